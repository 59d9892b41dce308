"""The varlink wire format, sans-IO: NUL-terminated JSON objects in both directions.

A `Decoder` is fed whatever bytes a socket produced and returns whole messages;
it never sees the socket, so the server, the CLI's client and the tests share
it. https://varlink.org/Method-Call
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

#: The largest message accepted. A bigger one is a protocol violation: no
#: varlink call of ours comes near it, and it bounds each connection's memory.
MAX_MESSAGE = 1 << 20


class ProtocolError(ValueError):
    """The peer did not speak varlink: the connection cannot be trusted any more."""


@dataclass(frozen=True)
class Call:
    method: str
    parameters: dict[str, Any] = field(default_factory=dict)
    more: bool = False
    oneway: bool = False
    upgrade: bool = False

    @property
    def interface(self) -> str:
        return self.method.rpartition(".")[0]

    @property
    def member(self) -> str:
        return self.method.rpartition(".")[2]

    def to_message(self) -> dict[str, Any]:
        msg: dict[str, Any] = {"method": self.method}
        if self.parameters:
            msg["parameters"] = self.parameters
        for flag in ("more", "oneway", "upgrade"):
            if getattr(self, flag):
                msg[flag] = True
        return msg


@dataclass(frozen=True)
class Reply:
    parameters: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    continues: bool = False

    def to_message(self) -> dict[str, Any]:
        msg: dict[str, Any] = {"parameters": self.parameters}
        if self.error is not None:
            msg["error"] = self.error
        if self.continues:
            msg["continues"] = True
        return msg


def encode(message: dict[str, Any]) -> bytes:
    # json.dumps escapes U+0000 inside strings, so the terminator cannot appear
    # inside a message.
    return json.dumps(message, separators=(",", ":")).encode() + b"\0"


class Decoder:
    """Split a byte stream into varlink messages."""

    def __init__(self, limit: int = MAX_MESSAGE) -> None:
        self._buf = bytearray()
        self._scanned = 0
        self._limit = limit

    @property
    def pending(self) -> int:
        """Bytes received that are not yet a whole message."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[bytes]:
        """The whole messages `data` completes, undecoded: `decode` each in turn, so that
        one that is not JSON does not take the ones before it down with it."""
        self._buf += data
        messages = []
        start = 0
        while (end := self._buf.find(b"\0", self._scanned)) != -1:
            if end - start > self._limit:
                raise ProtocolError(f"message over {self._limit} bytes")
            messages.append(bytes(self._buf[start:end]))
            start = self._scanned = end + 1
        del self._buf[:start]
        self._scanned = len(self._buf)
        if len(self._buf) > self._limit:
            raise ProtocolError(f"message over {self._limit} bytes")
        return messages


def decode(raw: bytes) -> dict[str, Any]:
    try:
        message = json.loads(raw)
    except (ValueError, RecursionError) as e:
        # ValueError: not UTF-8, not JSON, or an integer of more digits than Python
        # converts (sys.get_int_max_str_digits); RecursionError: nested too deep.
        raise ProtocolError(f"malformed JSON: {str(e)[:200]}") from None
    if not isinstance(message, dict):
        raise ProtocolError("a message must be a JSON object")
    return message


def parse_call(message: dict[str, Any]) -> Call:
    method = message.get("method")
    if not isinstance(method, str) or "." not in method:
        raise ProtocolError("a call needs 'method', a fully qualified method name")
    parameters = message.get("parameters", {})
    if parameters is None:
        parameters = {}
    if not isinstance(parameters, dict):
        raise ProtocolError("'parameters' must be an object")
    flags = {}
    for flag in ("more", "oneway", "upgrade"):
        value = message.get(flag, False)
        if not isinstance(value, bool):
            raise ProtocolError(f"'{flag}' must be a boolean")
        flags[flag] = value
    return Call(method, parameters, **flags)


def parse_reply(message: dict[str, Any]) -> Reply:
    parameters = message.get("parameters") or {}
    error = message.get("error")
    if not isinstance(parameters, dict) or not (error is None or isinstance(error, str)):
        raise ProtocolError("malformed reply")
    return Reply(parameters, error, bool(message.get("continues", False)))
