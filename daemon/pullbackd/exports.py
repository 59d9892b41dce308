"""pullbackd's own NBD endpoints: one Unix socket per pull job, relayed to QEMU.

QEMU's NBD server for a job listens on `<exports>/.qemu/<id>.sock`, in a folder
only pullbackd and the QEMU user can enter. Appliances connect to the job's
endpoint `<exports>/<id>.sock` instead, and each connection is relayed to QEMU
byte for byte: the appliance cannot tell the difference, and pullbackd knows
every session (who, which disk, when, how much was read), can limit them, and
can close them.

The relay reads the client's side with `handshake.Sniffer` (small: options,
then 28-byte requests) and moves QEMU's side, the data, with splice(2) through
a pipe, so the payload never enters Python.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import grp
import os
import pwd
import socket
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

import anyio
import structlog

from .handshake import Refusal, Sniffer

log = structlog.get_logger()

#: Bytes moved per splice(2); the pipe is grown to hold as much.
CHUNK = 1 << 20
_PEERCRED = struct.Struct("3i")


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class Session:
    """One client connection to a job's endpoint."""

    id: int
    #: Who: "pid P uid U gid G" for a Unix socket.
    peer: str
    started: str
    #: The export (disk) it opened, once it did.
    disk: str | None = None
    ended: str | None = None
    #: Bytes the client asked to read.
    bytes_read: int = 0


#: A session opened (ended is None) or closed.
OnSession = Callable[[str, Session], None]


class Endpoint:
    """One job's socket and its sessions."""

    def __init__(self, job_id: str, path: Path, upstream: Path, limit: int,
                 on_session: OnSession, past: tuple[Session, ...] = ()) -> None:
        self.job_id = job_id
        self.path = path
        self.upstream = upstream
        self.limit = limit
        self._on_session = on_session
        self._past = list(past)
        self._live: dict[int, tuple[Session, Sniffer]] = {}
        self._next_id = max((s.id for s in past), default=0) + 1
        self._idle_since = time.monotonic()
        self._idle_wall = now()
        self._changed = anyio.Event()
        self._scope = anyio.CancelScope()
        self._over = anyio.Event()

    # What Get shows.

    @property
    def active(self) -> int:
        return len(self._live)

    @property
    def idle_since(self) -> str | None:
        return None if self._live else self._idle_wall

    def sessions(self) -> list[Session]:
        live = [replace(s, disk=sniffer.export or s.disk, bytes_read=sniffer.read)
                for s, sniffer in self._live.values()]
        return sorted(self._past + live, key=lambda s: s.id)

    # Lifetime.

    async def serve(self, listener: socket.socket,
                    *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
                    ) -> None:
        """Accept and relay until closed; every session ends with it."""
        with self._scope, listener, _setting(self._over):
            async with anyio.create_task_group() as tg:
                task_status.started()
                while True:
                    await anyio.wait_readable(listener)
                    try:
                        client, _ = listener.accept()
                    except (BlockingIOError, InterruptedError):
                        continue
                    client.setblocking(False)
                    if len(self._live) >= self.limit:
                        tg.start_soon(self._refuse, client)
                    else:
                        tg.start_soon(self._session, client)

    async def close(self) -> None:
        """Stop accepting and cut every session at once (Abort, the job's end)."""
        self._scope.cancel()
        await self._over.wait()

    async def idle_for(self, seconds: float) -> None:
        """Return once no session has been open for `seconds` in a row."""
        while True:
            changed = self._changed
            if self._live:
                await changed.wait()
                continue
            with anyio.move_on_after(self._idle_since + seconds - time.monotonic()):
                await changed.wait()
                continue
            return

    async def drained(self) -> None:
        """Return once no session is open."""
        while self._live:
            await self._changed.wait()

    # Sessions.

    async def _session(self, client: socket.socket) -> None:
        session = Session(self._next_id, _peer(client), now())
        self._next_id += 1
        sniffer = Sniffer()
        self._live[session.id] = (session, sniffer)
        self._changed_now()
        self._on_session(self.job_id, session)
        log.info("nbd session opened", job=self.job_id, session=session.id, peer=session.peer)
        errors: list[str] = []
        try:
            with client, socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as qemu:
                try:
                    await anyio.to_thread.run_sync(qemu.connect, str(self.upstream))
                except OSError as e:
                    errors.append(f"cannot reach QEMU's NBD server: {e}")
                    return
                qemu.setblocking(False)
                async with anyio.create_task_group() as tg:
                    tg.start_soon(_upstream, client, qemu, sniffer, tg.cancel_scope, errors)
                    tg.start_soon(_downstream, qemu, client, tg.cancel_scope, errors)
        finally:
            del self._live[session.id]
            ended = replace(session, disk=sniffer.export, ended=now(), bytes_read=sniffer.read)
            self._past.append(ended)
            self._idle_since, self._idle_wall = time.monotonic(), now()
            self._changed_now()
            self._on_session(self.job_id, ended)
            log.info("nbd session closed", job=self.job_id, session=session.id,
                     disk=ended.disk, bytes_read=ended.bytes_read, error="; ".join(errors) or None)

    async def _refuse(self, client: socket.socket) -> None:
        refusal = Refusal(f"this backup already has {self.limit} connections, the limit: "
                          "close one first")
        log.warning("nbd connection refused: limit reached", job=self.job_id,
                    peer=_peer(client), limit=self.limit)
        with client, anyio.move_on_after(10):
            try:
                await _send_all(client, refusal.greeting())
                while not refusal.done:
                    await anyio.wait_readable(client)
                    data = client.recv(4096)
                    if not data:
                        break
                    await _send_all(client, refusal.feed(data))
            except OSError:
                pass

    def _changed_now(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()


async def _upstream(client: socket.socket, qemu: socket.socket, sniffer: Sniffer,
                    scope: anyio.CancelScope, errors: list[str]) -> None:
    """Client to QEMU: options and requests, read as they pass."""
    try:
        while True:
            await anyio.wait_readable(client)
            try:
                data = client.recv(256 << 10)
            except (BlockingIOError, InterruptedError):
                continue
            if not data:
                qemu.shutdown(socket.SHUT_WR)
                return
            sniffer.feed(data)
            await _send_all(qemu, data)
    except OSError as e:
        errors.append(str(e))
        scope.cancel()  # one side gone: the session is over


async def _downstream(qemu: socket.socket, client: socket.socket,
                      scope: anyio.CancelScope, errors: list[str]) -> None:
    """QEMU to client: replies and data, spliced through a pipe."""
    read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        with contextlib.suppress(OSError):  # a smaller pipe only means more calls
            fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, CHUNK)
        flags = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
        while True:
            try:
                n = os.splice(qemu.fileno(), write_end, CHUNK, flags=flags)
            except (BlockingIOError, InterruptedError):
                await anyio.wait_readable(qemu)
                continue
            if n == 0:
                client.shutdown(socket.SHUT_WR)
                # QEMU closed: nothing more can come, so the client is done too.
                scope.cancel()
                return
            while n:
                try:
                    n -= os.splice(read_end, client.fileno(), n, flags=flags)
                except (BlockingIOError, InterruptedError):
                    await anyio.wait_writable(client)
    except OSError as e:
        if e.errno not in (errno.EPIPE, errno.ECONNRESET):
            errors.append(str(e))
        scope.cancel()  # one side gone: the session is over
    finally:
        os.close(read_end)
        os.close(write_end)


