"""Who gets a session on a job's endpoints, against qemu-nbd standing in for QEMU (no
lab): the connection limit holds for remote clients waiting for room; a client waiting
when the endpoint closes or hands off is refused, and the close or hand-off ends; a
client of an endpoint that is done, a reset from QEMU, running out of descriptors on the
TCP endpoint end that connection alone; only our own export names are recorded; a client
that has opened no export by the handshake deadline is cut, one that has may wait; a flood
of connections holds a bounded number of descriptors and log entries; a QEMU that accepts
nothing holds no worker thread; a client that leaves before QEMU took what it sent costs no
CPU meanwhile."""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import anyio
import pytest

from pullbackd import exports as exporting
from pullbackd import handshake as hs
from pullbackd.exports import Endpoint, Exports
from pullbackd.model import Handed, Session
from pullbackd.remote import Remote
from pullbackd.roles import Role, Roles

from .test_handoff import qemu_nbd

pytestmark = pytest.mark.asyncio

JOB = "aaaaaaaaaaaa"
TOKEN = "vda-0123456789abcdef0123456789abcdef"
SIZE = 4 << 20
BYTE = 0x5A
REP_INFO = 3
MiB = 1 << 20
T = TypeVar("T")


class Client:
    """A blocking NBD client on a raw socket (run its calls in a thread)."""

    def __init__(self, sock: socket.socket) -> None:
        self.s = sock
        self.s.settimeout(20)

    @classmethod
    def unix(cls, path: Path) -> Client:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(path))
        return cls(s)

    @classmethod
    def tcp(cls, port: int) -> Client:
        return cls(socket.create_connection(("127.0.0.1", port)))

    def exactly(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            data = self.s.recv(n - len(out))
            if not data:
                raise EOFError(f"closed after {len(out)} of {n} bytes")
            out += data
        return out

    def greet(self) -> None:
        magic, opt, _ = hs.GREETING.unpack(self.exactly(hs.GREETING.size))
        assert (magic, opt) == (hs.NBDMAGIC, hs.IHAVEOPT)
        self.s.sendall(struct.pack(">I", 3))

    def send_go(self, name: bytes = TOKEN.encode(), option: int = hs.OPT_GO) -> None:
        data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
        self.s.sendall(struct.pack(">QII", hs.IHAVEOPT, option, len(data)) + data)

    def go_reply(self) -> tuple[int, bytes]:
        """The final reply to GO (or any option), and its data."""
        while True:
            magic, _, reply, length = hs.REPLY.unpack(self.exactly(hs.REPLY.size))
            assert magic == hs.REPLY_MAGIC
            data = self.exactly(length)
            if reply != REP_INFO:
                return reply, data

    def open(self) -> None:
        self.greet()
        self.send_go()
        assert self.go_reply()[0] == hs.REP_ACK

    def read(self, offset: int, length: int) -> bytes:
        self.s.sendall(struct.pack(">IHHQQI", hs.REQUEST_MAGIC, 0, hs.CMD_READ, 1, offset,
                                   length))
        magic, error, _ = struct.unpack(">IIQ", self.exactly(16))
        assert (magic, error) == (0x67446698, 0)
        return self.exactly(length)

    def close(self) -> None:
        self.s.close()


async def call(fn: Callable[..., T], *args: object) -> T:
    return await anyio.to_thread.run_sync(fn, *args)


async def unrecorded(handed: Handed) -> None:
    """A hand-off's records, not kept: these tests pass on what it returns."""


#: Seconds a hand-off here may take: nothing holds a session up.
HANDOFF = 20.0


def serving(image: Path, sock: Path) -> subprocess.Popen[bytes]:
    """qemu-nbd serving `image` read-only as TOKEN on `sock`, once it listens."""
    return qemu_nbd(image, TOKEN, sock)


def serving_slowly(sock: Path, seconds: int) -> subprocess.Popen[bytes]:
    """nbdkit serving its pattern plugin's 16 MiB on `sock` (any export name), opening the
    export `seconds` after each client asked, once it listens."""
    nbdkit = subprocess.Popen(["nbdkit", "-f", "-r", "-U", str(sock), "--filter=delay",
                               "pattern", "16M", f"delay-open={seconds}"])
    deadline = time.monotonic() + 30
    while not sock.exists():
        assert nbdkit.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    return nbdkit


def connecting_later(port: int) -> subprocess.Popen[bytes]:
    """Another process that connects to `port` in half a second, and stays a while."""
    return subprocess.Popen(["python3", "-c", f"""
import socket, time
time.sleep(0.5)
c = socket.create_connection(("127.0.0.1", {port}))
time.sleep(2)
"""])


@dataclass
class Setup:
    exports: Exports
    endpoint: Endpoint
    remote: Remote
    qemu: subprocess.Popen[bytes]


@asynccontextmanager
async def endpoint(tmp_path: Path, limit: int, handshake_timeout: float = 5.0
                   ) -> AsyncIterator[Setup]:
    """A job's endpoints (Unix and, without TLS, TCP) before a qemu-nbd serving SIZE
    bytes of BYTE as export TOKEN."""
    exports = Exports(tmp_path / "exports", limit=limit, handshake_timeout=handshake_timeout)
    exports.prepare()
    image = tmp_path / "disk.raw"
    image.write_bytes(bytes([BYTE]) * SIZE)
    qemu = serving(image, exports.qemu_path(JOB))
    try:
        async with anyio.create_task_group() as tg:
            opened = await exports.open(JOB, {TOKEN: "vda"}, tg, lambda job, session: None)
            remote = Remote(exports, "127.0.0.1", 0, None)
            await tg.start(remote.serve)
            yield Setup(exports, opened, remote, qemu)
            tg.cancel_scope.cancel()
    finally:
        qemu.terminate()
        qemu.wait()


async def waiting_remote(setup: Setup) -> Client:
    """A remote client that named the export, waiting for room."""
    client = await call(Client.tcp, setup.remote.port)
    await call(client.greet)
    await call(client.send_go)
    return client


async def test_remote_clients_waiting_for_room_never_exceed_the_limit(tmp_path: Path) -> None:
    async with endpoint(tmp_path, limit=1) as setup:
        first = await call(Client.unix, setup.exports.endpoint_path(JOB))
        await call(first.open)
        waiting = [await waiting_remote(setup) for _ in range(3)]
        await anyio.sleep(0.3)
        first.close()  # one place frees: one waiter gets it
        replies = [(await call(c.go_reply))[0] for c in waiting]
        assert sorted(replies) == sorted([hs.REP_ERR_POLICY, hs.REP_ERR_POLICY, hs.REP_ACK])
        served = waiting[replies.index(hs.REP_ACK)]
        assert await call(served.read, MiB, 64 << 10) == bytes([BYTE]) * (64 << 10)
        assert setup.endpoint.active == 1
        for c in waiting:
            c.close()


@pytest.mark.parametrize("ending", ["close", "hand_off"])
async def test_a_client_waiting_for_room_is_refused_when_the_endpoint_ends(
        tmp_path: Path, ending: str) -> None:
    """An Abort (close) or a restart (hand_off) while a remote client waits for the only
    place: the waiter is told the endpoint closes, and the close or hand-off returns
    (it waited for ever on the session the waiter got)."""
    async with endpoint(tmp_path, limit=1) as setup:
        first = await call(Client.unix, setup.exports.endpoint_path(JOB))
        await call(first.open)
        assert await call(first.read, 0, 64 << 10) == bytes([BYTE]) * (64 << 10)
        waiter = await waiting_remote(setup)
        await anyio.sleep(0.3)
        with anyio.fail_after(20):
            if ending == "close":
                await setup.endpoint.close()
            else:
                handed = await setup.endpoint.hand_off(lambda name, fds: None, unrecorded,
                                                       HANDOFF)
                assert len(handed) == 1  # the open session, paused
        reply, message = await call(waiter.go_reply)
        assert (reply, message) == (hs.REP_ERR_POLICY, b"this backup's endpoint is closing "
                                    b"(the job ended, or the daemon restarts)")
        assert setup.endpoint.active == 0
        first.close()
        waiter.close()


async def test_a_connection_made_as_the_endpoint_hands_off_waits_for_the_next_run(
        tmp_path: Path) -> None:
    """A client that connects as the endpoint hands off (the accept loop had seen it, and
    the hand-off's cancel let that loop run on) stays in the listening socket's backlog,
    which goes to the next run: it was accepted, then refused as the endpoint was closing,
    when the next run would have served it."""
    async with endpoint(tmp_path, limit=4) as setup:
        await anyio.sleep(0.1)  # the accept loop waits
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(str(setup.exports.endpoint_path(JOB)))
            # One turn of the loop sees the connection; the hand-off comes in the next.
            await anyio.lowlevel.checkpoint()
            await anyio.lowlevel.checkpoint()
            kept: list[int] = []  # what systemd would keep of the fd store
            with anyio.fail_after(20):
                handed = await setup.endpoint.hand_off(
                    lambda name, fds: kept.extend(os.dup(fd) for fd in fds), unrecorded,
                    HANDOFF)
            assert handed == []
            client.setblocking(False)
            with pytest.raises(BlockingIOError):
                client.recv(1)  # told nothing, and not closed
            with socket.socket(fileno=kept[0]) as listener:
                listener.setblocking(False)
                listener.accept()[0].close()  # the next run's to take


class SlowRoles(Roles):
    """[roles] whose lookups take ROLE_LOOKUP seconds (NSS asking a slow directory), each
    setting LOOKING_UP as it begins."""

    def of(self, uid: int, gid: int) -> Role:
        LOOKING_UP.set()
        time.sleep(ROLE_LOOKUP)
        return super().of(uid, gid)


ROLE_LOOKUP = 0.5
LOOKING_UP = threading.Event()


async def test_a_connection_admitted_as_the_endpoint_hands_off_goes_to_the_next_run(
        tmp_path: Path) -> None:
    """A connection the endpoint had accepted, still in its admission (its role looked up)
    as the daemon hands off, goes to the next run with the open sessions, which serves it:
    it was refused ("the daemon restarts"), and its appliance had to connect again."""
    exports = Exports(tmp_path / "exports", limit=4, roles=SlowRoles())
    exports.prepare()
    image = tmp_path / "disk.raw"
    image.write_bytes(bytes([BYTE]) * SIZE)
    qemu = serving(image, exports.qemu_path(JOB))
    kept: dict[str, int] = {}  # systemd keeps copies of what is stored
    try:
        with socket.socket(socket.AF_UNIX) as sock:
            async with anyio.create_task_group() as tg:
                endpoint = await exports.open(JOB, {TOKEN: "vda"}, tg, lambda j, s: None)
                LOOKING_UP.clear()
                sock.connect(str(exports.endpoint_path(JOB)))
                # Accepted: its role is being looked up as the hand-off comes.
                assert await anyio.to_thread.run_sync(LOOKING_UP.wait, 10)
                with anyio.fail_after(20):
                    handed = await endpoint.hand_off(
                        lambda name, fds: kept.__setitem__(name, os.dup(fds[0])), unrecorded,
                        HANDOFF)
                tg.cancel_scope.cancel()
            assert [h.sniffer["opened"] for h in handed] == [False]
            client = Client(sock)
            following = Exports(tmp_path / "exports", limit=4, handshake_timeout=5.0)
            following.inherit(kept, handed)
            async with anyio.create_task_group() as tg:
                await following.open(JOB, {TOKEN: "vda"}, tg, lambda j, s: None)
                await call(client.open)
                assert await call(client.read, 0, 4096) == bytes([BYTE]) * 4096
                tg.cancel_scope.cancel()
    finally:
        qemu.terminate()
        qemu.wait()


async def test_a_client_of_an_endpoint_that_is_done_is_refused(tmp_path: Path) -> None:
    """An endpoint handed off is still found by its export name until every endpoint is:
    a remote client naming it is refused, and the daemon serves on."""
    async with endpoint(tmp_path, limit=1) as setup:
        await setup.endpoint.hand_off(lambda name, fds: None, unrecorded, HANDOFF)
        client = await waiting_remote(setup)
        assert (await call(client.go_reply))[0] == hs.REP_ERR_POLICY
        client.close()


async def test_a_reset_from_qemu_as_a_remote_session_connects_ends_it_alone(
        tmp_path: Path) -> None:
    """Client flags QEMU does not know, replayed to it: it hangs up on the session as it
    connects; that session ends, the next one reads."""
    async with endpoint(tmp_path, limit=4) as setup:
        for _ in range(5):
            bad = await call(Client.tcp, setup.remote.port)
            await call(bad.exactly, hs.GREETING.size)
            await call(bad.s.sendall, struct.pack(">I", 0xFFFFFFFF))
            await call(bad.send_go)
            with pytest.raises((EOFError, ConnectionError)):
                await call(bad.go_reply)
            bad.close()
        good = await waiting_remote(setup)
        assert (await call(good.go_reply))[0] == hs.REP_ACK
        assert await call(good.read, 3 * MiB, 4096) == bytes([BYTE]) * 4096
        good.close()


async def test_running_out_of_descriptors_on_the_tcp_endpoint_is_waited_out(
        tmp_path: Path) -> None:
    async with endpoint(tmp_path, limit=1) as setup:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        filler: list[int] = []
        # The client's own socket needs a descriptor: it comes from another process.
        child = connecting_later(setup.remote.port)
        try:
            top = max(int(fd) for fd in os.listdir("/proc/self/fd"))
            resource.setrlimit(resource.RLIMIT_NOFILE, (top + 1, hard))
            while True:
                try:
                    filler.append(os.open("/dev/null", os.O_RDONLY))
                except OSError:
                    break
            await anyio.sleep(1.5)  # the endpoint cannot accept it: EMFILE
        finally:
            for fd in filler:
                os.close(fd)
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        await call(child.wait)
        client = await waiting_remote(setup)  # the endpoint serves on
        assert (await call(client.go_reply))[0] == hs.REP_ACK
        assert await call(client.read, 0, 4096) == bytes([BYTE]) * 4096
        client.close()


async def test_only_our_export_names_are_recorded(tmp_path: Path) -> None:
    """A name QEMU refused is not the session's disk (it would be kept in the job's
    record and in what Get and Watch show, 8 KiB at a time)."""
    async with endpoint(tmp_path, limit=4) as setup:
        stray = await call(Client.unix, setup.exports.endpoint_path(JOB))
        await call(stray.greet)
        await call(stray.send_go, b"\xff" * 4000)
        assert (await call(stray.go_reply))[0] != hs.REP_ACK
        stray.close()
        reader = await call(Client.unix, setup.exports.endpoint_path(JOB))
        await call(reader.open)
        assert await call(reader.read, 0, 4096) == bytes([BYTE]) * 4096
        reader.close()
        with anyio.fail_after(20):
            await setup.endpoint.drained()
        assert [(s.disk, s.bytes_read) for s in setup.endpoint.sessions()] == \
            [(None, 0), ("vda", 4096)]


@pytest.mark.parametrize("asked", ["nothing", "info", "a go refused", "starttls",
                                   "a request's magic"])
async def test_a_client_that_opens_no_export_is_cut_at_the_deadline(
        tmp_path: Path, asked: str) -> None:
    """An INFO or a GO names an export, but only a GO that QEMU accepted opens one; after
    a STARTTLS QEMU refused (it has no TLS), the session goes on in the clear and is
    followed. Each is cut once the deadline passes; the daemon serves on."""
    async with endpoint(tmp_path, limit=4, handshake_timeout=1.0) as setup:
        idle = await call(Client.unix, setup.exports.endpoint_path(JOB))
        await call(idle.greet)
        if asked == "a request's magic":  # once enough to open an export
            await call(idle.s.sendall, struct.pack(">I", hs.REQUEST_MAGIC))
        elif asked != "nothing":
            name, option = {"info": (TOKEN.encode(), hs.OPT_INFO),
                            "a go refused": (b"vda", hs.OPT_GO),
                            "starttls": (b"", hs.OPT_STARTTLS)}[asked]
            if option == hs.OPT_STARTTLS:
                await call(idle.s.sendall, hs.OPTION.pack(hs.IHAVEOPT, option, 0))
            else:
                await call(idle.send_go, name, option)
            reply = (await call(idle.go_reply))[0]
            assert (reply == hs.REP_ACK) == (option == hs.OPT_INFO)  # the rest, refused
        with anyio.fail_after(10):
            await setup.endpoint.drained()
        with pytest.raises((EOFError, ConnectionError)):
            await call(idle.exactly, 1)
        idle.close()
        reader = await call(Client.unix, setup.exports.endpoint_path(JOB))
        await call(reader.open)
        assert await call(reader.read, 0, 4096) == bytes([BYTE]) * 4096
        reader.close()


async def test_the_handshake_timeout_does_not_count_qemus_time(tmp_path: Path) -> None:
    """A client that sent its GO at once, to a QEMU that takes longer than the handshake
    timeout to open the export (nbdkit's delay filter stands in for a busy QEMU): the
    session opens when QEMU answers, and reads; the client is not cut for QEMU's time."""
    exports = Exports(tmp_path / "exports", limit=4, handshake_timeout=1.0)
    exports.prepare()
    slow = serving_slowly(exports.qemu_path(JOB), 3)
    try:
        async with anyio.create_task_group() as tg:
            await exports.open(JOB, {TOKEN: "vda"}, tg, lambda job, session: None)
            client = await call(Client.unix, exports.endpoint_path(JOB))
            await call(client.greet)
            await call(client.send_go)
            assert (await call(client.go_reply))[0] == hs.REP_ACK
            # nbdkit's pattern plugin: each 8-byte word is its own offset, big-endian.
            assert await call(client.read, MiB, 16) == struct.pack(">QQ", MiB, MiB + 8)
            client.close()
            tg.cancel_scope.cancel()
    finally:
        slow.terminate()
        slow.wait()


async def test_a_client_that_opened_an_export_may_wait_and_is_counted(tmp_path: Path) -> None:
    """Past the deadline, a client that had its GO accepted (after a STARTTLS QEMU
    refused) reads on, and what it reads is counted to its disk."""
    async with endpoint(tmp_path, limit=4, handshake_timeout=1.0) as setup:
        reader = await call(Client.unix, setup.exports.endpoint_path(JOB))
        await call(reader.greet)
        await call(reader.s.sendall, hs.OPTION.pack(hs.IHAVEOPT, hs.OPT_STARTTLS, 0))
        assert (await call(reader.go_reply))[0] & hs.REP_ERR
        await call(reader.send_go)
        assert (await call(reader.go_reply))[0] == hs.REP_ACK
        await anyio.sleep(2.5)
        assert await call(reader.read, MiB, 64 << 10) == bytes([BYTE]) * (64 << 10)
        assert [(s.disk, s.bytes_read) for s in setup.endpoint.sessions()] == \
            [("vda", 64 << 10)]
        reader.close()


async def test_a_session_handed_over_in_its_handshake_is_followed_on(tmp_path: Path) -> None:
    """Restarts while a client is between two options, then before its first request: each
    next run reads QEMU's answers where the last one stopped (the GO accepted opens the
    export), and counts what the client reads to its disk."""
    exports = Exports(tmp_path / "exports", limit=4, handshake_timeout=1.0)
    exports.prepare()
    image = tmp_path / "disk.raw"
    image.write_bytes(bytes([BYTE]) * SIZE)
    qemu = serving(image, exports.qemu_path(JOB))
    client = None
    try:
        async def run(handed: list[Handed], stored: dict[str, int],
                      step: Callable[[Endpoint], Awaitable[None]]
                      ) -> tuple[list[Handed], dict[str, int]]:
            """One run of the daemon: it takes what the last handed over, and hands over."""
            exporting = Exports(tmp_path / "exports", limit=4, handshake_timeout=1.0)
            exporting.inherit(stored, handed)
            kept: dict[str, int] = {}  # systemd keeps copies of what is stored
            async with anyio.create_task_group() as tg:
                await step(await exporting.open(JOB, {TOKEN: "vda"}, tg, lambda j, s: None))
                handed = await exporting.hand_off(
                    lambda name, fds: kept.__setitem__(name, os.dup(fds[0])), unrecorded,
                    HANDOFF)
                tg.cancel_scope.cancel()
            return handed, kept

        async def asks_info(endpoint: Endpoint) -> None:
            nonlocal client
            client = await call(Client.unix, exports.endpoint_path(JOB))
            await call(client.greet)
            await call(client.send_go, TOKEN.encode(), hs.OPT_INFO)
            assert (await call(client.go_reply))[0] == hs.REP_ACK

        async def opens(endpoint: Endpoint) -> None:
            assert client is not None
            await call(client.send_go)
            assert (await call(client.go_reply))[0] == hs.REP_ACK

        async def reads(endpoint: Endpoint) -> None:
            assert client is not None
            assert await call(client.read, 0, 4096) == bytes([BYTE]) * 4096
            assert [(s.disk, s.bytes_read) for s in endpoint.sessions()] == [("vda", 4096)]

        handed, stored = await run([], {}, asks_info)
        assert [(h.sniffer["opened"], h.sniffer["answering"]) for h in handed] == [(False, True)]
        handed, stored = await run(handed, stored, opens)
        assert [(h.sniffer["opened"], h.sniffer["export"]) for h in handed] == [(True, TOKEN)]
        await run(handed, stored, reads)
    finally:
        if client is not None:
            client.close()
        qemu.terminate()
        qemu.wait()


async def test_a_flood_of_connections_holds_a_bounded_number_of_descriptors(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A job at its limit, and 300 more connections at once: MAX_WAITING of them wait for
    a place (and are then told why there is none), the rest are closed at once; the
    refusals are logged at most once a second; the open session reads on."""
    flood = 300
    async with endpoint(tmp_path, limit=1) as setup:
        reader = await call(Client.unix, setup.exports.endpoint_path(JOB))
        await call(reader.open)
        clients = [await call(Client.unix, setup.exports.endpoint_path(JOB))
                   for _ in range(flood)]
        await anyio.sleep(0.3)  # all accepted, none waited its ADMIT_WAIT out

        def closed(client: Client) -> bool:
            client.s.setblocking(False)
            try:
                return client.s.recv(1) == b""
            except BlockingIOError:
                return False
            finally:
                client.s.setblocking(True)

        assert sum(map(closed, clients)) == flood - exporting.MAX_WAITING
        await anyio.sleep(exporting.ADMIT_WAIT + 0.5)
        assert await call(reader.read, 0, 64 << 10) == bytes([BYTE]) * (64 << 10)
        refused = capsys.readouterr().out.count("nbd connection refused")
        assert 1 <= refused <= 3
        for client in clients:
            client.close()
        reader.close()


async def test_a_qemu_that_accepts_nothing_holds_no_worker_thread(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """QEMU's listening socket with a full backlog: each session's connect is tried again
    on the event loop (not in a thread of the pool libvirt's calls share) until
    CONNECT_TIMEOUT, and then that session ends."""
    monkeypatch.setattr(exporting, "CONNECT_TIMEOUT", 1.5)
    exports = Exports(tmp_path / "exports", limit=4, handshake_timeout=30)
    exports.prepare()
    stuck = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stuck.bind(str(exports.qemu_path(JOB)))
    stuck.listen(0)  # one connection queued, never accepted; then the backlog is full
    with stuck:
        ended: list[Session] = []
        three_ended = anyio.Event()

        def on_session(job: str, session: Session) -> None:
            if session.ended is not None:
                ended.append(session)
                if len(ended) == 3:
                    three_ended.set()

        async with anyio.create_task_group() as tg:
            endpoint = await exports.open(JOB, {TOKEN: "vda"}, tg, on_session)
            clients = [await call(Client.unix, exports.endpoint_path(JOB)) for _ in range(4)]
            await anyio.sleep(0.5)
            assert endpoint.active == 4
            assert anyio.to_thread.current_default_thread_limiter().borrowed_tokens == 0
            with anyio.fail_after(10):
                await three_ended.wait()  # the one QEMU's backlog took waits on
            assert endpoint.active == 1
            for client in clients:
                client.close()
            tg.cancel_scope.cancel()


async def test_a_client_gone_before_qemu_took_what_it_sent_costs_nothing_meanwhile(
        tmp_path: Path) -> None:
    """A client sends more than QEMU reads (QEMU is stopped) and hangs up: its hangup,
    reported on every wait, no longer spins the session's thread (a core per session
    until QEMU read again); once QEMU reads, the session ends."""
    async with endpoint(tmp_path, limit=4) as setup:
        client = await call(Client.unix, setup.exports.endpoint_path(JOB))
        await call(client.open)
        setup.qemu.send_signal(signal.SIGSTOP)
        try:
            client.s.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                while True:
                    client.s.send(bytes(64 << 10))
            await anyio.sleep(0.5)  # the relay holds what QEMU's socket does not take
            client.close()
            before = threads_cpu()
            await anyio.sleep(3)
            after = threads_cpu()
            # Its thread spun: 2.9 s of 3. (Each thread alone: the rest of the process
            # may be busy with other work.)
            assert max(after[t] - before.get(t, 0.0) for t in after) < 1.0
        finally:
            setup.qemu.send_signal(signal.SIGCONT)
        with anyio.fail_after(20):
            await setup.endpoint.drained()



def threads_cpu() -> dict[int, float]:
    """Seconds of CPU each thread of this process has used."""
    used = {}
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError), open(f"/proc/self/task/{tid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
            used[int(tid)] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return used


def eventfds() -> int:
    return sum(os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[eventfd]"
               for fd in os.listdir("/proc/self/fd") if os.path.exists(f"/proc/self/fd/{fd}"))


async def test_sessions_that_cannot_reach_qemu_leave_nothing_open(tmp_path: Path) -> None:
    """Each session's relay has an eventfd (to be woken): one that never ran, its
    connect to QEMU failed, left it open."""
    exports = Exports(tmp_path / "exports", limit=4, handshake_timeout=5.0)
    exports.prepare()  # and no QEMU listening
    async with anyio.create_task_group() as tg:
        endpoint = await exports.open(JOB, {TOKEN: "vda"}, tg, lambda job, session: None)
        before = eventfds()
        for _ in range(20):
            client = await call(Client.unix, exports.endpoint_path(JOB))
            with pytest.raises((EOFError, ConnectionError)):
                await call(client.greet)
            client.close()
        with anyio.fail_after(10):
            await endpoint.drained()
        assert endpoint.total == 20 and eventfds() == before
        tg.cancel_scope.cancel()


async def test_a_session_handed_over_in_its_handshake_keeps_its_deadline(
        tmp_path: Path) -> None:
    exports = Exports(tmp_path / "exports", limit=4, handshake_timeout=1.0)
    exports.prepare()
    image = tmp_path / "disk.raw"
    image.write_bytes(bytes([BYTE]) * SIZE)
    qemu = serving(image, exports.qemu_path(JOB))
    stored: dict[str, int] = {}
    try:
        async with anyio.create_task_group() as tg:
            await exports.open(JOB, {TOKEN: "vda"}, tg, lambda job, session: None)
            silent = await call(Client.unix, exports.endpoint_path(JOB))
            await call(silent.greet)
            handed = await exports.hand_off(
                lambda name, fds: stored.__setitem__(name, os.dup(fds[0])), unrecorded,
                HANDOFF)
            tg.cancel_scope.cancel()
        following = Exports(tmp_path / "exports", limit=4, handshake_timeout=1.0)
        following.inherit(stored, handed)
        async with anyio.create_task_group() as tg:
            endpoint = await following.open(JOB, {TOKEN: "vda"}, tg, lambda j, s: None)
            with anyio.fail_after(10):
                await endpoint.drained()
            with pytest.raises((EOFError, ConnectionError)):
                await call(silent.exactly, 1)
            silent.close()
            tg.cancel_scope.cancel()
    finally:
        qemu.terminate()
        qemu.wait()
