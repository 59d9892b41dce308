"""Backup jobs: the records, and the manager that moves them through their states.

    queued ──> starting                            (when fewer than [jobs] max_active run)
    pull:      starting ──> ready ───> completed   (Finish)
                              └──────> expired     (no appliance came for [exports] idle_timeout,
                                                    or it outlived [exports] max_lifetime)
    push:      starting ──> running ─> completed   (libvirt: the copy is done)
    streamed:  starting ──> running ─> completed   (pullbackd's own copy: every byte arrived)
                  │           ├──────> aborted     (Abort)
                  └───────────┴──────> failed      (libvirt refused, the domain stopped, the
                                                    job vanished, the copy failed,
                                                    Finish(success=false))

Only `completed` makes the job's checkpoint part of its consumer's chain (see
chain.py); every other end deletes it. The end and the checkpoint's fate are
one transaction (`_close`); what a job that did not complete stored (push
targets, files in the repository) is removed before it, so that a crash
anywhere leaves either a completed job with everything in place, or a job
recovery ends (again) as failed with nothing of it left.

Names derive from the job id alone, so a job's files can be found again from
the state database after a crash: `<exports>/<id>.sock` (the appliances' endpoint,
see exports.py), `<exports>/.qemu/<id>.sock` (QEMU's), `<scratch>/<id>.<disk>.qcow2`,
`<target_dir>/<id>.<disk>.qcow2`, checkpoint `pullbackd.<consumer>.<id>`.

libvirt allows one backup job per domain, so the manager keeps one active job
per domain and refuses a second at once (libvirt would make the caller wait 30 s
on its job lock and then fail).
"""

from __future__ import annotations

import dataclasses
import math
import os
import secrets
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, quote, urlsplit

import anyio
import structlog
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from . import crash, stream, xml
from .chain import (
    CONSUMER,
    DEFAULT_CONSUMER,
    PREFIX,
    Base,
    Chains,
    Checkpoint,
    CheckpointState,
    check_consumer,
)
from .chain import checkpoint_name as make_checkpoint_name
from .errors import (
    BackupInProgress,
    DomainBusy,
    DomainNotRunning,
    InsufficientScratch,
    InvalidParameter,
    JobNotReady,
    LibvirtError,
    MigrationPending,
    NoSuchDisk,
    NoSuchDomain,
    NoSuchJob,
    PullbackError,
    SessionsActive,
    TargetNotWritable,
    TooManyJobs,
)
from .exports import Endpoint, Exports, Session, StoreFds, now
from .repository import Repository, Writer, recorder
from .virt import BrokenBitmap, ConnectionLost, DomainStopped, JobEnded, Virt

if TYPE_CHECKING:
    from .state import Store

log = structlog.get_logger()

MODES = ("full", "incremental", "differential")
#: Measuring a disk blocks a thread for a while: a few at a time, apart from
#: the threads libvirt and the database calls need.
_MEASURE = anyio.CapacityLimiter(4)
#: Job changes a watcher may fall behind by before it is cut off.
WATCH_BUFFER = 1024
LOCAL = "local"
NBD_SCHEMES = ("nbd://", "nbd+unix://", "nbds://", "nbds+unix://")


class JobState(StrEnum):
    QUEUED = "queued"
    STARTING = "starting"
    READY = "ready"
    RUNNING = "running"
    COMPLETED = "completed"
    ABORTED = "aborted"
    FAILED = "failed"
    EXPIRED = "expired"

    @property
    def final(self) -> bool:
        return self in (JobState.COMPLETED, JobState.ABORTED, JobState.FAILED, JobState.EXPIRED)


@dataclass(frozen=True)
class Disk:
    name: str
    size: int
    mode: str
    export: str | None = None
    url: str | None = None
    bitmap: str | None = None
    since: str | None = None
    fallback: str | None = None
    target: str | None = None
    #: Pull, with [exports] tcp_listen: the disk on the TCP endpoint for remote appliances.
    remote_url: str | None = None
    #: Bytes of data to transfer, once known; bytes done (streamed by pullbackd or
    #: read by appliances), bytes per second, seconds left.
    transfer: int | None = None
    done: int | None = None
    rate: int | None = None
    eta: int | None = None
    #: Bytes the disk's scratch file holds now (Get only).
    scratch: int | None = None


@dataclass(frozen=True)
class Transition:
    state: JobState
    at: str


@dataclass(frozen=True)
class Scratch:
    """libvirt's account of a pull job's scratch files: used, and what they may grow to."""

    used: int
    limit: int


@dataclass(frozen=True)
class Progress:
    done: int
    total: int
    rate: int
    eta: int | None


@dataclass
class _Live:
    """A running copy's progress across the job's disks, which go one after another."""

    sizes: list[int]
    started: float = field(default_factory=time.monotonic)
    #: Disks done, and the bytes they took.
    index: int = 0
    finished: int = 0
    #: The disk being copied now.
    current: stream.Progress | None = None
    #: Per disk: when its copy started and ended, and how it ended.
    starts: list[float] = field(default_factory=list)
    ends: list[float] = field(default_factory=list)
    results: list[stream.Progress] = field(default_factory=list)

    def disk_started(self) -> None:
        self.starts.append(time.monotonic())

    def disk_done(self, progress: stream.Progress) -> None:
        self.index += 1
        self.finished += progress.done
        self.current = None
        self.ends.append(time.monotonic())
        self.results.append(progress)

    def disk(self, i: int) -> tuple[int | None, int, float]:
        """Disk i: bytes to transfer (None until its extents are all read), done, seconds."""
        if i < self.index:
            r = self.results[i]
            return r.planned, r.done, self.ends[i] - self.starts[i]
        if i == self.index and self.current is not None:
            c = self.current
            return (c.planned if c.scanned >= c.size else None, c.done,
                    time.monotonic() - self.starts[i])
        return None, 0, 0.0

    def view(self) -> Progress:
        current = self.current
        done = self.finished + (current.done if current else 0)
        # Until a disk's extents are all read, what is left of it is estimated
        # from what was read so far; later disks from the same ratio.
        ratio = current.planned / current.scanned if current and current.scanned else 1.0
        here = (current.planned + (current.size - current.scanned) * ratio if current
                else self.sizes[self.index] if self.index < len(self.sizes) else 0)
        total = max(done, int(self.finished + here + sum(self.sizes[self.index + 1:]) * ratio))
        elapsed = time.monotonic() - self.started
        rate = int(done / elapsed) if elapsed > 0 else 0
        return Progress(done, total, rate, int((total - done) / rate) if rate else None)


@dataclass(frozen=True)
class Appliance:
    """How appliances use a pull job's endpoint."""

    #: Sessions open now, and so far.
    active: int
    total: int
    bytes_read: int
    #: Since when no session is open; None while one is.
    idle_since: str | None
    sessions: tuple[Session, ...] = ()

    @classmethod
    def of(cls, endpoint: Endpoint) -> Appliance:
        return cls(endpoint.active, endpoint.total, endpoint.bytes_read(),
                   endpoint.idle_since, tuple(endpoint.sessions()))

    @property
    def earlier(self) -> tuple[int, int]:
        """Sessions, and bytes read, counted but no longer listed."""
        return (self.total - len(self.sessions),
                self.bytes_read - sum(s.bytes_read for s in self.sessions))