async def _send_all(sock: socket.socket, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[sock.send(view):]
        except (BlockingIOError, InterruptedError):
            await anyio.wait_writable(sock)


@contextlib.contextmanager
def _setting(event: anyio.Event) -> Iterator[None]:
    try:
        yield
    finally:
        event.set()


def _peer(sock: socket.socket) -> str:
    try:
        pid, uid, gid = _PEERCRED.unpack(
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
    except OSError:
        return "unknown"
    return f"pid {pid} uid {uid} gid {gid}"


def listen(path: Path, mode: int, gid: int | None) -> socket.socket:
    """Bind a job's endpoint, replacing what a crash left at its (deterministic) path."""
    path.unlink(missing_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(str(path))
        os.chmod(path, mode)
        if gid is not None:
            os.chown(path, -1, gid)
        sock.listen(64)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        path.unlink(missing_ok=True)
        raise
    return sock


class Exports:
    """Every job's endpoint, and the private folder QEMU's servers listen in."""

    def __init__(self, dir: Path, *, mode: int = 0o660, group: str = "", qemu_user: str = "",
                 limit: int = 8) -> None:
        self.dir = dir
        self.private = dir / ".qemu"
        self._mode = mode
        self._gid = grp.getgrnam(group).gr_gid if group else None
        self._qemu_uid = pwd.getpwnam(qemu_user).pw_uid if qemu_user else None
        self.limit = limit
        self._endpoints: dict[str, Endpoint] = {}

    def prepare(self) -> None:
        """Create the folders: QEMU's is for QEMU and us alone (root reaches it anyway)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        self.private.mkdir(mode=0o700, exist_ok=True)
        os.chmod(self.private, 0o700)
        if self._qemu_uid is not None:
            os.chown(self.private, self._qemu_uid, -1)

    def endpoint_path(self, job_id: str) -> Path:
        return self.dir / f"{job_id}.sock"

    def qemu_path(self, job_id: str) -> Path:
        return self.private / f"{job_id}.sock"

    def get(self, job_id: str) -> Endpoint | None:
        return self._endpoints.get(job_id)

    async def open(self, job_id: str, tg: anyio.abc.TaskGroup, on_session: OnSession,
                   past: tuple[Session, ...] = ()) -> Endpoint:
        path = self.endpoint_path(job_id)
        listener = await anyio.to_thread.run_sync(listen, path, self._mode, self._gid)
        endpoint = Endpoint(job_id, path, self.qemu_path(job_id), self.limit, on_session, past)
        self._endpoints[job_id] = endpoint
        await tg.start(endpoint.serve, listener)
        return endpoint

    async def close(self, job_id: str) -> Endpoint | None:
        """Cut the job's sessions and remove its socket; the endpoint, if it was open."""
        endpoint = self._endpoints.pop(job_id, None)
        if endpoint is not None:
            await endpoint.close()
        await anyio.Path(self.endpoint_path(job_id)).unlink(missing_ok=True)
        return endpoint
