"""The job state machine (jobs.py) against the fake source (fakes.py): start, finish,
abort, the queue, a migration's drain, every failure of the source, what its events
tell, and recovery after a restart.

Everything else is real: the state database (SQLite in tmp), the chains, admission,
serving (each pull job's endpoint is a real socket, relaying to nothing until an
appliance comes), scratch accounting. Nothing here moves data: the lab tests do,
each ending in a byte comparison. A "restart" is a new `Jobs` over the same
database and the same source, as after `kill -9`.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import shutil
import signal
import sqlite3
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing, asynccontextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import anyio.streams.text
import pytest
import structlog
from structlog.testing import capture_logs

from pullbackd import crash, errors, quiesce, xml
from pullbackd.admission import Admission
from pullbackd.chain import Base, Chains
from pullbackd.exports import Exports
from pullbackd.jobs import Jobs
from pullbackd.migration import Migrations, Step
from pullbackd.model import (
    Checkpoint,
    CheckpointState,
    Job,
    JobState,
    Scratch,
    StartRequest,
    Transition,
    now,
    timestamp,
)
from pullbackd.names import Layout, checkpoint_name
from pullbackd.repository import Repository
from pullbackd.scratch import ScratchSpace
from pullbackd.serving import Limits, Serving
from pullbackd.source import Begun, Exported, Plan
from pullbackd.state import Store
from pullbackd.virt import AgentError

from . import fakes
from .fakes import Backup, FakeSource, FakeVirt

pytestmark = pytest.mark.asyncio

#: Where a migration goes (the fake virt only records it).
ELSEWHERE = "qemu+ssh://elsewhere/system"
MiB = 1 << 20


@dataclass
class Rig:
    """The jobs over the fake source, and what the tests look into."""

    jobs: Jobs
    source: FakeSource
    store: Store
    chains: Chains
    exports: Exports
    migrations: Migrations
    serving: Serving
    scratch: ScratchSpace
    #: What `follow_events`'s `lost` was told, and the job endpoints open at that moment.
    lost: list[tuple[str, list[str]]] = field(default_factory=list)
    lost_told: anyio.Event = field(default_factory=anyio.Event)
    #: Where a test runs what it waits for (Start held in the source, a migration).
    tg: anyio.abc.TaskGroup = field(init=False)

    @property
    def virt(self) -> FakeVirt:
        return self.source.virt

    def checkpoints(self, domain: str = "d1") -> list[str]:
        """The checkpoints libvirt has of the domain."""
        return [name for (d, name) in self.virt.checkpoint_xmls if d == domain]

    def chain(self, domain: str = "d1", consumer: str | None = None) -> list[str]:
        return [c.name for c in self.chains.of(domain, consumer)]

    def endpoint(self, job: Job) -> Path:
        return self.exports.endpoint_path(job.id)


@asynccontextmanager
async def running(tmp_path: Path, source: FakeSource, *, max_active: int = 0,
                  limits: Limits | None = None, drain_timeout: float = 2.0,
                  recover: bool = True, exports: Exports | None = None,
                  remote: str | None = None) -> AsyncIterator[Rig]:
    """The daemon's job machinery, as service.py assembles it, with `source`; `exports`:
    the endpoints (default: in tmp_path, root's alone); `remote`: the TCP endpoint's base
    URI, if there is one."""
    store = Store(tmp_path / "state.db")
    exports = exports or Exports(tmp_path / "exports")
    exports.prepare()
    layout = Layout(exports.dir, tmp_path / "scratch")
    chains = Chains(source.virt, store, source.virt.forget_bitmaps)
    admission = Admission(max_active)
    serving = Serving(exports, source, limits or Limits(), remote)
    scratch = ScratchSpace(layout, 0)
    jobs = Jobs(source, store, chains, serving, scratch,
                Repository(tmp_path / "repo", tmp_path / "nbd", 1 << 20), admission=admission)
    migrations = Migrations(jobs, admission, source.virt, grace=0.05,
                            drain_timeout=drain_timeout)
    rig = Rig(jobs, source, store, chains, exports, migrations, serving, scratch)

    async def lost(reason: str) -> None:
        rig.lost.append((reason, sorted(p.name for p in exports.dir.glob("*.sock"))))
        rig.lost_told.set()

    try:
        async with anyio.create_task_group() as rig.tg:
            await rig.tg.start(jobs.follow_events, lost)
            if recover:
                await jobs.recover()
            try:
                yield rig
            finally:
                source.release()
            rig.tg.cancel_scope.cancel()
    finally:
        store.close()


@pytest.fixture
def source(tmp_path: Path) -> FakeSource:
    (tmp_path / "source").mkdir()
    return FakeSource(FakeVirt(), tmp_path / "source")


@pytest.fixture
def push_dir(tmp_path: Path) -> Path:
    (tmp_path / "push").mkdir()
    return tmp_path / "push"


async def until(jobs: Jobs, job_id: str, done: Callable[[Job], bool]) -> Job:
    """The job once `done(job)` (within 2 s): for what happens in the background (the
    source's events, the queue, a copy, expiry)."""
    with jobs.watch() as changes, anyio.fail_after(2):
        while not done(job := jobs.get(job_id)):
            await changes.receive()
    return job


async def ended(jobs: Jobs, job_id: str) -> Job:
    return await until(jobs, job_id, lambda j: j.state.final)


def states(job: Job) -> list[str]:
    return [t.state for t in job.history]


def stored(tmp_path: Path) -> list[Job]:
    """The jobs in the state database (the rig closed)."""
    store = Store(tmp_path / "state.db")
    try:
        return store.load_jobs()
    finally:
        store.close()


def files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# Start, Finish.


async def test_a_pull_backup_is_served_then_finished_into_its_chain(
        tmp_path: Path, source: FakeSource) -> None:
    async with running(tmp_path, source) as rig:
        job = await rig.jobs.start(StartRequest("d1", consumer="c"))
        assert (job.state, job.mode, job.since) == (JobState.READY, "full", None)
        assert [(d.name, d.mode, d.bitmap) for d in job.disks] == [
            ("vda", "full", None), ("vdb", "full", None)]
        assert all(str(rig.endpoint(job)) in str(d.url) for d in job.disks)
        assert rig.endpoint(job).is_socket()
        assert job.checkpoint == checkpoint_name("c", job.id) and rig.chain() == []
        assert [j.state for j in rig.store.load_jobs()] == [JobState.READY]

        done = await rig.jobs.finish(job.id)
        assert (done.state, done.error) == (JobState.COMPLETED, None) and done.ended
        assert states(done) == ["starting", "ready", "completed"]
        assert rig.chain(consumer="c") == [job.checkpoint] == rig.checkpoints()
        assert source.backups == {} and not rig.endpoint(job).exists()
        assert rig.jobs.active("d1") is None

        nxt = await rig.jobs.start(StartRequest("d1", consumer="c", mode="incremental"))
        assert (nxt.mode, nxt.since) == ("incremental", job.checkpoint)
        assert [(d.mode, d.since) for d in nxt.disks] == [("incremental", job.checkpoint)] * 2
        assert all(d.bitmap for d in nxt.disks)
    assert [j.state for j in stored(tmp_path)] == [JobState.COMPLETED, JobState.READY]


async def test_finish_with_failure_rolls_the_checkpoint_back(
        tmp_path: Path, source: FakeSource) -> None:
    async with running(tmp_path, source) as rig:
        full = await rig.jobs.finish((await rig.jobs.start(StartRequest("d1"))).id)
        incr = await rig.jobs.start(StartRequest("d1", mode="incremental"))
        failed = await rig.jobs.finish(incr.id, success=False)
        assert (failed.state, failed.error) == (
            JobState.FAILED, "the appliance reported the backup failed")
        assert rig.chain() == [full.checkpoint] == rig.checkpoints()
        assert rig.chains.get(incr.checkpoint) is None
        # The next incremental covers what the failed one held.
        nxt = await rig.jobs.start(StartRequest("d1", mode="incremental"))
        assert nxt.since == full.checkpoint


async def test_watchers_see_every_state_in_order(tmp_path: Path, source: FakeSource) -> None:
    async with running(tmp_path, source) as rig:
        with rig.jobs.watch() as changes:
            job = await rig.jobs.start(StartRequest("d1"))
            done = await rig.jobs.finish(job.id)
            seen = [changes.receive_nowait() for _ in range(4)]
            with pytest.raises(anyio.WouldBlock):
                changes.receive_nowait()
        # d1 has no guest agent: quiesce "auto" warns that the backup is crash-consistent.
        assert [(c.kind, c.job.id, c.job.state) for c in seen] == [
            ("state", job.id, "starting"), ("warning", job.id, "starting"),
            ("state", job.id, "ready"), ("state", job.id, "completed")]
        assert seen[1].message == "no guest agent is connected; the backup is crash-consistent"
        assert states(done) == [c.job.state for c in seen if c.kind == "state"]
        assert (done.quiesce, done.consistency, done.frozen) == ("auto", "crash", None)


async def test_a_disk_whose_bitmap_cannot_be_used_alone_is_backed_up_in_full(
        tmp_path: Path, source: FakeSource) -> None:
    async with running(tmp_path, source) as rig:
        both = await rig.jobs.start(StartRequest("d1"))
        await rig.jobs.finish(both.id)
        vdb = await rig.jobs.start(StartRequest("d1", disks=["vdb"]))
        await rig.jobs.finish(vdb.id)
        source.broken.add(vdb.checkpoint)
        incr = await rig.jobs.start(StartRequest("d1", mode="incremental"))
        assert [(d.name, d.mode, d.since) for d in incr.disks] == [
            ("vda", "incremental", both.checkpoint), ("vdb", "full", None)]
        assert incr.disks[1].fallback == f"the bitmap of {vdb.checkpoint} cannot be used"
        assert (incr.mode, incr.since) == ("incremental", both.checkpoint)
        await rig.jobs.finish(incr.id)
        source.broken.add(incr.checkpoint)
        # No disk could start from its base: the backup is full.
        last = await rig.jobs.start(StartRequest("d1", disks=["vda"], mode="incremental"))
        assert (last.mode, last.since) == ("full", None)
        assert last.disks[0].fallback == f"the bitmap of {incr.checkpoint} cannot be used"


# Abort, idempotence, refusals.


async def test_abort_of_a_ready_job_ends_it_and_rolls_back(
        tmp_path: Path, source: FakeSource) -> None:
    async with running(tmp_path, source) as rig:
        job = await rig.jobs.start(StartRequest("d1"))
        aborted = await rig.jobs.abort(job.id)
        assert (aborted.state, aborted.error) == (JobState.ABORTED, None)
        assert states(aborted) == ["starting", "ready", "aborted"]
        assert source.called("end") == ["d1"] and source.backups == {}
        assert rig.checkpoints() == [] and rig.chains.get(job.checkpoint) is None
        assert not rig.endpoint(job).exists()
        assert (await rig.jobs.start(StartRequest("d1"))).state == JobState.READY


async def test_a_push_cannot_be_finished_and_abort_removes_its_files(
        tmp_path: Path, source: FakeSource, push_dir: Path) -> None:
    async with running(tmp_path, source) as rig:
        job = await rig.jobs.start(StartRequest("d1", target_dir=str(push_dir)))
        assert job.state == JobState.RUNNING and job.disks[0].url is None
        assert files(push_dir) == [f"{job.id}.vda.qcow2", f"{job.id}.vdb.qcow2"]
        with pytest.raises(errors.JobNotReady) as e:
            await rig.jobs.finish(job.id)
        assert e.value.parameters == {"id": job.id, "state": "running"}
        assert rig.jobs.get(job.id).state == JobState.RUNNING
        assert (await rig.jobs.abort(job.id)).state == JobState.ABORTED
        assert files(push_dir) == [], "nothing half-written may look like a backup"
        assert rig.checkpoints() == []


async def test_finish_and_abort_are_idempotent(tmp_path: Path, source: FakeSource) -> None:
    async with running(tmp_path, source) as rig:
        job = await rig.jobs.start(StartRequest("d1"))
        finished = await rig.jobs.finish(job.id)
        assert await rig.jobs.finish(job.id) == finished
        assert await rig.jobs.abort(job.id) == finished  # ended is ended
        assert await rig.jobs.finish(job.id, success=False) == finished

        job = await rig.jobs.start(StartRequest("d1"))
        aborted = await rig.jobs.abort(job.id)
        assert aborted.state == JobState.ABORTED
        assert await rig.jobs.abort(job.id) == aborted
        assert await rig.jobs.finish(job.id) == aborted
        assert source.called("end") == ["d1", "d1"]  # once a job
        assert rig.chain() == [finished.checkpoint]


async def test_an_abort_while_finish_ends_the_job_finds_it_completed(
        tmp_path: Path, source: FakeSource) -> None:
    async with running(tmp_path, source) as rig:
        job = await rig.jobs.start(StartRequest("d1"))
        stall = source.stall("end")
        rig.tg.start_soon(rig.jobs.finish, job.id)
        await stall.reached.wait()

        async def release_once_abort_waits() -> None:
            await anyio.wait_all_tasks_blocked()
            stall.release()

        rig.tg.start_soon(release_once_abort_waits)
        aborted = await rig.jobs.abort(job.id)
        assert aborted.state == JobState.COMPLETED, "ended once, by Finish"
        assert source.called("end") == ["d1"]
        assert rig.chain() == [job.checkpoint]


async def test_unknown_jobs(tmp_path: Path, source: FakeSource) -> None:
    async with running(tmp_path, source) as rig:
        with pytest.raises(errors.NoSuchJob):
            rig.jobs.get("0123456789ab")
        with pytest.raises(errors.NoSuchJob):
            await rig.jobs.finish("0123456789ab")
        with pytest.raises(errors.NoSuchJob) as e:
            await rig.jobs.abort("0123456789ab")
        assert e.value.parameters == {"id": "0123456789ab"}


async def test_a_second_start_of_a_domain_is_refused_at_once(
        tmp_path: Path, source: FakeSource) -> None:
    stall = source.stall("begin")
    async with running(tmp_path, source) as rig:
        rig.tg.start_soon(rig.jobs.start, StartRequest("d1"))
        await stall.reached.wait()
        [starting] = rig.jobs.all()
        assert starting.state == JobState.STARTING
        with pytest.raises(errors.BackupInProgress) as e:
            await rig.jobs.start(StartRequest("d1", disks=["vdb"]))
        assert e.value.parameters == {"domain": "d1", "id": starting.id}
        assert source.called("plan") == ["d1"], "refused before the source is asked"
        stall.release()
        ready = await until(rig.jobs, starting.id, lambda j: j.state == JobState.READY)
        with pytest.raises(errors.BackupInProgress) as e:
            await rig.jobs.start(StartRequest("d1"))
        assert e.value.parameters == {"domain": "d1", "id": ready.id}
        assert [j.id for j in rig.jobs.all()] == [ready.id]
        assert (await rig.jobs.start(StartRequest("d2"))).state == JobState.READY


async def test_abort_while_starting_waits_for_the_start_then_ends_the_job(
        tmp_path: Path, source: FakeSource) -> None:
    stall = source.stall("begin")
    async with running(tmp_path, source) as rig:
        rig.tg.start_soon(rig.jobs.start, StartRequest("d1"))
        await stall.reached.wait()
        [job] = rig.jobs.all()
        rig.tg.start_soon(rig.jobs.abort, job.id)
        await anyio.wait_all_tasks_blocked()
        assert rig.jobs.get(job.id).state == JobState.STARTING
        stall.release()
        aborted = await ended(rig.jobs, job.id)
        assert states(aborted) == ["starting", "ready", "aborted"]
        assert source.backups == {} and rig.checkpoints() == []


@pytest.mark.parametrize(("request_", "error", "parameters"), [
    (StartRequest("d1", mode="sideways"), errors.InvalidParameter, {"parameter": "mode"}),
    (StartRequest("d1", mode="differential"), errors.InvalidParameter, {"parameter": "since"}),
    (StartRequest("d1", mode="incremental", since="pullbackd.default.x"),
     errors.InvalidParameter, {"parameter": "since"}),
    (StartRequest("d1", consumer="Has Caps"), errors.InvalidParameter, {"parameter": "consumer"}),
    (StartRequest("d1", consumer="x" * 33), errors.InvalidParameter, {"parameter": "consumer"}),
    (StartRequest("d1", consumer=""), errors.InvalidParameter, {"parameter": "consumer"}),
    (StartRequest("d1", target_dir="relative/dir"), errors.TargetNotWritable,
     {"target_dir": "relative/dir", "reason": "not an absolute path"}),
    (StartRequest("d1", target_dir="/nonexistent/pullbackd"), errors.TargetNotWritable,
     {"target_dir": "/nonexistent/pullbackd", "reason": "no such folder"}),
    (StartRequest("d1", destination="ftp://x"), errors.InvalidParameter,
     {"parameter": "destination"}),
], ids=["mode", "differential-without-since", "since-without-differential", "consumer-caps",
        "consumer-long", "consumer-empty", "target-dir-relative", "target-dir-missing",
        "destination"])
async def test_bad_requests_are_refused_before_the_source_hears_of_them(
        tmp_path: Path, source: FakeSource, request_: StartRequest,
        error: type[errors.PullbackError], parameters: dict[str, str]) -> None:
    async with running(tmp_path, source) as rig:
        source.calls.clear()  # recovery's
        with pytest.raises(error) as e:
            await rig.jobs.start(request_)
        assert e.value.parameters == parameters
        assert source.calls == []
        assert rig.jobs.all() == [] and rig.store.load_jobs() == []
        assert rig.jobs.active("d1") is None


@pytest.mark.parametrize(("request_", "error", "parameters"), [
    (StartRequest("nope"), errors.NoSuchDomain, {"domain": "nope"}),
    (StartRequest("off"), errors.DomainNotRunning, {"domain": "off"}),
    (StartRequest("d1", disks=["vdz"]), errors.NoSuchDisk, {"domain": "d1", "disk": "vdz"}),
    (StartRequest("d1", mode="differential", since="pullbackd.default.nope"),
     errors.NoSuchCheckpoint,
     {"domain": "d1", "consumer": "default", "checkpoint": "pullbackd.default.nope"}),
], ids=["domain", "not-running", "disk", "checkpoint"])
async def test_what_the_source_or_the_chain_refuses_records_nothing(
        tmp_path: Path, source: FakeSource, request_: StartRequest,
        error: type[errors.PullbackError], parameters: dict[str, str]) -> None:
    source.virt.running["off"] = False
    async with running(tmp_path, source) as rig:
        with pytest.raises(error) as e:
            await rig.jobs.start(request_)
        assert e.value.parameters == parameters
        assert source.called("plan") == [request_.domain]
        assert rig.jobs.all() == [] and rig.store.load_jobs() == []
        assert rig.chains.all() == [] and rig.checkpoints() == []
        assert source.called("begin") == [] and rig.jobs.active(request_.domain) is None


async def test_starts_of_domains_that_do_not_exist_leave_no_chain_lock(
        tmp_path: Path, source: FakeSource) -> None:
    """A client may make up as many names as it likes: each Start's lock of the domain's
    chain goes with it (they were kept for ever, ~1.5 KiB each)."""
    async with running(tmp_path, source) as rig:
        for i in range(200):
            with pytest.raises(errors.NoSuchDomain):
                await rig.jobs.start(StartRequest(f"{i:04d}" + "x" * 1000))
        assert await rig.jobs.delete_chain("made-up", "default") == []
        assert rig.jobs._starts._chain_locks == {}
        assert rig.jobs.all() == []


async def test_a_chain_lock_stays_one_lock_while_anyone_holds_or_waits_for_it(
        tmp_path: Path, source: FakeSource) -> None:
    """It goes once nobody needs it, never while one waits: whoever comes after waits
    on the same lock."""
    async with running(tmp_path, source) as rig:
        starts, inside = rig.jobs._starts, []
        names = ("first", "second", "third")
        entered, release = ({n: anyio.Event() for n in names} for _ in range(2))

        async def take(name: str) -> None:
            async with starts.chain_lock("d1"):
                inside.append(name)
                entered[name].set()
                await release[name].wait()
                inside.remove(name)

        async def alone_inside(name: str) -> None:
            with anyio.fail_after(10):
                await entered[name].wait()
            await anyio.wait_all_tasks_blocked()  # the others wait for the lock
            assert inside == [name]

        rig.tg.start_soon(take, "first")
        await alone_inside("first")
        rig.tg.start_soon(take, "second")
        await alone_inside("first")
        release["first"].set()  # the second takes it, and nobody else holds it
        await alone_inside("second")
        rig.tg.start_soon(take, "third")
        await alone_inside("second")
        release["second"].set()
        await alone_inside("third")
        release["third"].set()
        await anyio.wait_all_tasks_blocked()
        assert inside == []
        assert starts._chain_locks == {}


async def test_a_differential_starts_only_at_a_checkpoint_of_its_own_consumer(
        tmp_path: Path, source: FakeSource) -> None:
    async with running(tmp_path, source) as rig:
        theirs = await rig.jobs.finish((await rig.jobs.start(StartRequest(
            "d1", consumer="other"))).id)
        with pytest.raises(errors.NoSuchCheckpoint) as e:
            await rig.jobs.start(StartRequest("d1", consumer="strict", mode="differential",
                                              since=theirs.checkpoint))
        assert e.value.parameters == {"domain": "d1", "consumer": "strict",
                                      "checkpoint": theirs.checkpoint}
        assert len(rig.jobs.all()) == 1 and rig.chain() == [theirs.checkpoint]
        diff = await rig.jobs.start(StartRequest("d1", consumer="other", mode="differential",
                                                 since=theirs.checkpoint))
        assert (diff.mode, diff.since) == ("differential", theirs.checkpoint)


async def test_scratch_that_cannot_hold_a_pull_backup_refuses_it_up_front(
        tmp_path: Path, source: FakeSource, push_dir: Path) -> None:
    source.sizes["vda"] = 1 << 60  # no file system holds that in the worst case
    async with running(tmp_path, source) as rig:
        with pytest.raises(errors.InsufficientScratch) as e:
            await rig.jobs.start(StartRequest("d1"))
        assert e.value.parameters["dir"] == str(tmp_path / "scratch")
        assert e.value.parameters["needed"] == (1 << 60) + source.sizes["vdb"]
        assert rig.jobs.all() == [] and rig.chains.all() == []
        job = await rig.jobs.start(StartRequest("d1", allow_scratch_overcommit=True))
        assert job.state == JobState.READY
        push = await rig.jobs.start(StartRequest("d2", target_dir=str(push_dir)))
        assert push.state == JobState.RUNNING  # a push needs no scratch


class Filling:
    """The scratch file system as `Jobs.watch_scratch` sees it (looking every 10 ms): the
    real one's free space, or with `capacity`, that many bytes less what the running
    backups' scratch files hold (real files, written by the test) and `other` (what
    anything else wrote). `looks`: how many times it looked."""

    def __init__(self, rig: Rig, capacity: int | None = None) -> None:
        self.rig = rig
        self.capacity = capacity
        self.other = 0
        self.looks = 0
        self._look = anyio.Event()
        self._pulls = rig.jobs.scratch_users

    def free(self) -> int:
        if self.capacity is None:
            return shutil.disk_usage(self.rig.scratch.dir).free
        scratch = self.rig.scratch.sizes(self._pulls())
        return self.capacity - self.other - sum(scratch.values())

    def pulls(self) -> list[Job]:
        """What the watch asks first each time it looks."""
        self.looks += 1
        self._look.set()
        self._look = anyio.Event()
        return self._pulls()

    def grow(self, job: Job, size: int) -> None:
        """The guest rewrote `size` bytes: QEMU keeps the old ones in the job's scratch."""
        with open(self.rig.scratch.dir / f"{job.id}.vda.qcow2", "ab") as f:
            f.write(b"\x5a" * size)
            f.flush()
            os.fsync(f.fileno())

    async def looked(self, times: int = 2) -> None:
        """Until the watch has looked `times` more: what it saw in all but the last of
        those looks, it acted on."""
        until = self.looks + times
        with anyio.fail_after(10):
            while self.looks < until:
                await self._look.wait()


def filling(rig: Rig, monkeypatch: pytest.MonkeyPatch, capacity: int | None = None) -> Filling:
    """The watch started over the rig, as service.py starts it."""
    fs = Filling(rig, capacity)
    monkeypatch.setattr(rig.scratch, "free", fs.free)
    monkeypatch.setattr(rig.jobs, "scratch_users", fs.pulls)
    rig.tg.start_soon(rig.jobs.watch_scratch, 0.01)
    return fs


async def three_pulls(rig: Rig, scratch: tuple[int, int, int]) -> list[Job]:
    """Pull jobs of d1, d2, d3, whose scratch files hold `scratch` bytes."""
    jobs = [await rig.jobs.start(StartRequest(d)) for d in ("d1", "d2", "d3")]
    for job, size in zip(jobs, scratch, strict=True):
        if size:
            Filling(rig).grow(job, size)
    return jobs


def ready(rig: Rig, jobs: list[Job]) -> list[str]:
    return [j.domain for j in jobs if rig.jobs.get(j.id).state == JobState.READY]


async def over_the_reserve(rig: Rig, monkeypatch: pytest.MonkeyPatch
                           ) -> tuple[Job, Job, list[Job], Filling]:
    """Three ready pulls whose scratch files hold 1, 6 and 0 MiB, 2 MiB of free space over
    an 8 MiB reserve, looked at once by the watch."""
    d1, d2, _ = jobs = await three_pulls(rig, (1 * MiB, 6 * MiB, 0))
    held = sum(rig.scratch.sizes(jobs).values())
    rig.scratch.reserve = 8 * MiB
    fs = filling(rig, monkeypatch, capacity=8 * MiB + 2 * MiB + held)
    await fs.looked()
    return d1, d2, jobs, fs


async def test_scratch_files_that_grow_into_the_reserve_end_the_backup_holding_the_most(
        tmp_path: Path, source: FakeSource, monkeypatch: pytest.MonkeyPatch) -> None:
    async with running(tmp_path, source) as rig:
        d1, d2, jobs, fs = await over_the_reserve(rig, monkeypatch)
        assert ready(rig, jobs) == ["d1", "d2", "d3"]  # 2 MiB over the reserve
        fs.grow(d1, 3 * MiB)  # a MiB under it: the scratch files' doing
        failed = await ended(rig.jobs, d2.id)
        assert failed.state == JobState.FAILED and failed.error is not None
        assert failed.error.startswith("scratch space ran out: ") and \
            "under the reserve of 8388608; the backups' scratch files took it and this " \
            "one's held the most" in failed.error, failed.error
        await fs.looked(3)  # its 6 MiB gave the reserve back: nothing more ends
        assert ready(rig, jobs) == ["d1", "d3"]


async def test_a_shortfall_the_scratch_files_did_not_cause_ends_no_backup(
        tmp_path: Path, source: FakeSource, monkeypatch: pytest.MonkeyPatch) -> None:
    """Something else fills the scratch file system under the reserve: ending a backup
    would cut its readers off for nothing; the operator is told, once. A backup is ended
    only if the scratch files then take half of what is left."""
    async with running(tmp_path, source) as rig:
        d1, d2, jobs, fs = await over_the_reserve(rig, monkeypatch)
        with capture_logs() as logged:
            fs.other = 6 * MiB  # 4 MiB under the reserve, 4 MiB left
            await fs.looked(5)
            assert ready(rig, jobs) == ["d1", "d2", "d3"], "a backup was ended for nothing"
            fs.grow(d1, 1 * MiB)  # 3 MiB left: within the half of 4 MiB they may take
            await fs.looked(3)
            assert ready(rig, jobs) == ["d1", "d2", "d3"]
            fs.grow(d1, 2 * MiB)  # 1 MiB left: they took it
            failed = await ended(rig.jobs, d2.id)
        told = [e for e in logged if e["event"].startswith("scratch space is under")]
        assert [(e["log_level"], e["free"], e["reserve"], e["dir"]) for e in told] == [
            ("warning", 4 * MiB, 8 * MiB, str(rig.scratch.dir))], "warned once"
        assert "lower [scratch] reserve" in told[0]["event"]
        assert failed.error is not None and f"under {2 * MiB}, half of what was left when " \
            "free space fell under the reserve of 8388608 for another cause" in failed.error
        assert ready(rig, jobs) == ["d1", "d3"]


async def test_a_chain_is_not_deleted_under_its_running_backup(
        tmp_path: Path, source: FakeSource) -> None:
    async with running(tmp_path, source) as rig:
        other = await rig.jobs.finish((await rig.jobs.start(StartRequest("d1",
                                                                         consumer="o"))).id)
        job = await rig.jobs.start(StartRequest("d1", consumer="c"))
        with pytest.raises(errors.BackupInProgress) as e:
            await rig.jobs.delete_chain("d1", "c")
        assert e.value.parameters == {"domain": "d1", "id": job.id}
        assert await rig.jobs.delete_chain("d1", "o") == [other.checkpoint]
        assert rig.checkpoints() == [job.checkpoint]


# The queue.


async def test_the_queue_starts_jobs_in_order_as_places_free(
        tmp_path: Path, source: FakeSource) -> None:
    async with running(tmp_path, source, max_active=1) as rig:
        jobs = rig.jobs
        first = await jobs.start(StartRequest("d1"))
        second = await jobs.start(StartRequest("d2"))
        third = await jobs.start(StartRequest("d3"))
        assert first.state == JobState.READY
        assert [(j.state, j.position) for j in (second, third)] == [
            (JobState.QUEUED, 1), (JobState.QUEUED, 2)]
        assert sorted(rig.store.load_requests()) == sorted([second.id, third.id])
        with pytest.raises(errors.TooManyJobs) as too_many:
            await jobs.start(StartRequest("d4", queue=False))
        assert too_many.value.parameters == {"limit": 1, "active": 1}
        with pytest.raises(errors.BackupInProgress) as busy:
            await jobs.start(StartRequest("d2"))  # queued claims its domain too
        assert busy.value.parameters == {"domain": "d2", "id": second.id}

        await jobs.finish(first.id)
        assert (await until(jobs, second.id, lambda j: j.state == JobState.READY)).position \
            is None
        assert (jobs.get(third.id).state, jobs.get(third.id).position) == (JobState.QUEUED, 1)
        await jobs.abort(second.id)
        await until(jobs, third.id, lambda j: j.state == JobState.READY)
        assert source.called("begin") == ["d1", "d2", "d3"]
        assert states(jobs.get(third.id)) == ["queued", "starting", "ready"]


async def test_places_freed_at_once_start_the_queue_in_order(
        tmp_path: Path, source: FakeSource) -> None:
    async with running(tmp_path, source, max_active=2) as rig:
        jobs = rig.jobs
        running_ = [await jobs.start(StartRequest(d)) for d in ("d1", "d2")]
        queued = [await jobs.start(StartRequest(d)) for d in ("d3", "d4")]
        planned = len(source.called("plan"))
        stall = source.stall("plan")
        for job in running_:
            await jobs.abort(job.id)
        await stall.reached.wait()
        await anyio.wait_all_tasks_blocked()
        # One at a time: the first waits in the source, the second for it.
        assert source.called("plan")[planned:] == ["d3"]
        assert [jobs.get(j.id).state for j in queued] == [JobState.QUEUED, JobState.QUEUED]
        stall.release()
        for job in queued:
            await until(jobs, job.id, lambda j: j.state == JobState.READY)
        assert source.called("begin") == ["d1", "d2", "d3", "d4"]


async def test_a_place_freed_while_a_job_is_being_queued_starts_it(
        tmp_path: Path, source: FakeSource, monkeypatch: pytest.MonkeyPatch) -> None:
    """A job that ends while a Start is writing its queued job's record takes that job out
    of the queue: its start waits for the record (it used to look for it at once, fail,
    and take the daemon down with it)."""
    async with running(tmp_path, source, max_active=1) as rig:
        first = await rig.jobs.start(StartRequest("d1"))
        saving, go, answered = anyio.Event(), anyio.Event(), anyio.Event()
        save_request = rig.store.save_request

        async def held(job_id: str, record: dict[str, object]) -> None:
            saving.set()
            await go.wait()
            await save_request(job_id, record)

        monkeypatch.setattr(rig.store, "save_request", held)
        queued: list[Job] = []

        async def start() -> None:
            queued.append(await rig.jobs.start(StartRequest("d2")))
            answered.set()

        rig.tg.start_soon(start)
        await saving.wait()
        await rig.jobs.finish(first.id)
        await anyio.wait_all_tasks_blocked()
        go.set()
        await answered.wait()
        second = await until(rig.jobs, queued[0].id, lambda j: j.state == JobState.READY)
        assert states(second) == ["queued", "starting", "ready"]
        await anyio.wait_all_tasks_blocked()
        assert list(rig.store.load_requests()) == []
        assert source.called("begin") == ["d1", "d2"]


async def test_an_aborted_queued_job_never_starts(tmp_path: Path, source: FakeSource) -> None:
    async with running(tmp_path, source, max_active=1) as rig:
        jobs = rig.jobs
        first = await jobs.start(StartRequest("d1"))
        second = await jobs.start(StartRequest("d2"))
        third = await jobs.start(StartRequest("d3"))
        aborted = await jobs.abort(second.id)
        assert states(aborted) == ["queued", "aborted"] and aborted.position is None
        assert jobs.get(third.id).position == 1
        assert list(rig.store.load_requests()) == [third.id]
        assert jobs.active("d2") is None
        with pytest.raises(errors.JobNotReady):
            await jobs.finish(third.id)  # a queued job has nothing to finish
        await jobs.finish(first.id)
        await until(jobs, third.id, lambda j: j.state == JobState.READY)
        assert source.called("begin") == ["d1", "d3"]
        assert rig.chains.get(second.checkpoint) is None


async def test_a_queued_job_that_cannot_start_fails_and_the_next_one_starts(
        tmp_path: Path, source: FakeSource) -> None:
    async with running(tmp_path, source, max_active=1) as rig:
        jobs = rig.jobs
        first = await jobs.start(StartRequest("d1"))
        second = await jobs.start(StartRequest("d2"))
        third = await jobs.start(StartRequest("d3"))
        source.stopped("d2")  # its job has not started: nothing to fail yet
        await anyio.wait_all_tasks_blocked()
        assert jobs.get(second.id).state == JobState.QUEUED
        await jobs.finish(first.id)
        failed = await ended(jobs, second.id)
        assert failed.state == JobState.FAILED and failed.error == (
            "the backup could not start: domain 'd2' is not running (a backup of it may start "
            "again, while it is off; a migration needs it running)")
        await until(jobs, third.id, lambda j: j.state == JobState.READY)
        assert jobs.active("d2") is None


# A migration's drain.


async def test_a_queued_backup_whose_turn_comes_during_its_domains_drain_does_not_start(
        tmp_path: Path, source: FakeSource) -> None:
    async with running(tmp_path, source, max_active=1) as rig:
        first = await rig.jobs.start(StartRequest("d1"))
        queued = await rig.jobs.start(StartRequest("d2", queue=True))
        assert queued.state == JobState.QUEUED
        async with aclosing(rig.migrations.migrate("d2", ELSEWHERE)) as steps:
            assert await anext(steps) == Step("draining", (queued.id,), 0)
            await rig.jobs.finish(first.id)  # its turn, during the drain
            failed = await ended(rig.jobs, queued.id)
            assert (failed.state, failed.error) == (
                JobState.FAILED, "the backup could not start: domain 'd2' is being drained "
                "for a migration; back it up where it lands")
            assert [s.state async for s in steps] == ["migrating", "completed"]
        assert "d2" not in source.called("begin")
        assert source.virt.migrated == [("d2", ELSEWHERE)]


class Migrating:
    """A Migrate run in the rig's task group: its steps as they come, and its end."""

    def __init__(self, rig: Rig, domain: str, force: bool = False) -> None:
        self.steps: list[Step] = []
        self.error: errors.PullbackError | None = None
        self.done = anyio.Event()
        rig.tg.start_soon(self._run, rig, domain, force)

    async def _run(self, rig: Rig, domain: str, force: bool) -> None:
        try:
            async with aclosing(rig.migrations.migrate(domain, ELSEWHERE,
                                                       force=force)) as steps:
                async for step in steps:
                    self.steps.append(step)
        except errors.PullbackError as e:
            self.error = e
        finally:
            self.done.set()

    def states(self) -> list[str]:
        return [s.state for s in self.steps]


MIGRATED = ("ended for the domain's migration: no appliance had used it for [migration] "
            "grace, and nobody confirmed the data")


async def test_the_drain_waits_for_a_start_under_way_then_judges_its_job(
        tmp_path: Path, source: FakeSource) -> None:
    async with running(tmp_path, source, drain_timeout=60) as rig:
        plan = source.stall("plan")  # the Start plans (libvirt: the domain's XML)
        started: list[Job] = []

        async def start() -> None:
            started.append(await rig.jobs.start(StartRequest("d1")))

        rig.tg.start_soon(start)
        await plan.reached.wait()
        claimant = rig.jobs.active("d1")  # claimed, not recorded yet
        assert claimant is not None and rig.jobs.all() == []
        migration = Migrating(rig, "d1")
        await anyio.wait_all_tasks_blocked()
        assert migration.steps == [Step("draining", (claimant,), 0)]
        assert source.virt.migrated == [] and source.called("begin") == []
        plan.release()  # the Start goes on: its backup begins, before any migration
        with anyio.fail_after(10):
            await migration.done.wait()
        assert migration.error is None
        assert migration.states() == ["draining", "migrating", "completed"]
        assert [j.id for j in started] == [claimant]
        # Judged as any: ready, unread for the grace, so ended before libvirt migrated.
        job = rig.jobs.get(claimant)
        assert (job.state, job.error) == (JobState.FAILED, MIGRATED)
        assert JobState.READY in [t.state for t in job.history]
        assert source.called("begin") == ["d1"]
        assert source.virt.migrated == [("d1", ELSEWHERE)]


@pytest.mark.parametrize("force", [False, True], ids=["refused", "forced"])
async def test_a_drain_timed_out_on_a_start_under_way(
        tmp_path: Path, source: FakeSource, force: bool) -> None:
    """The drain's deadline passes while a Start is still under way (planning, claimed, not
    recorded). Not forced: MigrationBlocked names it, and the Start goes on to a ready
    job, untouched. Forced: the migration waits for the Start (it cannot abort a job
    before its record), then aborts its job (its checkpoint goes) and migrates."""
    async with running(tmp_path, source, drain_timeout=0.05) as rig:
        plan = source.stall("plan")
        started: list[Job] = []
        start_returned = anyio.Event()

        async def start() -> None:
            started.append(await rig.jobs.start(StartRequest("d1")))
            start_returned.set()

        rig.tg.start_soon(start)
        await plan.reached.wait()
        claimant = rig.jobs.active("d1")
        assert claimant is not None
        migration = Migrating(rig, "d1", force=force)
        if not force:
            with anyio.fail_after(10):
                await migration.done.wait()
            assert isinstance(migration.error, errors.MigrationBlocked)
            assert migration.error.parameters == {"domain": "d1", "jobs": [claimant],
                                                  "sessions": 0}
        else:
            await anyio.sleep(0.2)  # past the deadline: it waits for the Start
            assert migration.states() == ["draining"] and not migration.done.is_set()
        assert source.virt.migrated == [] and source.called("begin") == []
        plan.release()
        with anyio.fail_after(10):
            await migration.done.wait()
            await start_returned.wait()
        job = rig.jobs.get(claimant)
        if not force:
            assert job.state == JobState.READY and source.virt.migrated == []
        else:
            assert migration.error is None
            assert migration.states() == ["draining", "migrating", "completed"]
            assert job.state == JobState.ABORTED and rig.chain() == []
            assert rig.checkpoints() == []
            assert source.virt.migrated == [("d1", ELSEWHERE)]
        assert started[0].id == claimant and source.called("begin") == ["d1"]


async def test_the_drain_opens_once_a_start_under_way_fails_before_its_record(
        tmp_path: Path, source: FakeSource) -> None:
    async with running(tmp_path, source, drain_timeout=60) as rig:
        plan = source.stall("plan")
        refused: list[errors.PullbackError] = []

        async def start() -> None:
            try:
                await rig.jobs.start(StartRequest("d1"))
            except errors.PullbackError as e:
                refused.append(e)

        rig.tg.start_soon(start)
        await plan.reached.wait()
        claimant = rig.jobs.active("d1")
        assert claimant is not None
        migration = Migrating(rig, "d1")
        await anyio.wait_all_tasks_blocked()
        assert migration.steps == [Step("draining", (claimant,), 0)]
        assert source.virt.migrated == []
        # It fails before it is recorded: no job to watch, yet the gate looks again.
        source.errors["plan"] = errors.DomainNotRunning("d1")
        plan.release()
        with anyio.fail_after(10):
            await migration.done.wait()
        assert migration.error is None
        assert migration.states() == ["draining", "migrating", "completed"]
        assert [type(e) for e in refused] == [errors.DomainNotRunning]
        assert rig.jobs.all() == [] and source.called("begin") == []
        assert source.virt.migrated == [("d1", ELSEWHERE)]


async def test_the_drain_waits_for_a_queued_backup_whose_turn_came_before_it(
        tmp_path: Path, source: FakeSource) -> None:
    async with running(tmp_path, source, max_active=1, drain_timeout=60) as rig:
        first = await rig.jobs.start(StartRequest("d2"))
        queued = await rig.jobs.start(StartRequest("d1", queue=True))
        plan = source.stall("plan")
        await rig.jobs.finish(first.id)  # its turn: past the drain's check, it plans
        with anyio.fail_after(10):
            await plan.reached.wait()
        migration = Migrating(rig, "d1")
        await anyio.wait_all_tasks_blocked()
        assert migration.steps == [Step("draining", (queued.id,), 0)]
        assert source.virt.migrated == [] and "d1" not in source.called("begin")
        plan.release()
        with anyio.fail_after(10):
            await migration.done.wait()
        assert migration.error is None
        assert migration.states() == ["draining", "migrating", "completed"]
        job = rig.jobs.get(queued.id)
        assert (job.state, job.error) == (JobState.FAILED, MIGRATED)
        assert JobState.READY in [t.state for t in job.history]
        assert source.virt.migrated == [("d1", ELSEWHERE)]


async def test_a_drained_domain_takes_no_backup_and_an_unread_one_ends_after_the_grace(
        tmp_path: Path, source: FakeSource) -> None:
    async with running(tmp_path, source) as rig:
        job = await rig.jobs.start(StartRequest("d1"))
        async with aclosing(rig.migrations.migrate("d1", ELSEWHERE)) as steps:
            assert await anext(steps) == Step("draining", (job.id,), 0)
            with pytest.raises(errors.MigrationPending) as e:
                await rig.jobs.start(StartRequest("d1"))
            assert e.value.parameters == {"domain": "d1"}
            other = await rig.jobs.start(StartRequest("d2"))  # other domains go on
            assert [s.state async for s in steps] == ["migrating", "completed"]
        failed = rig.jobs.get(job.id)
        assert failed.state == JobState.FAILED
        assert failed.error == ("ended for the domain's migration: no appliance had used it "
                                "for [migration] grace, and nobody confirmed the data")
        assert rig.chains.get(job.checkpoint) is None and rig.checkpoints() == []
        assert source.virt.migrated == [("d1", ELSEWHERE)]
        assert rig.jobs.get(other.id).state == JobState.READY


@pytest.mark.parametrize("destination", [
    "garbage", "qemu+ssh://elsewhere/", "xen://elsewhere/system", "qemu+ssh://elsewhere:x/system",
    # This host's own libvirt: libvirt refuses, after the drain.
    "qemu:///system", "qemu+unix:///system",
    # What libvirtd, as root, would run or read for the caller.
    "qemu+ext:///system?command=/home/u/x", "qemu+ssh://elsewhere/system?netcat=/home/u/x",
    "qemu+ssh://elsewhere/system?keyfile=/root/.ssh/id_ed25519",
    "qemu+unix:///system?socket=/run/x.sock;command=/home/u/x",
    "qemu+unix:///system?socket=/run/x.sock&socket=/run/y.sock",
    "qemu+ssh://-oProxyCommand=x/system"])
async def test_a_destination_that_is_no_libvirt_uri_is_refused_before_the_drain(
        tmp_path: Path, source: FakeSource, destination: str) -> None:
    async with running(tmp_path, source) as rig:
        job = await rig.jobs.start(StartRequest("d1"))
        with pytest.raises(errors.InvalidParameter) as e:
            async with aclosing(rig.migrations.migrate("d1", destination)) as steps:
                await anext(steps)
        assert e.value.parameters == {"parameter": "destination"}
        assert rig.jobs.get(job.id).state == JobState.READY
        assert rig.chains.get(job.checkpoint) is not None
        assert source.virt.migrated == []


async def test_the_gate_waits_for_a_push_to_end(
        tmp_path: Path, source: FakeSource, push_dir: Path) -> None:
    async with running(tmp_path, source) as rig:
        push = await rig.jobs.start(StartRequest("d1", target_dir=str(push_dir)))
        seen: list[str] = []
        done = anyio.Event()

        async def migrate() -> None:
            async with aclosing(rig.migrations.migrate("d1", ELSEWHERE)) as steps:
                seen.extend([s.state async for s in steps])
            done.set()

        rig.tg.start_soon(migrate)
        await anyio.wait_all_tasks_blocked()
        assert not done.is_set() and source.virt.migrated == []
        source.ended("d1", success=True)
        with anyio.fail_after(2):
            await done.wait()
        assert seen == ["draining", "migrating", "completed"]
        assert rig.jobs.get(push.id).state == JobState.COMPLETED
        assert rig.chain() == [push.checkpoint]


async def test_a_blocked_migration_leaves_the_backup_alone_unless_forced(
        tmp_path: Path, source: FakeSource, push_dir: Path) -> None:
    async with running(tmp_path, source, drain_timeout=0.1) as rig:
        push = await rig.jobs.start(StartRequest("d1", target_dir=str(push_dir)))
        with pytest.raises(errors.MigrationBlocked) as e:
            async with aclosing(rig.migrations.migrate("d1", ELSEWHERE)) as steps:
                async for _ in steps:
                    pass
        assert e.value.parameters == {"domain": "d1", "jobs": [push.id], "sessions": 0}
        assert rig.jobs.get(push.id).state == JobState.RUNNING
        assert source.virt.migrated == []
        with pytest.raises(errors.BackupInProgress):  # drained no more
            await rig.jobs.start(StartRequest("d1"))

        async with aclosing(rig.migrations.migrate("d1", ELSEWHERE, force=True)) as steps:
            assert [s.state async for s in steps] == ["draining", "migrating", "completed"]
        assert rig.jobs.get(push.id).state == JobState.ABORTED
        assert source.virt.migrated == [("d1", ELSEWHERE)]


# Each failure of the source.


async def test_plan_failing_records_nothing(tmp_path: Path, source: FakeSource) -> None:
    source.errors["plan"] = errors.DomainBusy("d1", "snapshot")
    async with running(tmp_path, source, max_active=1) as rig:
        with pytest.raises(errors.DomainBusy):
            await rig.jobs.start(StartRequest("d1"))
        assert rig.jobs.all() == [] and rig.store.load_jobs() == [] and rig.chains.all() == []
        assert rig.jobs.active("d1") is None
        del source.errors["plan"]
        await rig.jobs.start(StartRequest("d1"))
        source.errors["plan"] = errors.DomainBusy("d2", "snapshot")
        with pytest.raises(errors.DomainBusy):  # nor is it queued
            await rig.jobs.start(StartRequest("d2"))
        assert len(rig.jobs.all()) == 1 and rig.store.load_requests() == {}
        assert rig.jobs.active("d2") is None


async def test_begin_failing_fails_the_job_and_frees_the_domain(
        tmp_path: Path, source: FakeSource) -> None:
    source.errors["begin"] = errors.LibvirtError(1, "internal error: no space left")
    async with running(tmp_path, source) as rig:
        with pytest.raises(errors.LibvirtError):
            await rig.jobs.start(StartRequest("d1"))
        [failed] = rig.jobs.all()
        assert (failed.state, failed.error) == (
            JobState.FAILED, "the backup did not start: libvirt error 1: "
                             "internal error: no space left")
        assert states(failed) == ["starting", "failed"]
        assert rig.chains.all() == [] and rig.checkpoints() == []
        assert source.called("end") == []  # nothing began
        del source.errors["begin"]
        assert (await rig.jobs.start(StartRequest("d1"))).state == JobState.READY


async def test_exports_failing_ends_the_backup_and_fails_the_job(
        tmp_path: Path, source: FakeSource) -> None:
    source.errors["exports"] = errors.LibvirtError(1, "flaky")
    async with running(tmp_path, source) as rig:
        with pytest.raises(errors.LibvirtError):
            await rig.jobs.start(StartRequest("d1"))
        [failed] = rig.jobs.all()
        assert (failed.state, failed.error) == (
            JobState.FAILED, "the backup started but could not be read: libvirt error 1: flaky")
        assert source.called("end") == ["d1"] and source.backups == {}
        assert rig.chains.all() == [] and rig.checkpoints() == []
        assert not rig.endpoint(failed).exists()
        del source.errors["exports"]
        assert (await rig.jobs.start(StartRequest("d1"))).state == JobState.READY


async def test_a_backup_that_can_be_neither_read_nor_ended_says_so_and_goes_at_restart(
        tmp_path: Path, source: FakeSource) -> None:
    source.errors["exports"] = errors.LibvirtError(1, "flaky")
    source.errors["end"] = errors.LibvirtError(1, "stuck")
    async with running(tmp_path, source) as rig:
        with pytest.raises(errors.LibvirtError):
            await rig.jobs.start(StartRequest("d1"))
        [failed] = rig.jobs.all()
        assert failed.state == JobState.FAILED
        assert failed.error == (
            "the backup started but could not be read: libvirt error 1: flaky; ending it "
            "failed too (libvirt error 1: stuck): end it with `virsh domjobabort d1`")
        assert rig.checkpoints() == []
        # The source still runs it: the domain is refused by the source, not by us.
        with pytest.raises(errors.BackupInProgress) as e:
            await rig.jobs.start(StartRequest("d1"))
        assert e.value.parameters == {"domain": "d1", "id": ""}
    source.errors.clear()
    async with running(tmp_path, source) as rig:
        # A backup of ours that only a failed job owns: ended at start.
        assert source.called("end_unowned") == ["d1"] and source.backups == {}
        assert (await rig.jobs.start(StartRequest("d1"))).state == JobState.READY


async def test_end_failing_leaves_the_job_to_be_ended_again(
        tmp_path: Path, source: FakeSource) -> None:
    async with running(tmp_path, source) as rig:
        job = await rig.jobs.start(StartRequest("d1"))
        source.errors["end"] = errors.LibvirtError(1, "stuck")
        with pytest.raises(errors.LibvirtError):
            await rig.jobs.finish(job.id)
        assert rig.jobs.get(job.id).state == JobState.READY
        assert rig.jobs.active("d1") == job.id
        assert rig.chains.get(job.checkpoint) is not None and rig.chain() == []
        del source.errors["end"]
        assert (await rig.jobs.finish(job.id)).state == JobState.COMPLETED
        assert rig.chain() == [job.checkpoint]


async def test_an_end_nobody_waits_on_is_tried_again_until_it_ends(
        tmp_path: Path, source: FakeSource) -> None:
    async with running(tmp_path, source) as rig:
        job = await rig.jobs.start(StartRequest("d1"))
        source.errors["end"] = errors.LibvirtError(1, "stuck")
        source.ended("d1", success=False, error="I/O error")
        await anyio.sleep(0.1)
        assert rig.jobs.get(job.id).state == JobState.READY  # it could not end yet
        del source.errors["end"]
        failed = await ended(rig.jobs, job.id)  # the retry, a second later
        assert failed.state == JobState.FAILED and rig.jobs.active("d1") is None


async def test_get_shows_the_scratch_the_source_reports(
        tmp_path: Path, source: FakeSource) -> None:
    async with running(tmp_path, source) as rig:
        job = await rig.jobs.start(StartRequest("d1"))
        assert (await rig.jobs.details(job.id)).scratch == Scratch(4096, 3 << 20)
        (tmp_path / "scratch").mkdir(exist_ok=True)
        (tmp_path / "scratch" / f"{job.id}.vda.qcow2").write_bytes(b"x" * 8192)
        vda, vdb = (await rig.jobs.details(job.id)).disks
        assert (vda.scratch or 0) >= 8192 and vdb.scratch == 0
        done = await rig.jobs.finish(job.id)
        assert (await rig.jobs.details(done.id)).scratch is None  # ended: not asked


async def test_a_completed_backup_stays_completed_when_libvirt_is_busy_after_its_end(
        tmp_path: Path, source: FakeSource) -> None:
    """Finish recorded the job completed; then the domain's metadata could not be written
    (another libvirt job held the domain for 30 s): the job is completed all the same,
    its checkpoint in the chain, the domain free; the metadata follows at the next end."""
    async with running(tmp_path, source) as rig:
        job = await rig.jobs.start(StartRequest("d1", consumer="c"))
        rig.virt.errors["set_metadata"] = errors.DomainBusy("d1", "migration")
        done = await rig.jobs.finish(job.id)
        assert done.state == JobState.COMPLETED and rig.chain() == [job.checkpoint]
        assert rig.jobs.active("d1") is None
        assert [j.state for j in rig.store.load_jobs()] == [JobState.COMPLETED]
        del rig.virt.errors["set_metadata"]
        assert (await rig.jobs.finish(job.id)).state == JobState.COMPLETED  # idempotent
        second = await rig.jobs.finish((await rig.jobs.start(StartRequest("d1",
                                                                          consumer="c"))).id)
        assert rig.chain() == [job.checkpoint, second.checkpoint]
        assert second.checkpoint in rig.virt.metadata_xmls["d1"]


async def test_a_chain_deletion_cut_short_is_not_undone_by_the_domains_metadata(
        tmp_path: Path, source: FakeSource) -> None:
    """A crash after DeleteChain marked a checkpoint for deletion and before it rewrote
    the domain's metadata: the next start deletes it and takes it out of the metadata,
    so that no later Start takes it in again from there."""
    async with running(tmp_path, source) as rig:
        first = await rig.jobs.finish((await rig.jobs.start(StartRequest(
            "d1", consumer="c"))).id)
        assert first.checkpoint in rig.virt.metadata_xmls["d1"]
        [listed] = [c for c in rig.chains.all() if c.name == first.checkpoint]
    store = Store(tmp_path / "state.db")  # what the crash left in the database
    await store.save_checkpoint(dataclasses.replace(listed, state=CheckpointState.DISCARD))
    store.close()
    async with running(tmp_path, source) as rig:
        assert rig.checkpoints() == [] and rig.chain(consumer="c") == []
        assert first.checkpoint not in rig.virt.metadata_xmls.get("d1", "")
        job = await rig.jobs.start(StartRequest("d1", consumer="c"))
        assert rig.chain(consumer="c") == []
        assert [d.mode for d in job.disks] == ["full", "full"]


async def test_a_crash_before_the_domains_metadata_followed_a_backups_end_is_made_good(
        tmp_path: Path, source: FakeSource) -> None:
    """A crash right after a job's end was recorded (crash point end.recorded), before the
    domain's metadata was rewritten: the next start rewrote it only for checkpoints it
    deleted, so a migration carried the chain without its newest checkpoint, and a new
    database (a damaged one moved aside) did not know it. The next start rewrites it,
    keeping what it carries from elsewhere; a start that finds it right writes nothing."""
    async with running(tmp_path, source) as rig:
        first = await rig.jobs.finish((await rig.jobs.start(StartRequest(
            "d1", consumer="c"))).id)
        before = rig.virt.metadata_xmls["d1"]
        newest = await rig.jobs.finish((await rig.jobs.start(StartRequest(
            "d1", consumer="c", mode="incremental"))).id)
    # What the crash left: the metadata as it was before the end, which also carries a
    # checkpoint another host's pullbackd took (the domain migrated here since).
    moved = xml.ChainEntry(checkpoint_name("o", "0000000000ff"), "o", "0000000000ff", now(),
                           ("vda",), None)
    source.virt.metadata_xmls["d1"] = xml.chains([*xml.parse_chains(before), moved])
    async with running(tmp_path, source) as rig:
        assert [e.name for e in xml.parse_chains(rig.virt.metadata_xmls["d1"])] == [
            first.checkpoint, newest.checkpoint, moved.name]
        assert rig.chain(consumer="o") == [moved.name]
    source.virt.errors["set_metadata"] = AssertionError("a start wrote metadata it found right")
    async with running(tmp_path, source):
        pass
    del source.virt.errors["set_metadata"]
    lose_the_database(tmp_path)
    async with running(tmp_path, source) as rig:
        job = await rig.jobs.start(StartRequest("d1", consumer="c", mode="incremental"))
        assert [(d.mode, d.since) for d in job.disks] == [
            ("incremental", newest.checkpoint)] * 2


async def test_a_backup_the_source_cannot_tell_of_at_a_restart_is_held_as_found(
        tmp_path: Path, source: FakeSource) -> None:
    """The source cannot say whether a job's backup runs (its QEMU does not answer): the
    job stays as it was, holding its domain, and every other domain goes on; a next
    start that can tell adopts it, or an Abort ends it."""
    async with running(tmp_path, source) as rig:
        job = await rig.jobs.start(StartRequest("d1"))
        other = await rig.jobs.start(StartRequest("d2"))
    source.errors["running"] = errors.DomainBusy("d1", "unknown")  # (for both)
    async with running(tmp_path, source) as rig:
        assert [j.state for j in rig.store.load_jobs()] == [JobState.READY] * 2
        assert source.called("end") == []
        assert (rig.jobs.active("d1"), rig.jobs.active("d2")) == (job.id, other.id)
        with pytest.raises(errors.BackupInProgress):
            await rig.jobs.start(StartRequest("d1"))
        assert (await rig.jobs.start(StartRequest("d3"))).state == JobState.READY
    del source.errors["running"]
    async with running(tmp_path, source) as rig:
        assert rig.jobs.get(job.id).state == JobState.READY
        assert (await rig.jobs.finish(job.id)).state == JobState.COMPLETED
        assert (await rig.jobs.finish(other.id)).state == JobState.COMPLETED
    source.errors["running"] = errors.DomainBusy("d3", "unknown")
    async with running(tmp_path, source) as rig:
        [held] = [j for j in rig.jobs.all() if j.domain == "d3"]
        del source.errors["running"]
        assert (await rig.jobs.abort(held.id)).state == JobState.ABORTED
        assert rig.jobs.active("d3") is None and "d3" not in source.backups


async def test_unowned_failing_at_a_restart_stops_the_recovery(
        tmp_path: Path, source: FakeSource) -> None:
    source.errors["unowned"] = errors.LibvirtError(1, "connection reset")
    async with running(tmp_path, source, recover=False) as rig:
        with pytest.raises(errors.LibvirtError):
            await rig.jobs.recover()
        assert source.swept == []


# What the source's events tell.


async def test_a_pull_backup_the_source_ended_fails_with_the_sources_why(
        tmp_path: Path, source: FakeSource) -> None:
    async with running(tmp_path, source) as rig:
        job = await rig.jobs.start(StartRequest("d1"))
        source.ended("d1", success=True, error="Operation canceled")
        failed = await ended(rig.jobs, job.id)
        assert (failed.state, failed.error) == (
            JobState.FAILED, "the fake source ended the backup: Operation canceled")
        assert rig.checkpoints() == [] and not rig.endpoint(job).exists()
        assert rig.jobs.active("d1") is None


@pytest.mark.parametrize(("success", "error", "outcome", "why"), [
    (True, None, JobState.COMPLETED, None),
    (False, "No space left on device", JobState.FAILED, "No space left on device"),
    (False, None, JobState.FAILED, "libvirt: push failed"),
], ids=["completed", "failed", "failed-without-why"])
async def test_a_push_ends_with_the_sources_word(
        tmp_path: Path, source: FakeSource, push_dir: Path, success: bool, error: str | None,
        outcome: JobState, why: str | None) -> None:
    async with running(tmp_path, source) as rig:
        job = await rig.jobs.start(StartRequest("d1", target_dir=str(push_dir)))
        source.ended("d1", success, error)
        done = await ended(rig.jobs, job.id)
        assert (done.state, done.error) == (outcome, why)
        if success:
            assert rig.chain() == [job.checkpoint]
            assert files(push_dir) == [f"{job.id}.vda.qcow2", f"{job.id}.vdb.qcow2"]
        else:
            assert rig.chain() == [] and rig.checkpoints() == []
            assert files(push_dir) == []


def record_syncs(monkeypatch: pytest.MonkeyPatch, failing: Path | None = None) -> list[Path]:
    """The files and folders os.fsync syncs from here on (a power cut cannot be made);
    with `failing`, syncing what is in that folder fails, as on a file system gone bad."""
    synced: list[Path] = []
    real = os.fsync

    def recording(fd: int) -> None:
        path = Path(os.readlink(f"/proc/self/fd/{fd}"))
        if failing is not None and path.parent == failing:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        synced.append(path)
        real(fd)

    monkeypatch.setattr(os, "fsync", recording)
    return synced


async def test_a_push_is_on_disk_with_its_names_before_it_completes(
        tmp_path: Path, source: FakeSource, push_dir: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """libvirt (or a shut-off domain's daemon) writes a push's files, and nothing synced
    them nor the folder that names them before the job was recorded completed: a power cut
    then could lose the backup. Both are synced first."""
    synced = record_syncs(monkeypatch)
    async with running(tmp_path, source) as rig:
        job = await rig.jobs.start(StartRequest("d1", target_dir=str(push_dir)))
        source.ended("d1", success=True)
        assert (await ended(rig.jobs, job.id)).state == JobState.COMPLETED
    targets = [push_dir / f"{job.id}.{disk}.qcow2" for disk in ("vda", "vdb")]
    assert [path for path in [*targets, push_dir] if path not in synced] == []


async def test_a_push_whose_files_cannot_be_synced_fails_and_leaves_none(
        tmp_path: Path, source: FakeSource, push_dir: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    record_syncs(monkeypatch, failing=push_dir)
    async with running(tmp_path, source) as rig:
        job = await rig.jobs.start(StartRequest("d1", target_dir=str(push_dir)))
        source.ended("d1", success=True)
        failed = await ended(rig.jobs, job.id)
        assert (failed.state, failed.error) == (JobState.FAILED, (
            f"its files cannot be written to disk ([Errno 5] Input/output error: "
            f"'{push_dir}/{job.id}.vda.qcow2'): they are no backup; start it again once "
            "that folder's file system works"))
        assert rig.chain() == [] and rig.checkpoints() == [] and files(push_dir) == []


async def test_a_start_whose_endpoint_cannot_open_ends_what_it_began(
        tmp_path: Path, source: FakeSource) -> None:
    """The backup began, and then its endpoint could not open (the exports folder went
    away): the Start fails, and with it the backup and its checkpoint; the domain is
    free, and nobody can complete the job into the chain."""
    stall = source.stall("exports")
    async with running(tmp_path, source) as rig:
        async with anyio.create_task_group() as tg:
            async def start() -> None:
                with pytest.raises(OSError):
                    await rig.jobs.start(StartRequest("d1"))
            tg.start_soon(start)
            await stall.reached.wait()
            rig.exports.dir.rename(tmp_path / "gone")
            stall.release()
        [job] = rig.jobs.all()
        assert job.state == JobState.FAILED and "could not be read" in str(job.error)
        assert "d1" not in source.backups and rig.checkpoints() == [] and rig.chain() == []
        assert rig.jobs.active("d1") is None
        assert (await rig.jobs.finish(job.id)).state == JobState.FAILED  # as it ended
        (tmp_path / "gone").rename(rig.exports.dir)
        again = await rig.jobs.start(StartRequest("d1"))
        assert again.state == JobState.READY


async def test_a_push_whose_end_cannot_be_recorded_yet_ends_once_it_can(
        tmp_path: Path, source: FakeSource, push_dir: Path) -> None:
    """libvirt's word on a push comes with nobody waiting for it: if its end cannot be
    recorded (another process holds the state database), pullbackd tries again, and
    every other job goes on."""
    async with running(tmp_path, source) as rig:
        push = await rig.jobs.start(StartRequest("d1", target_dir=str(push_dir)))
        pull = await rig.jobs.start(StartRequest("d2"))
        holder = sqlite3.connect(tmp_path / "state.db", isolation_level=None)
        retrying = anyio.Event()

        def tell(_logger: object, _method: str, event: structlog.typing.EventDict
                 ) -> structlog.typing.EventDict:
            if event["event"] == "could not end a job; trying again":
                retrying.set()
            return event

        try:
            with capture_logs(processors=[tell]):
                holder.execute("BEGIN EXCLUSIVE")
                source.ended("d1", success=True)
                with anyio.fail_after(60):
                    await retrying.wait()
                assert rig.jobs.get(push.id).state == JobState.RUNNING
                holder.execute("ROLLBACK")
        finally:
            holder.close()
        done = await ended(rig.jobs, push.id)
        assert done.state == JobState.COMPLETED and rig.chain() == [push.checkpoint]
        assert files(push_dir) == [f"{push.id}.vda.qcow2", f"{push.id}.vdb.qcow2"]
        assert rig.jobs.get(pull.id).state == JobState.READY
        assert (await rig.jobs.finish(pull.id)).state == JobState.COMPLETED


async def test_a_push_that_ends_before_start_returns(
        tmp_path: Path, source: FakeSource, push_dir: Path) -> None:
    stall = source.stall("exports")
    async with running(tmp_path, source) as rig:
        rig.tg.start_soon(rig.jobs.start, StartRequest("d1", target_dir=str(push_dir)))
        await stall.reached.wait()
        [job] = rig.jobs.all()
        source.ended("d1", success=True)  # while Start still holds the job
        await anyio.wait_all_tasks_blocked()
        assert rig.jobs.get(job.id).state == JobState.STARTING
        stall.release()
        done = await ended(rig.jobs, job.id)
        assert states(done) == ["starting", "running", "completed"]
        assert rig.chain() == [job.checkpoint]


async def test_a_stopped_domain_fails_its_job_and_its_checkpoint_goes_offline(
        tmp_path: Path, source: FakeSource) -> None:
    async with running(tmp_path, source) as rig:
        full = await rig.jobs.finish((await rig.jobs.start(StartRequest("d1"))).id)
        cut = await rig.jobs.start(StartRequest("d1", mode="incremental"))
        source.stopped("d1", "destroyed")
        failed = await ended(rig.jobs, cut.id)
        assert (failed.state, failed.error) == (
            JobState.FAILED, "the domain stopped (destroyed) during the backup")
        # libvirt deletes no checkpoint of a shut-off domain: its bitmaps go out of the
        # images (the offline source's), then libvirt's metadata.
        assert source.virt.forgotten == [("d1", ["vda", "vdb"], cut.checkpoint)]
        assert rig.chains.get(cut.checkpoint) is None
        assert rig.chain() == [full.checkpoint] and cut.checkpoint not in rig.checkpoints()
        source.virt.running["d1"] = True
        nxt = await rig.jobs.start(StartRequest("d1", mode="incremental"))
        assert nxt.since == full.checkpoint


async def test_finish_after_the_backup_vanished_fails(
        tmp_path: Path, source: FakeSource) -> None:
    async with running(tmp_path, source) as rig:
        job = await rig.jobs.start(StartRequest("d1"))
        del source.backups["d1"]  # ended, and its event lost
        failed = await rig.jobs.finish(job.id)
        assert (failed.state, failed.error) == (
            JobState.FAILED, "the backup ended before Finish: the domain stopped or the "
                             "libvirt job was ended outside pullbackd")
        assert rig.chain() == [] and rig.checkpoints() == []


async def test_a_lost_source_is_told_with_every_endpoint_still_up(
        tmp_path: Path, source: FakeSource) -> None:
    async with running(tmp_path, source) as rig:
        job = await rig.jobs.start(StartRequest("d1"))
        source.lose("libvirtd closed the connection")
        with anyio.fail_after(2):
            await rig.lost_told.wait()
        assert rig.lost == [("libvirtd closed the connection", [f"{job.id}.sock"])]
        assert rig.jobs.get(job.id).state == JobState.READY  # for the next run to adopt


async def test_events_of_domains_without_a_running_job_change_nothing(
        tmp_path: Path, source: FakeSource) -> None:
    async with running(tmp_path, source) as rig:
        job = await rig.jobs.finish((await rig.jobs.start(StartRequest("d1"))).id)
        source.ended("d1", success=False, error="late")
        source.stopped("d2")
        await anyio.wait_all_tasks_blocked()
        assert rig.jobs.all() == [job] and source.called("why_ended") == []


# pullbackd's own copy; expiry.


@pytest.mark.parametrize("cause", [None, "the domain stopped during the backup"])
async def test_a_copy_that_fails_fails_its_job(
        tmp_path: Path, source: FakeSource, cause: str | None) -> None:
    if cause:
        source.causes["d1"] = cause
    destination = f"nbd+unix:///{{disk}}?socket={tmp_path}/appliance.sock"
    async with running(tmp_path, source) as rig:
        job = await rig.jobs.start(StartRequest("d1", destination=destination))
        assert job.state == JobState.RUNNING and all(d.url is None for d in job.disks)
        failed = await ended(rig.jobs, job.id)
        assert failed.state == JobState.FAILED
        prefix = f"{cause} (the copy failed: " if cause else f"streaming to {destination} failed"
        assert failed.error is not None and failed.error.startswith(prefix), failed.error
        assert source.called("end") == ["d1"] and rig.checkpoints() == []


async def test_a_job_nobody_reads_expires(tmp_path: Path, source: FakeSource) -> None:
    async with running(tmp_path, source, limits=Limits(idle_timeout=0.1)) as rig:
        job = await rig.jobs.start(StartRequest("d1"))
        expired = await ended(rig.jobs, job.id)
        assert (expired.state, expired.error) == (
            JobState.EXPIRED, "no appliance used it for [exports] idle_timeout (0.1 s)")
        assert rig.checkpoints() == [] and source.backups == {}


async def test_a_job_that_outlives_max_lifetime_expires(
        tmp_path: Path, source: FakeSource) -> None:
    limits = Limits(idle_timeout=0, max_lifetime=0.1)
    async with running(tmp_path, source, limits=limits) as rig:
        job = await rig.jobs.start(StartRequest("d1"))
        expired = await ended(rig.jobs, job.id)
        assert expired.state == JobState.EXPIRED
        assert expired.error == ("it ran for [exports] max_lifetime (0.1 s); appliances must "
                                 "finish sooner, or the limit be raised")


async def backdate(tmp_path: Path, job_id: str, by: timedelta) -> None:
    """The stored job as if it and each step of its history had come `by` earlier (the
    rig closed)."""
    def earlier(at: str) -> str:
        return timestamp(datetime.fromisoformat(at) - by)

    store = Store(tmp_path / "state.db")
    try:
        job = next(j for j in store.load_jobs() if j.id == job_id)
        await store.save_job(dataclasses.replace(job, created=earlier(job.created), history=tuple(
            Transition(t.state, earlier(t.at)) for t in job.history)))
    finally:
        store.close()


async def test_max_lifetime_counts_from_ready_not_from_the_wait_in_the_queue(
        tmp_path: Path, source: FakeSource) -> None:
    """A job that waited its turn under [jobs] max_active (here an hour, across a restart)
    has the whole of [exports] max_lifetime once its appliance can read it."""
    async with running(tmp_path, source, max_active=1) as rig:
        first = await rig.jobs.start(StartRequest("d1"))
        waited = await rig.jobs.start(StartRequest("d2"))
        assert waited.state == JobState.QUEUED
    await backdate(tmp_path, waited.id, timedelta(hours=1))
    lifetime = 2.0
    async with running(tmp_path, source, max_active=1,
                       limits=Limits(idle_timeout=0, max_lifetime=lifetime)) as rig:
        await rig.jobs.finish(first.id)
        with rig.jobs.watch() as changes, anyio.fail_after(30):
            while not (expired := rig.jobs.get(waited.id)).state.final:
                await changes.receive()
    assert expired.state == JobState.EXPIRED, expired.error
    assert states(expired) == ["queued", "starting", "ready", "expired"]
    at = {t.state: datetime.fromisoformat(t.at) for t in expired.history}
    # The timer starts a moment before `ready` is recorded: half the lifetime is a margin.
    served = (at[JobState.EXPIRED] - at[JobState.READY]).total_seconds()
    assert served >= lifetime / 2, f"it expired {served:.3f} s after it became ready"


async def test_a_job_served_again_after_a_restart_keeps_the_lifetime_it_used(
        tmp_path: Path, source: FakeSource) -> None:
    async with running(tmp_path, source) as rig:
        job = await rig.jobs.start(StartRequest("d1"))
    await backdate(tmp_path, job.id, timedelta(hours=1))  # ready an hour before the restart
    async with running(tmp_path, source,
                       limits=Limits(idle_timeout=0, max_lifetime=600)) as rig:
        expired = await ended(rig.jobs, job.id)
        assert (expired.state, expired.error) == (JobState.EXPIRED, (
            "it ran for [exports] max_lifetime (600 s); appliances must finish sooner, or "
            "the limit be raised"))


# Recovery.


async def test_a_restart_adopts_what_the_source_runs_and_fails_the_rest(
        tmp_path: Path, source: FakeSource, push_dir: Path) -> None:
    async with running(tmp_path, source) as rig:
        kept = await rig.jobs.start(StartRequest("d1"))
        gone = await rig.jobs.start(StartRequest("d2"))
        push = await rig.jobs.start(StartRequest("d3", target_dir=str(push_dir)))
    del source.backups["d2"]  # ended while pullbackd was down
    async with running(tmp_path, source) as rig:
        assert rig.jobs.get(kept.id).state == JobState.READY
        assert rig.endpoint(kept).is_socket(), "served again"
        with pytest.raises(errors.BackupInProgress) as e:
            await rig.jobs.start(StartRequest("d1"))
        assert e.value.parameters == {"domain": "d1", "id": kept.id}
        failed = rig.jobs.get(gone.id)
        assert (failed.state, failed.error) == (
            JobState.FAILED, "pullbackd restarted while the job was ready, and libvirt no "
                             "longer runs it")
        assert rig.checkpoints("d2") == [] and rig.chains.get(gone.checkpoint) is None
        assert rig.jobs.get(push.id).state == JobState.RUNNING
        assert source.swept[-1] == {kept.id, push.id}
        assert (await rig.jobs.finish(kept.id)).state == JobState.COMPLETED
        source.ended("d3", success=True)
        assert (await ended(rig.jobs, push.id)).state == JobState.COMPLETED
        assert rig.chain("d1") == [kept.checkpoint] and rig.chain("d3") == [push.checkpoint]


def _recorded(job: Job, checkpoint: CheckpointState) -> Checkpoint:
    return Checkpoint(job.checkpoint, job.domain, job.consumer, job.id, job.created,
                      checkpoint, ("vda",))


@pytest.mark.parametrize(("state", "destination", "runs", "why"), [
    (JobState.STARTING, None, False, "pullbackd restarted while the job was starting"),
    (JobState.STARTING, None, True, "pullbackd restarted while the job was starting"),
    (JobState.RUNNING, "local", True,
     "pullbackd restarted during its own copy, which cannot resume"),
    (JobState.RUNNING, "local", False,
     "pullbackd restarted during its own copy, which cannot resume, and libvirt no longer "
     "runs the backup"),
], ids=["starting", "starting-begun", "copying", "copying-ended"])
async def test_jobs_that_cannot_go_on_after_a_restart_fail_and_lose_their_checkpoint(
        tmp_path: Path, source: FakeSource, state: JobState, destination: str | None,
        runs: bool, why: str) -> None:
    """What a crash leaves mid-start, or during pullbackd's own copy."""
    job_id = "0123456789ab"
    job = Job(job_id, "d1", state, "full", now(), "c", checkpoint_name("c", job_id),
              destination=destination)
    store = Store(tmp_path / "state.db")
    await store.save_job(job)
    await store.save_checkpoint(_recorded(job, CheckpointState.PENDING))
    store.close()
    if runs:
        source.virt.checkpoint_xmls["d1", job.checkpoint] = "<domaincheckpoint/>"
        source.backups["d1"] = Backup(job_id, job.checkpoint, Begun(
            source.socket(job), (Exported("vda", "vda-x", None, None, None),)))
    async with running(tmp_path, source) as rig:
        failed = rig.jobs.get(job_id)
        assert (failed.state, failed.error) == (JobState.FAILED, why)
        assert source.called("end") == ["d1"] and source.backups == {}
        assert rig.chains.all() == [] and rig.checkpoints() == []
        assert rig.jobs.active("d1") is None


@pytest.mark.parametrize("found", ["busy", "unreachable"])
async def test_a_guest_a_crash_left_frozen_is_thawed_whatever_else_recovery_finds(
        tmp_path: Path, source: FakeSource, found: str) -> None:
    """A crash while the guest was frozen; at the restart libvirt cannot tell whether the
    backup runs (the job is held as found), or its exports are gone (it fails): the
    guest stayed frozen, as recovery thawed only a job it ended itself."""
    job_id = "0123456789ab"
    job = Job(job_id, "d1", JobState.STARTING, "full", now(), "c",
              checkpoint_name("c", job_id), quiesce="auto")
    store = Store(tmp_path / "state.db")
    await store.save_job(job, _recorded(job, CheckpointState.PENDING))
    await store.save_freeze("d1", job_id)  # the freeze was asked
    store.close()
    source.agents.add("d1")
    source.frozen.add("d1")
    if found == "busy":
        source.errors["running"] = errors.DomainBusy("d1", "query")
    else:
        source.backups["d1"] = Backup(job_id, job.checkpoint, Begun(
            source.socket(job), (Exported("vda", "vda-x", None, None, None),)))
        source.unreachable.add("d1")
    async with running(tmp_path, source) as rig:
        assert source.frozen == set() and source.called("thaw") == ["d1"]
        assert rig.jobs.get(job_id).state == (
            JobState.STARTING if found == "busy" else JobState.FAILED)


async def test_checkpoints_of_jobs_that_did_not_complete_are_deleted_at_start(
        tmp_path: Path, source: FakeSource) -> None:
    # A crash between recording a job's end and deleting its checkpoint, and a
    # checkpoint libvirt could not delete then.
    pending = Job("00000000000a", "d1", JobState.FAILED, "full", now(), "c",
                  checkpoint_name("c", "00000000000a"), ended=now(), error="x")
    discard = Job("00000000000b", "d2", JobState.ABORTED, "full", now(), "c",
                  checkpoint_name("c", "00000000000b"), ended=now())
    completed = Job("00000000000c", "d3", JobState.COMPLETED, "full", now(), "c",
                    checkpoint_name("c", "00000000000c"), ended=now())
    store = Store(tmp_path / "state.db")
    for job, checkpoint in [(pending, CheckpointState.PENDING),
                            (discard, CheckpointState.DISCARD),
                            (completed, CheckpointState.COMPLETE)]:
        await store.save_job(job, _recorded(job, checkpoint))
        source.virt.checkpoint_xmls[job.domain, job.checkpoint] = "<domaincheckpoint/>"
    store.close()
    async with running(tmp_path, source) as rig:
        assert [c.name for c in rig.chains.all()] == [completed.checkpoint]
        assert list(source.virt.checkpoint_xmls) == [("d3", completed.checkpoint)]


async def test_queued_jobs_keep_their_place_across_a_restart(
        tmp_path: Path, source: FakeSource) -> None:
    async with running(tmp_path, source, max_active=1) as rig:
        first = await rig.jobs.start(StartRequest("d1"))
        queued = [await rig.jobs.start(StartRequest(d, consumer="q")) for d in ("d2", "d3", "d4")]
        await rig.store.delete_request(queued[1].id)  # what a damaged record would be
    async with running(tmp_path, source, max_active=1) as rig:
        jobs = rig.jobs
        lost = jobs.get(queued[1].id)
        assert (lost.state, lost.error) == (JobState.FAILED, "its request was lost")
        assert [(jobs.get(j.id).state, jobs.get(j.id).position)
                for j in (queued[0], queued[2])] == [(JobState.QUEUED, 1), (JobState.QUEUED, 2)]
        with pytest.raises(errors.BackupInProgress):
            await jobs.start(StartRequest("d2"))
        await jobs.finish(first.id)
        second = await until(jobs, queued[0].id, lambda j: j.state == JobState.READY)
        assert second.consumer == "q"  # started as it was asked
        await jobs.abort(second.id)
        await until(jobs, queued[2].id, lambda j: j.state == JobState.READY)
        assert source.called("begin") == ["d1", "d2", "d4"]


#: A daemon over the fake source in argv[1] with one place: a backup of d1 takes it, one
#: of d2 is queued (its id printed last) and aborted; it dies where crash.ENV says.
ABORTING_QUEUED = """
import sys
from pathlib import Path
import anyio
from pullbackd.model import StartRequest
from tests.fakes import FakeSource, FakeVirt
from tests.test_jobs import running

async def main() -> None:
    tmp = Path(sys.argv[1])
    async with running(tmp, FakeSource(FakeVirt(), tmp / "source"), max_active=1) as rig:
        await rig.jobs.start(StartRequest("d1"))
        queued = await rig.jobs.start(StartRequest("d2"))
        print(queued.id, flush=True)
        await rig.jobs.abort(queued.id)

anyio.run(main)
"""


@pytest.mark.parametrize(("point", "outcome"), [("end.cleaned", JobState.READY),
                                                ("end.recorded", JobState.ABORTED)])
async def test_an_abort_of_a_queued_job_cut_short_leaves_it_queued_or_aborted(
        tmp_path: Path, source: FakeSource, point: str, outcome: JobState) -> None:
    """Abort of a queued job, killed before its end is recorded (end.cleaned) or after
    (end.recorded). It deleted the job's request first: killed before its end was
    recorded, the job was failed at the restart, 'its request was lost'. Its end is
    recorded first now: before it, the job is queued again and starts in its turn (the
    Abort never took place); after it, it is aborted and its request goes."""
    with anyio.fail_after(120):
        killed = await anyio.run_process(
            [sys.executable, "-c", ABORTING_QUEUED, str(tmp_path)], check=False,
            env=os.environ | {crash.ENV: point}, cwd=Path(__file__).parent.parent)
    assert killed.returncode == crash.STATUS, killed.stderr.decode()
    assert f"crash point {point}" in killed.stderr.decode()
    job_id = killed.stdout.decode().splitlines()[-1]  # after the logs
    async with running(tmp_path, source, max_active=1) as rig:
        # d1's backup is gone with the fake: its job fails, and the queue moves.
        job = await until(rig.jobs, job_id, lambda j: j.state not in (
            JobState.QUEUED, JobState.STARTING))
        assert (job.state, job.error) == (outcome, None)
        if outcome == JobState.ABORTED:  # a request whose job ended: deleted at the start
            assert rig.store.load_requests() == {}


def lose_the_database(tmp_path: Path) -> None:
    for path in tmp_path.glob("state.db*"):
        path.unlink()


async def test_backups_the_state_database_lost_are_rebuilt_or_ended(
        tmp_path: Path, source: FakeSource) -> None:
    async with running(tmp_path, source) as rig:
        kept = await rig.jobs.start(StartRequest("d1", consumer="c"))
        lone = await rig.jobs.start(StartRequest("d2", consumer="c"))
    lose_the_database(tmp_path)
    del source.virt.checkpoint_xmls["d2", lone.checkpoint]  # nothing tells its consumer
    async with running(tmp_path, source) as rig:
        rebuilt = rig.jobs.get(kept.id)
        assert (rebuilt.state, rebuilt.domain, rebuilt.consumer, rebuilt.checkpoint) == (
            JobState.READY, "d1", "c", kept.checkpoint)
        assert [(d.name, d.mode, d.export) for d in rebuilt.disks] == [
            (d.name, d.mode, d.export) for d in kept.disks]
        assert rig.endpoint(rebuilt).is_socket()
        with pytest.raises(errors.NoSuchJob):
            rig.jobs.get(lone.id)
        assert source.called("end_unowned") == ["d2"] and "d2" not in source.backups
        assert (await rig.jobs.finish(kept.id)).state == JobState.COMPLETED
        assert rig.chain("d1", "c") == [kept.checkpoint]
        assert (await rig.jobs.start(StartRequest("d2"))).state == JobState.READY


async def test_a_rebuilt_job_counts_its_lifetime_from_when_libvirt_began_it(
        tmp_path: Path, source: FakeSource, monkeypatch: pytest.MonkeyPatch) -> None:
    async with running(tmp_path, source) as rig:
        job = await rig.jobs.start(StartRequest("d1", consumer="c"))
    lose_the_database(tmp_path)
    began = timestamp(datetime.now(UTC) - timedelta(hours=1))
    monkeypatch.setattr(fakes, "now", lambda: began)  # libvirt's word on when it began
    async with running(tmp_path, source,
                       limits=Limits(idle_timeout=0, max_lifetime=600)) as rig:
        expired = await ended(rig.jobs, job.id)
        assert expired.state == JobState.EXPIRED and "max_lifetime" in (expired.error or "")
        assert states(expired) == ["ready", "expired"] and expired.ready_since == began


# A source that cannot tell why does not stop the jobs.


async def test_why_ended_failing_still_fails_the_job(
        tmp_path: Path, source: FakeSource) -> None:
    source.errors["why_ended"] = errors.LibvirtError(1, "connection reset")
    async with running(tmp_path, source) as rig:
        job = await rig.jobs.start(StartRequest("d1"))
        source.ended("d1", success=True, error="Operation canceled")
        failed = await ended(rig.jobs, job.id)
        assert failed.state == JobState.FAILED
        assert failed.error == "the backup ended without pullbackd (Operation canceled)"
        assert rig.jobs.active("d1") is None


async def test_cause_failing_still_fails_the_copy(tmp_path: Path, source: FakeSource) -> None:
    source.errors["cause"] = errors.LibvirtError(1, "connection reset")
    destination = f"nbd+unix:///{{disk}}?socket={tmp_path}/appliance.sock"
    async with running(tmp_path, source) as rig:
        job = await rig.jobs.start(StartRequest("d1", destination=destination))
        failed = await ended(rig.jobs, job.id)
        assert failed.state == JobState.FAILED
        assert (failed.error or "").startswith(f"streaming to {destination} failed: ")


async def test_a_job_failed_at_a_restart_leaves_no_endpoint(
        tmp_path: Path, source: FakeSource) -> None:
    async with running(tmp_path, source) as rig:
        job = await rig.jobs.start(StartRequest("d1"))
    del source.backups["d1"]
    async with running(tmp_path, source) as rig:
        assert rig.jobs.get(job.id).state == JobState.FAILED
        assert not rig.endpoint(job).exists(), "the endpoint of a job that ended is left"


async def test_a_ready_job_whose_socket_went_is_ended_at_a_restart_not_adopted(
        tmp_path: Path, source: FakeSource) -> None:
    """Its source still runs it, but nothing reaches its exports (the runtime folder was
    removed while pullbackd was down): adopted, it could never be read."""
    async with running(tmp_path, source) as rig:
        job = await rig.jobs.start(StartRequest("d1"))
    source.unreachable.add("d1")
    async with running(tmp_path, source) as rig:
        failed = rig.jobs.get(job.id)
        assert failed.state == JobState.FAILED
        assert "NBD socket was removed while pullbackd was down" in (failed.error or "")
        assert "d1" not in source.backups and rig.jobs.active("d1") is None
        assert rig.chain() == [] and rig.checkpoints() == []


async def test_quiesce_freezes_the_guest_only_while_the_backup_begins(
        tmp_path: Path, source: FakeSource) -> None:
    source.agents.add("d1")
    seen: list[tuple[str, bool]] = []
    real_begin = source.begin

    async def begin(job: Job, plan: Plan, bases: dict[str, Base]) -> None:
        seen.append(("begin", job.domain in source.frozen))
        await real_begin(job, plan, bases)

    source.begin = begin  # type: ignore[method-assign]
    async with running(tmp_path, source) as rig:
        job = await rig.jobs.start(StartRequest("d1", quiesce="required",
                                                mountpoints=["/data"]))
        assert seen == [("begin", True)] and source.frozen == set()
        assert [m for m in source.called("freeze") + source.called("thaw")] == ["d1", "d1"]
        assert (job.quiesce, job.consistency) == ("required", "filesystem")
        assert job.frozen is not None and 0 <= job.frozen < 5
        assert (await rig.jobs.finish(job.id)).consistency == "filesystem"
        assert stored(tmp_path)[0].consistency == "filesystem"


async def test_required_without_an_agent_changes_nothing(
        tmp_path: Path, source: FakeSource) -> None:
    async with running(tmp_path, source) as rig:
        with pytest.raises(errors.QuiesceFailed) as e:
            await rig.jobs.start(StartRequest("d1", quiesce="required"))
        assert e.value.parameters == {"domain": "d1", "reason": "no guest agent is connected"}
        assert rig.jobs.all() == [] and rig.chains.all() == []
        assert source.called("begin") == [] and source.called("freeze") == []
        # Nor does a queued one: refused before it waits.
        with pytest.raises(errors.QuiesceFailed):
            await rig.jobs.start(StartRequest("d2", quiesce="required", queue=True))
        assert rig.jobs.all() == []


async def test_an_agent_that_does_not_freeze(tmp_path: Path, source: FakeSource) -> None:
    """"required" fails the job (nothing began); "auto" goes on crash-consistent, warned."""
    source.agents.add("d1")
    source.errors["freeze"] = AgentError("guest agent is not responding")
    async with running(tmp_path, source) as rig:
        with pytest.raises(errors.QuiesceFailed) as e:
            await rig.jobs.start(StartRequest("d1", quiesce="required"))
        assert "not responding" in e.value.parameters["reason"]
        [failed] = rig.jobs.all()
        assert failed.state == JobState.FAILED and "did not freeze" in (failed.error or "")
        assert source.called("begin") == [] and rig.checkpoints() == []
        with rig.jobs.watch() as changes:
            job = await rig.jobs.start(StartRequest("d1"))
            kinds = [(c.kind, c.message) for c in (changes.receive_nowait() for _ in range(3))]
        assert kinds[1] == ("warning", "the guest agent did not freeze the filesystems: guest "
                                       "agent is not responding; the backup is crash-consistent")
        assert (job.state, job.consistency, job.frozen) == (JobState.READY, "crash", None)


async def test_a_push_that_fails_once_begun_leaves_no_file_behind(
        tmp_path: Path, source: FakeSource, push_dir: Path) -> None:
    """The source made the push's files (and may have begun writing them), then could not
    tell how it serves them: the job fails, and its files go with it (they stayed, and
    looked like a backup)."""
    source.errors["exports"] = errors.LibvirtError(1, "internal error")
    async with running(tmp_path, source) as rig:
        with pytest.raises(errors.LibvirtError):
            await rig.jobs.start(StartRequest("d1", target_dir=str(push_dir)))
        [job] = rig.jobs.all()
        assert job.state == JobState.FAILED and source.called("begin") == ["d1"]
        assert files(push_dir) == []


async def test_a_begin_that_fails_while_frozen_still_thaws(
        tmp_path: Path, source: FakeSource) -> None:
    source.agents.add("d1")
    source.errors["begin"] = errors.LibvirtError(1, "internal error: no space left")
    async with running(tmp_path, source) as rig:
        with pytest.raises(errors.LibvirtError):
            await rig.jobs.start(StartRequest("d1"))
        assert source.called("thaw") == ["d1"] and source.frozen == set()


async def test_quiesce_off_never_asks_the_agent(tmp_path: Path, source: FakeSource) -> None:
    source.agents.add("d1")
    async with running(tmp_path, source) as rig:
        job = await rig.jobs.start(StartRequest("d1", quiesce="off"))
        assert source.called("freeze") == [] and job.consistency == "crash"
        for bad in (StartRequest("d2", quiesce="sometimes"),
                    StartRequest("d2", quiesce="off", mountpoints=["/"]),
                    StartRequest("d2", mountpoints=["data"]), StartRequest("d2", mountpoints=[])):
            with pytest.raises(errors.InvalidParameter):
                await rig.jobs.start(bad)


async def test_a_thaw_that_fails_hides_nothing_and_a_failed_freeze_is_thawed(
        tmp_path: Path, source: FakeSource) -> None:
    """A thaw that raises (the domain went, say) is logged, and the backup that began is
    served; a freeze that failed may have frozen all the same: it is thawed once."""
    source.agents.add("d1")
    source.errors["thaw"] = errors.NoSuchDomain("d1")
    async with running(tmp_path, source) as rig:
        job = await rig.jobs.start(StartRequest("d1"))
        assert (job.state, job.consistency) == (JobState.READY, "filesystem")
        assert source.called("thaw") == ["d1"] * quiesce.THAW_ATTEMPTS
        await rig.jobs.abort(job.id)
        del source.errors["thaw"]
        source.errors["freeze"] = AgentError("timed out")
        job = await rig.jobs.start(StartRequest("d1"))
        assert job.consistency == "crash"
        assert source.called("thaw")[quiesce.THAW_ATTEMPTS:] == ["d1"]


@pytest.mark.parametrize("how", ["thawed by someone else", "windows"])
async def test_a_freeze_that_did_not_hold_through_the_begin_is_no_freeze(
        tmp_path: Path, source: FakeSource, how: str) -> None:
    """The guest was thawed while the backup began (its point in time taken): Windows' VSS
    ends a freeze after 10 s by itself, and answers the thaw "couldn't hold writes" (the
    next thaw finds nothing frozen); on Linux someone else's thaw leaves the agent nothing
    to thaw. Such a job claimed "filesystem" consistency. "auto" goes on crash-consistent,
    warned; "required" fails, its backup ended."""
    source.agents.add("d1")
    real_begin, real_thaw = source.begin, source.thaw
    timed_out: set[str] = set()  # VSS ended the freeze by itself: the next thaw says so

    async def begin(job: Job, plan: Plan, bases: dict[str, Base]) -> None:
        source.frozen.discard(job.domain)  # the guest thaws, as the begin goes on
        if how == "windows":
            timed_out.add(job.domain)
        await real_begin(job, plan, bases)

    async def thaw(job: Job) -> int:
        if job.domain in timed_out:
            timed_out.discard(job.domain)
            source.calls.append(("thaw", job.domain))
            raise AgentError("unable to execute QEMU agent command 'guest-fsfreeze-thaw': "
                             "couldn't hold writes: fsfreeze is limited up to 10 seconds",
                             refused=True)
        return await real_thaw(job)

    source.begin = begin  # type: ignore[method-assign]
    source.thaw = thaw  # type: ignore[method-assign]
    async with running(tmp_path, source) as rig:
        with rig.jobs.watch() as changes:
            job = await rig.jobs.start(StartRequest("d1"))
            told = [changes.receive_nowait()
                    for _ in range(changes.statistics().current_buffer_used)]
            warnings = [c.message or "" for c in told if c.kind == "warning"]
        assert (job.state, job.consistency, job.frozen) == (JobState.READY, "crash", None)
        [warning] = warnings
        assert "no longer frozen when the backup had begun" in warning, warning
        assert warning.endswith("the backup is crash-consistent")
        assert source.frozen == set() and rig.store.load_thaws() == {}
        await rig.jobs.abort(job.id)

        with pytest.raises(errors.QuiesceFailed) as e:
            await rig.jobs.start(StartRequest("d1", quiesce="required"))
        assert "no longer frozen" in e.value.parameters["reason"]
        [failed] = [j for j in rig.jobs.all() if j.id != job.id]
        assert failed.state == JobState.FAILED
        assert (failed.error or "").startswith("the backup began, but not frozen: ")
        assert source.called("end") == ["d1", "d1"] and source.backups == {}
        assert rig.checkpoints() == [] and rig.jobs.active("d1") is None


async def test_a_freeze_the_agent_refuses_thaws_nobody_elses_freeze(
        tmp_path: Path, source: FakeSource) -> None:
    """Someone else froze the guest (`virsh domfsfreeze` before a storage snapshot): qemu-ga
    refuses our freeze, and pullbackd thawed the guest under them. A refused freeze froze
    nothing: no thaw follows, unless a thaw of ours was owed (an earlier freeze of ours
    the agent did not answer may be what froze the guest; the thaw owed is asked again
    only after THAW_AGAIN_EVERY, 5 s: the Start's own thaw is what thaws it here)."""
    refused = AgentError("unable to execute QEMU agent command 'guest-fsfreeze-freeze': "
                         "Command guest-fsfreeze-freeze has been disabled: the agent is in "
                         "frozen state", refused=True)
    source.agents.add("d1")
    source.frozen.add("d1")  # someone else's freeze
    source.errors["freeze"] = refused
    async with running(tmp_path, source) as rig:
        job = await rig.jobs.start(StartRequest("d1"))
        assert (job.state, job.consistency) == (JobState.READY, "crash")
        assert source.called("thaw") == [] and source.frozen == {"d1"}
        assert rig.store.load_thaws() == {}
        await rig.jobs.abort(job.id)
        with pytest.raises(errors.QuiesceFailed):
            await rig.jobs.start(StartRequest("d1", quiesce="required"))
        assert source.called("thaw") == [] and source.frozen == {"d1"}

        # A freeze of ours the agent did not answer, which then froze the guest.
        source.frozen.clear()
        source.errors["freeze"] = source.errors["thaw"] = AgentError(
            "Guest agent is not responding")
        job = await rig.jobs.start(StartRequest("d1"))
        assert rig.store.load_thaws() == {"d1": job.id}
        await rig.jobs.abort(job.id)
        source.frozen.add("d1")
        source.errors["freeze"] = refused
        del source.errors["thaw"]
        job = await rig.jobs.start(StartRequest("d1"))
        assert job.consistency == "crash" and source.frozen == set()
        assert rig.store.load_thaws() == {}


async def thawed(source: FakeSource) -> None:
    """Until the fake's guest is thawed (within 10 s)."""
    with anyio.fail_after(10):
        while source.frozen:  # noqa: ASYNC110 (the fake tells no one: we look)
            await anyio.sleep(0.01)


async def test_a_guest_whose_agent_does_not_answer_is_thawed_once_it_does(
        tmp_path: Path, source: FakeSource, monkeypatch: pytest.MonkeyPatch) -> None:
    """A thaw the agent does not answer (after a begin; at a restart after a crash while
    frozen): asked again in the background until one is answered (the agent answers in
    order: a freeze it did not answer may freeze the guest when it ends), across a
    restart of pullbackd; a new freeze of the domain takes it over."""
    monkeypatch.setattr(quiesce, "THAW_AGAIN_EVERY", 0.01)
    unanswered = AgentError("Guest agent is not responding")
    source.agents.add("d1")
    source.errors["thaw"] = unanswered
    async with running(tmp_path, source) as rig:
        job = await rig.jobs.start(StartRequest("d1"))
        assert (job.state, source.frozen) == (JobState.READY, {"d1"})
        await anyio.sleep(0.1)
        assert source.frozen == {"d1"}  # still asked: the agent does not answer
        asked = len(source.called("thaw"))
    async with running(tmp_path, source) as rig:  # a restart: asked again
        with anyio.fail_after(10):
            while len(source.called("thaw")) == asked:  # noqa: ASYNC110 (we look)
                await anyio.sleep(0.01)
        del source.errors["thaw"]
        await thawed(source)
        await rig.jobs.abort(job.id)
    asked = len(source.called("thaw"))
    async with running(tmp_path, source) as rig:  # nothing owed any more
        await anyio.sleep(0.1)  # ten tries, were it still owed
        assert len(source.called("thaw")) == asked and rig.store.load_thaws() == {}

    # After a crash while frozen.
    job_id = "0123456789ab"
    crashed = Job(job_id, "d1", JobState.STARTING, "full", now(), "c",
                  checkpoint_name("c", job_id), quiesce="auto")
    (tmp_path / "again").mkdir()
    store = Store(tmp_path / "again" / "state.db")
    await store.save_job(crashed, _recorded(crashed, CheckpointState.PENDING))
    await store.save_freeze("d1", job_id)
    store.close()
    source.frozen.add("d1")
    source.errors["thaw"] = unanswered
    async with running(tmp_path / "again", source):
        assert source.frozen == {"d1"}
        del source.errors["thaw"]
        await thawed(source)


async def test_a_new_freeze_takes_over_a_thaw_owed(
        tmp_path: Path, source: FakeSource, monkeypatch: pytest.MonkeyPatch) -> None:
    """A thaw owed from an earlier Start must not thaw the guest under a later one's
    freeze: the later Start's own thaw follows its begin."""
    monkeypatch.setattr(quiesce, "THAW_AGAIN_EVERY", 0.05)
    source.agents.add("d1")
    source.errors["freeze"] = AgentError("Guest agent is not responding")
    source.errors["thaw"] = source.errors["freeze"]
    async with running(tmp_path, source) as rig:
        job = await rig.jobs.start(StartRequest("d1"))
        assert job.consistency == "crash" and rig.store.load_thaws() == {"d1": job.id}
        await rig.jobs.abort(job.id)
        del source.errors["freeze"], source.errors["thaw"]
        source.stall("begin")
        rig.tg.start_soon(rig.jobs.start, StartRequest("d1"))
        await source.stalls["begin"].reached.wait()
        thaws = len(source.called("thaw"))
        await anyio.sleep(0.3)  # six of the owed thaw's tries, were it still owed
        assert source.frozen == {"d1"} and len(source.called("thaw")) == thaws
        assert rig.store.load_thaws() == {}
        source.stalls["begin"].release()
        await thawed(source)


#: A daemon over the fake source in argv[1] starts a backup of d1, quiesce "auto" (its agent
#: connected if argv[2] says so); it dies where crash.ENV says, or (argv[3] "kill") is
#: killed while its freeze is asked: it prints "freezing" then.
QUIESCED_START = """
import sys
from pathlib import Path
import anyio
from pullbackd.model import StartRequest
from tests.fakes import FakeSource, FakeVirt
from tests.test_jobs import running

async def main() -> None:
    tmp = Path(sys.argv[1])
    source = FakeSource(FakeVirt(), tmp / "source")
    if sys.argv[2] == "agent":
        source.agents.add("d1")
    async with running(tmp, source) as rig:
        if sys.argv[3] != "kill":
            await rig.jobs.start(StartRequest("d1"))
            return
        stall = source.stall("freeze")
        rig.tg.start_soon(rig.jobs.start, StartRequest("d1"))
        await stall.reached.wait()
        print("freezing", flush=True)
        await anyio.sleep_forever()

anyio.run(main)
"""


async def crash_a_quiesced_start(tmp_path: Path, agent: bool, point: str) -> None:
    """A Start of d1 (quiesce "auto") in a daemon of its own that dies at crash `point`,
    or is killed (`point` "kill") while the agent is asked to freeze."""
    args = [sys.executable, "-c", QUIESCED_START, str(tmp_path),
            "agent" if agent else "none", point]
    cwd = Path(__file__).parent.parent
    with anyio.fail_after(120):
        if point != "kill":
            killed = await anyio.run_process(args, check=False, cwd=cwd,
                                             env=os.environ | {crash.ENV: point})
            assert killed.returncode == crash.STATUS, killed.stderr.decode()
            assert f"crash point {point}" in killed.stderr.decode()
            return
        async with await anyio.open_process(args, cwd=cwd, stderr=None) as daemon:
            assert daemon.stdout is not None
            async with anyio.streams.text.TextReceiveStream(daemon.stdout) as lines:
                said = ""
                async for text in lines:
                    said += text
                    if "\nfreezing\n" in "\n" + said:  # a line of its own
                        break
            daemon.kill()
            assert await daemon.wait() == -signal.SIGKILL


@pytest.mark.parametrize(("agent", "point", "ours"), [
    (True, "start.recorded", False),
    (True, "kill", True),
    (True, "start.frozen", True),
    (True, "start.begun", False),
    (False, "start.begun", False),
], ids=["before-the-freeze", "while-freezing", "frozen", "after-the-thaw", "no-agent"])
async def test_a_restart_thaws_only_a_guest_the_crashed_start_may_have_frozen(
        tmp_path: Path, source: FakeSource, agent: bool, point: str, ours: bool) -> None:
    """A crash during a quiesced Start. A restart thawed the guest of every job still
    starting: one the crash left frozen (at start.frozen; killed while the agent was asked
    to freeze: the freeze may have happened), but also one frozen by someone else while
    pullbackd was down (`virsh domfsfreeze` before a storage snapshot) after a crash before
    the freeze or after the thaw; and a domain without an agent ("auto" went on
    crash-consistent) was asked for a thaw, then for another every 5 s for an hour. The
    guest is frozen at the restart, by the crashed Start (`ours`) or by someone else."""
    await crash_a_quiesced_start(tmp_path, agent, point)
    source.frozen.add("d1")
    if agent:
        source.agents.add("d1")
    async with running(tmp_path, source) as rig:
        [job] = rig.jobs.all()
        assert (job.state, job.error) == (
            JobState.FAILED, "pullbackd restarted while the job was starting")
        assert source.called("thaw") == (["d1"] if ours else [])
        assert source.frozen == (set() if ours else {"d1"})
        assert rig.store.load_thaws() == {} and rig.store.load_freezes() == {}


async def test_a_start_that_freezes_records_it_until_its_thaw_is_answered(
        tmp_path: Path, source: FakeSource, monkeypatch: pytest.MonkeyPatch) -> None:
    """The record of a freeze that may be in effect (quiesce.py): written before the freeze
    is asked, deleted once the thaw is answered, or turned into a thaw owed; a Start that
    freezes nothing writes none."""
    writes: list[str] = []
    source.agents.add("d1")
    async with running(tmp_path, source) as rig:
        for name in ("save_freeze", "delete_freeze"):
            write = getattr(rig.store, name)

            async def spied(*args: object, _write: Any = write, _name: str = name,
                            **kwargs: object) -> None:
                writes.append(_name)
                await _write(*args, **kwargs)

            monkeypatch.setattr(rig.store, name, spied)
        for request in (StartRequest("d1", quiesce="off"), StartRequest("d2")):
            await rig.jobs.abort((await rig.jobs.start(request)).id)
        assert writes == [] and source.called("freeze") == []

        stall = source.stall("freeze")
        rig.tg.start_soon(rig.jobs.start, StartRequest("d1"))
        await stall.reached.wait()
        [job] = [j for j in rig.jobs.all() if j.state == JobState.STARTING]
        freezing, written = rig.store.load_freezes(), list(writes)
        stall.release()  # before any assertion: a Start held would hold the rig's end
        job = await until(rig.jobs, job.id, lambda j: j.state == JobState.READY)
        assert freezing == {job.id: "d1"} and written == ["save_freeze"]
        assert job.consistency == "filesystem" and source.frozen == set()
        assert rig.store.load_freezes() == {} and writes == ["save_freeze", "delete_freeze"]
        await rig.jobs.abort(job.id)

        del source.stalls["freeze"]
        source.errors["thaw"] = AgentError("Guest agent is not responding")
        job = await rig.jobs.start(StartRequest("d1"))
        assert rig.store.load_freezes() == {} and rig.store.load_thaws() == {"d1": job.id}
        assert writes[2:] == ["save_freeze", "delete_freeze"]  # the thaw owed with it


async def test_a_freeze_whose_end_was_not_recorded_is_thawed_at_a_restart_and_told(
        tmp_path: Path, source: FakeSource, monkeypatch: pytest.MonkeyPatch) -> None:
    """quiesce.py's invariant, checked at start: only a job still starting may have frozen
    its guest. A record of a freeze the database could not delete after its thaw stays:
    the guest is thawed once more at the restart (as far as pullbackd knows, it may be
    frozen), and the operator told; a record whose job was forgotten goes."""
    source.agents.add("d1")
    async with running(tmp_path, source) as rig:
        async def failing(*args: object, **kwargs: object) -> None:
            raise sqlite3.OperationalError("disk I/O error")

        monkeypatch.setattr(rig.store, "delete_freeze", failing)
        job = await rig.jobs.start(StartRequest("d1"))
        assert (job.state, job.consistency) == (JobState.READY, "filesystem")
        assert rig.store.load_freezes() == {job.id: "d1"}
        await rig.store.save_freeze("d2", "forgotten000")
    source.frozen.add("d1")
    with capture_logs() as logged:
        async with running(tmp_path, source) as rig:
            assert rig.jobs.get(job.id).state == JobState.READY  # adopted
            assert source.called("thaw") == ["d1", "d1"] and source.frozen == set()
            assert rig.store.load_freezes() == {} and rig.store.load_thaws() == {}
    [told] = [e for e in logged if e["event"].startswith("a freeze of the guest was not")]
    assert (told["log_level"], told["job"], told["state"]) == ("warning", job.id,
                                                                JobState.READY)


async def test_a_database_of_a_version_that_did_not_record_freezes_thaws_every_start(
        tmp_path: Path, source: FakeSource) -> None:
    """A database written before freezes were recorded: every job still starting, quiesced
    and online, may have frozen its guest, as that version thawed each at a restart."""
    jobs = [Job(f"00000000000{i}", f"d{i}", JobState.STARTING, "full", now(), "c",
                checkpoint_name("c", f"00000000000{i}"), quiesce=quiesced)
            for i, quiesced in ((1, "auto"), (2, "off"), (3, "required"))]
    store = Store(tmp_path / "state.db")
    for job in jobs:
        await store.save_job(job, _recorded(job, CheckpointState.PENDING))
    store.close()
    with sqlite3.connect(tmp_path / "state.db") as db:
        db.execute("DROP TABLE freezes")
    db.close()
    source.agents.update({"d1", "d2", "d3"})
    source.frozen.update({"d1", "d2", "d3"})
    async with running(tmp_path, source) as rig:
        assert sorted(source.called("thaw")) == ["d1", "d3"] and source.frozen == {"d2"}
        assert rig.store.load_freezes() == {}


async def test_a_rebuilt_checkpoint_is_ordered_after_its_chain(tmp_path: Path) -> None:
    """libvirt's creation time has whole seconds: a checkpoint rebuilt from it (a lost
    database) may look older than the chain it joins, whose times have milliseconds.
    It goes after the chain's newest, or trimming would delete it as the oldest."""
    virt = FakeVirt(("lab1",))
    chains = Chains(virt, Store(tmp_path / "state.db"), virt.forget_bitmaps)
    chains.recorded(Checkpoint("pullbackd.c.a", "lab1", "c", "a", "2026-12-02T09:58:29.512Z",
                               CheckpointState.COMPLETE, ("vda",)))
    assert chains.after_newest("lab1", "c", "2026-12-02T09:58:29.000Z") == \
        "2026-12-02T09:58:29.513Z"
    assert chains.after_newest("lab1", "c", "2026-12-02T09:58:30.000Z") == \
        "2026-12-02T09:58:30.000Z"
    assert chains.after_newest("lab1", "other", "2026-12-02T09:58:29.000Z") == \
        "2026-12-02T09:58:29.000Z"


async def test_a_chain_deleted_while_the_domains_metadata_cannot_be_written_stays_deleted(
        tmp_path: Path, source: FakeSource) -> None:
    """DeleteChain while libvirt refuses the domain's metadata (another job holds the
    domain): the chain is deleted all the same, and the metadata, which still lists it,
    does not bring it back at the next backup; it is rewritten then."""
    async with running(tmp_path, source) as rig:
        first = await rig.jobs.finish((await rig.jobs.start(StartRequest("d1", consumer="c"))).id)
        assert first.checkpoint in rig.virt.metadata_xmls["d1"]
        rig.virt.errors["set_metadata"] = errors.DomainBusy("d1", "migration")
        assert await rig.jobs.delete_chain("d1", "c") == [first.checkpoint]
        assert rig.chain(consumer="c") == []
        del rig.virt.errors["set_metadata"]
        job = await rig.jobs.start(StartRequest("d1", consumer="c", mode="incremental"))
        assert [(d.mode, d.since) for d in job.disks] == [("full", None)] * 2
        nxt = await rig.jobs.finish(job.id)
        assert rig.chain(consumer="c") == [nxt.checkpoint] == rig.checkpoints()
        assert first.checkpoint not in rig.virt.metadata_xmls["d1"]
        assert [c.name for c in rig.chains.all()] == [nxt.checkpoint]


class Refusing(FakeVirt):
    """libvirt refusing to take back some checkpoints it lost, as it does one that covers
    a disk detached since ("no disk named 'vdb'")."""

    def __init__(self) -> None:
        super().__init__()
        self.refused: set[str] = set()

    async def redefine_checkpoint(self, domain: str, checkpoint_xml: str,
                                  validate: bool) -> None:
        if xml.parse_checkpoint(checkpoint_xml).name in self.refused:
            raise errors.LibvirtError(8, "invalid argument: no disk named 'vdb'")
        await super().redefine_checkpoint(domain, checkpoint_xml, validate)


async def test_a_checkpoint_libvirt_will_not_take_back_stops_no_backup(
        tmp_path: Path) -> None:
    """libvirt lost its checkpoints, and refuses one back: every consumer's backups go
    on; an incremental starts from the newest checkpoint libvirt took back (its bitmap
    holds every change since the refused one too), or is full, and says why."""
    (tmp_path / "source").mkdir()
    virt = Refusing()
    async with running(tmp_path, FakeSource(virt, tmp_path / "source")) as rig:
        older = await rig.jobs.finish((await rig.jobs.start(StartRequest("d1", consumer="c"))).id)
        newer = await rig.jobs.finish((await rig.jobs.start(StartRequest("d1", consumer="c"))).id)
        other = await rig.jobs.finish((await rig.jobs.start(StartRequest("d1", consumer="o"))).id)
        virt.refused = {newer.checkpoint, other.checkpoint}
        virt.checkpoint_xmls.clear()  # lost: a move, a libvirtd that lost its state
        job = await rig.jobs.start(StartRequest("d1", consumer="c", mode="incremental"))
        assert [(d.mode, d.since) for d in job.disks] == [("incremental", older.checkpoint)] * 2
        await rig.jobs.finish(job.id)
        job = await rig.jobs.start(StartRequest("d1", consumer="o", mode="incremental"))
        assert [d.mode for d in job.disks] == ["full", "full"]
        assert all(f"libvirt lost checkpoint {other.checkpoint} and refuses to take it back"
                   in (d.fallback or "") for d in job.disks)
        await rig.jobs.finish(job.id)


@pytest.mark.parametrize("error", [errors.LibvirtError(1, "connection reset"),
                                   errors.NoSuchDomain("d1"), errors.DomainBusy("d1", "x")])
async def test_a_metadata_read_failing_as_the_daemon_starts_stops_nothing(
        tmp_path: Path, source: FakeSource, error: Exception) -> None:
    """A backup no record owns (the database was lost) is taken in as the daemon starts;
    the domain's metadata cannot be read (the domain went, or another job holds it)."""
    async with running(tmp_path, source) as rig:
        job = await rig.jobs.start(StartRequest("d1", consumer="c"))
    lose_the_database(tmp_path)
    source.virt.errors["metadata"] = error
    async with running(tmp_path, source) as rig:
        assert rig.jobs.get(job.id).state == JobState.READY


class Unwritable(FakeVirt):
    """A domain whose metadata libvirt never lets be written."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    async def set_metadata(self, domain: str, element: str | None, prefix: str,
                           namespace: str) -> None:
        self.writes += 1
        raise errors.LibvirtError(55, "Requested operation is not valid")


async def test_records_of_checkpoints_the_metadata_does_not_list_go_all_the_same(
        tmp_path: Path) -> None:
    """The metadata cannot be written, and lists none of the checkpoints trimmed: their
    records go with them, and a Start tries the metadata once, not once a record."""
    (tmp_path / "source").mkdir()
    virt = Unwritable()
    async with running(tmp_path, FakeSource(virt, tmp_path / "source")) as rig:
        rig.chains.keep = 1
        for _ in range(4):
            await rig.jobs.finish((await rig.jobs.start(StartRequest("d1", consumer="c"))).id)
        assert [c.state for c in rig.chains.all()] == [CheckpointState.COMPLETE]
        virt.writes = 0
        await rig.jobs.start(StartRequest("d1", consumer="c"))
        assert virt.writes <= 1


async def test_delete_chain_while_a_start_plans_is_refused_as_busy(
        tmp_path: Path, source: FakeSource) -> None:
    """A Start holds its domain before its job is recorded: DeleteChain then got an
    internal error (KeyError), not BackupInProgress."""
    async with running(tmp_path, source) as rig:
        stall = source.stall("plan")
        rig.tg.start_soon(rig.jobs.start, StartRequest("d1", consumer="c"))
        await stall.reached.wait()
        try:
            with pytest.raises(errors.BackupInProgress):
                await rig.jobs.delete_chain("d1", "c")
        finally:
            stall.release()


@dataclass
class NbdkitSource(FakeSource):
    """The fake source, its exports served for real by one nbdkit, on `served`."""

    served: Path = Path()

    def socket(self, job: Job) -> Path:
        return self.served


async def test_a_streamed_job_whose_source_freezes_fails_and_can_be_aborted(
        tmp_path: Path) -> None:
    """QEMU stops mid-copy (SIGSTOP: hung storage, a host in trouble): its socket still
    accepts, and never greets. The stall timeout fails the copy, and the job fails (it
    stayed running for good: asking whether the source was reachable waited for its
    greeting); an Abort meanwhile returns (it waited for the copy)."""
    size = 256 * MiB
    (tmp_path / "source").mkdir()
    source = NbdkitSource(FakeVirt(), tmp_path / "source", served=tmp_path / "qemu.sock")
    source.sizes = {"vda": size}
    qemu = await anyio.open_process(
        ["nbdkit", "-f", "-U", str(source.served), "--filter=delay", "pattern", f"size={size}",
         "rdelay=20ms"], stderr=None)
    appliance = await anyio.open_process(
        ["nbdkit", "-f", "-U", str(tmp_path / "appliance.sock"), "memory", str(size)],
        stderr=None)
    try:
        with anyio.fail_after(30):
            while not (source.served.exists()  # noqa: ASYNC110 (nbdkit tells no one)
                       and (tmp_path / "appliance.sock").exists()):
                await anyio.sleep(0.01)
        async with running(tmp_path, source) as rig:
            rig.jobs._tuning = dataclasses.replace(rig.jobs._tuning, stall_timeout=1.0)
            job = await rig.jobs.start(StartRequest(
                "d1", destination=f"nbd+unix:///{{disk}}?socket={tmp_path}/appliance.sock"))
            assert job.state == JobState.RUNNING
            # The copy is under way (its progress is looked at, not announced).
            while not ((p := rig.jobs.get(job.id).progress) and p.done):  # noqa: ASYNC110
                await anyio.sleep(0.01)
            aborted: list[Job] = []
            returned = anyio.Event()

            async def abort() -> None:  # in a task: a hung Abort cannot be cancelled
                aborted.append(await rig.jobs.abort(job.id))
                returned.set()

            os.kill(qemu.pid, signal.SIGSTOP)
            try:
                with rig.jobs.watch() as changes, anyio.move_on_after(120):  # a hang guard
                    while not rig.jobs.get(job.id).state.final:
                        await changes.receive()
                rig.tg.start_soon(abort)
                with anyio.move_on_after(60):
                    await returned.wait()
                hung = not returned.is_set()
            finally:
                os.kill(qemu.pid, signal.SIGCONT)  # whatever still waits for it goes on
            with anyio.fail_after(120):
                await returned.wait()
            assert not hung, "Abort hung"
            ended = aborted[0]
            assert ended.state == JobState.FAILED, ended
            assert "no progress for 1 s" in str(ended.error), ended.error
    finally:
        for server in (qemu, appliance):
            with suppress(ProcessLookupError):  # gone already
                server.terminate()
            await server.wait()
