"""Backup jobs: the records, and the manager that moves them through their states.

    starting ──> ready ──> completed   (Finish)
        │          ├─────> aborted     (Abort)
        └──────────┴─────> failed      (libvirt refused, the domain stopped,
                                        the job vanished, the daemon lost it)

Names derive from the job id alone, so a job's socket and scratch files can be
found again from the state database after a crash: `<exports>/<id>.sock`,
`<scratch>/<id>.<disk>.qcow2`.

libvirt allows one backup job per domain, so the manager keeps one active job
per domain and refuses a second at once (libvirt would make the caller wait 30 s
on its job lock and then fail).
"""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import anyio
import structlog

from . import xml
from .errors import (
    BackupInProgress,
    DomainBusy,
    DomainNotRunning,
    InvalidParameter,
    LibvirtError,
    NoSuchDisk,
    NoSuchDomain,
    NoSuchJob,
)
from .virt import ConnectionLost, DomainStopped, JobEnded, Virt

if TYPE_CHECKING:
    from .state import Store

log = structlog.get_logger()


class JobState(StrEnum):
    STARTING = "starting"
    READY = "ready"
    COMPLETED = "completed"
    ABORTED = "aborted"
    FAILED = "failed"

    @property
    def final(self) -> bool:
        return self in (JobState.COMPLETED, JobState.ABORTED, JobState.FAILED)


@dataclass(frozen=True)
class Disk:
    name: str
    export: str
    url: str
    size: int
    mode: str
    bitmap: str | None = None


@dataclass(frozen=True)
class Job:
    id: str
    domain: str
    state: JobState
    mode: str
    created: str
    disks: tuple[Disk, ...] = ()
    ended: str | None = None
    error: str | None = None

    def to_record(self) -> dict[str, Any]:
        """The job as the varlink `Job` type (and as stored)."""
        return dataclasses.asdict(self) | {"disks": [dataclasses.asdict(d) for d in self.disks]}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Job:
        return cls(**record | {
            "state": JobState(record["state"]),
            "disks": tuple(Disk(**d) for d in record["disks"]),
        })


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def nbd_url(socket: Path, export: str) -> str:
    """An NBD URI for a Unix socket: https://github.com/NetworkBlockDevice/nbd/blob/master/doc/uri.md"""
    return f"nbd+unix:///{quote(export, safe='')}?socket={quote(str(socket), safe='/')}"