@dataclass(frozen=True)
class Job:
    id: str
    domain: str
    state: JobState
    mode: str
    created: str
    consumer: str = DEFAULT_CONSUMER
    checkpoint: str = ""
    since: str | None = None
    target_dir: str | None = None
    destination: str | None = None
    progress: Progress | None = None
    appliance: Appliance | None = None
    disks: tuple[Disk, ...] = ()
    ended: str | None = None
    error: str | None = None
    history: tuple[Transition, ...] = ()
    #: Queued: the place in the queue, from 1.
    position: int | None = None
    scratch: Scratch | None = None

    @property
    def push(self) -> bool:
        return self.target_dir is not None

    def to_record(self) -> dict[str, Any]:
        """The job as the varlink `Job` type (and as stored)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Job:
        progress = record.get("progress")
        appliance = record.get("appliance")
        scratch = record.get("scratch")
        return cls(**record | {
            "state": JobState(record["state"]),
            "disks": tuple(Disk(**d) for d in record["disks"]),
            "progress": Progress(**progress) if progress else None,
            "history": tuple(Transition(JobState(t["state"]), t["at"])
                             for t in record.get("history", ())),
            "scratch": Scratch(**scratch) if scratch else None,
            "appliance": Appliance(**appliance | {"sessions": tuple(
                Session(**s) for s in appliance["sessions"])}) if appliance else None,
        })


@dataclass(frozen=True)
class Change:
    """What watchers hear: a job's new state, or a warning about it."""

    kind: str
    job: Job
    message: str | None = None
    session: Session | None = None


@dataclass(frozen=True)
class StartRequest:
    domain: str
    disks: list[str] | None = None
    mode: str = "full"
    since: str | None = None
    consumer: str = DEFAULT_CONSUMER
    target_dir: str | None = None
    destination: str | None = None
    allow_scratch_overcommit: bool = False
    #: Wait in the queue when [jobs] max_active are running (else TooManyJobs).
    queue: bool = True

    def check(self) -> None:
        """Refuse what no domain could satisfy, before anything is touched."""
        if not self.domain:
            raise InvalidParameter("domain", "empty")
        check_consumer(self.consumer)
        if self.mode not in MODES:
            raise InvalidParameter("mode", f"one of {', '.join(MODES)}")
        if self.mode == "differential" and not self.since:
            raise InvalidParameter("since", "a differential backup needs a checkpoint to start at")
        if self.since is not None and self.mode != "differential":
            raise InvalidParameter("since", "only a differential backup takes since")
        if self.target_dir is not None:
            _check_target_dir(self.target_dir)
        if self.destination is not None:
            if self.target_dir is not None:
                raise InvalidParameter("destination", "a push backup writes its own files")
            if self.destination != LOCAL and not self.destination.startswith(NBD_SCHEMES):
                raise InvalidParameter("destination", "\"local\" or an NBD URI")
            if self.destination != LOCAL and "{disk}" not in self.destination and \
                    (self.disks is None or len(self.disks) != 1):
                raise InvalidParameter("destination", "put {disk} in the URI to name each "
                                                      "disk's export, or back up one disk")


def _check_target_dir(target_dir: str) -> None:
    path = Path(target_dir)
    if not path.is_absolute():
        raise TargetNotWritable(target_dir, "not an absolute path")
    if not path.is_dir():
        raise TargetNotWritable(target_dir, "no such folder")
    # access(2) also says no for a read-only file system, even to root.
    if not os.access(path, os.W_OK | os.X_OK):
        raise TargetNotWritable(target_dir, "not writable")


@dataclass(frozen=True)
class Places:
    """Where a client may have pullbackd (root) write or connect: push targets only into
    `push_dirs` ([push] dirs), copies only to NBD URIs starting with one of
    `destinations` ([stream] destinations). The repository ("local") is always allowed."""

    push_dirs: tuple[Path, ...] = ()
    destinations: tuple[str, ...] = ()

    def check(self, request: StartRequest) -> None:
        """Raise TargetNotWritable or InvalidParameter, naming the setting. Blocks."""
        if request.target_dir is not None:
            folder = Path(request.target_dir).resolve()
            allowed = [d.resolve() for d in self.push_dirs]
            if not any(folder == d or d in folder.parents for d in allowed):
                raise TargetNotWritable(request.target_dir, (
                    f"not inside [push] dirs ({', '.join(map(str, self.push_dirs)) or 'none'});"
                    " have the host's administrator add the folder"))
        if request.destination not in (None, LOCAL) and not any(
                _within(str(request.destination), allowed) for allowed in self.destinations):
            raise InvalidParameter("destination", (
                "not allowed by [stream] destinations "
                f"({', '.join(self.destinations) or 'none'}); have the host's administrator "
                "add it, or use \"local\""))


def _within(url: str, allowed: str) -> bool:
    """Whether an NBD URI is one `allowed` covers: the same scheme, and for a Unix
    socket a path inside the allowed one (resolved: no "..", no symlink out of it),
    for TCP the same host and port. Blocks (it resolves paths)."""
    u, a = urlsplit(url), urlsplit(allowed)
    if u.scheme != a.scheme:
        return False
    if u.scheme.endswith("+unix"):
        sockets = [parse_qs(x.query).get("socket", [""])[0] for x in (u, a)]
        if not all(sockets):
            return False
        path, folder = (Path(s).resolve() for s in sockets)
        return path == folder or folder in path.parents
    return bool(u.hostname) and (u.hostname, u.port) == (a.hostname, a.port)


def nbd_url(socket: Path, export: str) -> str:
    """An NBD URI for a Unix socket: https://github.com/NetworkBlockDevice/nbd/blob/master/doc/uri.md"""
    return f"nbd+unix:///{quote(export, safe='')}?socket={quote(str(socket), safe='/')}"


