"""Backup jobs: the state machine (model.py draws it) and, with starting.py and
ending.py, the only code that changes a job.

    start    admission (admission.py), then the source begins the backup
             (source.py); the job is ready (pull: served, serving.py), or running
             (push: the source copies; stream: pullbackd copies, copying.py):
             starting.py
    finish   a pull job's appliance is done, or says it failed (its starter alone)
    abort    any job, queued or not (by its starter, or an admin)
    end      every end goes through ending.py: sessions closed, the source's backup
             ended, the outcome recorded with the checkpoint's fate
    recover  at start: adopt what still runs, end what cannot go on, check the
             chains, rebuild what the state database lost (recovery.py)

Invariants, checked at every start (`recover`):
- A job's end and its checkpoint's fate are one transaction (ending.py says what
  that asks of the end).
- A job is recorded (with its pending checkpoint) before the source hears of
  it (starting.py).
- A domain has one job that has not ended at most (admission.py); a job's end
  is shown (Get, List, Watch) only once its checkpoint's fate was carried out,
  and its domain is free from that same instant.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING

import anyio
import anyio.abc
import structlog
from anyio.streams.memory import MemoryObjectReceiveStream

from . import quiesce, stream
from .admission import Admission
from .chain import Chains, check_consumer
from .copying import Copy
from .domainfiles import DomainFiles
from .ending import Ending
from .errors import BackupInProgress, JobNotReady, JobOfAnother, NoSuchJob, PullbackError
from .exports import StoreFds
from .logs import logged
from .model import Change, Job, JobState, Kind, Session, StartRequest
from .places import Places
from .records import Records
from .recovery import Recovery
from .repository import Repository
from .roles import user_name
from .running import Running
from .scratch import ScratchSpace
from .serving import Serving, appliance
from .source import BackupSource
from .starting import Starts

if TYPE_CHECKING:
    from .state import Store

log = structlog.get_logger()


class Jobs:
    """Every job the daemon knows."""

    def __init__(self, source: BackupSource, store: Store, chains: Chains,
                 serving: Serving, scratch: ScratchSpace, repository: Repository, *,
                 admission: Admission | None = None, places: Places | None = None,
                 tuning: stream.Tuning | None = None,
                 keep_finished: float = 7 * 24 * 3600.0) -> None:
        """`places`: where clients may have us write (default: anywhere, for tests)."""
        self._source = source
        self._store = store
        self._chains = chains
        self._serving = serving
        self._scratch = scratch
        self._repository = repository
        self._admission = admission or Admission()
        self._tuning = tuning or stream.Tuning()
        self._records = Records(store, self.view)
        #: Jobs that have not ended, by id.
        self._running: dict[str, Running] = {}
        self._ending = Ending(self._records, store, source, chains, serving, repository,
                              self._admission, self._running, self.view, self._dequeue,
                              keep_finished)
        self._starts = Starts(self, self._records, store, source, chains, serving, scratch,
                              repository, self._admission, self._running,
                              places or Places(None, None))
        #: Where copies, endpoints and event handling run: follow_events's task group.
        self._tg: anyio.abc.TaskGroup | None = None
        #: The daemon stops (`hand_off` began): no timer ends a job from then on.
        self._stopping = False
        #: Thaws of guests whose agent did not answer, asked again in the background.
        self.thaws = quiesce.Thaws(store)

    # Queries.

    def log_fields(self, job_id: str) -> dict[str, str]:
        """What every log event about the job names besides its id (logs.name_jobs)."""
        job = self._records.get(job_id)
        return {} if job is None else {"domain": job.domain, "consumer": job.consumer}

    def get(self, job_id: str) -> Job:
        """Raises NoSuchJob."""
        job = self._records.get(job_id)
        if job is None:
            raise NoSuchJob(job_id)
        return self.view(job)

    def all(self) -> list[Job]:
        return [self.view(j) for j in self._records.all()]

    def active(self, domain: str) -> str | None:
        """The job of the domain that has not ended, if any."""
        return self._admission.holder(domain)

    def writing_locally(self, domain: str) -> str | None:
        """The job of the domain that has not ended and may write into the local
        repository, if any: one streaming into it, or one whose Start is under way and
        not recorded yet (it may be: as far as we know, it is)."""
        job_id = self._admission.holder(domain)
        if job_id is None:
            return None
        held = self._records.get(job_id)
        return job_id if held is None or held.local else None

    def starting(self, domain: str) -> str | None:
        """The job of a Start of the domain under way (claimed, maybe not recorded yet,
        not ready nor failed), if any."""
        return self._starts.under_way(domain)

    async def started(self, domain: str) -> None:
        """Wait until the Start of the domain under way, if any, is ready or failed."""
        await self._starts.ended(domain)

    def view(self, job: Job) -> Job:
        """The job as shown: with its place in the queue, and what its `Running` knows."""
        running = self._running.get(job.id)
        if running is None or job.state.final:
            return job
        if job.state == JobState.QUEUED:
            job = dataclasses.replace(job, position=self._admission.position(job.id))
        return running.view(job)

    async def details(self, job_id: str) -> Job:
        """The job as Get shows it: with its scratch files, as the file system and
        the source count them, while it runs."""
        job = self.get(job_id)
        if job.state not in (JobState.READY, JobState.RUNNING) or job.kind == Kind.PUSH:
            return job
        files = await anyio.to_thread.run_sync(self._scratch.sizes, [job], True)
        return dataclasses.replace(job, scratch=await self._source.usage(job), disks=tuple(
            dataclasses.replace(d, scratch=files.get(f"{job.id}.{d.name}", 0))
            for d in job.disks))

    async def files(self, job_id: str) -> DomainFiles:
        """The domain's files a job's backup began with. Raises NoSuchJob, and
        JobNotReady before its backup began."""
        job = self.get(job_id)
        record = await self._store.load_files(job_id)
        if record is None:
            raise JobNotReady(job_id, job.state)
        return await anyio.to_thread.run_sync(DomainFiles.from_record, record)

    # Start (starting.py).

    async def start(self, request: StartRequest) -> Job:
        """Start a backup, or queue it. Raises what admission, the places, the chains
        and the source raise (errors.py); a job that was recorded and failed to
        start stays, failed, with why."""
        return await self._starts.start(request)

    def reconfigure(self, *, max_active: int, keep_finished: float, places: Places) -> None:
        """New settings (a reload): they apply from the next Start; more room under
        `max_active` starts queued jobs now."""
        self._admission.max_active = max_active
        self._ending.keep_finished = keep_finished
        self._starts.places = places
        self._dequeue()

    def _dequeue(self) -> None:
        """Start queued jobs, oldest first, while there is room."""
        if self._tg is None:
            return
        for job_id, request in self._admission.ready():
            self._tg.start_soon(self._starts.start_queued, job_id, request)

    # pullbackd's own copy; appliances' sessions.

    def copy(self, job: Job, files: DomainFiles) -> None:
        if self._tg is None:
            raise RuntimeError("jobs are not being served (follow_events is not running)")
        copy = self._running[job.id].copy = Copy(job, self._source, self._repository,
                                                  self._tuning, files)

        async def run() -> None:
            error = await copy.run()
            if copy.stopped:
                return  # whoever stopped it ends the job
            await self._ending.quietly(job.id, JobState.FAILED if error else JobState.COMPLETED,
                                       error, copied=True)

        self._tg.start_soon(run)

    async def serve(self, job: Job) -> None:
        """Open the job's endpoint for appliances, and watch its limits."""
        if self._tg is None:
            raise RuntimeError("jobs are not being served (follow_events is not running)")

        async def expire(job_id: str, reason: str) -> None:
            await self._ending.quietly(job_id, JobState.EXPIRED, reason)

        served = self._running[job.id].served = await self._serving.open(
            job, self._tg, self._on_session, expire)
        if self._stopping:  # started as the daemon stops: the next run's timer decides
            served.timer.cancel()

    def _on_session(self, job_id: str, session: Session) -> None:
        job = self._records.get(job_id)
        if job is None or job.state.final:
            return
        self._records.publish(Change("session", self.view(job), session=session))
        if session.ended is not None and self._tg is not None:
            # Sessions so far survive a restart of the daemon.
            self._tg.start_soon(self._save_sessions, job_id)

    async def _save_sessions(self, job_id: str) -> None:
        running = self._running.get(job_id)
        if running is None:
            return
        async with running.lock:
            job = self._records[job_id]
            if not job.state.final and running.served is not None:
                with logged("cannot save the job's sessions (its end saves them)",
                             job=job_id):
                    await self._records.update(dataclasses.replace(
                        job, appliance=appliance(running.served.endpoint)))

    async def hand_off(self, store: StoreFds, seconds: float) -> int:
        """Before the daemon stops: pass the endpoints and their sessions to the next run
        (systemd keeps the sockets; each session is recorded as it goes). A session that
        cannot be paused within `seconds` is cut, alone. Returns how many sessions
        were handed over.

        From here on no timer ends a job ([exports] idle_timeout, max_lifetime): the
        daemon stops, and the next run adopts its jobs and starts their timers again
        (a job past max_lifetime then expires at once)."""
        self._stopping = True
        for running in self._running.values():
            if running.served is not None:
                running.served.timer.cancel()
        handed = await self._serving.exports.hand_off(store, self._store.save_handoff, seconds)
        log.info("handed over the NBD endpoints", sessions=len(handed))
        return len(handed)

    # Finish, abort, end.

    async def delete_chain(self, domain: str, consumer: str) -> list[str]:
        """Raises BackupInProgress while a job of that chain runs."""
        check_consumer(consumer)
        job_id = self._admission.holder(domain)
        if job_id is not None:
            held = self._records.get(job_id)
            # Its checkpoint would outlive the chain it was to join (a Start not yet
            # recorded is of any consumer, as far as we know).
            if held is None or held.consumer == consumer:
                raise BackupInProgress(domain, job_id)
        async with self._starts.chain_lock(domain):
            return await self._chains.delete_chain(domain, consumer)

    async def finish(self, job_id: str, success: bool = True, by: int | None = None) -> Job:
        """Raises NoSuchJob, JobOfAnother (`by`, a uid, did not start it), JobNotReady,
        SessionsActive (appliances still read after [exports] drain_timeout: never cut
        off)."""
        await _check_owner(self.get(job_id), by)
        running = self._running.get(job_id)
        if running is not None and running.served is not None:
            await running.served.drain(self._serving.limits.drain_timeout)
        if success:
            return await self._ending.end(job_id, JobState.COMPLETED)
        return await self._ending.end(job_id, JobState.FAILED,
                                      "the appliance reported the backup failed")

    async def abort(self, job_id: str, by: int | None = None) -> Job:
        """Raises NoSuchJob, JobOfAnother (`by`, a uid unless an admin's, did not start
        it)."""
        await _check_owner(self.get(job_id), by)
        return await self._ending.end(job_id, JobState.ABORTED)

    async def end_for_migration(self, job_id: str) -> Job:
        """The migration gate opened on a job no appliance was using: it fails, and its
        checkpoint goes, as nobody confirmed the data."""
        return await self._ending.end(job_id, JobState.FAILED, (
            "ended for the domain's migration: no appliance had used it for [migration] "
            "grace, and nobody confirmed the data"))

    def release(self, job_id: str, domain: str) -> None:
        """The job no longer holds its domain (ending.py)."""
        self._ending.release(job_id, domain)

    def did_not_complete(self, job_id: str) -> bool:
        """Whether a job is known to have ended without completing, or to be running."""
        job = self._records.get(job_id)
        return job is not None and job.state != JobState.COMPLETED

    # What the source tells.

    async def follow_events(
            self, lost: Callable[[str], Awaitable[None]], *,
            task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Apply what the source tells to the jobs until it is lost (then `lost(reason)`
        runs, with every endpoint and copy still up, before they are cancelled);
        copies, endpoints, the handling of events and the thaws owed run in here too."""
        async with anyio.create_task_group() as tg:
            self._tg = tg
            await tg.start(self.thaws.serve)
            sink = _Sink(self, self._records, self._admission, self._source, tg, lost)
            await self._source.follow(sink, task_status.started)
            tg.cancel_scope.cancel()

    async def push_ended(self, job_id: str, success: bool, error: str | None) -> None:
        """libvirt ended a push, with this outcome (ending.py)."""
        await self._ending.push_ended(job_id, success, error)

    async def fail(self, job_id: str, reason: str) -> None:
        await self._ending.quietly(job_id, JobState.FAILED, reason)

    async def watch_scratch(self, interval: float = 1.0) -> None:
        """Keep QEMU from filling the scratch file system while pull backups run."""
        def warn(jobs: list[Job], message: str) -> None:
            for job in jobs:
                self._records.publish(Change("warning", job, message))

        await self._scratch.watch(self.scratch_users, warn, self.fail, interval)

    def scratch_users(self) -> list[Job]:
        """The jobs whose backups keep scratch files: pull and stream (pull mode) of running
        domains (nothing writes a shut-off domain's disks: no scratch)."""
        return [j for j in self._records.all() if not j.state.final and j.disks
                and j.kind != Kind.PUSH and not j.offline]

    # Recovery (recovery.py), and its interface: how what an earlier run left becomes
    # jobs again.

    async def recover(self, progress: Callable[[str], None] = lambda step: None) -> None:
        """At start, before any client: what an earlier run left (telling `progress`
        each step it begins: recovery.py); then the queue moves."""
        await Recovery(self, self._records, self._store, self._source, self._chains,
                       self._repository, self._serving).run(self._ending.keep_finished, progress)
        self._dequeue()

    def requeue(self, job: Job, request: StartRequest) -> None:
        """A job found queued waits in the queue again, in its order."""
        self._admission.enqueue(job.domain, job.id, request)
        self._running[job.id] = Running()

    def hold(self, job: Job) -> None:
        """A job found that cannot be settled now stays as it was found, holding its
        domain (not served: nobody knows whether its backup runs): Abort ends it."""
        self._admission.claim(job.domain, job.id)
        self._running[job.id] = Running()

    async def adopt(self, job: Job) -> None:
        """A job found running (or rebuilt) is this run's: a ready one is served."""
        self.hold(job)
        if job.state == JobState.READY:
            await self.serve(job)

    async def fail_found(self, job: Job, error: str) -> Job:
        """A job found that cannot go on (its backup ended, by the caller) fails."""
        return await self._ending.close(job, JobState.FAILED, error)

    def claimed(self) -> set[str]:
        """The jobs that hold their domains."""
        return self._admission.claimed()

    def watch(self) -> AbstractContextManager[MemoryObjectReceiveStream[Change]]:
        """Every change of any job, in order, while the context lasts (Records.watch)."""
        return self._records.watch()


class _Sink:
    """What the source tells, turned into the jobs' ends (source.Sink): the source
    ended a job's backup without us (a push: with its outcome; any other job failed),
    or its domain stopped."""

    def __init__(self, jobs: Jobs, records: Records, admission: Admission,
                 source: BackupSource, tg: anyio.abc.TaskGroup,
                 lost: Callable[[str], Awaitable[None]]) -> None:
        self._jobs = jobs
        self._records = records
        self._admission = admission
        self._source = source
        self._tg = tg
        self._lost = lost

    async def lost(self, reason: str) -> None:
        await self._lost(reason)

    def ended(self, domain: str, success: bool, error: str | None) -> None:
        if (job := self._claimed_by(domain)) is None:
            return
        if job.kind == Kind.PUSH:
            self._tg.start_soon(self._jobs.push_ended, job.id, success, error)
        else:
            self._tg.start_soon(self._failed, job, error)

    def stopped(self, domain: str, reason: str) -> None:
        if (job := self._claimed_by(domain)) is not None:
            self._tg.start_soon(self._jobs.fail, job.id,
                                f"the domain stopped ({reason}) during the backup")

    def _claimed_by(self, domain: str) -> Job | None:
        """The domain's job that has left the queue and not ended, if any."""
        job_id = self._admission.holder(domain)
        job = self._records.get(job_id) if job_id is not None else None
        return job if job is not None and job.state != JobState.QUEUED else None

    async def _failed(self, job: Job, error: str | None) -> None:
        try:
            reason = await self._source.why_ended(job, error)
        except PullbackError as e:
            reason = f"the backup ended without pullbackd ({error or e})"
        await self._jobs.fail(job.id, reason)


async def _check_owner(job: Job, by: int | None) -> None:
    """A job is its starter's to end (None: anyone's, for a job of an earlier version, or
    `by` nobody in particular: an admin, or pullbackd itself)."""
    if job.owner is not None and by is not None and job.owner != by:
        raise JobOfAnother(job.id, await anyio.to_thread.run_sync(user_name, job.owner))
