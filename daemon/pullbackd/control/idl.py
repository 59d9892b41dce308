"""Varlink interface definitions: parse the IDL text, and check values against it.

The `.varlink` files shipped in the package are the single source of truth for
the protocol: the server checks every call's parameters against them, the tests
check every reply against them, and `GetInterfaceDescription` serves them as
written. Grammar: https://varlink.org/Interface-Definition
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

PRIMITIVES = frozenset({"bool", "int", "float", "string", "object"})
#: varlink's int is 64 bits, signed.
INT_LIMIT = 1 << 63


@dataclass(frozen=True)
class Primitive:
    name: str


@dataclass(frozen=True)
class Named:
    name: str


@dataclass(frozen=True)
class Maybe:
    inner: Type


@dataclass(frozen=True)
class Array:
    inner: Type


@dataclass(frozen=True)
class Dict:
    inner: Type


@dataclass(frozen=True)
class Struct:
    fields: tuple[tuple[str, Type], ...]


@dataclass(frozen=True)
class Enum:
    values: tuple[str, ...]


Type = Primitive | Named | Maybe | Array | Dict | Struct | Enum


@dataclass(frozen=True)
class Method:
    name: str
    input: Struct
    output: Struct


@dataclass(frozen=True)
class Interface:
    name: str
    description: str
    types: dict[str, Struct | Enum]
    methods: dict[str, Method]
    errors: dict[str, Struct]


class SyntaxError_(ValueError):
    """The interface text is not valid varlink IDL."""


class Mismatch(ValueError):
    """A value does not have the type the interface declares.

    `path` names the offending value from the top of the message, e.g.
    ``disks[1]``; the server reports it as `InvalidParameter`'s parameter.
    """

    def __init__(self, path: str, why: str) -> None:
        super().__init__(f"{path}: {why}")
        self.path = path


_TOKEN = re.compile(
    r"\s+|#[^\n]*|(?P<tok>->|\[\]|\[string\]|[():,?]|[A-Za-z][A-Za-z0-9_.\-]*)"
)


def _tokenize(text: str) -> list[str]:
    tokens: list[str] = []
    pos = 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            raise SyntaxError_(f"unexpected {text[pos:pos + 10]!r} at offset {pos}")
        if m.group("tok"):
            tokens.append(m.group("tok"))
        pos = m.end()
    return tokens


class _Parser:
    def __init__(self, text: str) -> None:
        self.tokens = _tokenize(text)
        self.pos = 0

    def peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self, expected: str | None = None) -> str:
        tok = self.peek()
        if tok is None:
            raise SyntaxError_(f"unexpected end of interface, expected {expected or 'more'}")
        if expected is not None and tok != expected:
            raise SyntaxError_(f"expected {expected!r}, got {tok!r}")
        self.pos += 1
        return tok

    def type_(self) -> Type:
        tok = self.peek()
        if tok == "?":
            self.take()
            return Maybe(self.type_())
        if tok == "[]":
            self.take()
            return Array(self.type_())
        if tok == "[string]":
            self.take()
            return Dict(self.type_())
        if tok == "(":
            return self.struct_or_enum()
        name = self.take()
        return Primitive(name) if name in PRIMITIVES else Named(name)

    def struct_or_enum(self) -> Struct | Enum:
        self.take("(")
        fields: list[tuple[str, Type]] = []
        values: list[str] = []
        while self.peek() != ")":
            if fields or values:
                self.take(",")
            name = self.take()
            if self.peek() == ":":
                self.take()
                fields.append((name, self.type_()))
            else:
                values.append(name)
            if fields and values:
                raise SyntaxError_(f"{name!r}: a type is either a struct or an enum")
        self.take(")")
        return Enum(tuple(values)) if values else Struct(tuple(fields))

    def struct(self) -> Struct:
        s = self.struct_or_enum()
        if not isinstance(s, Struct):
            raise SyntaxError_("expected a struct, got an enum")
        return s


def parse(text: str) -> Interface:
    p = _Parser(text)
    p.take("interface")
    name = p.take()
    types: dict[str, Struct | Enum] = {}
    methods: dict[str, Method] = {}
    errors: dict[str, Struct] = {}
    while (kind := p.peek()) is not None:
        p.take()
        member = p.take()
        if member in types or member in methods or member in errors:
            raise SyntaxError_(f"{member!r} is declared twice")
        if kind == "type":
            types[member] = p.struct_or_enum()
        elif kind == "method":
            inp = p.struct()
            p.take("->")
            methods[member] = Method(member, inp, p.struct())
        elif kind == "error":
            errors[member] = p.struct()
        else:
            raise SyntaxError_(f"expected type, method or error, got {kind!r}")
    return Interface(name, text, types, methods, errors)


def check(iface: Interface, typ: Type, value: Any, path: str) -> None:
    """Raise `Mismatch` unless `value` (decoded JSON) has type `typ`."""
    match typ:
        case Maybe(inner):
            if value is not None:
                check(iface, inner, value, path)
        case Primitive("bool"):
            _expect(isinstance(value, bool), path, "expected a boolean")
        case Primitive("int"):
            ok = isinstance(value, int) and not isinstance(value, bool)
            _expect(ok, path, "expected an integer")
            _expect(-INT_LIMIT <= value < INT_LIMIT, path, "over 64 bits")
        case Primitive("float"):
            ok = isinstance(value, int | float) and not isinstance(value, bool)
            _expect(ok, path, "expected a number")
        case Primitive("string"):
            _expect(isinstance(value, str), path, "expected a string")
        case Primitive("object"):
            _expect(isinstance(value, dict), path, "expected an object")
        case Named(name):
            if name not in iface.types:
                raise Mismatch(path, f"type {name} is not declared in {iface.name}")
            check(iface, iface.types[name], value, path)
        case Array(inner):
            _expect(isinstance(value, list), path, "expected an array")
            for i, item in enumerate(value):
                check(iface, inner, item, f"{path}[{i}]")
        case Dict(inner):
            _expect(isinstance(value, dict), path, "expected an object")
            for key, item in value.items():
                check(iface, inner, item, f"{path}[{key!r}]")
        case Enum(values):
            _expect(isinstance(value, str) and value in values, path, f"expected one of {values}")
        case Struct():
            _expect(isinstance(value, dict), path, "expected an object")
            check_fields(iface, typ, value, prefix=f"{path}.")
        case _:
            raise Mismatch(path, f"unknown type {typ}")


def check_fields(iface: Interface, struct: Struct, value: dict[str, Any], prefix: str = "") -> None:
    """Check an object's fields: each declared one has its type, no others are present.

    A field of a maybe type may be absent or null; any other must be there.
    """
    declared = dict(struct.fields)
    for key in value:
        if key not in declared:
            raise Mismatch(f"{prefix}{key}", "not a field of this type")
    for key, typ in struct.fields:
        if key not in value:
            if not isinstance(typ, Maybe):
                raise Mismatch(f"{prefix}{key}", "missing")
            continue
        check(iface, typ, value[key], f"{prefix}{key}")


def _expect(ok: bool, path: str, why: str) -> None:
    if not ok:
        raise Mismatch(path, why)
