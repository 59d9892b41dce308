"""Starting a backup: from the request to a job that is ready (pull: served) or running
(push: the source copies; stream: pullbackd copies), or queued until there is room
(admission.py); a queued job starts in its turn, in the queue's order.

    check      the request, the places it may write to (places.py), and that the
               consumer's chain is not another user's (chain.py): the job keeps the
               places as checked (resolved); a queued job's are checked again as its
               turn comes (its claim on its domain kept the chain as it was)
    plan       what the source would back up; what cannot work fails now
    bases      what each disk starts from (chain.py), or why it is full
    record     the job and its pending checkpoint, in one transaction
    begin      the source begins it, the guest frozen as asked (quiesce.py)
    ready      the checkpoint as libvirt made it, the domain's files, the exports:
               served or copied, then recorded in one transaction

Invariants (jobs.py checks them at every start, with the rest of the state machine):
- A job is recorded (with its pending checkpoint) before the source hears of it:
  after a crash the database knows which backups and checkpoints are ours.
- A Start that fails once the source may have begun ends what it began (the copy,
  the endpoint, the backup) and discards its checkpoint: the job is recorded failed,
  and nobody can complete it into the chain.
- What changes a domain's checkpoints (a Start, DeleteChain) happens under the
  domain's chain lock, which exists only while someone holds it or waits for it.
- A Start that did not queue is *under way* from its claim until it is ready or
  failed, its claim released (`under_way`, `ended`): it is recorded only after
  libvirt's calls of its plan and chain, and a migration's gate waits for it, as its
  backup may begin any moment. (A queued job's turn is told by its record: it
  leaves the queue, then starts, or fails.)

It changes jobs through the records Jobs keeps, and reaches the rest of a job's life
through Jobs' start interface (`view`, `copy`, `serve`, `release`, `scratch_users`,
`did_not_complete`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import anyio
import structlog

from . import crash, quiesce
from .admission import Admission
from .chain import Base, Chains
from .domainfiles import DomainFiles
from .errors import ChainOfAnother, NoSuchCheckpoint, QuiesceFailed
from .logs import logged
from .model import (
    LOCAL,
    Change,
    Checkpoint,
    CheckpointState,
    Job,
    JobState,
    Kind,
    StartRequest,
    now,
)
from .names import checkpoint_name
from .places import Places, remove_targets
from .records import Records
from .repository import Repository
from .roles import user_name
from .running import Running
from .scratch import ScratchSpace
from .serving import Serving
from .source import BackupSource, Begun, Plan

if TYPE_CHECKING:
    from .jobs import Jobs
    from .state import Store

log = structlog.get_logger()


class Starts:
    """Every Start, and the queue's."""

    def __init__(self, jobs: Jobs, records: Records, store: Store, source: BackupSource,
                 chains: Chains, serving: Serving, scratch: ScratchSpace,
                 repository: Repository, admission: Admission,
                 running: dict[str, Running], places: Places) -> None:
        """`running`: Jobs' jobs that have not ended, which a Start joins."""
        self._jobs = jobs
        self._records = records
        self._store = store
        self._source = source
        self._chains = chains
        self._serving = serving
        self._scratch = scratch
        self._repository = repository
        self._admission = admission
        self._running = running
        #: Where clients may have us write (a reload changes it).
        self.places = places
        #: domain -> the lock of what changes its checkpoints (Start, DeleteChain), there
        #: only while someone holds it or waits for it: a Start of a domain that does
        #: not exist leaves nothing behind, whatever name it made up.
        self._chain_locks: dict[str, _ChainLock] = {}
        #: Queued jobs start one at a time, in their order (anyio's lock is fair).
        self._starting_queued = anyio.Lock()
        #: domain -> its Start under way: the job's id, and what is set once it ended.
        self._under_way: dict[str, tuple[str, anyio.Event]] = {}

    async def start(self, request: StartRequest) -> Job:
        """Start a backup, or queue it. Raises what admission, the places, the chains
        and the source raise (errors.py); a job that was recorded and failed to
        start stays, failed, with why."""
        # What was checked is what is used: target_dir and the socket resolved.
        request = await anyio.to_thread.run_sync(self._check, request)  # it looks at them
        await self._check_owner(request)
        if not self._admission.admit(request):
            return await self._enqueue(request)
        job_id = self._records.new_id()
        # Claimed before the first await: a concurrent Start of this domain
        # fails at once instead of racing us to the source.
        self._admission.claim(request.domain, job_id)
        self._running[job_id] = Running()
        # Not recorded until the plan, the scratch and the chain are checked: until then
        # only this tells a migration's drain that a backup of the domain may begin.
        with self._starting(job_id, request.domain):
            return await self._claimed_start(job_id, request)

    def _check(self, request: StartRequest) -> StartRequest:
        request.check()
        return self.places.check(request)

    async def _check_owner(self, request: StartRequest) -> None:
        """Refuse a backup of a consumer whose chain is another user's (chain.py)."""
        owner = self._chains.owner(request.domain, request.consumer)
        if owner is not None and owner != request.owner:
            raise ChainOfAnother(request.domain, request.consumer,
                                 await anyio.to_thread.run_sync(user_name, owner))  # NSS

    async def _enqueue(self, request: StartRequest) -> Job:
        # What cannot work fails now.
        quiesce.check(request, await self._source.plan(request.domain, request.disks,
                                                        request.kind))
        job_id = self._records.new_id()
        position = self._admission.enqueue(request.domain, job_id, request)
        running = self._running[job_id] = Running()
        # Held until the job is recorded: a job that ends meanwhile may take this one
        # out of the queue, and its start waits for the record.
        running.lock.acquire_nowait()
        try:
            job = Job(job_id, request.domain, JobState.QUEUED, request.mode, now(),
                      request.consumer, checkpoint_name(request.consumer, job_id),
                      since=request.since, target_dir=request.target_dir,
                      destination=request.destination, quiesce=request.quiesce,
                      owner=request.owner)
            await self._store.save_request(job_id, dataclasses.asdict(request))
            job = await self._records.save(job)
        finally:
            running.lock.release()
        log.info("backup queued", job=job_id, domain=request.domain, position=position,
                 max_active=self._admission.max_active)
        return self._jobs.view(job)

    def under_way(self, domain: str) -> str | None:
        """The job of the Start of `domain` under way, if any: claimed, not yet ready
        nor failed; it may not be recorded yet (a queued job's turn is not one)."""
        under_way = self._under_way.get(domain)
        return under_way[0] if under_way is not None else None

    async def ended(self, domain: str) -> None:
        """Wait until the Start of `domain` under way, if any, is ready or failed (its
        record tells which; one that failed before it was recorded left none)."""
        under_way = self._under_way.get(domain)
        if under_way is not None:
            await under_way[1].wait()

    @contextmanager
    def _starting(self, job_id: str, domain: str) -> Iterator[None]:
        """The Start of `job_id` is under way while the context lasts (set going before
        the claim's first await, so that nobody sees the claim without it)."""
        ended = anyio.Event()
        self._under_way[domain] = (job_id, ended)
        try:
            yield
        finally:
            del self._under_way[domain]
            ended.set()

    async def start_queued(self, job_id: str, request: StartRequest) -> None:
        try:
            # Each once the one before it started (or failed to): their histories
            # show the queue's order even when several places free up at once.
            async with self._starting_queued:
                await self._claimed_start(job_id, request, queued=True)
        except Exception as e:
            log.warning("queued backup could not start", job=job_id, error=str(e))
            job = self._records.get(job_id)
            if job is not None and not job.state.final:
                with logged("cannot record that a queued backup could not start",
                            job=job_id):
                    await self._records.save(job.failed(f"the backup could not start: {e}"))
            self._jobs.release(job_id, request.domain)
        finally:
            # Shielded: a request must not start twice. One left behind is deleted at
            # the next start, as its job is no longer queued.
            with anyio.CancelScope(shield=True), \
                    logged("cannot delete a started backup's request", job=job_id):
                await self._store.delete_request(job_id)

    async def _claimed_start(self, job_id: str, request: StartRequest,
                             queued: bool = False) -> Job:
        running = self._running.get(job_id)
        if running is None:
            return self._records[job_id]  # aborted while it waited in the queue
        try:
            async with running.lock, self.chain_lock(request.domain):
                job = self._records[job_id] if queued else None
                if job is not None and job.state != JobState.QUEUED:
                    return job  # aborted while it waited for the lock
                if queued:
                    # Its turn came while a migration drains its domain (it fails).
                    self._admission.check_drain(request.domain)
                    # Where it writes may have changed while it waited ([push] dirs
                    # reloaded, a folder given away or opened to others): as at Start.
                    request = await anyio.to_thread.run_sync(self._check, request)
                return await self._start(job_id, request, job)
        finally:
            job = self._records.get(job_id)
            if job is None or job.state.final:
                self._jobs.release(job_id, request.domain)

    async def _start(self, job_id: str, request: StartRequest, queued: Job | None) -> Job:
        domain = request.domain
        plan = await self._source.plan(domain, request.disks, request.kind)
        quiesce.check(request, plan)
        await self._check_scratch(job_id, request, plan)
        bases = await self._bases(request, plan)
        job = Job(job_id, domain, JobState.STARTING, request.mode,
                  queued.created if queued else now(), request.consumer,
                  checkpoint_name(request.consumer, job_id), target_dir=request.target_dir,
                  destination=request.destination, history=queued.history if queued else (),
                  offline=plan.offline, quiesce=request.quiesce, owner=request.owner)
        checkpoint = Checkpoint(job.checkpoint, domain, job.consumer, job_id, job.created,
                                CheckpointState.PENDING,
                                tuple(d for d in plan.disks if d not in plan.full),
                                owner=request.owner)
        # Recorded before the source hears of them, in one transaction: after a
        # crash, the database knows which backup and checkpoint are ours.
        await self._records.save(job, checkpoint)
        self._chains.recorded(checkpoint)
        crash.point("start.recorded")
        # Shielded: once the source may have begun, the outcome must be recorded
        # (and a half-started backup ended) even if our caller is cancelled.
        with anyio.CancelScope(shield=True):
            job = await self._begin(job, request, plan, bases)
            try:
                checkpoint = await self._chains.begun(job.checkpoint, tuple(
                    d for d, b in bases.items() if b.checkpoint is None))
                files, record = await self._capture(job, plan)
                begun = await self._source.exports(job, bases)
                job = self._started(job, begun, bases, plan.sizes)
                if job.kind == Kind.STREAM:
                    self._jobs.copy(job, files)
                elif job.kind == Kind.PULL:
                    await self._jobs.serve(job)
                # With libvirt's XML of its checkpoint and the domain's files, in one
                # transaction (a crash before it fails the job at the next start, and
                # deletes the checkpoint by name).
                job = await self._records.save(job, checkpoint, files=record)
            except Exception as e:
                await self._fail_begun(job, e)
                raise
            self._chains.recorded(checkpoint)
            crash.point("start.ready")
        log.info("backup started", job=job.id, domain=domain, mode=job.mode, state=job.state,
                 consumer=job.consumer, disks={d.name: d.mode for d in job.disks},
                 destination=job.destination)
        return self._jobs.view(job)

    async def _check_scratch(self, job_id: str, request: StartRequest, plan: Plan) -> None:
        """Refuse a pull backup the scratch file system could not hold (InsufficientScratch)."""
        if request.kind != Kind.PUSH and not plan.offline and not request.allow_scratch_overcommit:
            # QEMU keeps what the guest overwrites in scratch files (pull mode).
            others = [j for j in self._jobs.scratch_users() if j.id != job_id]
            await anyio.to_thread.run_sync(self._scratch.check, sum(plan.sizes.values()),
                                           others)

    async def _fail_begun(self, job: Job, e: Exception,
                          what: str = "the backup started but could not be read") -> None:
        """A Start that failed once the source had begun: what it set going stopped, the
        backup ended, its checkpoint discarded, the job recorded as failed (`what`: how
        far it went, before why it failed)."""
        error = f"{what}: {e}"
        with logged("cannot stop a half-started backup's copy or endpoint", job=job.id):
            await self._unstart(job)
        try:
            await self._source.end(job)
        except Exception as end_error:
            log.exception("cannot end a half-started backup", job=job.id)
            error += f"; ending it failed too ({end_error}): end it with " \
                f"`virsh domjobabort {job.domain}`"
        await anyio.to_thread.run_sync(remove_targets, job)
        await self._discard_checkpoint(job)
        await self._records.save(job.failed(error))

    async def _unstart(self, job: Job) -> None:
        """Undo what a Start that failed late had set going: its copy stopped (and what
        it stored removed), its endpoint closed. Nobody read from it yet."""
        running = self._running[job.id]
        if running.copy is not None:
            await running.copy.stop()
            running.copy = None
        if running.served is not None:
            await running.served.close()
            running.served = None
        await self._serving.remove(job.id)
        if job.local:
            await anyio.to_thread.run_sync(self._repository.forget_job, job.domain,
                                           job.consumer, job.id)

    async def _bases(self, request: StartRequest, plan: Plan) -> dict[str, Base]:
        """What each disk's backup starts from (chain.py), or why it is full."""
        domain = request.domain
        lost = await self._chains.prepare(domain, refused=self._jobs.did_not_complete)
        bases = self._chains.bases(domain, request.consumer, request.mode, request.since,
                                   list(plan.disks), lost)
        if request.destination == LOCAL:
            bases = await anyio.to_thread.run_sync(
                self._local_bases, domain, request.consumer, bases)
        return bases | {disk: Base(None, why, bitmap=False) for disk, why in plan.full.items()}

    async def _begin(self, job: Job, request: StartRequest, plan: Plan,
                     bases: dict[str, Base]) -> Job:
        """The source begins the backup, the guest frozen as the request asks (quiesce.py);
        the job with how consistent it is. A begin that fails fails the job (raises)."""
        try:
            quiesced = await quiesce.begin(self._source, job, request, plan,
                                           lambda: self._source.begin(job, plan, bases),
                                           self._jobs.thaws)
        except Exception as e:
            # A push's files, if the source made them (it may have begun writing).
            await anyio.to_thread.run_sync(remove_targets, job)
            await self._discard_checkpoint(job)
            await self._records.save(job.failed(f"the backup did not start: {e}"))
            raise
        if quiesced.failed is not None:
            # "required", and the freeze did not hold until the begin ended: what began is
            # not the backup that was asked for.
            error = QuiesceFailed(job.domain, quiesced.failed)
            await self._fail_begun(job, error, "the backup began, but not frozen")
            raise error
        crash.point("start.begun")
        job = dataclasses.replace(job, consistency=quiesced.consistency,
                                  frozen=quiesced.frozen)
        if quiesced.warning is not None:
            log.warning("not frozen", job=job.id, reason=quiesced.warning)
            self._records.publish(Change("warning", self._jobs.view(job), quiesced.warning))
        return job

    async def _capture(self, job: Job, plan: Plan) -> tuple[DomainFiles, str]:
        """The domain's own files as its backup began, for the repository, and as the job
        records them; what could not be read is a warning."""
        files = await self._source.files(job, plan)
        record = await anyio.to_thread.run_sync(files.to_record)  # up to MiBs of base64
        if files.missing:
            message = "not in the backup: " + "; ".join(files.missing)
            log.warning("domain files missing", job=job.id, missing=list(files.missing))
            self._records.publish(Change("warning", self._jobs.view(job), message))
        return files, record

    def _local_bases(self, domain: str, consumer: str, bases: dict[str, Base]
                     ) -> dict[str, Base]:
        """An incremental into the repository needs the backup it starts from to be there."""
        result = dict(bases)
        for disk, base in bases.items():
            if base.checkpoint is None:
                continue
            try:
                self._repository.at(domain, consumer, disk, base.checkpoint)
            except NoSuchCheckpoint:
                result[disk] = Base(None, f"the local repository has no backup of this disk "
                                          f"at {base.checkpoint}")
        return result

    def _started(self, job: Job, begun: Begun, bases: dict[str, Base],
                 sizes: dict[str, int]) -> Job:
        """The job as the source began it: ready to serve (pull), or running."""
        disks = self._serving.disks(job, begun, sizes,
                                    {d: b.fallback for d, b in bases.items()})
        # The newest checkpoint any disk starts from: the chain's order is creation order.
        used = {d.since for d in disks if d.since}
        order = [c.name for c in self._chains.of(job.domain, job.consumer)]
        return dataclasses.replace(
            job, state=JobState.READY if job.kind == Kind.PULL else JobState.RUNNING,
            mode=job.mode if used else "full",
            since=max(used, key=order.index) if used else None, disks=disks)

    async def _discard_checkpoint(self, job: Job) -> None:
        checkpoint = self._chains.get(job.checkpoint)
        if checkpoint is not None and checkpoint.state != CheckpointState.COMPLETE:
            await self._chains.discard(checkpoint)

    @asynccontextmanager
    async def chain_lock(self, domain: str) -> AsyncIterator[None]:
        """Serializes what changes a domain's checkpoints: starting a backup, deleting a chain."""
        # Taken and counted before the first await: whoever comes while it is counted
        # waits on this lock; it goes once the last who held or waited for it left.
        chain_lock = self._chain_locks.get(domain)
        if chain_lock is None:
            chain_lock = self._chain_locks[domain] = _ChainLock()
        chain_lock.users += 1
        try:
            async with chain_lock.lock:
                yield
        finally:
            chain_lock.users -= 1
            if not chain_lock.users:
                del self._chain_locks[domain]


@dataclass
class _ChainLock:
    lock: anyio.Lock = field(default_factory=anyio.Lock)
    #: Tasks that hold it or wait for it.
    users: int = 0
