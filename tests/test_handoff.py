"""A restart under systemd (service._hand_off, Jobs.hand_off, Endpoint.hand_off) and the
next run that takes the sessions back, against qemu-nbd standing in for QEMU, the jobs
over the fake source and systemd's fd store played by tests/systemd.py (no lab).

A restart ends no job: not for [exports] idle_timeout (the sessions leave this run's
endpoint, not the appliance), not for max_lifetime while the daemon stops, not for a
migration's grace; the next run adopts the job and its appliance reads on. One appliance
too slow to read for its session to be paused in time is cut, alone: every other session
is recorded and resumed.
"""

from __future__ import annotations

import select
import socket
import struct
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import anyio
import pytest
from structlog.testing import capture_logs

from pullbackd import errors, service
from pullbackd import handshake as hs
from pullbackd.model import Appliance, Job, JobState, StartRequest
from pullbackd.names import fd_session
from pullbackd.sdnotify import Notifier
from pullbackd.serving import Limits

from .fakes import FakeSource, FakeVirt
from .systemd import ServiceManager
from .test_jobs import ELSEWHERE, Rig, running, stored

pytestmark = pytest.mark.asyncio

SIZE = 64 << 20
BYTE = 0x5A
MiB = 1 << 20
T = TypeVar("T")


async def call(fn: Callable[..., T], *args: object) -> T:
    return await anyio.to_thread.run_sync(fn, *args)


@pytest.fixture
def source(tmp_path: Path) -> FakeSource:
    (tmp_path / "source").mkdir()
    return FakeSource(FakeVirt(), tmp_path / "source")


