"""Failures injected at the libvirt adapter, the one place a fake is allowed.

The fake keeps a backup per domain the way libvirt does (one at most, its XML
read back with the export names libvirt fills in), and can be told to fail or
stall one call by name.
"""

from __future__ import annotations

import contextlib
import grp
import json
import socket
import stat
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import pytest

from pullbackd import api, errors, stream, xml
from pullbackd.admission import Admission
from pullbackd.chain import Chains
from pullbackd.control.codec import Call
from pullbackd.domainfiles import Reader
from pullbackd.exports import Exports
from pullbackd.jobs import Jobs
from pullbackd.migration import Migrations
from pullbackd.model import (
    Checkpoint,
    CheckpointState,
    Job,
    JobState,
    StartRequest,
    now,
    timestamp,
)
from pullbackd.names import Layout, checkpoint_name
from pullbackd.places import Places
from pullbackd.rebuild import Rebuilder
from pullbackd.repository import Repository
from pullbackd.scratch import ScratchSpace
from pullbackd.serving import Limits, Serving
from pullbackd.source import LibvirtSource
from pullbackd.state import StateDamaged, Store
from pullbackd.virt import Definition, Domain, JobEnded, Virt

DOMAIN_XML = """<domain><devices>
<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
<source file='/d/a.qcow2'/><target dev='vda'/></disk>
</devices></domain>"""


class FakeVirt(Virt):
    def __init__(self) -> None:
        super().__init__("test:///fake")
        self.running = {"d1": True, "d2": True}
        self.backups: dict[str, str] = {}
        self.checkpoint_xmls: dict[tuple[str, str], str] = {}
        self.metadata_xmls: dict[str, str] = {}
        self.fail: dict[str, Exception] = {}
        self.stall: dict[str, anyio.Event] = {}
        #: domain -> whether its last backup was begun on files that exist.
        self.reused: dict[str, bool] = {}

    async def _hook(self, method: str) -> None:
        if method in self.stall:
            await self.stall[method].wait()
        if method in self.fail:
            raise self.fail[method]

    async def domain(self, name: str, definition: bool = False) -> Domain:
        await self._hook("domain")
        if name not in self.running:
            raise errors.NoSuchDomain(name)
        return Domain(name, self.running[name], DOMAIN_XML,
                      "backup" if name in self.backups else None,
                      DOMAIN_XML if definition else None)

    async def definition(self, name: str) -> Definition:
        await self._hook("definition")
        if name not in self.running:
            raise errors.NoSuchDomain(name)
        return Definition(DOMAIN_XML, DOMAIN_XML if self.running[name] else None)

    async def fs_thaw(self, domain: str, wait: float) -> int:
        await self._hook("fs_thaw")
        return 0  # nothing frozen

    async def running_domains(self) -> list[str]:
        return [name for name, running in self.running.items() if running]

    async def capacity(self, domain: str, disk: str) -> int:
        return 1 << 30

    async def capacities(self, domain: str, disks: list[str]) -> dict[str, int]:
        return {d: 1 << 30 for d in disks}

    async def backup_begin(self, domain: str, backup_xml: str,
                           checkpoint_xml: str | None = None, *, reuse: bool = False) -> None:
        await self._hook("backup_begin")
        self.reused[domain] = reuse
        root = ET.fromstring(backup_xml)
        for disk in root.iterfind("disks/disk"):
            disk.set("exportname", disk.get("name", ""))
        if (server := root.find("server")) is not None:
            # QEMU listens there: the socket file is what appliances (and recovery) find.
            with socket.socket(socket.AF_UNIX) as listening, \
                    contextlib.suppress(FileNotFoundError):  # a test's folder of none
                listening.bind(server.get("socket", ""))
        self.backups[domain] = ET.tostring(root, encoding="unicode")
        if checkpoint_xml is not None:
            name = ET.fromstring(checkpoint_xml).findtext("name", "")
            self.checkpoint_xmls[domain, name] = checkpoint_xml

    async def checkpoints(self, domain: str) -> list[str]:
        return [name for (d, name) in self.checkpoint_xmls if d == domain]

    async def metadata(self, domain: str, namespace: str) -> str | None:
        await self._hook("metadata")
        return self.metadata_xmls.get(domain)

    async def set_metadata(self, domain: str, element: str | None, prefix: str,
                           namespace: str) -> None:
        await self._hook("set_metadata")
        if element is None:
            self.metadata_xmls.pop(domain, None)
        else:
            self.metadata_xmls[domain] = element

    async def checkpoint_xml(self, domain: str, name: str) -> str:
        return self.checkpoint_xmls[domain, name]

    async def delete_checkpoint(self, domain: str, name: str, *,
                                metadata_only: bool = False) -> None:
        await self._hook("delete_checkpoint")
        self.checkpoint_xmls.pop((domain, name), None)

    async def forget_bitmaps(self, domain: str, disks: list[str], checkpoint: str) -> None:
        raise AssertionError("never asked: this libvirt deletes every checkpoint itself")

    async def backup_xml(self, domain: str) -> str | None:
        await self._hook("backup_xml")
        return self.backups.get(domain)

    async def abort_job(self, domain: str) -> bool:
        if self.backups.pop(domain, None) is None:
            return False
        self._send.send_nowait(JobEnded(domain, "backup", True, "Operation canceled"))
        return True


