"""Backup sources: where a job's data comes from.

A source begins a backup of a domain's disks and serves each disk as an NBD
export with its dirty bitmap (pull, stream) or writes it into a file (push);
it tells whether the backup still runs, ends it, and reports, through `follow`,
a backup that ended or a domain that stopped on its own. jobs.py drives a
source through this interface alone (`BackupSource`); `LibvirtSource` is the
one for running domains: libvirt's pull- and push-mode backups (a pull backup's
scratch files made by scratch.py, libvirt told to take them as they are).

A source's exports are for pullbackd: appliances reach a pull job's disks
through the job's endpoint (exports.py), never the source's socket.
"""

from __future__ import annotations

import grp
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

import anyio
import structlog

from . import scratch, xml
from .chain import Base
from .domainfiles import DomainFiles, Reader
from .errors import (
    BackupInProgress,
    DomainBusy,
    DomainNotRunning,
    InvalidParameter,
    LibvirtError,
    NoSuchDisk,
    NoSuchDomain,
    PullbackError,
)
from .model import Job, Kind, Scratch, now, timestamp
from .names import Layout, consumer_of, export_token, job_file, job_of, of_job
from .virt import (
    AgentError,
    BrokenBitmap,
    ConnectionLost,
    Definition,
    DomainStopped,
    JobEnded,
    Virt,
)

log = structlog.get_logger()

#: Seconds the agent may take to answer a thaw: it writes nothing, and waits only for
#: what the agent was doing before (a thaw it does not answer is asked again: quiesce.py).
THAW_WAIT = 10.0
#: Seconds between looks at a backup being ended, while libvirt's event has not come.
LOOK_AGAIN = 1.0


@dataclass(frozen=True)
class Plan:
    """What a backup of a domain covers: its disks, the disks left out, their sizes, and
    the disks that can only be backed up in full (no dirty bitmap), with why. (What each
    disk starts from is chain.py's; the source may yet restart a disk's chain when it
    begins, in full with a new bitmap: `BackupSource.begin`.)"""

    disks: tuple[str, ...]
    skip: tuple[str, ...]
    sizes: dict[str, int]
    full: dict[str, str] = field(default_factory=dict)
    #: The domain is shut off (offline.py serves it); `clean`ly (virt.CLEAN_SHUTOFF).
    offline: bool = False
    clean: bool = False
    #: Its guest agent is connected (it can freeze the filesystems).
    agent: bool = False
    #: Its definitions, read with the plan (None: `files` reads them).
    definition: Definition | None = None


@dataclass(frozen=True)
class Exported:
    """One disk of a backup as its source serves it."""

    name: str
    #: The NBD export (pull, stream), and its dirty bitmap's name in it.
    export: str | None
    bitmap: str | None
    #: The file it is written into (push).
    target: Path | None
    #: The checkpoint it starts from; None for a full backup.
    since: str | None


@dataclass(frozen=True)
class Begun:
    """A backup the source runs: the NBD socket its exports are on (None: push)."""

    socket: Path | None
    disks: tuple[Exported, ...]


@dataclass(frozen=True)
class Unowned:
    """A backup of ours that no job owns (the state database was lost): what is
    needed to rebuild its job, if its checkpoint names a consumer."""

    domain: str
    job_id: str
    #: Our checkpoints of the domain named after the job.
    checkpoints: tuple[str, ...]
    consumer: str | None
    begun: Begun
    sizes: dict[str, int]
    created: str
    checkpoint_xml: str
    #: The disks the checkpoint has a bitmap of.
    bitmaps: tuple[str, ...]


class Sink(Protocol):
    """What a source tells the jobs, from `follow`."""

    async def lost(self, reason: str) -> None:
        """The source is gone (libvirt's connection): every job is in doubt."""

    def ended(self, domain: str, success: bool, error: str | None) -> None:
        """The domain's backup ended without pullbackd asking."""

    def stopped(self, domain: str, reason: str) -> None:
        """The domain stopped."""


