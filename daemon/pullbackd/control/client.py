"""A small blocking varlink client over a Unix socket, for pullbackctl and the tests."""

from __future__ import annotations

import contextlib
import socket
import time
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


#: Seconds between two tries to connect while the listener's backlog is full.
BACKLOG_RETRY = 0.05


class Client:
    def __init__(self, path: Path | str, timeout: float | None = None) -> None:
        """Connect to the service at `path`. `timeout`: seconds to wait for the
        connection, and then for each reply (TimeoutError); None: no limit."""
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            self._connect(str(path), timeout)
        except BaseException:
            self._sock.close()
            raise
        self._decoder = Decoder()
        self._pending: list[dict[str, Any]] = []

    def _connect(self, path: str, timeout: float | None) -> None:
        """Connect within `timeout`. With one, a Unix socket whose backlog is full refuses
        at once (EAGAIN) rather than waiting for room as a blocking connect does: tried
        again until the time is up, then TimeoutError."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                self._sock.connect(path)
                return
            except BlockingIOError:
                if deadline is None or (left := deadline - time.monotonic()) <= 0:
                    raise TimeoutError(f"{path}: the backlog of connections to accept stayed "
                                       f"full for {timeout} s") from None
                time.sleep(min(BACKLOG_RETRY, left))

    @property
    def timeout(self) -> float | None:
        """Seconds to wait for each reply from now on; None: no limit."""
        return self._sock.gettimeout()

    @timeout.setter
    def timeout(self, seconds: float | None) -> None:
        self._sock.settimeout(seconds)

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
