import inspect
from typing import Any

import pytest

from pullbackd import api, errors
from pullbackd.control import idl

SAMPLE = """
# A comment
interface org.example.test

type Colour (red, green, blue)
type Thing (name: string, tags: []string, extra: ?[string]int, colour: Colour,
             nested: (a: bool, b: ?float), anything: object)

method Do(thing: Thing, count: ?int) -> ()
error Failed (why: string)
"""


def test_parse_sample() -> None:
    iface = idl.parse(SAMPLE)
    assert iface.name == "org.example.test"
    assert iface.types["Colour"] == idl.Enum(("red", "green", "blue"))
    assert iface.methods["Do"].output == idl.Struct(())
    assert iface.errors["Failed"] == idl.Struct((("why", idl.Primitive("string")),))


GOOD = {"name": "x", "tags": ["a"], "colour": "red", "nested": {"a": True}, "anything": {}}


@pytest.mark.parametrize(("change", "path"), [
    ({"name": 1}, "thing.name"),
    ({"tags": ["a", 2]}, "thing.tags[1]"),
    ({"extra": {"k": "v"}}, "thing.extra['k']"),
    ({"colour": "mauve"}, "thing.colour"),
    ({"nested": {"a": 1}}, "thing.nested.a"),
    ({"nested": {"a": True, "b": True}}, "thing.nested.b"),
    ({"anything": []}, "thing.anything"),
    ({"surprise": 1}, "thing.surprise"),
])
def test_mismatch_names_the_path(change: dict[str, Any], path: str) -> None:
    iface = idl.parse(SAMPLE)
    method = iface.methods["Do"]
    idl.check_fields(iface, method.input, {"thing": GOOD})
    with pytest.raises(idl.Mismatch) as e:
        idl.check_fields(iface, method.input, {"thing": GOOD | change})
    assert e.value.path == path


@pytest.mark.parametrize(("count", "ok"), [
    ((1 << 63) - 1, True), (-(1 << 63), True), (1 << 63, False), (10**400, False)])
def test_an_int_has_64_bits(count: int, ok: bool) -> None:
    iface = idl.parse(SAMPLE)
    call = {"thing": GOOD, "count": count}
    if ok:
        idl.check_fields(iface, iface.methods["Do"].input, call)
    else:
        with pytest.raises(idl.Mismatch) as e:
            idl.check_fields(iface, iface.methods["Do"].input, call)
        assert e.value.path == "count"


def test_missing_and_optional_fields() -> None:
    iface = idl.parse(SAMPLE)
    method = iface.methods["Do"]
    idl.check_fields(iface, method.input, {"thing": GOOD, "count": None})
    with pytest.raises(idl.Mismatch, match="count"):
        idl.check_fields(iface, method.input, {"thing": GOOD, "count": True})
    with pytest.raises(idl.Mismatch, match="thing: missing"):
        idl.check_fields(iface, method.input, {})


@pytest.mark.parametrize("text", [
    "interface a.b\nmethod X( -> ()",
    "interface a.b\ntype T (a, b: int)",
    "interface a.b\nthing X ()",
    "interface a.b\ntype T ()\ntype T ()",
    "interface a.b\nmethod X() -> (a: int) !",
])
def test_syntax_errors(text: str) -> None:
    with pytest.raises(idl.SyntaxError_):
        idl.parse(text)


def test_shipped_interfaces_parse_and_every_named_type_exists() -> None:
    for name in ("org.varlink.service", api.INTERFACE):
        iface = api.interface(name)
        assert iface.name == name

        def walk(t: idl.Type, iface: idl.Interface = iface) -> None:
            match t:
                case idl.Named(n):
                    assert n in iface.types
                case idl.Maybe(i) | idl.Array(i) | idl.Dict(i):
                    walk(i)
                case idl.Struct(fields):
                    for _, ft in fields:
                        walk(ft)
        for m in iface.methods.values():
            walk(m.input)
            walk(m.output)


def test_every_pullback_error_is_declared_with_its_parameters() -> None:
    """errors.py and the interface must agree: each exception crosses the socket by name."""
    iface = api.interface(api.INTERFACE)
    service = api.interface("org.varlink.service")
    for cls in errors.PullbackError.__subclasses__():
        declared = service.errors if cls is errors.InvalidParameter else iface.errors
        assert cls.__name__ in declared, cls
        fields = [name for name, _ in declared[cls.__name__].fields]
        params = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
        if cls is errors.InvalidParameter:
            params = ["parameter"]
        assert params == fields, cls
