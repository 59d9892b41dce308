"""A small blocking varlink client over a Unix socket, for pullbackctl and the tests."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .codec import Call, Decoder, decode, encode, parse_reply


class VarlinkError(Exception):
    """The service answered with an error."""

    def __init__(self, name: str, parameters: dict[str, Any]) -> None:
        super().__init__(f"{name} {parameters}")
        self.name = name
        self.parameters = parameters

    @property
    def short_name(self) -> str:
        return self.name.rpartition(".")[2]


class Client:
    def __init__(self, path: Path | str, timeout: float | None = None) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        self._sock.connect(str(path))
        self._decoder = Decoder()
        self._pending: list[dict[str, Any]] = []

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        """Hang up; a thread waiting for a reply wakes up with ConnectionError."""
        with contextlib.suppress(OSError):  # not connected (any more)
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()

    def call(self, method: str, **parameters: Any) -> dict[str, Any]:
        """Call a method and return its reply's parameters; raise VarlinkError on an error."""
        self._sock.sendall(encode(Call(method, parameters).to_message()))
        return next(self._replies())

    def stream(self, method: str, **parameters: Any) -> Iterator[dict[str, Any]]:
        """Call a method with `more` (sent before this returns) and iterate its replies."""
        self._sock.sendall(encode(Call(method, parameters, more=True).to_message()))
        return self._replies()

    def _replies(self) -> Iterator[dict[str, Any]]:
        while True:
            reply = parse_reply(self._receive())
            if reply.error is not None:
                raise VarlinkError(reply.error, reply.parameters)
            yield reply.parameters
            if not reply.continues:
                return

    def _receive(self) -> dict[str, Any]:
        while not self._pending:
            data = self._sock.recv(65536)
            if not data:
                raise ConnectionError("the service closed the connection")
            self._pending.extend(decode(frame) for frame in self._decoder.feed(data))
        return self._pending.pop(0)