class Client:
    """A blocking NBD client on a raw socket that reads no more than it is told to (its
    receive buffer small), like an appliance whose disk is busy."""

    def __init__(self, path: Path) -> None:
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
        self.s.connect(str(path))
        self.s.settimeout(20)

    def exactly(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            data = self.s.recv(min(n - len(out), MiB))
            if not data:
                raise EOFError(f"closed after {len(out)} of {n} bytes")
            out += data
        return bytes(out)

    def open(self, name: str) -> None:
        magic, opt, _ = hs.GREETING.unpack(self.exactly(hs.GREETING.size))
        assert (magic, opt) == (hs.NBDMAGIC, hs.IHAVEOPT)
        self.s.sendall(struct.pack(">I", 3))
        data = struct.pack(">I", len(name)) + name.encode() + struct.pack(">H", 0)
        self.s.sendall(struct.pack(">QII", hs.IHAVEOPT, hs.OPT_GO, len(data)) + data)
        while True:
            _, _, reply, length = hs.REPLY.unpack(self.exactly(hs.REPLY.size))
            self.exactly(length)
            if reply != 3:  # NBD_REP_INFO
                assert reply == hs.REP_ACK, hex(reply)
                return

    def ask(self, offset: int, length: int) -> None:
        self.s.sendall(struct.pack(">IHHQQI", hs.REQUEST_MAGIC, 0, hs.CMD_READ, 1, offset,
                                   length))

    def replying(self) -> bool:
        """Whether a reply comes (within a generous deadline), not read."""
        return bool(select.select([self.s], [], [], 20)[0])

    def reply(self, length: int) -> bytes:
        magic, error, _ = struct.unpack(">IIQ", self.exactly(16))
        assert (magic, error) == (0x67446698, 0)
        return self.exactly(length)

    def read(self, offset: int, length: int) -> bytes:
        self.ask(offset, length)
        return self.reply(length)

    def close(self) -> None:
        self.s.close()


def qemu_nbd(image: Path, export: str, sock: Path) -> subprocess.Popen[bytes]:
    """qemu-nbd serving `image` read-only as `export` on `sock`, once it listens."""
    qemu = subprocess.Popen(["qemu-nbd", "-r", "-t", "-e", "64", "-x", export, "-k", str(sock),
                             "-f", "raw", str(image)])
    deadline = time.monotonic() + 30
    while not sock.exists():
        assert qemu.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    return qemu


@dataclass
class Machine:
    """What outlives the daemon's runs: QEMU's NBD servers (qemu-nbd), systemd (which
    keeps the sockets handed over), the appliances."""

    image: Path
    manager: ServiceManager
    notifier: Notifier
    qemus: list[subprocess.Popen[bytes]] = field(default_factory=list)
    clients: list[Client] = field(default_factory=list)

    async def reading_and_slow(self, rig: Rig) -> tuple[Job, Client, Job, Client]:
        """Two ready jobs, of d1 and d2: A's appliance has read, B's asked for 32 MiB and
        reads nothing of it."""
        a, reader = await self.ready(rig, "d1")
        b, slow = await self.ready(rig, "d2")
        assert await call(reader.read, 0, MiB) == bytes([BYTE]) * MiB
        await call(slow.ask, 0, 32 * MiB)
        assert await call(slow.replying)
        await anyio.sleep(0.5)  # QEMU's reply fills what B does not read, and the pipe
        return a, reader, b, slow

    async def ready(self, rig: Rig, domain: str) -> tuple[Job, Client]:
        """A ready pull job of `domain`, its QEMU serving its disk vda, and an appliance's
        session open on it."""
        job = await rig.jobs.start(StartRequest(domain, disks=["vda"]))
        self.qemus.append(await call(qemu_nbd, self.image, job.disks[0].export,
                                     rig.exports.qemu_path(job.id)))
        client = await call(Client, rig.exports.endpoint_path(job.id))
        self.clients.append(client)
        await call(client.open, job.disks[0].export)
        return job, client

    async def stored(self) -> dict[str, int]:
        """The fd store, once the daemon said it stops (the last of its notifications)."""
        assert await call(self.manager.stopping.wait, 20)
        return dict(self.manager.fdstore)


@asynccontextmanager
async def machine(tmp_path: Path) -> AsyncIterator[Machine]:
    image = tmp_path / "disk.raw"
    image.write_bytes(bytes([BYTE]) * SIZE)
    manager = ServiceManager(tmp_path / "notify.sock")
    it = Machine(image, manager, Notifier({"NOTIFY_SOCKET": str(manager.path)}))
    try:
        yield it
    finally:
        manager.close()
        for client in it.clients:
            client.close()
        for qemu in it.qemus:  # killed: one that was left a session waits for it to end
            qemu.kill()
            qemu.wait()


def appliance(rig: Rig, job: Job) -> Appliance:
    shown = rig.jobs.get(job.id).appliance
    assert shown is not None
    return shown


@asynccontextmanager
async def next_run(tmp_path: Path, source: FakeSource, stored: dict[str, int],
                   limits: Limits | None = None) -> AsyncIterator[Rig]:
    """The next run of the daemon, as service.run starts: it takes what the last one handed
    over, recovers its jobs, and closes what no job took (checked: nothing)."""
    async with running(tmp_path, source, limits=limits, recover=False) as rig:
        rig.exports.inherit(stored, rig.store.take_handoff())
        await rig.jobs.recover()
        assert rig.exports.release() == []
        yield rig


async def test_a_restart_expires_no_job_its_appliance_reads(
        tmp_path: Path, source: FakeSource) -> None:
    """A session open longer than [exports] idle_timeout when the daemon stops: the hand-off
    empties the endpoint, whose idle clock was last set when it opened; the job's timer took
    that for idleness and expired the job (its checkpoint rolled back, libvirt's backup
    ended) as the daemon stopped. Now the next run adopts it, and the appliance reads on."""
    limits = Limits(idle_timeout=1.0)
    async with machine(tmp_path) as m:
        async with running(tmp_path, source, limits=limits) as rig:
            job, reader = await m.ready(rig, "d1")
            assert await call(reader.read, 0, MiB) == bytes([BYTE]) * MiB
            await anyio.sleep(limits.idle_timeout + 0.5)  # open, so not idle, all along
            assert await call(reader.read, MiB, MiB) == bytes([BYTE]) * MiB
            await service._hand_off(m.notifier, rig.jobs)  # SIGTERM's, then a cancel
        assert [j.state for j in stored(tmp_path)] == [JobState.READY]
        assert source.backups["d1"].job == job.id
        async with next_run(tmp_path, source, await m.stored(), limits) as rig:
            assert rig.jobs.get(job.id).state == JobState.READY
            assert await call(reader.read, 2 * MiB, MiB) == bytes([BYTE]) * MiB
            assert appliance(rig, job).active == 1


async def test_no_timer_ends_a_job_once_the_daemon_stops(
        tmp_path: Path, source: FakeSource) -> None:
    """Neither idle_timeout nor max_lifetime runs out for a job while the daemon stops
    (here a stop that takes longer than both), nor for one started meanwhile (the control
    socket serves until the end): the next run's timers decide."""
    limits = Limits(idle_timeout=1.0, max_lifetime=2.0)
    async with machine(tmp_path) as m, running(tmp_path, source, limits=limits) as rig:
        job, _ = await m.ready(rig, "d1")
        await service._hand_off(m.notifier, rig.jobs)
        late = await rig.jobs.start(StartRequest("d2", disks=["vda"]))
        await anyio.sleep(limits.max_lifetime + 1.0)
        assert [rig.jobs.get(j.id).state for j in (job, late)] == [JobState.READY] * 2
        assert sorted(source.backups) == ["d1", "d2"]


async def test_a_migration_draining_as_the_daemon_stops_ends_no_job(
        tmp_path: Path, source: FakeSource) -> None:
    """A session handed over is still open: a migration waiting for it does not take the
    endpoint, emptied by the hand-off, for one idle past [migration] grace (it ended the
    job, and migrated the domain, as the daemon stopped)."""
    async with machine(tmp_path) as m, running(tmp_path, source, drain_timeout=3.0) as rig:
        job, _ = await m.ready(rig, "d1")
        draining = anyio.Event()
        outcome: list[BaseException | str] = []

        async def migrate() -> None:
            try:
                async with aclosing(rig.migrations.migrate("d1", ELSEWHERE)) as steps:
                    async for step in steps:
                        outcome.append(step.state)
                        draining.set()
            except errors.MigrationBlocked as e:
                outcome.append(e)

        async with anyio.create_task_group() as tg:
            tg.start_soon(migrate)
            with anyio.fail_after(20):
                await draining.wait()
            await service._hand_off(m.notifier, rig.jobs)
        assert rig.jobs.get(job.id).state == JobState.READY
        assert source.virt.migrated == []
        assert outcome[0] == "draining" and isinstance(outcome[-1], errors.MigrationBlocked)
        assert appliance(rig, job).idle_since is None


async def test_an_appliance_slow_at_a_restart_is_cut_alone(
        tmp_path: Path, source: FakeSource, monkeypatch: pytest.MonkeyPatch) -> None:
    """B asked for 32 MiB and does not read it yet: its relay cannot pause with data on its
    way. The hand-off timed out before recording anything, so the next run closed A's
    sockets too, which systemd had kept. Now A's session is recorded as soon as it is
    handed over and resumed; B's alone is cut, and the journal says why."""
    monkeypatch.setattr(service, "HANDOFF_TIMEOUT", 1.0)
    async with machine(tmp_path) as m:
        async with running(tmp_path, source) as rig:
            a, reader, b, slow = await m.reading_and_slow(rig)
            with capture_logs() as logs:
                await service._hand_off(m.notifier, rig.jobs)
        async with next_run(tmp_path, source, await m.stored()) as rig:
            assert [rig.jobs.get(j.id).state for j in (a, b)] == [JobState.READY] * 2
            assert appliance(rig, a).active == 1
            assert await call(reader.read, MiB, MiB) == bytes([BYTE]) * MiB
            assert appliance(rig, b).active == 0
            with pytest.raises((EOFError, ConnectionError)):
                await call(slow.reply, 32 * MiB)
        cut = [e for e in logs if e["event"].startswith("nbd session cut")]
        assert [(e["job"], e["log_level"]) for e in cut] == [(b.id, "warning")]
        assert "could not be paused" in cut[0]["event"]


async def test_a_hand_off_cut_short_loses_no_session_it_handed(
        tmp_path: Path, source: FakeSource, monkeypatch: pytest.MonkeyPatch) -> None:
    """The stop goes on while B holds the hand-off up, until something cancels it all (the
    daemon's root scope: libvirt lost meanwhile, say): A's session, whose sockets systemd
    already keeps, was recorded then, and the next run resumes it."""
    monkeypatch.setattr(service, "HANDOFF_TIMEOUT", 600.0)
    async with machine(tmp_path) as m:
        async with running(tmp_path, source) as rig:
            a, reader, _, _ = await m.reading_and_slow(rig)
            handed = anyio.Event()
            store = m.notifier.store_fds

            def storing(name: str, fds: list[int]) -> None:
                store(name, fds)
                if name == fd_session(a.id, 1)[-1]:  # A's last socket: cancelled at once
                    handed.set()

            monkeypatch.setattr(m.notifier, "store_fds", storing)
            async with anyio.create_task_group() as tg:
                tg.start_soon(service._hand_off, m.notifier, rig.jobs)
                with anyio.fail_after(20):
                    await handed.wait()
                tg.cancel_scope.cancel()
        m.notifier.stopping()  # (the last notification: the fd store is complete)
        async with next_run(tmp_path, source, await m.stored()) as rig:
            assert appliance(rig, a).active == 1
            assert await call(reader.read, MiB, MiB) == bytes([BYTE]) * MiB