class Jobs:
    """Every job the daemon knows, and the only code that changes them."""

    def __init__(self, virt: Virt, store: Store, chains: Chains, exports: Exports, scratch: Path,
                 end_timeout: float, repository: Repository,
                 tuning: stream.Tuning | None = None, scratch_reserve: int = 0,
                 keep_finished: float = 7 * 24 * 3600.0, limits: Limits | None = None,
                 max_active: int = 0, remote: str | None = None,
                 places: Places | None = None) -> None:
        """`places`: where clients may have us write (None: anywhere, for tests)."""
        self._virt = virt
        self._store = store
        self._places = places
        self.chains = chains
        self.repository = repository
        self.tuning = tuning or stream.Tuning()
        self.exports = exports
        self.limits = limits or Limits()
        self._max_active = max_active
        #: "nbds://host:port" of the TCP endpoint, if there is one.
        self._remote = remote
        self._scratch = scratch
        self._scratch_reserve = scratch_reserve
        self._keep_finished = keep_finished
        self._end_timeout = end_timeout
        self._jobs: dict[str, Job] = {}
        #: domain -> id of its job that is not final.
        self._active: dict[str, str] = {}
        #: One lock per job: every change of a job's state happens under it.
        self._locks: dict[str, anyio.Lock] = {}
        #: domain -> set when libvirt reports the domain's backup job ended.
        self._ended: dict[str, anyio.Event] = {}
        #: Subscribers to job changes (Watch).
        self._watchers: set[MemoryObjectSendStream[Change]] = set()
        #: Where pullbackd's own copies run: the task group of follow_events.
        self._tg: anyio.abc.TaskGroup | None = None
        #: job id -> the progress of its copy.
        self._live: dict[str, _Live] = {}
        #: job id -> its copy's cancel scope, and the event set when the copy is over.
        self._streams: dict[str, tuple[anyio.CancelScope, anyio.Event]] = {}
        #: job id -> the scope of its idle and lifetime limits.
        self._timers: dict[str, anyio.CancelScope] = {}
        #: Queued jobs in order, and what each asked for.
        self._queue: list[str] = []
        #: Queued jobs start one at a time, in their order (anyio's lock is fair).
        self._starting_queued = anyio.Lock()
        self._requests: dict[str, StartRequest] = {}
        #: Pull job id -> disk -> bytes of data an appliance must read.
        self._transfers: dict[str, dict[str, int]] = {}
        #: Domains being drained for a migration: no backup starts (see migration.py).
        self.draining: set[str] = set()

    # Deterministic names.

    def socket_path(self, job_id: str) -> Path:
        """Where QEMU's NBD server for the job listens."""
        return self.exports.qemu_path(job_id)

    def scratch_path(self, job_id: str, disk: str) -> Path:
        return self._scratch / f"{job_id}.{disk}.qcow2"

    @staticmethod
    def target_path(target_dir: str, job_id: str, disk: str) -> Path:
        return Path(target_dir) / f"{job_id}.{disk}.qcow2"

    # Queries.

    def get(self, job_id: str) -> Job:
        try:
            return self._view(self._jobs[job_id])
        except KeyError:
            raise NoSuchJob(job_id) from None

    def all(self) -> list[Job]:
        return [self._view(j) for j in self._jobs.values()]

    def _view(self, job: Job) -> Job:
        """The job with what changes too often to be stored: progress, sessions, place
        in the queue, and each disk's statistics."""
        live = self._live.get(job.id)
        if live is not None:
            job = dataclasses.replace(job, progress=live.view())
        endpoint = self.exports.get(job.id)
        if endpoint is not None:
            job = dataclasses.replace(job, appliance=Appliance.of(endpoint))
        if job.state == JobState.QUEUED and job.id in self._queue:
            job = dataclasses.replace(job, position=self._queue.index(job.id) + 1)
        if not job.state.final and job.disks and not job.push:
            job = dataclasses.replace(job, disks=tuple(
                self._disk_view(job, i, disk) for i, disk in enumerate(job.disks)))
        return job

    def _disk_view(self, job: Job, i: int, disk: Disk) -> Disk:
        live = self._live.get(job.id)
        if live is not None:
            transfer, done, seconds = live.disk(i)
        else:
            # Read by appliances, since the exports were up.
            transfer = self._transfers.get(job.id, {}).get(disk.name)
            endpoint = self.exports.get(job.id)
            done = endpoint.bytes_read(disk.name) if endpoint is not None else sum(
                s.bytes_read for s in (job.appliance.sessions if job.appliance else ())
                if s.disk == disk.name)
            ready = next((t.at for t in job.history if t.state == JobState.READY), None)
            seconds = (datetime.now(UTC) - datetime.fromisoformat(ready)).total_seconds() \
                if ready else 0.0
        rate = int(done / seconds) if seconds > 0 else 0
        left = None if transfer is None else max(transfer - done, 0)
        eta = None if left is None else 0 if not left else int(left / rate) if rate else None
        return dataclasses.replace(disk, transfer=transfer, done=done, rate=rate, eta=eta)

    async def details(self, job_id: str) -> Job:
        """The job as Get shows it: with its scratch files, as the file system and
        libvirt count them, while it runs."""
        job = self.get(job_id)
        if job.state not in (JobState.READY, JobState.RUNNING) or job.push:
            return job
        files = await anyio.to_thread.run_sync(self._scratch_sizes, [job], True)
        try:
            stats = await self._virt.job_stats(job.domain)
        except PullbackError:
            stats = {}
        scratch = Scratch(int(stats["disk_temp_used"]), int(stats["disk_temp_total"])) \
            if "disk_temp_used" in stats and "disk_temp_total" in stats else None
        return dataclasses.replace(job, scratch=scratch, disks=tuple(
            dataclasses.replace(d, scratch=files.get(f"{job.id}.{d.name}", 0))
            for d in job.disks))

    def active(self, domain: str) -> str | None:
        return self._active.get(domain)

    # Changes.

    async def start(self, request: StartRequest) -> Job:
        await anyio.to_thread.run_sync(self._check, request)  # it looks at target_dir
        domain = request.domain
        if domain in self.draining:
            raise MigrationPending(domain)
        if domain in self._active:
            raise BackupInProgress(domain, self._active[domain])
        if self._queue or self._full():
            return await self._enqueue(request)
        job_id = self._new_id()
        # Claimed before the first await: a concurrent Start of this domain
        # fails at once instead of racing us to libvirt.
        self._active[domain] = job_id
        return await self._claimed_start(job_id, request)

    def _check(self, request: StartRequest) -> None:
        request.check()
        if self._places is not None:
            self._places.check(request)

    async def _claimed_start(self, job_id: str, request: StartRequest,
                             queued: Job | None = None) -> Job:
        try:
            async with self._locked(job_id), self._chain_lock(request.domain):
                if queued is not None and self._jobs[job_id].state != JobState.QUEUED:
                    return self._jobs[job_id]  # aborted while it waited for the lock
                return await self._start(job_id, request, queued)
        finally:
            job = self._jobs.get(job_id)
            if job is None or job.state.final:
                self._release(job_id, request.domain)

    def _running(self) -> int:
        """Jobs that hold a place under max_active: claimed, and not waiting in the queue."""
        return len(self._active) - len(self._queue)

    def _full(self) -> bool:
        return bool(self._max_active) and self._running() >= self._max_active

    async def _enqueue(self, request: StartRequest) -> Job:
        if not request.queue:
            raise TooManyJobs(self._max_active, self._running())
        await self._virt.domain(request.domain)  # a name that cannot work fails now
        if request.domain in self._active:  # claimed while we asked
            raise BackupInProgress(request.domain, self._active[request.domain])
        job_id = self._new_id()
        self._active[request.domain] = job_id
        job = Job(job_id, request.domain, JobState.QUEUED, request.mode, now(), request.consumer,
                  make_checkpoint_name(request.consumer, job_id), since=request.since,
                  target_dir=request.target_dir, destination=request.destination)
        self._queue.append(job_id)
        self._requests[job_id] = request
        await self._store.save_request(job_id, dataclasses.asdict(request))
        job = await self._save(job)
        log.info("backup queued", job=job_id, domain=request.domain,
                 position=len(self._queue), max_active=self._max_active)
        return self._view(job)

    def _dequeue(self) -> None:
        """Start queued jobs, oldest first, while there is room."""
        while self._queue and not self._full() and self._tg is not None:
            job_id = self._queue.pop(0)
            self._tg.start_soon(self._start_queued, job_id)

    async def _start_queued(self, job_id: str) -> None:
        request = self._requests.pop(job_id, None)
        if request is None:
            return  # aborted meanwhile
        try:
            # Each once the one before it started (or failed to): their histories
            # show the queue's order even when several places free up at once.
            async with self._starting_queued:
                await self._claimed_start(job_id, request, self._jobs[job_id])
        except Exception as e:
            log.warning("queued backup could not start", job=job_id, error=str(e))
            job = self._jobs[job_id]
            if not job.state.final:
                await self._save(_failed(job, f"the backup could not start: {e}"))
            self._release(job_id, request.domain)
        finally:
            with anyio.CancelScope(shield=True):  # a request must not start twice
                await self._store.delete_request(job_id)

    def _release(self, job_id: str, domain: str) -> None:
        """The job no longer holds its domain (nor a place under max_active)."""
        if self._active.get(domain) == job_id:
            del self._active[domain]
            self._dequeue()

    async def _start(self, job_id: str, request: StartRequest, queued: Job | None = None) -> Job:
        domain = request.domain
        dom = await self._virt.domain(domain)
        if not dom.running:
            raise DomainNotRunning(domain)
        operation = await self._virt.job_operation(domain)
        if operation == "backup":
            raise BackupInProgress(domain, "")
        if operation is not None:
            raise DomainBusy(domain, operation)
        chosen, skip = _select_disks(domain, xml.parse_disks(dom.xml), request.disks)
        sizes = {disk: await self._virt.capacity(domain, disk) for disk in chosen}
        if request.target_dir is None and not request.allow_scratch_overcommit:
            await anyio.to_thread.run_sync(self._check_scratch, job_id, sum(sizes.values()))
        await self.chains.prepare(domain, refused=self._did_not_complete)
        bases = self.chains.bases(domain, request.consumer, request.mode, request.since, chosen)
        if request.destination == LOCAL:
            bases = await anyio.to_thread.run_sync(
                self._local_bases, domain, request.consumer, bases)
        job = Job(job_id, domain, JobState.STARTING, request.mode,
                  queued.created if queued else now(), request.consumer,
                  make_checkpoint_name(request.consumer, job_id), target_dir=request.target_dir,
                  destination=request.destination, history=queued.history if queued else ())
        # Recorded before libvirt hears of them: after a crash, the database
        # knows which libvirt job and checkpoint are ours.
        await self._save(job)
        await self.chains.add(Checkpoint(job.checkpoint, domain, job.consumer, job_id,
                                         job.created, CheckpointState.PENDING, tuple(chosen)))
        crash.point("start.recorded")
        # Shielded: once libvirt may have started the job, the outcome must be
        # recorded (and a half-started job ended) even if our caller is cancelled.
        with anyio.CancelScope(shield=True):
            try:
                bases = await self._begin(job, bases, skip)
            except Exception as e:
                await self._discard_checkpoint(job)
                await self._save(_failed(job, f"libvirt did not start the backup: {e}"))
                raise
            crash.point("start.begun")
            try:
                await self.chains.begun(job.checkpoint, tuple(
                    d for d, b in bases.items() if b.checkpoint is None))
                job = await self._started(job, bases, sizes)
            except Exception as e:
                error = f"the backup started but could not be read: {e}"
                try:
                    await self._end_libvirt_job(job)
                except Exception as end_error:
                    log.exception("cannot end a half-started backup", job=job.id)
                    error += f"; ending it failed too ({end_error}): end it with " \
                        f"`virsh domjobabort {domain}`"
                await self._discard_checkpoint(job)
                await self._save(_failed(job, error))
                raise
            if job.destination is not None:
                job = dataclasses.replace(job, state=JobState.RUNNING)
                self._spawn_stream(job)
            elif not job.push:
                await self._serve(job)
            job = await self._save(job)
            crash.point("start.ready")
        log.info("backup started", job=job.id, domain=domain, mode=job.mode, state=job.state,
                 consumer=job.consumer, disks={d.name: d.mode for d in job.disks},
                 destination=job.destination)
        return self._view(job)

    def _check_scratch(self, job_id: str, size: int) -> None:
        """Refuse a pull backup the scratch file system cannot hold in the worst case.

        The worst case of a running pull backup is the size of its disks; what its
        scratch files hold now is already out of the free space.
        """
        self._scratch.mkdir(parents=True, exist_ok=True)  # libvirt needs it there too
        running = [j for j in self._jobs.values() if j.id != job_id and not j.state.final
                   and j.target_dir is None]
        needed = size + sum(d.size for j in running for d in j.disks)
        used = sum(self._scratch_sizes(running).values())
        available = shutil.disk_usage(self._scratch).free - self._scratch_reserve + used
        if needed > available:
            raise InsufficientScratch(str(self._scratch), needed, max(available, 0))

    async def watch_scratch(self, interval: float = 1.0) -> None:
        """Keep QEMU from filling the scratch file system while pull backups run.

        libvirt has no event for it, so look every `interval` seconds: under twice
        `[scratch] reserve` free, warn every watcher once; under the reserve, end the
        pull backup with the largest scratch files, before QEMU runs out of room
        (its copy-before-write would then fail the guest's writes).
        """
        warned = False
        while True:
            await anyio.sleep(interval)
            pulls = [j for j in self._jobs.values() if not j.state.final and j.disks
                     and j.target_dir is None]
            if not pulls or not self._scratch_reserve:
                warned = False
                continue
            usage = await anyio.to_thread.run_sync(shutil.disk_usage, self._scratch)
            if usage.free < self._scratch_reserve and self._tg is not None:
                sizes = await anyio.to_thread.run_sync(self._scratch_sizes, pulls)
                victim = max(pulls, key=lambda j: sizes.get(j.id, 0))
                self._tg.start_soon(self._fail, victim.id, (
                    f"scratch space ran out: {usage.free} bytes left in {self._scratch}, "
                    f"under the reserve of {self._scratch_reserve}; the backup was ended "
                    "before QEMU could fill it"))
            elif usage.free < 2 * self._scratch_reserve and not warned:
                warned = True
                message = (f"scratch space is running low: {usage.free} bytes left in "
                           f"{self._scratch}; backups end at {self._scratch_reserve}")
                log.warning("scratch space low", free=usage.free, dir=str(self._scratch))
                for job in pulls:
                    self._publish(Change("warning", job, message))
            elif usage.free >= 2 * self._scratch_reserve:
                warned = False

    def _scratch_sizes(self, jobs: list[Job], per_disk: bool = False) -> dict[str, int]:
        """Bytes each job's scratch files hold, by job id (or by "<id>.<disk>")."""
        sizes: dict[str, int] = {}
        for j in jobs:
            for path in self._scratch.glob(f"{j.id}.*.qcow2"):
                key = path.name.removesuffix(".qcow2") if per_disk else j.id
                try:
                    size = path.stat().st_blocks * 512
                except FileNotFoundError:
                    continue  # the job ended between the listing and now
                sizes[key] = sizes.get(key, 0) + size
        return sizes

    def _local_bases(self, domain: str, consumer: str, bases: dict[str, Base]
                     ) -> dict[str, Base]:
        """An incremental into the repository needs the backup it starts from to be there."""
        result = dict(bases)
        for disk, base in bases.items():
            stored = {m.checkpoint for m in self.repository.manifests(domain, consumer, disk)}
            if base.checkpoint and base.checkpoint not in stored:
                result[disk] = Base(None, f"the local repository has no backup of this disk "
                                          f"at {base.checkpoint}")
        return result

    async def _begin(self, job: Job, bases: dict[str, Base], skip: tuple[str, ...]
                     ) -> dict[str, Base]:
        """Start the libvirt job. A disk whose bitmap libvirt cannot use falls back
        to a full backup, alone when libvirt names it, else with every incremental disk."""
        checkpoint_xml = xml.checkpoint(job.checkpoint, list(bases), skip)
        # Export names nobody can guess: on a TCP endpoint shared by every job, the
        # name is what selects a job's disk.
        token = secrets.token_hex(16)
        for _ in range(len(bases) + 1):
            request = xml.BackupRequest(
                socket=None if job.push else self.socket_path(job.id),
                files={d: self._file(job, d) for d in bases},
                exports={} if job.push else {d: f"{d}-{token}" for d in bases},
                since={d: b.checkpoint for d, b in bases.items() if b.checkpoint},
                skip=skip,
            )
            try:
                await self._virt.backup_begin(job.domain, xml.backup(request), checkpoint_xml)
                return bases
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

    # pullbackd's own copy.

    def _spawn_stream(self, job: Job) -> None:
        if self._tg is None:
            raise RuntimeError("jobs are not being served (follow_events is not running)")
        if not job.disks:
            raise AssertionError(f"job {job.id} has no disks to stream")
        self._live[job.id] = _Live([d.size for d in job.disks])
        self._streams[job.id] = (anyio.CancelScope(), anyio.Event())
        # The job itself, not its id: the table may not hold this version yet.
        self._tg.start_soon(self._stream, job)

    async def _stream(self, job: Job) -> None:
        """Copy every disk to the destination, then end the job: completed only if every
        byte arrived (and, for the repository, is stored). Abort cancels it."""
        job_id = job.id
        scope, over = self._streams[job_id]
        live = self._live[job_id]
        writers: list[Writer] = []
        error: str | None = None
        try:
            with scope:
                for disk in job.disks:
                    live.disk_started()
                    writer = None
                    if job.destination == LOCAL:
                        writer = await self._open_writer(job, disk)
                        writers.append(writer)
                    target = writer.url if writer else str(job.destination).replace(
                        "{disk}", disk.name)
                    # Straight from QEMU: the endpoint is for appliances.
                    source = nbd_url(self.socket_path(job_id), str(disk.export))
                    result = await stream.stream(
                        source, target, bitmap=disk.bitmap,
                        zeroed_destination=writer is not None and disk.mode == "full",
                        tuning=self.tuning,
                        on_progress=_follower(live, writer),
                        checksums=recorder(writer.regions) if writer else None)
                    live.disk_done(result)
                for writer in writers:
                    await self.repository.commit(writer)
                writers.clear()
                crash.point("commit.stored")
        except Exception as e:
            error = f"streaming to {job.destination} failed: {e}"
            log.warning("streaming failed", job=job_id, error=str(e))
            if job.disks and not await anyio.to_thread.run_sync(stream.reachable, nbd_url(
                    self.socket_path(job_id), str(job.disks[0].export))):
                # QEMU's side went away: libvirt ends the job, and its event tells
                # the cause better than what the copy saw of it.
                error = await self._cause(job, error, e)
        finally:
            with anyio.CancelScope(shield=True):  # no partial file may outlive the copy
                for writer in writers:
                    await self.repository.abort(writer)
            over.set()
        if scope.cancel_called:
            return  # whoever cancelled it ends the job
        if error is None:
            await self._end(job_id, JobState.COMPLETED, streamed=True)
        else:
            await self._end(job_id, JobState.FAILED, error, streamed=True)

    async def _cause(self, job: Job, error: str, seen: Exception) -> str:
        ended = self._ended.setdefault(job.domain, anyio.Event())
        try:
            with anyio.move_on_after(self._end_timeout):
                await ended.wait()
        finally:
            if self._ended.get(job.domain) is ended:
                del self._ended[job.domain]
        if not ended.is_set():
            return error
        if await self._domain_runs(job.domain):
            return f"the libvirt backup job was ended outside pullbackd (the copy failed: {seen})"
        return f"the domain stopped during the backup (the copy failed: {seen})"

    async def _open_writer(self, job: Job, disk: Disk) -> Writer:
        base = None if disk.since is None else await anyio.to_thread.run_sync(
            self.repository.at, job.domain, job.consumer, disk.name, disk.since)
        return await self.repository.begin(job.domain, job.consumer, disk.name, disk.size,
                                           job.id, job.checkpoint, job.created, base)

    async def _stop_stream(self, job_id: str) -> None:
        if job_id in self._streams:
            scope, over = self._streams[job_id]
            scope.cancel()
            await over.wait()

    def _file(self, job: Job, disk: str) -> Path:
        if job.target_dir is not None:
            return self.target_path(job.target_dir, job.id, disk)
        return self.scratch_path(job.id, disk)

    async def _started(self, job: Job, bases: dict[str, Base], sizes: dict[str, int]) -> Job:
        if job.target_dir is not None:
            # A small push can be over before we could ask: its targets are
            # the files we named, and libvirt's event tells how it went.
            backup = xml.BackupJob(None, tuple(
                xml.BackupDisk(d, None, None, None, self.target_path(job.target_dir, job.id, d))
                for d in bases))
        else:
            backup_xml = await self._virt.backup_xml(job.domain)
            if backup_xml is None:
                raise LibvirtError(-1, "the backup job ended as soon as it started")
            backup = xml.parse_backup(backup_xml)
            if not self._is_ours(backup, job):
                raise LibvirtError(-1, "libvirt reports a backup job that is not ours")
        disks = []
        for d in backup.disks:
            base = bases[d.name]
            # Appliances read it: a pull job, not one pullbackd streams itself.
            read = d.export if backup.socket and job.destination is None else None
            disks.append(Disk(
                name=d.name,
                size=sizes[d.name],
                mode="incremental" if base.checkpoint else "full",
                export=d.export,
                url=nbd_url(self.exports.endpoint_path(job.id), read) if read else None,
                remote_url=f"{self._remote}/{quote(read, safe='')}"
                if read and self._remote else None,
                bitmap=f"qemu:dirty-bitmap:{d.bitmap}" if d.bitmap else None,
                since=base.checkpoint,
                fallback=base.fallback,
                target=str(d.target) if d.target else None,
            ))
        # The newest checkpoint any disk starts from: the chain's order is creation order.
        used = {b.checkpoint for b in bases.values() if b.checkpoint}
        order = [c.name for c in self.chains.of(job.domain, job.consumer)]
        since = max(used, key=order.index) if used else None
        return dataclasses.replace(
            job,
            state=JobState.RUNNING if job.push else JobState.READY,
            mode=job.mode if used else "full",
            since=since,
            disks=tuple(disks),
        )

    def _is_ours(self, backup: xml.BackupJob, job: Job) -> bool:
        if job.target_dir is None:
            return backup.socket == self.socket_path(job.id)
        return any(d.target == self.target_path(job.target_dir, job.id, d.name)
                   for d in backup.disks)

    async def delete_chain(self, domain: str, consumer: str) -> list[str]:
        check_consumer(consumer)
        job_id = self._active.get(domain)
        if job_id is not None and self._jobs[job_id].consumer == consumer:
            # Its checkpoint would outlive the chain it was to join.
            raise BackupInProgress(domain, job_id)
        async with self._chain_lock(domain):
            return await self.chains.delete_chain(domain, consumer)

    async def finish(self, job_id: str, success: bool = True) -> Job:
        endpoint = self.exports.get(job_id)
        if endpoint is not None and endpoint.active:
            # Appliances still reading: give them a moment, never cut them off.
            with anyio.move_on_after(self.limits.drain_timeout):
                await endpoint.drained()
            if endpoint.active:
                raise SessionsActive(job_id, endpoint.active, self.limits.drain_timeout)
        if success:
            return await self._end(job_id, JobState.COMPLETED)
        return await self._end(job_id, JobState.FAILED, "the appliance reported the backup failed")

    async def abort(self, job_id: str) -> Job:
        return await self._end(job_id, JobState.ABORTED)

    async def end_for_migration(self, job_id: str) -> Job:
        """The migration gate opened on a job no appliance was using: it fails, and its
        checkpoint goes, as nobody confirmed the data."""
        return await self._end(job_id, JobState.FAILED, (
            "ended for the domain's migration: no appliance had used it for [migration] "
            "grace, and nobody confirmed the data"))

    async def _end(self, job_id: str, state: JobState, error: str | None = None, *,
                   streamed: bool = False) -> Job:
        self.get(job_id)
        async with self._locked(job_id):
            job = self._jobs[job_id]
            if job.state.final:
                return job  # Finish and Abort are idempotent
            if state == JobState.COMPLETED and job.state in (
                    JobState.RUNNING, JobState.QUEUED) and not streamed:
                raise JobNotReady(job.id, job.state)
            if job.state == JobState.QUEUED:
                if job.id in self._queue:
                    self._queue.remove(job.id)
                self._requests.pop(job.id, None)
                with anyio.CancelScope(shield=True):
                    await self._store.delete_request(job.id)
                    return await self._close(job, state, error)
            if not streamed:
                await self._stop_stream(job.id)
            # Shielded: a libvirt job we ended must be recorded as ended.
            with anyio.CancelScope(shield=True):
                # Sessions first: nobody reads from a job that is ending.
                endpoint = await self.exports.close(job.id)
                if endpoint is not None:
                    job = dataclasses.replace(job, appliance=Appliance.of(endpoint))
                crash.point("end.sessions")
                running = await self._end_libvirt_job(job)
                crash.point("end.libvirt")
                if not running and state == JobState.COMPLETED:
                    # The exports vanished before the appliance said it was
                    # done: nobody can vouch that it read everything.
                    state, error = JobState.FAILED, "the backup ended before Finish: " \
                        "the domain stopped or the libvirt job was ended outside pullbackd"
                job = await self._close(job, state, error)
        return job

    async def _close(self, job: Job, state: JobState, error: str | None) -> Job:
        """Record a job's end and its checkpoint's fate in one transaction, then carry
        the fate out: the checkpoint joins the chain, or is deleted (chain.py)."""
        self._streams.pop(job.id, None)
        if (timer := self._timers.pop(job.id, None)) is not None:
            timer.cancel()
        completed = state == JobState.COMPLETED
        if not completed:
            # Before the end is recorded: a crash until then ends the job again
            # at the next start, which comes here again; after it, nothing is left.
            await anyio.to_thread.run_sync(self._remove_targets, job)
            if job.destination == LOCAL:
                # Stored files of a job that did not complete are no backups.
                await anyio.to_thread.run_sync(self.repository.forget_job, job.domain,
                                               job.consumer, job.id)
            crash.point("end.cleaned")
        # What it came to: the last progress and per-disk statistics stay on record.
        final = self._view(job)
        self._live.pop(job.id, None)
        self._transfers.pop(job.id, None)
        job = dataclasses.replace(job, state=state, ended=now(), error=error,
                                  progress=final.progress, disks=tuple(
                                      dataclasses.replace(d, rate=None, eta=None)
                                      for d in final.disks))
        checkpoint = self.chains.outcome(job.checkpoint, completed)
        job = await self._save(job, checkpoint, show=False)
        crash.point("end.recorded")
        if checkpoint is not None:
            await self.chains.settle(checkpoint)
        # Shown once libvirt has followed it (the checkpoint deleted, or in the chain and
        # the domain's metadata): whoever sees the end can start the next backup.
        self._show(job)
        self._release(job.id, job.domain)
        log.info("backup ended", job=job.id, domain=job.domain, state=job.state, error=error)
        await self._forget_old()
        return job

    def _did_not_complete(self, job_id: str) -> bool:
        """Whether a job is known to have ended without completing, or to be running."""
        job = self._jobs.get(job_id)
        return job is not None and job.state != JobState.COMPLETED

    async def _forget_old(self) -> None:
        """Drop ended jobs older than `keep_finished`: when a job ends, and at start."""
        cutoff = (datetime.now(UTC) - timedelta(seconds=self._keep_finished)).isoformat(
            timespec="milliseconds").replace("+00:00", "Z")
        old = [j.id for j in self._jobs.values()
               if j.state.final and j.ended is not None and j.ended < cutoff]
        if old:
            await self._store.forget_jobs(old)
            for job_id in old:
                del self._jobs[job_id]
                self._locks.pop(job_id, None)
            log.info("forgot old jobs", jobs=len(old))

    async def _discard_checkpoint(self, job: Job) -> None:
        checkpoint = self.chains.get(job.checkpoint)
        if checkpoint is not None and checkpoint.state != CheckpointState.COMPLETE:
            await self.chains.discard(checkpoint)

    def _remove_targets(self, job: Job) -> None:
        # A push that did not complete must not leave files that look like a backup.
        if job.target_dir is None:
            return
        for path in Path(job.target_dir).glob(f"{job.id}.*.qcow2"):
            log.info("removing incomplete push target", job=job.id, path=str(path))
            path.unlink(missing_ok=True)

    async def _end_libvirt_job(self, job: Job) -> bool:
        """End the job's libvirt backup and wait until libvirt says it ended.

        Returns whether it was still running.
        """
        running = await self._runs_in_libvirt(job)
        if running:
            await self._abort_backup(job.domain)
        if await self._runs_in_libvirt(job):
            raise LibvirtError(
                -1, f"libvirt has not ended the backup after {self._end_timeout:g} s")
        await anyio.to_thread.run_sync(self._remove_leftovers, job.id)
        return running

    async def _abort_backup(self, domain: str) -> None:
        """Ask libvirt to end the domain's backup job; wait for its word, at most
        `end_timeout`."""
        ended = self._ended[domain] = anyio.Event()
        try:
            if await self._virt.abort_job(domain):
                with anyio.move_on_after(self._end_timeout):
                    await ended.wait()
        finally:
            del self._ended[domain]

    async def _runs_in_libvirt(self, job: Job) -> bool:
        try:
            backup_xml = await self._virt.backup_xml(job.domain)
        except NoSuchDomain:
            return False
        return backup_xml is not None and self._is_ours(xml.parse_backup(backup_xml), job)

    def _sweep(self) -> None:
        """At start: remove the endpoints, QEMU sockets and scratch files of every job
        that does not run (a job failed at recovery had its own removed already; these
        are what a lost database or a crash of libvirtd left)."""
        running = set(self._active.values())
        found = {p.name.split(".")[0] for p in (
            *self.exports.dir.glob("*.sock"), *self.exports.private.glob("*.sock"),
            *self._scratch.glob("*.qcow2"))}
        for job_id in sorted(found - running):
            self._remove_leftovers(job_id)

    def _remove_leftovers(self, job_id: str) -> None:
        # libvirt removes both when the job ends; a crash of libvirtd or QEMU
        # may not. Nothing else ever uses these names.
        leftovers = [self.socket_path(job_id), self.exports.endpoint_path(job_id),
                     *self._scratch.glob(f"{job_id}.*.qcow2")]
        for path in leftovers:
            if path.exists():
                log.warning("removing leftover file", job=job_id, path=str(path))
                path.unlink(missing_ok=True)

    # Appliances' sessions.

    async def _serve(self, job: Job) -> None:
        """Open the job's endpoint for appliances, and watch its limits."""
        if self._tg is None:
            raise RuntimeError("jobs are not being served (follow_events is not running)")
        endpoint = await self.exports.open(
            job.id, {str(d.export): d.name for d in job.disks}, self._tg, self._on_session,
            job.appliance.sessions if job.appliance else (),
            job.appliance.earlier if job.appliance else (0, 0))
        self._timers[job.id] = timer = anyio.CancelScope()
        self._tg.start_soon(self._expire, job, endpoint, timer)
        self._tg.start_soon(self._measure, job)

    async def _measure(self, job: Job) -> None:
        """Find how much each disk holds for the appliance to read (for Get's ETA)."""
        sizes = self._transfers.setdefault(job.id, {})
        for disk in job.disks:
            url = nbd_url(self.socket_path(job.id), str(disk.export))
            try:
                sizes[disk.name] = await anyio.to_thread.run_sync(
                    stream.transfer_size, url, disk.bitmap, limiter=_MEASURE)
            except Exception as e:  # the job may have ended meanwhile: only a statistic
                log.debug("could not measure a disk", job=job.id, disk=disk.name, error=str(e))
                return

    async def _expire(self, job: Job, endpoint: Endpoint, timer: anyio.CancelScope) -> None:
        """End the job as expired when no appliance used it for `idle_timeout`, or when
        it outlived `max_lifetime`. `timer` is cancelled when the job ends otherwise."""
        limits = self.limits
        with timer:
            age = (datetime.now(UTC) - datetime.fromisoformat(job.created)).total_seconds()
            reason = (f"it ran for [exports] max_lifetime ({limits.max_lifetime} s); "
                      "appliances must finish sooner, or the limit be raised")
            with anyio.move_on_after(limits.max_lifetime - age if limits.max_lifetime
                                     else math.inf):
                if not limits.idle_timeout:
                    await anyio.sleep_forever()
                await endpoint.idle_for(limits.idle_timeout)
                reason = (f"no appliance used it for [exports] idle_timeout "
                          f"({limits.idle_timeout} s)")
            log.warning("backup expired", job=job.id, reason=reason)
            await self._end_quietly(job.id, JobState.EXPIRED, reason)

    def _on_session(self, job_id: str, session: Session) -> None:
        job = self._jobs.get(job_id)
        if job is None or job.state.final:
            return
        self._publish(Change("session", self._view(job), session=session))
        if session.ended is not None and self._tg is not None:
            # Sessions so far survive a restart of the daemon.
            self._tg.start_soon(self._save_sessions, job_id)

    async def _save_sessions(self, job_id: str) -> None:
        async with self._locked(job_id):
            job = self._jobs[job_id]
            endpoint = self.exports.get(job_id)
            if not job.state.final and endpoint is not None:
                job = dataclasses.replace(job, appliance=Appliance.of(endpoint))
                await self._store.save_job(job)
                self._jobs[job_id] = job

    async def hand_off(self, store: StoreFds) -> int:
        """Before the daemon stops: pass the endpoints and their sessions to the next run
        (systemd keeps the sockets). Returns how many sessions were handed over."""
        handed = await self.exports.hand_off(store)
        await self._store.save_handoff(handed)
        log.info("handed over the NBD endpoints", sessions=len(handed))
        return len(handed)

    # Events and recovery.

    async def follow_events(
            self, lost: Callable[[str], Awaitable[None]], *,
            task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Apply libvirt's domain events to the jobs until the libvirt connection is lost
        (then `lost(reason)` runs, with every endpoint and copy still up, before they
        are cancelled); streamed backups and the endpoints run in here too."""
        async with anyio.create_task_group() as tg:
            self._tg = tg
            task_status.started()
            async for event in self._virt.events:
                match event:
                    case ConnectionLost(reason=reason):
                        await lost(reason)
                        tg.cancel_scope.cancel()
                        return
                    case JobEnded(domain=domain, operation="backup"):
                        if domain in self._ended:
                            self._ended[domain].set()
                        elif (job_id := self._active.get(domain)) is not None and \
                                self._jobs[job_id].state != JobState.QUEUED:
                            if self._jobs[job_id].push:
                                tg.start_soon(self._pushed, job_id, event)
                            else:
                                tg.start_soon(self._vanished, job_id, event.error)
                    case DomainStopped(domain=domain, reason=reason) if domain in self._active \
                            and self._jobs[self._active[domain]].state != JobState.QUEUED:
                        if domain in self._ended:
                            self._ended[domain].set()
                        tg.start_soon(self._fail, self._active[domain],
                                      f"the domain stopped ({reason}) during the backup")

    async def _pushed(self, job_id: str, event: JobEnded) -> None:
        """libvirt finished a push backup: its word on success is the outcome.

        The event may come while Start still holds the job: the lock makes it wait.
        """
        async with self._locked(job_id):
            job = self._jobs[job_id]
            if job.state != JobState.RUNNING:
                return
            with anyio.CancelScope(shield=True):  # the outcome must be recorded
                if event.success:
                    await self._close(job, JobState.COMPLETED, None)
                else:
                    await self._close(job, JobState.FAILED, event.error or "libvirt: push failed")

    async def _domain_runs(self, domain: str) -> bool:
        try:
            return (await self._virt.domain(domain)).running
        except NoSuchDomain:
            return False

    async def _vanished(self, job_id: str, error: str | None) -> None:
        """libvirt ended the job without us. When QEMU dies, this comes before the lifecycle
        event, so tell the two causes apart here."""
        job = self._jobs[job_id]
        reason = ("the libvirt backup job was ended outside pullbackd"
                  if await self._domain_runs(job.domain)
                  else "the domain stopped during the backup")
        await self._fail(job_id, f"{reason}: {error}" if error else reason)

    async def _fail(self, job_id: str, reason: str) -> None:
        await self._end_quietly(job_id, JobState.FAILED, reason)

    async def _end_quietly(self, job_id: str, state: JobState, reason: str) -> None:
        """End a job nobody is waiting on: an error can only be logged."""
        try:
            await self._end(job_id, state, reason)
        except Exception:
            log.exception("could not record the end of a job", job=job_id, state=state,
                          reason=reason)

    async def recover(self) -> None:
        """Load the jobs of an earlier run; adopt those libvirt still runs, fail the others;
        then check chain.py's invariant, rebuild (or end) the backups of ours libvirt runs
        for no job we know, and remove what belongs to no running job."""
        for job in self._store.load_jobs():
            self._jobs[job.id] = job
        await self._forget_old()
        requests = self._store.load_requests()
        for job in [j for j in self._jobs.values() if j.state == JobState.QUEUED]:
            if job.id in requests:
                self._active[job.domain] = job.id
                self._queue.append(job.id)
                self._requests[job.id] = StartRequest(**requests[job.id])
            else:
                await self._close(job, JobState.FAILED, "its request was lost")
        for job in [j for j in self._jobs.values()
                    if not j.state.final and j.state != JobState.QUEUED]:
            running = await self._runs_in_libvirt(job)
            # A copy of pullbackd's own died with it: such a job cannot be adopted.
            if running and (job.state == JobState.READY or (
                    job.state == JobState.RUNNING and job.destination is None)):
                self._active[job.domain] = job.id
                if job.state == JobState.READY:
                    await self._serve(job)
                log.info("adopted running backup", job=job.id, domain=job.domain)
                continue
            await self._end_libvirt_job(job)
            await self._close(job, JobState.FAILED, _lost(job, running))
        await self._check_chains()
        await self._take_in_unowned()
        await anyio.to_thread.run_sync(self._sweep)
        self._dequeue()

    async def _check_chains(self) -> None:
        """chain.py's invariant: a checkpoint is in a chain if and only if its job
        completed. Also delete what an earlier run could not (or crashed before it
        did), and what the repository holds of jobs that did not complete."""
        for c in self.chains.all():
            job = self._jobs.get(c.job)
            if c.state == CheckpointState.COMPLETE and job is not None and \
                    job.state != JobState.COMPLETED:
                log.error("BUG: a checkpoint is in its consumer's chain but its backup did "
                          "not complete; rolling it back (the next incremental covers its "
                          "changes)", checkpoint=c.name, job=c.job, state=job.state)
                await self.chains.discard(c)
            elif c.state == CheckpointState.DISCARD or (
                    c.state == CheckpointState.PENDING and c.job not in self._active.values()):
                await self.chains.discard(c)
        stored = await anyio.to_thread.run_sync(self.repository.stored_jobs)
        for job_id in stored:
            job = self._jobs.get(job_id)
            if job is not None and job.state != JobState.COMPLETED and \
                    job.id not in self._active.values():
                log.error("BUG: the repository holds a backup of a job that did not "
                          "complete; removing it", job=job_id, state=job.state)
                await anyio.to_thread.run_sync(self.repository.forget_job, job.domain,
                                               job.consumer, job.id)

    async def _take_in_unowned(self) -> None:
        """Pull backups libvirt runs on QEMU sockets of ours that no job of ours owns
        (the state database was lost or replaced): rebuild each job from libvirt's
        word (the backup's XML, the checkpoint named after the job), so that its
        appliance can read on and Finish it; end those that cannot be rebuilt, as
        nobody could Finish them and each would block every Start of its domain.
        A domain libvirt cannot tell about now is left as it is, and logged."""
        try:
            domains = await self._virt.running_domains()
        except PullbackError as e:
            log.warning("cannot look for backups nobody owns", error=str(e))
            return
        for domain in domains:
            try:
                await self._take_in_unowned_of(domain)
            except PullbackError as e:
                log.warning("cannot look for a backup nobody owns", domain=domain,
                            error=str(e))

    async def _take_in_unowned_of(self, domain: str) -> None:
        backup_xml = await self._virt.backup_xml(domain)
        backup = xml.parse_backup(backup_xml) if backup_xml else None
        if backup is None or backup.socket is None or domain in self._active or \
                backup.socket.parent != self.exports.private:
            return
        job_id = backup.socket.name.removesuffix(".sock")
        ours = [name for name in await self._virt.checkpoints(domain)
                if name.startswith(PREFIX) and name.endswith(f".{job_id}")]
        consumer = ours[0][len(PREFIX):-len(job_id) - 1] if len(ours) == 1 else ""
        if job_id in self._jobs or not CONSUMER.fullmatch(consumer):
            log.error("ending a backup of pullbackd's that no job owns; its appliances "
                      "must start again", domain=domain, job=job_id, checkpoints=ours)
            await self._abort_backup(domain)
            await anyio.to_thread.run_sync(self._remove_leftovers, job_id)
            for name in ours:
                await self._virt.delete_checkpoint(domain, name)
            return
        job = await self._rebuilt(domain, job_id, consumer, backup)
        log.error("rebuilt a running backup the state database did not know (was the "
                  "database lost?) from libvirt: appliances can read on and finish it",
                  domain=domain, job=job_id, consumer=consumer)
        self._active[domain] = job.id
        await self._serve(job)

    async def _rebuilt(self, domain: str, job_id: str, consumer: str,
                       backup: xml.BackupJob) -> Job:
        """A pull job as libvirt runs it, recorded as ready with a pending checkpoint."""
        name = make_checkpoint_name(consumer, job_id)
        checkpoint_xml = await self._virt.checkpoint_xml(domain, name)
        info = xml.parse_checkpoint(checkpoint_xml)
        created = now() if info.created is None else datetime.fromtimestamp(
            info.created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        disks = tuple([Disk(
            name=d.name, size=await self._virt.capacity(domain, d.name),
            mode="incremental" if d.since else "full", export=d.export,
            url=nbd_url(self.exports.endpoint_path(job_id), str(d.export)),
            remote_url=f"{self._remote}/{quote(str(d.export), safe='')}" if self._remote
            else None,
            bitmap=f"qemu:dirty-bitmap:{d.bitmap}" if d.bitmap else None, since=d.since)
            for d in backup.disks])
        since = next((d.since for d in disks if d.since), None)
        # Taken in first, so that what is written into the domain's metadata later
        # (when this job completes) holds the chains it carries.
        await self.chains.take_in(domain, refused=self._did_not_complete)
        job = await self._save(Job(job_id, domain, JobState.READY,
                                   "incremental" if since else "full", created, consumer,
                                   name, since=since, disks=disks))
        await self.chains.add(Checkpoint(
            name, domain, consumer, job_id, created, CheckpointState.PENDING, info.disks,
            checkpoint_xml, tuple(d.name for d in disks if d.since is None)))
        return job

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

    def _chain_lock(self, domain: str) -> anyio.Lock:
        """Serializes what changes a domain's checkpoints: starting a backup, deleting a chain."""
        return self._locks.setdefault(f"chain:{domain}", anyio.Lock())

    async def _save(self, job: Job, checkpoint: Checkpoint | None = None, *,
                    show: bool = True) -> Job:
        """Record the job (a new state joins its history), with its checkpoint's new
        state in the same transaction if given, and (unless not `show`) show it: to
        Get and List, and to the watchers. The job as recorded."""
        before = self._jobs.get(job.id)
        history = before.history if before is not None and \
            len(before.history) > len(job.history) else job.history
        if before is None or before.state != job.state or not history:
            history = (*history, Transition(job.state, now()))
        job = dataclasses.replace(job, history=history)
        await self._store.save_job(job, checkpoint)
        if show:
            self._show(job)
        return job

    def _show(self, job: Job) -> None:
        self._jobs[job.id] = job
        self._publish(Change("state", self._view(job)))

    def _publish(self, change: Change) -> None:
        for watcher in list(self._watchers):
            try:
                watcher.send_nowait(change)
            except anyio.WouldBlock:
                # Far behind: cut it off rather than hold up every job for it.
                log.warning("dropping a watcher that does not keep up")
                watcher.close()
                self._watchers.discard(watcher)

    @contextmanager
    def watch(self) -> Iterator[MemoryObjectReceiveStream[Change]]:
        """Every change of any job, in order, while the context lasts."""
        send, receive = anyio.create_memory_object_stream[Change](WATCH_BUFFER)
        self._watchers.add(send)
        try:
            yield receive
        finally:
            self._watchers.discard(send)
            send.close()
            receive.close()


@dataclass(frozen=True)
class Limits:
    """How long a pull job waits for its appliances ([exports] in the configuration)."""

    #: Seconds Finish waits for open sessions to close.
    drain_timeout: float = 30.0
    #: Seconds without any session before the job expires; 0: never.
    idle_timeout: int = 3600
    #: Seconds a pull job may run at most; 0: no limit.
    max_lifetime: int = 0


def _follower(live: _Live, writer: Writer | None) -> Callable[[stream.Progress], None]:
    """The copy's progress, for the job's statistics and the repository's write-behind."""
    def follow(progress: stream.Progress) -> None:
        live.current = progress
        if writer is not None:
            writer.behind.progress(progress)
    return follow


def _lost(job: Job, running: bool) -> str:
    """Why a job that was not final when pullbackd stopped cannot go on."""
    if job.state == JobState.STARTING:
        return "pullbackd restarted while the job was starting"
    if job.destination is not None:
        return ("pullbackd restarted during its own copy, which cannot resume"
                + ("" if running else ", and libvirt no longer runs the backup"))
    return f"pullbackd restarted while the job was {job.state}, and libvirt no longer runs it"


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
