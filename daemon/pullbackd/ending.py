"""How a job ends: the one path every end takes (Finish, Abort, a failure, an expiry,
libvirt's word on a push, recovery's verdict), whoever asks for it.

    end      under the job's lock: its copy stops, its sessions close, the source's
             backup ends, then `close`
    close    the end and the checkpoint's fate recorded, then carried out; the
             domain freed (`release`)
    quietly  an end nobody waits on (a timer, the job's own copy, an event): tried
             again until it is done, as a job that cannot end holds its domain

Invariants (jobs.py checks them at every start, through recovery.py):
- A job's end and its checkpoint's fate are one transaction (`close`): only
  `completed` puts the checkpoint in its consumer's chain (chain.py). What a job
  that did not complete stored (push targets, repository files) is removed
  before that transaction, so that a crash anywhere leaves either a completed
  job with everything in place, or a job recovery ends (again) as failed with
  nothing of it left. Once that transaction is done, the end stands. A push is
  recorded completed only once its files are on disk, with their names
  (places.sync_targets): a power cut after that leaves them whole.
- A job's end is shown (Get, List, Watch) only once its checkpoint's fate was
  carried out, and its domain is free from that same instant.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import anyio
import structlog

from . import crash
from .admission import Admission
from .chain import Chains
from .errors import JobNotReady, NoSuchJob
from .logs import logged
from .model import Job, JobState, now
from .places import remove_targets, sync_targets
from .records import Records
from .repository import Repository
from .running import Running
from .serving import Serving
from .source import BackupSource

if TYPE_CHECKING:
    from .state import Store

log = structlog.get_logger()


class Ending:
    """Ends jobs (see above), for jobs.py (which starting.py and recovery.py go through)."""

    def __init__(self, records: Records, store: Store, source: BackupSource, chains: Chains,
                 serving: Serving, repository: Repository, admission: Admission,
                 running: dict[str, Running], view: Callable[[Job], Job],
                 dequeue: Callable[[], None], keep_finished: float) -> None:
        """`running`: the jobs that have not ended (jobs.py's, shared); `view`: a job as
        shown; `dequeue`: start queued jobs that now have room."""
        self._records = records
        self._store = store
        self._source = source
        self._chains = chains
        self._serving = serving
        self._repository = repository
        self._admission = admission
        self._running = running
        self._view = view
        self._dequeue = dequeue
        #: Seconds an ended job stays on record ([jobs] keep_finished; a reload sets it).
        self.keep_finished = keep_finished

    async def end(self, job_id: str, state: JobState, error: str | None = None, *,
                  copied: bool = False) -> Job:
        """End a job (idempotent: an ended job is returned as it is). `copied`: the
        end comes from the job's own copy. Raises NoSuchJob, and JobNotReady for a
        job that cannot complete (nothing was readable)."""
        job = self._records.get(job_id)
        if job is None:
            raise NoSuchJob(job_id)
        running = self._running.get(job_id)
        if running is None:
            return self._view(job)
        async with running.lock:
            job = self._records[job_id]
            if job.state.final:
                return job  # Finish and Abort are idempotent
            readable = job.state == JobState.READY or (copied and job.state == JobState.RUNNING)
            if state == JobState.COMPLETED and not readable:
                # Only what an appliance could read, or our copy stored, completes.
                raise JobNotReady(job.id, job.state)
            if job.state == JobState.QUEUED:
                self._admission.unqueue(job.id)
                with anyio.CancelScope(shield=True):
                    # Its end first: a crash before its request goes leaves a request
                    # whose job ended, which the next start deletes (recovery.py); the
                    # other way round, a queued job without its request, which it failed.
                    job = await self.close(job, state, error)
                    with logged("cannot delete an ended backup's request (the next start "
                                "does)", job=job.id):
                        await self._store.delete_request(job.id)
                    return job
            # Shielded: a backup we ended (its copy stopped too) must be recorded as ended.
            with anyio.CancelScope(shield=True):
                if running.copy is not None and not copied:
                    await running.copy.stop()
                # Sessions first: nobody reads from a job that is ending.
                if running.served is not None:
                    job = dataclasses.replace(job, appliance=await running.served.close())
                crash.point("end.sessions")
                was_running = await self._source.end(job)
                crash.point("end.libvirt")
                if not was_running and state == JobState.COMPLETED:
                    # The exports vanished before the appliance said it was
                    # done: nobody can vouch that it read everything.
                    state, error = JobState.FAILED, "the backup ended before Finish: " \
                        "the domain stopped or the libvirt job was ended outside pullbackd"
                job = await self.close(job, state, error)
        return job

    async def close(self, job: Job, state: JobState, error: str | None) -> Job:
        """Record a job's end and its checkpoint's fate in one transaction, then carry
        the fate out: the checkpoint joins the chain, or is deleted (chain.py)."""
        completed = state == JobState.COMPLETED
        # Its endpoint, if it was served (this run or an earlier one): nobody reads on.
        await self._serving.remove(job.id)
        if not completed:
            # Before the end is recorded: a crash until then ends the job again
            # at the next start, which comes here again; after it, nothing is left.
            await anyio.to_thread.run_sync(remove_targets, job)
            if job.local:
                # Stored files of a job that did not complete are no backups.
                await anyio.to_thread.run_sync(self._repository.forget_job, job.domain,
                                               job.consumer, job.id)
            crash.point("end.cleaned")
        # What it came to: the last progress and per-disk statistics stay on record.
        final = self._view(job)
        running = self._running.get(job.id)
        if running is not None and running.served is not None:
            running.served.timer.cancel()
        job = dataclasses.replace(job, state=state, ended=now(), error=error,
                                  progress=final.progress, disks=tuple(
                                      dataclasses.replace(d, rate=None, eta=None)
                                      for d in final.disks))
        checkpoint = self._chains.outcome(job.checkpoint, completed)
        job = await self._records.save(job, checkpoint, show=False)
        crash.point("end.recorded")
        if checkpoint is not None:
            try:
                await self._chains.settle(checkpoint)
            except Exception:
                # The outcome is recorded and stays: trying the end again would decide it
                # anew. A checkpoint to delete is deleted at the next start (or the
                # domain's next backup); a chain to trim, at its next backup.
                log.exception("cannot carry out the checkpoint's fate yet", job=job.id,
                              checkpoint=checkpoint.name, state=checkpoint.state)
        # Shown once libvirt has followed it (the checkpoint deleted, or in the chain and
        # the domain's metadata): whoever sees the end can start the next backup.
        self._records.show(job)
        self.release(job.id, job.domain)
        log.info("backup ended", job=job.id, domain=job.domain, state=job.state, error=error)
        with logged("cannot forget old jobs (the next end tries again)"):
            await self._records.forget_old(self.keep_finished)
        return job

    def release(self, job_id: str, domain: str) -> None:
        """The job no longer holds its domain (nor a place under max_active). Only
        once its end is shown: until then, whoever would end it too waits for its
        lock, and then finds it ended."""
        self._running.pop(job_id, None)
        if self._admission.release(job_id, domain):
            self._dequeue()

    async def push_ended(self, job_id: str, success: bool, error: str | None) -> None:
        """libvirt ended a push: its outcome is libvirt's word (the event may come while
        Start still holds the job: the lock makes it wait)."""
        state = JobState.COMPLETED if success else JobState.FAILED
        why = None if success else error or "libvirt: push failed"
        await _until_done(job_id, lambda: self._push_ended(job_id, state, why),
                          state=state, reason=why)

    async def _push_ended(self, job_id: str, state: JobState, reason: str | None) -> None:
        """Record the outcome libvirt gave a push (its backup has ended: nothing to end)."""
        running = self._running.get(job_id)
        if running is None:
            return
        async with running.lock:
            job = self._records[job_id]
            if job.state != JobState.RUNNING:
                return
            with anyio.CancelScope(shield=True):  # the outcome must be recorded
                if state == JobState.COMPLETED:
                    try:
                        await anyio.to_thread.run_sync(sync_targets, job)
                    except OSError as e:
                        state, reason = JobState.FAILED, (
                            f"its files cannot be written to disk ({e}): they are no "
                            "backup; start it again once that folder's file system works")
                await self.close(job, state, reason)

    async def quietly(self, job_id: str, state: JobState, reason: str | None, *,
                      copied: bool = False) -> None:
        """End a job nobody is waiting on (`end`)."""
        await _until_done(job_id, lambda: self.end(job_id, state, reason, copied=copied),
                          state=state, reason=reason)


async def _until_done(job_id: str, end: Callable[[], Awaitable[object]],
                      **context: object) -> None:
    """Run `end` for a job nobody is waiting on, where an error can only be logged:
    it is tried again (a job that cannot end holds its domain) after 1, 2, 4... s,
    at most a minute apart, until it ended."""
    delay = 1.0
    while True:
        try:
            await end()
            return
        except Exception:
            log.exception("could not end a job; trying again", job=job_id, seconds=delay,
                          **context)
        await anyio.sleep(delay)
        delay = min(delay * 2, 60.0)
