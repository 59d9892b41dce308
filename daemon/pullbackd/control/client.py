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
#: Times a call is sent again, each on a new connection, when the service closed the one
#: it went on with the call unread (see `Client.call`).
RESENDS = 3


class Client:
    def __init__(self, path: Path | str, timeout: float | None = None) -> None:
        """Connect to the service at `path`. `timeout`: seconds to wait for the
        connection, and then for each reply (TimeoutError); None: no limit."""
        self._path, self._connect_timeout = str(path), timeout
        self._sock = self._connected()
        self._decoder = Decoder()
        self._pending: list[dict[str, Any]] = []

    def _connected(self) -> socket.socket:
        """A new connection, within the timeout. With one, a Unix socket whose backlog is
        full refuses at once (EAGAIN) rather than waiting for room as a blocking connect
        does: tried again until the time is up, then TimeoutError."""
        timeout = self._connect_timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            while True:
                try:
                    sock.connect(self._path)
                    return sock
                except BlockingIOError:
                    if deadline is None or (left := deadline - time.monotonic()) <= 0:
                        raise TimeoutError(f"{self._path}: the backlog of connections to "
                                           f"accept stayed full for {timeout} s") from None
                    time.sleep(min(BACKLOG_RETRY, left))
        except BaseException:
            sock.close()
            raise

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
        """Call a method and return its reply's parameters; raise VarlinkError on an error.

        A call the service never read is sent again, on a new connection (RESENDS times at
        most): on a Unix socket, EPIPE as it is sent, or ECONNRESET before its reply, says
        the service closed the connection with the call in it, unread (a run stopping as
        systemd restarts pullbackd: the next run takes the new connection). A connection
        closed once the call was read raises ConnectionError: it may have been done.
        """
        message = encode(Call(method, parameters).to_message())
        self._send(message)
        return next(self._replies(message))

    def stream(self, method: str, **parameters: Any) -> Iterator[dict[str, Any]]:
        """Call a method with `more` (sent before this returns) and iterate its replies
        (sent again as `call` says, until the first one comes)."""
        message = encode(Call(method, parameters, more=True).to_message())
        self._send(message)
        return self._replies(message)

    def _send(self, message: bytes) -> None:
        for _ in range(RESENDS):
            try:
                return self._sock.sendall(message)
            except BrokenPipeError:
                self._reconnect()
        self._sock.sendall(message)

    def _first(self, message: bytes) -> dict[str, Any]:
        for _ in range(RESENDS):
            try:
                return self._receive()
            except ConnectionResetError:
                if self._decoder.pending:
                    raise
            self._reconnect()
            self._send(message)
        return self._receive()

    def _reconnect(self) -> None:
        timeout = self._sock.gettimeout()
        self._sock.close()
        self._sock = self._connected()
        self._sock.settimeout(timeout)
        self._decoder = Decoder()

    def _replies(self, message: bytes) -> Iterator[dict[str, Any]]:
        reply = parse_reply(self._first(message))
        while True:
            if reply.error is not None:
                raise VarlinkError(reply.error, reply.parameters)
            yield reply.parameters
            if not reply.continues:
                return
            reply = parse_reply(self._receive())

    def _receive(self) -> dict[str, Any]:
        while not self._pending:
            data = self._sock.recv(65536)
            if not data:
                raise ConnectionError("the service closed the connection")
            self._pending.extend(decode(frame) for frame in self._decoder.feed(data))
        return self._pending.pop(0)