@dataclass
class Rig:
    """The jobs over the fake libvirt, and what the tests look into."""

    jobs: Jobs
    chains: Chains
    parts: api.Parts


@asynccontextmanager
async def running(tmp_path: Path, virt: FakeVirt, end_timeout: float = 5,
                  qemu_group: str = "") -> AsyncIterator[Rig]:
    store = Store(tmp_path / "state.db")
    exports = Exports(tmp_path / "exports")
    exports.prepare()
    layout = Layout(tmp_path / "exports", tmp_path / "scratch")
    source = LibvirtSource(virt, layout, end_timeout, Reader(virt, tmp_path / "libvirt"),
                           qemu_group)
    chains = Chains(virt, store, virt.forget_bitmaps)
    repository = Repository(tmp_path / "repo", tmp_path / "nbd", 1 << 20)
    admission = Admission()
    jobs = Jobs(source, store, chains, Serving(exports, source, Limits()),
                ScratchSpace(layout, 0), repository, admission=admission)
    parts = api.Parts(jobs, Migrations(jobs, admission, virt, grace=1, drain_timeout=1),
                      chains, repository,
                      Rebuilder(repository, virt, tmp_path / "libvirt", "tss", stream.Tuning(),
                                jobs.did_not_complete),
                      stream.Tuning())
    async with anyio.create_task_group() as tg:
        await tg.start(jobs.follow_events, _lost)
        await jobs.recover()
        yield Rig(jobs, chains, parts)
        tg.cancel_scope.cancel()
    store.close()


async def _lost(reason: str) -> None:
    pass


def stored(tmp_path: Path) -> list[Job]:
    store = Store(tmp_path / "state.db")
    try:
        return store.load_jobs()
    finally:
        store.close()


@pytest.mark.asyncio
async def test_libvirt_refusing_the_backup_leaves_a_failed_job_and_a_free_domain(
        tmp_path: Path) -> None:
    virt = FakeVirt()
    virt.fail["backup_begin"] = errors.LibvirtError(1, "internal error: no space left")
    async with running(tmp_path, virt) as rig:
        jobs = rig.jobs
        with pytest.raises(errors.LibvirtError):
            await jobs.start(StartRequest("d1"))
        [failed] = jobs.all()
        assert failed.state == JobState.FAILED and "no space left" in (failed.error or "")
        assert list((tmp_path / "scratch").iterdir()) == [], "the scratch file made for it"
        del virt.fail["backup_begin"]
        job = await jobs.start(StartRequest("d1"))  # not BackupInProgress: the claim was released
        assert job.state == JobState.READY
        # Its scratch file, made by pullbackd for libvirt to take as it is: an empty qcow2
        # image of the disk's size.
        [made] = (tmp_path / "scratch").iterdir()
        assert made.name == f"{job.id}.vda.qcow2" and virt.reused["d1"]
        info = json.loads((await anyio.run_process(
            ["qemu-img", "info", "--output=json", str(made)])).stdout)
        assert (info["format"], info["virtual-size"]) == ("qcow2", 1 << 30)
        assert "backing-filename" not in info
        assert stat.S_IMODE(made.stat().st_mode) == 0o600  # libvirt hands it over to QEMU
        await jobs.finish(job.id)
        assert list((tmp_path / "scratch").iterdir()) == [], "libvirt leaves ours"
    assert [j.state for j in stored(tmp_path)] == [JobState.FAILED, JobState.COMPLETED]