class Jobs:
    """Every job the daemon knows, and the only code that changes them."""

    def __init__(self, virt: Virt, store: Store, exports: Path, scratch: Path,
                 end_timeout: float) -> None:
        self._virt = virt
        self._store = store
        self._exports = exports
        self._scratch = scratch
        self._end_timeout = end_timeout
        self._jobs: dict[str, Job] = {}
        #: domain -> id of its job that is starting or ready.
        self._active: dict[str, str] = {}
        #: One lock per job: every change of a job's state happens under it.
        self._locks: dict[str, anyio.Lock] = {}
        #: domain -> set when libvirt reports the domain's backup job ended.
        self._ended: dict[str, anyio.Event] = {}

    # Deterministic names.

    def socket_path(self, job_id: str) -> Path:
        return self._exports / f"{job_id}.sock"

    def scratch_path(self, job_id: str, disk: str) -> Path:
        return self._scratch / f"{job_id}.{disk}.qcow2"

    # Queries.

    def get(self, job_id: str) -> Job:
        try:
            return self._jobs[job_id]
        except KeyError:
            raise NoSuchJob(job_id) from None

    def all(self) -> list[Job]:
        return list(self._jobs.values())

    # Changes.

    async def start(self, domain: str, disks: list[str] | None = None) -> Job:
        if not domain:
            raise InvalidParameter("domain", "empty")
        if domain in self._active:
            raise BackupInProgress(domain, self._active[domain])
        job_id = self._new_id()
        # Claimed before the first await: a concurrent Start of this domain
        # fails at once instead of racing us to libvirt.
        self._active[domain] = job_id
        try:
            async with self._locked(job_id):
                return await self._start(job_id, domain, disks)
        finally:
            job = self._jobs.get(job_id)
            if (job is None or job.state != JobState.READY) and self._active.get(domain) == job_id:
                del self._active[domain]

    async def _start(self, job_id: str, domain: str, wanted: list[str] | None) -> Job:
        dom = await self._virt.domain(domain)
        if not dom.running:
            raise DomainNotRunning(domain)
        operation = await self._virt.job_operation(domain)
        if operation == "backup":
            raise BackupInProgress(domain, "")
        if operation is not None:
            raise DomainBusy(domain, operation)
        chosen, skip = _select_disks(domain, xml.parse_disks(dom.xml), wanted)
        request = xml.PullRequest(
            socket=self.socket_path(job_id),
            scratch={name: self.scratch_path(job_id, name) for name in chosen},
            skip=skip,
        )
        job = Job(job_id, domain, JobState.STARTING, "full", now())
        # Recorded before libvirt hears of it: after a crash, the database
        # knows which libvirt job is ours.
        await self._save(job)
        # Shielded: once libvirt may have started the job, the outcome must be
        # recorded (and a half-started job ended) even if our caller is cancelled.
        with anyio.CancelScope(shield=True):
            try:
                await self._virt.backup_begin(domain, xml.pull_backup(request))
            except Exception as e:
                await self._save(_failed(job, f"libvirt did not start the backup: {e}"))
                raise
            try:
                job = dataclasses.replace(
                    job, state=JobState.READY, disks=await self._exports_of(job))
            except Exception as e:
                error = f"the backup started but could not be read: {e}"
                try:
                    await self._end_libvirt_job(job)
                except Exception as end_error:
                    log.exception("cannot end a half-started backup", job=job.id)
                    error += f"; ending it failed too ({end_error}): end it with " \
                        f"`virsh domjobabort {domain}`"
                await self._save(_failed(job, error))
                raise
            await self._save(job)
        log.info("backup ready", job=job.id, domain=domain, disks=[d.name for d in job.disks])
        return job

    async def _exports_of(self, job: Job) -> tuple[Disk, ...]:
        backup_xml = await self._virt.backup_xml(job.domain)
        if backup_xml is None:
            raise LibvirtError(-1, "the backup job ended as soon as it started")
        backup = xml.parse_backup(backup_xml)
        if backup.socket != self.socket_path(job.id):
            raise LibvirtError(-1, f"libvirt reports a backup on {backup.socket}, not ours")
        return tuple([
            Disk(
                name=d.name,
                export=d.export,
                url=nbd_url(backup.socket, d.export),
                size=await self._virt.capacity(job.domain, d.name),
                mode="incremental" if d.bitmap else "full",
                bitmap=f"qemu:dirty-bitmap:{d.bitmap}" if d.bitmap else None,
            )
            for d in backup.disks
        ])

    async def finish(self, job_id: str) -> Job:
        return await self._end(job_id, JobState.COMPLETED)

    async def abort(self, job_id: str) -> Job:
        return await self._end(job_id, JobState.ABORTED)

    async def _end(self, job_id: str, state: JobState, error: str | None = None) -> Job:
        self.get(job_id)
        async with self._locked(job_id):
            job = self._jobs[job_id]
            if job.state.final:
                return job  # Finish and Abort are idempotent
            # Shielded: a libvirt job we ended must be recorded as ended.
            with anyio.CancelScope(shield=True):
                if not await self._end_libvirt_job(job) and state == JobState.COMPLETED:
                    # The exports vanished before the appliance said it was
                    # done: nobody can vouch that it read everything.
                    state, error = JobState.FAILED, "the backup ended before Finish: " \
                        "the domain stopped or the libvirt job was ended outside pullbackd"
                job = dataclasses.replace(job, state=state, ended=now(), error=error)
                await self._save(job)
                self._active.pop(job.domain, None)
        log.info("backup ended", job=job.id, domain=job.domain, state=job.state, error=error)
        return job

    async def _end_libvirt_job(self, job: Job) -> bool:
        """End the job's libvirt backup and wait until libvirt says it ended.

        Returns whether it was still running.
        """
        ended = self._ended[job.domain] = anyio.Event()
        try:
            running = await self._runs_in_libvirt(job)
            if running and await self._virt.abort_job(job.domain):
                with anyio.move_on_after(self._end_timeout):
                    await ended.wait()
            if await self._runs_in_libvirt(job):
                raise LibvirtError(
                    -1, f"libvirt has not ended the backup after {self._end_timeout:g} s")
        finally:
            del self._ended[job.domain]
        self._remove_leftovers(job)
        return running

    async def _runs_in_libvirt(self, job: Job) -> bool:
        try:
            backup_xml = await self._virt.backup_xml(job.domain)
        except NoSuchDomain:
            return False
        return backup_xml is not None and \
            xml.parse_backup(backup_xml).socket == self.socket_path(job.id)

    def _remove_leftovers(self, job: Job) -> None:
        # libvirt removes both when the job ends; a crash of libvirtd or QEMU
        # may not. Nothing else ever uses these names.
        leftovers = [self.socket_path(job.id), *self._scratch.glob(f"{job.id}.*.qcow2")]
        for path in leftovers:
            if path.exists():
                log.warning("removing leftover file", job=job.id, path=str(path))
                path.unlink(missing_ok=True)

    # Events and recovery.

    async def follow_events(self) -> str:
        """Apply libvirt's domain events to the jobs until the libvirt connection is lost.

        Returns why it was lost.
        """
        async with anyio.create_task_group() as tg:
            async for event in self._virt.events:
                match event:
                    case ConnectionLost(reason=reason):
                        tg.cancel_scope.cancel()
                        return reason
                    case JobEnded(domain=domain, operation="backup"):
                        if domain in self._ended:
                            self._ended[domain].set()
                        elif domain in self._active:
                            tg.start_soon(self._vanished, self._active[domain], event.error)
                    case DomainStopped(domain=domain, reason=reason) if domain in self._active:
                        if domain in self._ended:
                            self._ended[domain].set()
                        tg.start_soon(self._fail, self._active[domain],
                                      f"the domain stopped ({reason}) during the backup")
        return "the event stream ended"

    async def _vanished(self, job_id: str, error: str | None) -> None:
        """libvirt ended the job without us. When QEMU dies, this comes before the lifecycle
        event, so tell the two causes apart here."""
        job = self._jobs[job_id]
        try:
            running = (await self._virt.domain(job.domain)).running
        except NoSuchDomain:
            running = False
        reason = ("the libvirt backup job was ended outside pullbackd" if running
                  else "the domain stopped during the backup")
        await self._fail(job_id, f"{reason}: {error}" if error else reason)

    async def _fail(self, job_id: str, reason: str) -> None:
        try:
            await self._end(job_id, JobState.FAILED, reason)
        except Exception:
            log.exception("could not record a failed job", job=job_id, reason=reason)

    async def recover(self) -> None:
        """Load the jobs of an earlier run; adopt those libvirt still runs, fail the others."""
        for job in self._store.load_jobs():
            self._jobs[job.id] = job
        for job in [j for j in self._jobs.values() if not j.state.final]:
            if job.state == JobState.READY and await self._runs_in_libvirt(job):
                self._active[job.domain] = job.id
                log.info("adopted running backup", job=job.id, domain=job.domain)
                continue
            await self._end_libvirt_job(job)
            await self._save(_failed(job, "pullbackd restarted while the job was "
                                     + ("starting" if job.state == JobState.STARTING
                                        else "ready, and libvirt no longer runs it")))

    # Helpers.

    def _new_id(self) -> str:
        while (job_id := secrets.token_hex(6)) in self._jobs:
            pass
        return job_id

    @asynccontextmanager
    async def _locked(self, job_id: str) -> AsyncIterator[None]:
        lock = self._locks.setdefault(job_id, anyio.Lock())
        async with lock:
            yield

    async def _save(self, job: Job) -> None:
        await self._store.save_job(job)
        self._jobs[job.id] = job


def _failed(job: Job, error: str) -> Job:
    return dataclasses.replace(job, state=JobState.FAILED, ended=now(), error=error)


def _select_disks(
    domain: str, disks: list[xml.DomainDisk], wanted: list[str] | None
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