class BackupSource(Protocol):
    async def plan(self, domain: str, wanted: list[str] | None, kind: Kind) -> Plan:
        """Which disks a backup of `domain` of `kind` covers (`wanted`, or every disk
        that can be backed up). Raises NoSuchDomain, DomainNotRunning, BackupInProgress,
        DomainBusy, NoSuchDisk, InvalidParameter."""

    async def begin(self, job: Job, plan: Plan, bases: dict[str, Base]) -> None:
        """Begin the backup of `plan`'s disks, creating `job.checkpoint`. A disk whose
        base cannot be used is backed up in full instead: `bases` is updated with why.
        Raises LibvirtError (and PullbackError) when it did not begin."""

    async def files(self, job: Job, plan: Plan) -> DomainFiles:
        """The domain's own files (domainfiles.py), as the job's backup begins (`plan`:
        the job's). Raises nothing: what it cannot read is `missing`."""

    async def freeze(self, job: Job, mountpoints: list[str] | None) -> int:
        """Freeze the guest's filesystems for the job's backup to begin: how many. Raises
        AgentError."""

    async def thaw(self, job: Job) -> int:
        """Thaw them: how many were frozen (none: nothing done). Raises AgentError."""

    async def exports(self, job: Job, bases: dict[str, Base]) -> Begun:
        """The backup the source began: how it serves each disk. Raises LibvirtError
        (and PullbackError) if it cannot tell (the backup may run: `end` it)."""

    def socket(self, job: Job) -> Path:
        """Where the source serves the job's exports (pull, stream)."""

    async def running(self, job: Job) -> bool:
        """Whether the source still runs the job's backup. Raises PullbackError if
        it cannot tell now."""

    async def reachable(self, job: Job) -> bool:
        """Whether the job's exports can be reached (at `socket(job)`) while it runs."""

    async def end(self, job: Job) -> bool:
        """End the job's backup and wait until it ended; remove what it left. Whether
        it was still running. Raises LibvirtError if it would not end."""

    async def why_ended(self, job: Job, error: str | None) -> str:
        """Why the job's backup ended without pullbackd (after `Sink.ended`), with the
        source's `error`. Raises PullbackError if it cannot tell now."""

    def sweep(self, running: set[str]) -> None:
        """Remove what backups of jobs not `running` left behind. Blocks."""

    async def cause(self, job: Job) -> str | None:
        """After the job's copy failed: why, if the backup ended under it (waits a
        while for the source's word); None if it still runs. Raises PullbackError
        if it cannot tell now."""

    async def usage(self, job: Job) -> Scratch | None:
        """What the backup's scratch space holds now, if the source tells (None if
        it cannot now). Raises nothing."""

    async def follow(self, sink: Sink, started: Callable[[], None]) -> None:
        """Tell `sink` what happens to backups and domains, until the source is lost
        (then `sink.lost` is awaited and follow returns). `started()` once listening."""

    async def unowned(self, busy: Callable[[str], bool]) -> list[Unowned]:
        """Backups of ours the source runs on domains not `busy`: found after a
        loss of the state database. A domain it cannot look at now is skipped (and
        logged). Raises nothing."""

    async def end_unowned(self, backup: Unowned) -> None:
        """End a backup of ours nobody can finish, and delete its checkpoints."""