@pytest.mark.asyncio
async def test_backup_that_cannot_be_read_back_is_failed_and_says_what_to_do(
        tmp_path: Path) -> None:
    virt = FakeVirt()
    virt.fail["backup_xml"] = errors.LibvirtError(1, "flaky")
    async with running(tmp_path, virt) as rig:
        jobs = rig.jobs
        with pytest.raises(errors.LibvirtError):
            await jobs.start(StartRequest("d1"))
        [job] = jobs.all()
        assert job.state == JobState.FAILED
        assert "virsh domjobabort d1" in (job.error or "")
        # libvirt still runs a backup nobody owns now: refused, not waited on.
        del virt.fail["backup_xml"]
        with pytest.raises(errors.BackupInProgress) as e:
            await jobs.start(StartRequest("d1"))
        assert e.value.parameters == {"domain": "d1", "id": ""}
    assert [j.state for j in stored(tmp_path)] == [JobState.FAILED]


@pytest.mark.asyncio
async def test_crash_recovery_adopts_live_jobs_and_fails_lost_ones(tmp_path: Path) -> None:
    virt = FakeVirt()
    async with running(tmp_path, virt) as rig:
        jobs = rig.jobs
        live = await jobs.start(StartRequest("d1"))
        lost = await jobs.start(StartRequest("d2"))
    # The daemon "crashed" with both jobs ready; meanwhile d2's libvirt job vanished.
    del virt.backups["d2"]
    async with running(tmp_path, virt) as rig:
        jobs = rig.jobs
        assert jobs.get(live.id).state == JobState.READY
        assert jobs.get(lost.id).state == JobState.FAILED
        with pytest.raises(errors.BackupInProgress) as e:
            await jobs.start(StartRequest("d1"))
        assert e.value.parameters["id"] == live.id
        assert (await jobs.finish(live.id)).state == JobState.COMPLETED


@pytest.mark.asyncio
async def test_concurrent_start_is_refused_at_once(tmp_path: Path) -> None:
    virt = FakeVirt()
    virt.stall["backup_begin"] = anyio.Event()
    async with running(tmp_path, virt) as rig, anyio.create_task_group() as tg:
        jobs = rig.jobs
        tg.start_soon(jobs.start, StartRequest("d1"))
        await anyio.wait_all_tasks_blocked()
        with pytest.raises(errors.BackupInProgress):
            await jobs.start(StartRequest("d1"))
        assert [j.state for j in jobs.all()] == [JobState.STARTING]
        virt.stall["backup_begin"].set()
    [job] = jobs.all()
    assert job.state == JobState.READY


@pytest.mark.asyncio
async def test_unexpected_exception_becomes_internal_error_and_service_goes_on(
        tmp_path: Path) -> None:
    virt = FakeVirt()
    virt.fail["domain"] = RuntimeError("boom: a bug")
    async with running(tmp_path, virt) as rig:
        service = api.service(rig.parts)

        async def call(method: str, **params: Any) -> dict[str, Any]:
            [reply] = [r async for r in service.replies(Call(f"{api.INTERFACE}.{method}", params))]
            return reply.to_message()

        reply = await call("Start", domain="d1")
        assert reply["error"] == f"{api.INTERFACE}.InternalError"
        assert set(reply["parameters"]) == {"reference"}
        assert "boom" not in str(reply)
        del virt.fail["domain"]
        reply = await call("Start", domain="d1")
        assert reply["parameters"]["job"]["state"] == "ready"