class LibvirtSource:
    """Running domains, through libvirt's backup jobs: QEMU serves a pull backup's
    disks on `layout.qemu_socket(job)`, with scratch files `layout.scratch_file`;
    a push backup writes `<target_dir>/<job>.<disk>.qcow2`."""

    def __init__(self, virt: Virt, layout: Layout, end_timeout: float, files: Reader,
                 qemu_group: str = "", agent_timeout: float = 60.0) -> None:
        """`end_timeout`: seconds to wait for libvirt to end a backup; `qemu_group`: the
        group QEMU runs as, given the scratch files (scratch.create); `agent_timeout`:
        seconds the guest agent may take to answer a freeze or a thaw."""
        self._virt = virt
        self._agent_timeout = agent_timeout
        self._layout = layout
        self._qemu_gid = grp.getgrnam(qemu_group).gr_gid if qemu_group else None
        self._end_timeout = end_timeout
        self._files = files
        #: domain -> set when libvirt reports the domain's backup ended, while we wait.
        self._ended: dict[str, anyio.Event] = {}

    async def plan(self, domain: str, wanted: list[str] | None, kind: Kind) -> Plan:
        dom = await self._virt.domain(domain, definition=True)
        if not dom.running:
            raise DomainNotRunning(domain)
        if dom.job == "backup":
            raise BackupInProgress(domain, "")
        if dom.job is not None:
            raise DomainBusy(domain, dom.job)
        live = xml.parse_live(dom.xml)
        chosen, skip = select_disks(domain, live.disks, wanted)
        # Asked each time, though it costs libvirt and QEMU 3 ms of CPU per disk: a size
        # kept from an earlier backup would be wrong after a resize, and when QEMU refuses
        # a scratch file of another size than its disk's, libvirt 9.0 can die (a segfault
        # in its error path, seen twice in the lab while other calls reached the domain).
        sizes = await self._virt.capacities(domain, chosen)
        full = {d.target: why for d in live.disks if d.target in chosen and (why := d.no_bitmap)}
        return Plan(tuple(chosen), skip, sizes, full, agent=live.agent_connected,
                    definition=dom.definition)

    async def files(self, job: Job, plan: Plan) -> DomainFiles:
        return await self._files.capture(job.domain, plan.definition)

    async def freeze(self, job: Job, mountpoints: list[str] | None) -> int:
        count = await self._virt.fs_freeze(job.domain, mountpoints, self._agent_timeout)
        log.info("froze the guest's filesystems", job=job.id, filesystems=count)
        # The agent skips, without an error, what it does not find or cannot freeze.
        asked = len(set(mountpoints)) if mountpoints else 1
        if count < asked:
            raise AgentError(f"it froze {count} filesystems, not "
                             + (f"the {asked} asked" if mountpoints else "any"))
        return count

    async def thaw(self, job: Job) -> int:
        return await self._virt.fs_thaw(job.domain, min(self._agent_timeout, THAW_WAIT))

    async def begin(self, job: Job, plan: Plan, bases: dict[str, Base]) -> None:
        bitmaps = [d for d, b in bases.items() if b.bitmap]
        skip = plan.skip
        # A disk without a bitmap takes no part in the checkpoint; with no bitmap at all
        # there is no checkpoint (libvirt would refuse an empty one).
        checkpoint_xml = xml.checkpoint(
            job.checkpoint, bitmaps, skip + tuple(d for d in bases if d not in bitmaps)
        ) if bitmaps else None
        token = export_token()
        pull = job.kind != Kind.PUSH
        for _ in range(len(bases) + 1):
            request = xml.BackupRequest(
                socket=self._layout.qemu_socket(job.id) if pull else None,
                files={d: self._file(job, d) for d in bases},
                exports={d: f"{d}-{token}" for d in bases} if pull else {},
                since={d: b.checkpoint for d, b in bases.items() if b.checkpoint},
                skip=skip,
            )
            try:
                await self._begin_once(job, request, checkpoint_xml,
                                       {d: plan.sizes[d] for d in bases})
                return
            except BrokenBitmap as e:
                incremental = list(request.since)
                if not incremental:
                    raise LibvirtError(-1, str(e)) from None
                broken = [e.disk] if e.disk in incremental else incremental
                for disk in broken:
                    bases[disk] = Base(None, f"the bitmap of {bases[disk].checkpoint} cannot be "
                                             f"used ({e}); this disk's chain restarts here")
                log.warning("falling back to a full backup", job=job.id, disks=broken,
                            error=str(e))
        raise AssertionError("unreachable: each round makes one more disk full")

    async def _begin_once(self, job: Job, request: xml.BackupRequest,
                          checkpoint_xml: str | None, sizes: dict[str, int]) -> None:
        """One `backupBegin`. A pull backup's scratch files are ours to make (scratch.py),
        new for each attempt, and gone if it fails."""
        pull = request.socket is not None
        try:
            if pull:
                await anyio.to_thread.run_sync(scratch.create, self._layout, job.id, sizes,
                                               self._qemu_gid)
            await self._virt.backup_begin(job.domain, xml.backup(request), checkpoint_xml,
                                          reuse=pull)
        except BaseException:
            if pull:
                with anyio.CancelScope(shield=True):  # no scratch file outlives a failure
                    await anyio.to_thread.run_sync(scratch.remove, self._layout, job.id)
            raise

    async def exports(self, job: Job, bases: dict[str, Base]) -> Begun:
        if job.kind == Kind.PUSH:
            # A small push can be over before we could ask: its targets are the
            # files we named, and libvirt's event tells how it went.
            return Begun(None, tuple(Exported(d, None, None, self._file(job, d),
                                              bases[d].checkpoint) for d in bases))
        backup_xml = await self._virt.backup_xml(job.domain)
        if backup_xml is None:
            raise LibvirtError(-1, "the backup job ended as soon as it started")
        backup = xml.parse_backup(backup_xml)
        if not self._is_ours(backup, job):
            raise LibvirtError(-1, "libvirt reports a backup job that is not ours")
        return _begun(backup, {d: b.checkpoint for d, b in bases.items()})

    def _file(self, job: Job, disk: str) -> Path:
        if job.target_dir is not None:
            return job_file(Path(job.target_dir), job.id, disk)
        return self._layout.scratch_file(job.id, disk)

    def socket(self, job: Job) -> Path:
        return self._layout.qemu_socket(job.id)

    def _is_ours(self, backup: xml.BackupJob, job: Job) -> bool:
        if job.target_dir is None:
            return backup.socket == self._layout.qemu_socket(job.id)
        return any(d.target == self._file(job, d.name) for d in backup.disks)

    async def running(self, job: Job) -> bool:
        try:
            backup_xml = await self._virt.backup_xml(job.domain)
        except NoSuchDomain:
            return False
        return backup_xml is not None and self._is_ours(xml.parse_backup(backup_xml), job)

    async def reachable(self, job: Job) -> bool:
        # QEMU listens on a socket file: if it went (its folder was removed), nothing
        # reaches the exports, though QEMU still serves them.
        return await anyio.Path(self.socket(job)).is_socket()

    async def end(self, job: Job) -> bool:
        running = await self.running(job)
        # libvirt's word that the job ended is enough; without it, look again.
        if running and not await self._abort(job.domain) and await self.running(job):
            raise LibvirtError(
                -1, f"libvirt has not ended the backup after {self._end_timeout:g} s")
        await anyio.to_thread.run_sync(self.remove_leftovers, job.id)
        return running

    async def _abort(self, domain: str) -> bool:
        """Ask libvirt to end the domain's backup job; wait for its end, at most
        `end_timeout`: libvirt's word (its event), or, each second it has not come, the
        backup gone from the domain (events stop flowing before the last ends of a
        daemon that stops). Whether it ended."""
        ended = self._ended[domain] = anyio.Event()
        try:
            if not await self._virt.abort_job(domain):
                return False
            with anyio.move_on_after(self._end_timeout):
                while not ended.is_set():
                    with anyio.move_on_after(LOOK_AGAIN):
                        await ended.wait()
                    if not ended.is_set() and not await self._has_backup(domain):
                        return True
        finally:
            del self._ended[domain]
        return ended.is_set()

    async def _has_backup(self, domain: str) -> bool:
        try:
            return await self._virt.backup_xml(domain) is not None
        except NoSuchDomain:
            return False

    def remove_leftovers(self, job_id: str) -> None:
        """The job's scratch files (ours: scratch.py), and the sockets libvirt removes when
        the job ends, which a crash of libvirtd or QEMU may leave. Nothing else ever uses
        these names. Blocks."""
        scratch.remove(self._layout, job_id)
        for path in self._layout.leftovers(job_id):
            if path.exists():
                log.warning("removing leftover file", job=job_id, path=str(path))
                path.unlink(missing_ok=True)

    def sweep(self, running: set[str]) -> None:
        for job_id in sorted(self._layout.jobs_with_files() - running):
            self.remove_leftovers(job_id)

    async def cause(self, job: Job) -> str | None:
        # When QEMU's side goes away, libvirt ends the job: its event tells the
        # cause better than what the copy saw of it.
        ended = self._ended.setdefault(job.domain, anyio.Event())
        try:
            with anyio.move_on_after(self._end_timeout):
                await ended.wait()
        finally:
            if self._ended.get(job.domain) is ended:
                del self._ended[job.domain]
        if not ended.is_set():
            return None
        return self._why(await self.domain_runs(job.domain))

    @staticmethod
    def _why(domain_runs: bool) -> str:
        return ("the libvirt backup job was ended outside pullbackd" if domain_runs
                else "the domain stopped during the backup")

    async def why_ended(self, job: Job, error: str | None) -> str:
        # When QEMU dies, libvirt's job event comes before the lifecycle event:
        # tell the two causes apart here.
        reason = self._why(await self.domain_runs(job.domain))
        return f"{reason}: {error}" if error else reason

    async def domain_runs(self, domain: str) -> bool:
        try:
            return (await self._virt.domain(domain)).running
        except NoSuchDomain:
            return False

    async def usage(self, job: Job) -> Scratch | None:
        try:
            stats = await self._virt.job_stats(job.domain)
        except PullbackError:
            return None
        if "disk_temp_used" in stats and "disk_temp_total" in stats:
            return Scratch(int(stats["disk_temp_used"]), int(stats["disk_temp_total"]))
        return None

    async def follow(self, sink: Sink, started: Callable[[], None]) -> None:
        started()
        async for event in self._virt.events:
            match event:
                case ConnectionLost(reason=reason):
                    await sink.lost(reason)
                    return
                case JobEnded(domain=domain, operation="backup"):
                    if domain in self._ended:
                        self._ended[domain].set()  # we are waiting for it
                    else:
                        sink.ended(domain, event.success, event.error)
                case DomainStopped(domain=domain, reason=reason):
                    if domain in self._ended:
                        self._ended[domain].set()
                    sink.stopped(domain, reason)

    async def unowned(self, busy: Callable[[str], bool]) -> list[Unowned]:
        try:
            domains = await self._virt.running_domains()
        except PullbackError as e:
            log.warning("cannot look for backups nobody owns", error=str(e))
            return []
        found = []
        for domain in domains:
            if busy(domain):
                continue
            try:
                if (backup := await self._unowned_of(domain)) is not None:
                    found.append(backup)
            except PullbackError as e:
                log.warning("cannot look for a backup nobody owns", domain=domain,
                            error=str(e))
        return found

    async def _unowned_of(self, domain: str) -> Unowned | None:
        backup_xml = await self._virt.backup_xml(domain)
        backup = xml.parse_backup(backup_xml) if backup_xml else None
        if backup is None or backup.socket is None or \
                backup.socket.parent != self._layout.qemu:
            return None
        job_id = job_of(backup.socket)
        ours = tuple(name for name in await self._virt.checkpoints(domain)
                     if of_job(name, job_id))
        consumer = consumer_of(ours[0], job_id) if len(ours) == 1 else None
        begun = _begun(backup, {d.name: d.since for d in backup.disks})
        if consumer is None:
            return Unowned(domain, job_id, ours, None, begun, {}, now(), "", ())
        checkpoint_xml = await self._virt.checkpoint_xml(domain, ours[0])
        info = xml.parse_checkpoint(checkpoint_xml)
        created = now() if info.created is None else timestamp(
            datetime.fromtimestamp(info.created, UTC))
        sizes = {d.name: await self._virt.capacity(domain, d.name) for d in backup.disks}
        return Unowned(domain, job_id, ours, consumer, begun, sizes, created, checkpoint_xml,
                       info.disks)

    async def end_unowned(self, backup: Unowned) -> None:
        await self._abort(backup.domain)
        await anyio.to_thread.run_sync(self.remove_leftovers, backup.job_id)
        for name in backup.checkpoints:
            await self._virt.delete_checkpoint(backup.domain, name)


def _begun(backup: xml.BackupJob, since: dict[str, str | None]) -> Begun:
    return Begun(backup.socket, tuple(
        Exported(d.name, d.export, f"qemu:dirty-bitmap:{d.bitmap}" if d.bitmap else None,
                 d.target, since.get(d.name)) for d in backup.disks))


def select_disks(domain: str, disks: list[xml.DomainDisk], wanted: list[str] | None
                 ) -> tuple[list[str], tuple[str, ...]]:
    """Which disks to back up, and which to name as skipped."""
    backupable = [d.target for d in disks if d.backupable]
    if wanted is None:
        if not backupable:
            raise InvalidParameter("domain", f"{domain!r} has no disk that can be backed up")
        chosen = backupable
    else:
        if not wanted:
            raise InvalidParameter("disks", "empty; leave it out to back up every disk")
        if len(set(wanted)) != len(wanted):
            raise InvalidParameter("disks", "a disk is named twice")
        for name in wanted:
            if name not in backupable:
                raise NoSuchDisk(domain, name)
        chosen = wanted
    return chosen, tuple(d.target for d in disks if d.target not in chosen)