@pytest.mark.asyncio
async def test_one_verify_reads_at_a_time_and_the_next_waits_its_turn(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each Verify holds a qemu-storage-daemon and a worker thread while it reads: calls
    made at once (by anyone who may Verify) read one after the other, all answered."""
    (tmp_path / "repo" / "d1" / "c" / "vda").mkdir(parents=True)
    reading, most, release = 0, 0, anyio.Event()

    async def verify_disk(domain: str, consumer: str, disk: str) -> tuple[int, list[str]]:
        nonlocal reading, most
        reading += 1
        most = max(most, reading)
        await release.wait()
        reading -= 1
        return 1, []

    virt = FakeVirt()
    async with running(tmp_path, virt) as rig:
        monkeypatch.setattr(rig.parts.repository, "verify_disk", verify_disk)
        service = api.service(rig.parts)
        replies: list[dict[str, Any]] = []

        async def verify() -> None:
            call = Call(f"{api.INTERFACE}.Verify", {"domain": "d1"})
            replies.extend([r.to_message() async for r in service.replies(call)])

        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(verify)
            await anyio.wait_all_tasks_blocked()
            assert reading == 1
            release.set()
    assert most == 1
    assert [r["parameters"] for r in replies] == [{"checked": 1, "problems": []}] * 3


@pytest.mark.asyncio
async def test_checkpoint_libvirt_cannot_delete_is_retried_and_never_a_base(
        tmp_path: Path) -> None:
    virt = FakeVirt()
    async with running(tmp_path, virt) as rig:
        jobs = rig.jobs
        full = await jobs.start(StartRequest("d1", consumer="c"))
        await jobs.finish(full.id)
        failed = await jobs.start(StartRequest("d1", mode="incremental", consumer="c"))
        virt.fail["delete_checkpoint"] = errors.LibvirtError(84, "domain is not running")
        await jobs.finish(failed.id, success=False)
        leftover = rig.chains.get(failed.checkpoint)
        assert leftover is not None and leftover.state == "discard"
        assert ("d1", failed.checkpoint) in virt.checkpoint_xmls
        del virt.fail["delete_checkpoint"]
        # The next backup deletes it first, and starts from the last good checkpoint.
        nxt = await jobs.start(StartRequest("d1", mode="incremental", consumer="c"))
        assert nxt.since == full.checkpoint
        assert rig.chains.get(failed.checkpoint) is None
        assert ("d1", failed.checkpoint) not in virt.checkpoint_xmls
        await jobs.finish(nxt.id)
        assert [c.name for c in rig.chains.of("d1", "c")] == [full.checkpoint, nxt.checkpoint]


@pytest.mark.asyncio
async def test_a_chain_libvirt_cannot_mirror_still_grows(tmp_path: Path) -> None:
    # The domain's metadata is for a pullbackd elsewhere (after a migration); our own
    # database is what counts here.
    virt = FakeVirt()
    virt.fail["set_metadata"] = errors.LibvirtError(1, "internal error")
    async with running(tmp_path, virt) as rig:
        jobs = rig.jobs
        job = await jobs.start(StartRequest("d1", consumer="c"))
        assert (await jobs.finish(job.id)).state == JobState.COMPLETED
        assert [c.name for c in rig.chains.of("d1", "c")] == [job.checkpoint]
        del virt.fail["set_metadata"]
        nxt = await jobs.start(StartRequest("d1", consumer="c", mode="incremental"))
        assert nxt.since == job.checkpoint
        await jobs.finish(nxt.id)
    assert "pullbackd.c." in virt.metadata_xmls["d1"]


@pytest.mark.asyncio
async def test_crash_while_starting_deletes_the_new_checkpoint(tmp_path: Path) -> None:
    # What a crash between backupBegin and recording READY leaves: libvirt runs
    # the job and has the checkpoint; the database says starting and pending.
    virt = FakeVirt()
    job = Job("0123456789ab", "d1", JobState.STARTING, "full", now(), "c",
              checkpoint_name("c", "0123456789ab"))
    await virt.backup_begin("d1", xml.backup(xml.BackupRequest(
        tmp_path / "exports" / ".qemu" / f"{job.id}.sock", {"vda": tmp_path / "s.qcow2"})),
        xml.checkpoint(job.checkpoint, ["vda"], ()))
    store = Store(tmp_path / "state.db")
    await store.save_job(job)
    await store.save_checkpoint(Checkpoint(job.checkpoint, "d1", "c", job.id, job.created,
                                           CheckpointState.PENDING, ("vda",)))
    store.close()
    async with running(tmp_path, virt) as rig:
        jobs = rig.jobs
        assert jobs.get(job.id).state == JobState.FAILED
        assert rig.chains.get(job.checkpoint) is None
        assert ("d1", job.checkpoint) not in virt.checkpoint_xmls
        assert "d1" not in virt.backups


@pytest.mark.asyncio
async def test_a_chain_holding_a_failed_jobs_checkpoint_is_rolled_back_at_start(
        tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    # What the bug chain.py's invariant rules out would leave: a failed job whose
    # checkpoint is in the chain (and in the domain's metadata).
    virt = FakeVirt()
    job = Job("0123456789ab", "d1", JobState.FAILED, "full", now(), "c",
              checkpoint_name("c", "0123456789ab"), ended=now(), error="lost")
    virt.checkpoint_xmls["d1", job.checkpoint] = xml.checkpoint(job.checkpoint, ["vda"], ())
    virt.metadata_xmls["d1"] = xml.chains([xml.ChainEntry(
        job.checkpoint, "c", job.id, job.created, ("vda",), None)])
    store = Store(tmp_path / "state.db")
    await store.save_job(job, Checkpoint(job.checkpoint, "d1", "c", job.id, job.created,
                                         CheckpointState.COMPLETE, ("vda",)))
    store.close()
    async with running(tmp_path, virt) as rig:
        jobs = rig.jobs
        assert rig.chains.of("d1") == []
        assert ("d1", job.checkpoint) not in virt.checkpoint_xmls
        assert job.checkpoint not in virt.metadata_xmls.get("d1", "")
        # Nor is it taken back in from the metadata before the next backup.
        virt.metadata_xmls["d1"] = xml.chains([xml.ChainEntry(
            job.checkpoint, "c", job.id, job.created, ("vda",), None)])
        nxt = await jobs.start(StartRequest("d1", consumer="c", mode="incremental"))
        assert nxt.mode == "full" and rig.chains.get(job.checkpoint) is None
    assert "BUG: a checkpoint is in its consumer's chain" in capfd.readouterr().out


@pytest.mark.asyncio
async def test_a_backup_of_ours_the_database_does_not_know_is_rebuilt_or_ended_at_start(
        tmp_path: Path) -> None:
    # The database was lost while jobs were ready: libvirt still runs their backups on
    # our QEMU sockets. d1's has the checkpoint named after its job: it is rebuilt.
    # d2's has none (someone deleted it): it cannot be finished, so it is ended.
    virt = FakeVirt()
    lost, lone = "0123456789ab", "ba9876543210"
    await virt.backup_begin("d1", xml.backup(xml.BackupRequest(
        tmp_path / "exports" / ".qemu" / f"{lost}.sock", {"vda": tmp_path / "s.qcow2"})),
        xml.checkpoint(checkpoint_name("c", lost), ["vda"], ()))
    await virt.backup_begin("d2", xml.backup(xml.BackupRequest(
        tmp_path / "exports" / ".qemu" / f"{lone}.sock", {"vda": tmp_path / "t.qcow2"})))
    async with running(tmp_path, virt) as rig:
        jobs = rig.jobs
        job = jobs.get(lost)
        assert (job.state, job.domain, job.consumer, job.checkpoint) == (
            JobState.READY, "d1", "c", checkpoint_name("c", lost))
        assert [d.mode for d in job.disks] == ["full"]
        with pytest.raises(errors.BackupInProgress):
            await jobs.start(StartRequest("d1", consumer="c"))
        assert (await jobs.finish(lost)).state == JobState.COMPLETED
        assert [c.name for c in rig.chains.of("d1", "c")] == [job.checkpoint]
        assert "d2" not in virt.backups
        fresh = await jobs.start(StartRequest("d2", consumer="c"))  # no BackupInProgress
        assert fresh.state == JobState.READY


def test_a_damaged_database_is_refused_with_what_to_do(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    path.write_bytes(b"SQLite format 3\x00" + b"\xff" * 4096)
    with pytest.raises(StateDamaged) as e:
        Store(path)
    assert "move it aside" in str(e.value) and str(path) in str(e.value)
    assert path.read_bytes().startswith(b"SQLite format 3")  # left for the operator


class PushingVirt(FakeVirt):
    """libvirt reports a push complete before backupBegin has even returned."""

    def __init__(self, success: bool) -> None:
        super().__init__()
        self.success = success

    async def backup_begin(self, domain: str, backup_xml: str,
                           checkpoint_xml: str | None = None, *, reuse: bool = False) -> None:
        await super().backup_begin(domain, backup_xml, checkpoint_xml, reuse=reuse)
        for target in ET.fromstring(backup_xml).iterfind("disks/disk/target"):
            await anyio.Path(target.get("file", "")).write_bytes(b"qcow2")
        del self.backups[domain]
        self._send.send_nowait(JobEnded(domain, "backup", self.success,
                                        None if self.success else "No space left on device"))


@pytest.mark.asyncio
@pytest.mark.parametrize("success", [True, False])
async def test_push_that_ends_before_start_returns(tmp_path: Path, success: bool) -> None:
    virt = PushingVirt(success)
    target = tmp_path / "push"
    target.mkdir()
    async with running(tmp_path, virt) as rig:
        jobs = rig.jobs
        job = await jobs.start(StartRequest("d1", target_dir=str(target)))
        assert job.state == JobState.RUNNING
        await anyio.wait_all_tasks_blocked()  # the event's handler has run
        ended = jobs.get(job.id)
        if success:
            assert ended.state == JobState.COMPLETED
            assert [c.name for c in rig.chains.of("d1")] == [job.checkpoint]
            assert [p.name for p in target.iterdir()] == [f"{job.id}.vda.qcow2"]
        else:
            assert ended.state == JobState.FAILED and "No space" in (ended.error or "")
            assert rig.chains.of("d1") == [] and rig.chains.get(job.checkpoint) is None
            assert list(target.iterdir()) == [], "nothing half-written may look like a backup"


@pytest.mark.asyncio
async def test_finish_of_a_running_push_is_refused(tmp_path: Path) -> None:
    virt = FakeVirt()
    target = tmp_path / "push"
    target.mkdir()
    async with running(tmp_path, virt) as rig:
        jobs = rig.jobs
        job = await jobs.start(StartRequest("d1", target_dir=str(target)))
        with pytest.raises(errors.JobNotReady):
            await jobs.finish(job.id)
        assert (await jobs.abort(job.id)).state == JobState.ABORTED
        assert rig.chains.get(job.checkpoint) is None


@pytest.mark.asyncio
async def test_ended_jobs_are_forgotten_after_keep_finished(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.db")
    old = Job("00000000000a", "d1", JobState.COMPLETED, "full", "2020-01-01T00:00:00.000Z",
              ended="2020-01-01T00:01:00.000Z")
    recent = Job("00000000000b", "d1", JobState.FAILED, "full", now(), ended=now())
    for job in (old, recent):
        await store.save_job(job)
    store.close()
    virt = FakeVirt()
    async with running(tmp_path, virt) as rig:
        jobs = rig.jobs
        assert [j.id for j in jobs.all()] == [recent.id]
        with pytest.raises(errors.NoSuchJob):
            jobs.get(old.id)
    assert [j.id for j in stored(tmp_path)] == [recent.id]


@pytest.mark.asyncio
async def test_list_pages_on_past_a_job_forgotten_between_two_pages(tmp_path: Path) -> None:
    """`pullbackctl jobs` pages through List, each page `after` the `next` of the one
    before. The job that ended the first page, forgotten before the second was asked
    (ended over [jobs] keep_finished ago, as the next end found), made that page
    NoSuchJob, and the listing failed. `next` is a position in List's order now: the
    page after it holds the jobs after it, whatever was forgotten meanwhile."""
    store = Store(tmp_path / "state.db")
    hour_ago = timestamp(datetime.now(UTC) - timedelta(hours=1))
    old = [Job(f"00000000000{n}", "d5", JobState.COMPLETED, "full", hour_ago,
               ended=hour_ago) for n in "ab"]
    for job in old:
        await store.save_job(job)
    store.close()
    async with running(tmp_path, FakeVirt()) as rig:
        jobs, backups = rig.jobs, api.BackupAPI(rig.parts)
        kept = await jobs.start(StartRequest("d1"))
        first = await backups.List(limit=2)
        assert [j["id"] for j in first["jobs"]] == [j.id for j in old]
        # Ended an hour ago is old now: the next end forgets both.
        jobs.reconfigure(max_active=0, keep_finished=60, places=Places(None, None))
        ended = await jobs.abort((await jobs.start(StartRequest("d2"))).id)
        assert [j.id for j in jobs.all()] == [kept.id, ended.id]
        rest = await backups.List(after=first["next"], limit=1)
        assert [j["id"] for j in rest["jobs"]] == [kept.id]
        last = await backups.List(after=rest["next"])
        assert [j["id"] for j in last["jobs"]] == [ended.id] and last["next"] is None
        # A job's id is a position too, while the job is known; an unknown one is none.
        assert (await backups.List(after=kept.id))["jobs"] == last["jobs"]
        with pytest.raises(errors.NoSuchJob):
            await backups.List(after=old[1].id)


class RefusesOneEnd(FakeVirt):
    """libvirt refuses to end the first backup asked (its domain's job lock is busy)."""

    def __init__(self) -> None:
        super().__init__()
        self.refused = anyio.Event()

    async def abort_job(self, domain: str) -> bool:
        if not self.refused.is_set():
            self.refused.set()
            raise errors.LibvirtError(1, "Timed out during operation: cannot acquire state "
                                         "change lock")
        return await super().abort_job(domain)


@pytest.mark.asyncio
async def test_a_copy_whose_end_libvirt_refuses_ends_later_and_the_daemon_goes_on(
        tmp_path: Path) -> None:
    """pullbackd's own copy fails (the fake's QEMU socket takes no connection), and
    libvirt refuses to end the backup: the end is tried again, not raised into the
    task group that serves every job."""
    virt = RefusesOneEnd()
    async with running(tmp_path, virt) as rig:
        jobs = rig.jobs
        with jobs.watch() as changes, anyio.fail_after(10):
            job = await jobs.start(StartRequest("d1", destination="local"))
            await virt.refused.wait()
            assert not jobs.get(job.id).state.final
            other = await jobs.start(StartRequest("d2"))  # the daemon goes on meanwhile
            async for change in changes:
                if change.job.id == job.id and change.job.state.final:
                    break
        ended = jobs.get(job.id)
        assert ended.state == JobState.FAILED and rig.chains.get(job.checkpoint) is None
        assert "Connection refused" in (ended.error or ""), ended.error
        assert (await jobs.finish(other.id)).state == JobState.COMPLETED
    assert [j.state for j in stored(tmp_path)] == [JobState.FAILED, JobState.COMPLETED]


class EndsSilently(FakeVirt):
    """libvirt ends a backup and says nothing: its event is lost (or no longer followed,
    as when the daemon stops)."""

    async def abort_job(self, domain: str) -> bool:
        return self.backups.pop(domain, None) is not None


@pytest.mark.asyncio
async def test_a_backup_ended_without_libvirts_event_is_seen_gone(tmp_path: Path) -> None:
    """The end does not wait [libvirt] end_timeout (here a minute) for an event that
    will not come: it looks whether the backup is gone."""
    async with running(tmp_path, EndsSilently(), end_timeout=60) as rig:
        job = await rig.jobs.start(StartRequest("d1"))
        with anyio.fail_after(30):
            assert (await rig.jobs.abort(job.id)).state == JobState.ABORTED
            await anyio.lowlevel.checkpoint()  # the end is shielded: a deadline past shows here


@pytest.mark.asyncio
async def test_scratch_files_are_qemus_groups_where_one_is_named(tmp_path: Path) -> None:
    """[exports] qemu_group: a libvirt that hands no file over to QEMU (dynamic_ownership
    = 0) leaves QEMU to open the scratch file through its group."""
    group = grp.getgrnam("nogroup")
    async with running(tmp_path, FakeVirt(), qemu_group=group.gr_name) as rig:
        job = await rig.jobs.start(StartRequest("d1"))
        made = (tmp_path / "scratch" / f"{job.id}.vda.qcow2").stat()
        assert (made.st_gid, stat.S_IMODE(made.st_mode)) == (group.gr_gid, 0o660)
        await rig.jobs.finish(job.id)
