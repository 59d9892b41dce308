"""Recovery: what a start of the daemon does with what an earlier run left, before it
serves anyone.

    queued    queued again from their stored requests (a job whose request is gone
              fails; a request whose job left the queue is deleted)
    frozen    the guests of jobs that may have frozen them (quiesce.py: recorded
              before the freeze, until the thaw was answered) thawed, before anything
              that may fail; if the agent does not answer, once it does. The guest of
              a job that did not freeze, or whose thaw was answered, is left as it
              is: it may be frozen by someone else. quiesce.py's invariant checked
              (such a job is still starting)
    jobs      adopted where the source still runs them (a ready pull job is served
              again, a push runs on); failed, their backups ended, where they cannot
              go on: a copy of pullbackd's own died with it, a pull job's exports are
              out of reach; held as found where the source cannot tell now (a domain
              whose QEMU does not answer must not keep every other domain from its
              backups): its domain stays taken until Abort ends it, or a next start
    chains    chain.py's invariant checked (a checkpoint in a chain whose job did
              not complete is rolled back), the domains' metadata rewritten where
              it does not carry their chains (a crash before it followed a job's
              end), and what the repository holds of jobs that did not complete
              removed
    unowned   backups of ours the source runs for no job we know (the state database
              was lost): rebuilt as ready jobs where their checkpoint names a consumer,
              so that their appliances read on; ended otherwise
    leftovers what backups of jobs that do not run left behind, swept
    thaws     the thaws an earlier run still owed guests whose agent did not answer,
              asked for again (quiesce.Thaws)

Each step (a thaw, a job, each phase after) tells `progress` what it begins: under
systemd, the start may take that step's time more than the unit's timeout (a thaw the
agent does not answer, a backup libvirt is slow to end: many jobs found took longer than
a start may, and systemd ended each start, again and again).

It changes jobs only through `Jobs`' recovery interface (`requeue`, `adopt`, `hold`,
`fail_found`), so that jobs.py's invariants hold as they do for any other change.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING

import anyio
import structlog

from . import quiesce
from .errors import PullbackError
from .model import Checkpoint, CheckpointState, Job, JobState, Kind, StartRequest, Transition, lost
from .names import checkpoint_name

if TYPE_CHECKING:
    from .chain import Chains
    from .jobs import Jobs
    from .records import Records
    from .repository import Repository
    from .serving import Serving
    from .source import BackupSource
    from .state import Store

log = structlog.get_logger()


class Recovery:
    def __init__(self, jobs: Jobs, records: Records, store: Store, source: BackupSource,
                 chains: Chains, repository: Repository, serving: Serving) -> None:
        self._jobs = jobs
        self._records = records
        self._store = store
        self._source = source
        self._chains = chains
        self._repository = repository
        self._serving = serving

    async def run(self, keep_finished: float, progress: Callable[[str], None]) -> None:
        """Everything above, in that order; ended jobs older than `keep_finished`
        seconds are forgotten first."""
        self._records.load()
        await self._records.forget_old(keep_finished)
        await self._queued()
        await self._thaw(progress)
        found = [j for j in self._records.all()
                 if not j.state.final and j.state != JobState.QUEUED]
        for i, job in enumerate(found, 1):
            progress(f"recovering: job {job.id} of {job.domain} ({i} of {len(found)})")
            try:
                await self._found(job)
            except PullbackError as e:
                log.error("cannot settle a backup found at start: it holds its domain "
                          "until Abort ends it, or a next start settles it", job=job.id,
                          domain=job.domain, state=job.state, error=str(e))
                self._jobs.hold(job)
        progress("recovering: checking the chains")
        await self._check_chains()
        progress("recovering: backups no job owns")
        await self._take_in_unowned()
        # What a lost database or a crash of libvirtd left, of jobs that do not run (a
        # job failed here had its own removed already).
        progress("recovering: what ended backups left")
        await anyio.to_thread.run_sync(self._source.sweep, self._jobs.claimed())
        self._jobs.thaws.resume(self._source, self._records.get)

    async def _queued(self) -> None:
        requests = self._store.load_requests()
        queued = [j for j in self._records.all() if j.state == JobState.QUEUED]
        for job_id in requests.keys() - {j.id for j in queued}:
            # Its job left the queue and was recorded; a crash came before this went.
            await self._store.delete_request(job_id)
        for job in queued:
            if job.id in requests:
                self._jobs.requeue(job, StartRequest(**requests[job.id]))
            else:
                await self._jobs.fail_found(job, "its request was lost")

    async def _thaw(self, progress: Callable[[str], None]) -> None:
        """A crash may have come while a guest was frozen, or its freeze asked: the guest
        of each job that may have frozen it, thawed (quiesce.py)."""
        for job_id, domain in self._store.load_freezes().items():
            job = self._records.get(job_id)
            if job is None:  # forgotten since: days have passed
                await self._store.delete_freeze(job_id)
                continue
            if job.state != JobState.STARTING:
                log.warning("a freeze of the guest was not recorded over (a write of the "
                            "state database failed?): thawing the guest", job=job_id,
                            domain=domain, state=job.state)
            progress(f"recovering: thawing the guest of {domain} (job {job_id})")
            thawed = await quiesce.thaw(self._source, job, attempts=1)
            await self._jobs.thaws.over(self._source, job, thawed=thawed.thawed)

    async def _found(self, job: Job) -> None:
        """A job that had begun and not ended: adopted, or ended as failed."""
        runs = await self._source.running(job)
        if runs and job.kind == Kind.PULL and not await self._source.reachable(job):
            # Adopted, it could not be read: nothing reaches QEMU's exports.
            await self._source.end(job)
            await self._jobs.fail_found(job, (
                "the source's NBD socket was removed while pullbackd was down (was its "
                "runtime folder removed?); the appliance must start a new backup"))
            return
        # A copy of pullbackd's own died with it: such a job cannot be adopted.
        if runs and (job.state == JobState.READY or (
                job.state == JobState.RUNNING and job.kind == Kind.PUSH)):
            await self._jobs.adopt(job)
            log.info("adopted running backup", job=job.id, domain=job.domain)
            return
        await self._source.end(job)
        await self._jobs.fail_found(job, lost(job, runs))

    async def _check_chains(self) -> None:
        """chain.py's invariant: a checkpoint is in a chain if and only if its job
        completed. Also delete what an earlier run could not (or crashed before it
        did), rewrite the domains' metadata that does not carry their chains, and
        remove what the repository holds of jobs that did not complete."""
        claimed = self._jobs.claimed()
        await self._chains.check(self._jobs.did_not_complete, claimed)
        stored = await anyio.to_thread.run_sync(self._repository.stored_jobs)
        for job_id in stored:
            job = self._records.get(job_id)
            if job is not None and job.state != JobState.COMPLETED and job.id not in claimed:
                log.error("BUG: the repository holds a backup of a job that did not "
                          "complete; removing it", job=job_id, state=job.state)
                await anyio.to_thread.run_sync(self._repository.forget_job, job.domain,
                                               job.consumer, job.id)

    async def _take_in_unowned(self) -> None:
        """Pull backups the source runs for jobs of ours that no record owns (the state
        database was lost or replaced): rebuild each job from the source's word, so
        that its appliance can read on and Finish it; end those that cannot be
        rebuilt, as nobody could Finish them and each would block every Start of its
        domain."""
        for found in await self._source.unowned(
                busy=lambda domain: self._jobs.active(domain) is not None):
            if found.job_id in self._records or found.consumer is None:
                log.error("ending a backup of pullbackd's that no job owns; its appliances "
                          "must start again", domain=found.domain, job=found.job_id,
                          checkpoints=found.checkpoints)
                await self._source.end_unowned(found)
                continue
            # Taken in first, so that what is written into the domain's metadata later
            # (when this job completes) holds the chains it carries.
            await self._chains.take_in(found.domain, refused=self._jobs.did_not_complete)
            name = checkpoint_name(found.consumer, found.job_id)
            created = self._chains.after_newest(found.domain, found.consumer, found.created)
            # Ready since libvirt began it, as far as anyone can tell: its limits
            # ([exports] max_lifetime) count from then, not from this restart.
            job = Job(found.job_id, found.domain, JobState.READY, "full", created,
                      found.consumer, name, history=(Transition(JobState.READY, created),))
            disks = self._serving.disks(job, found.begun, found.sizes, {})
            since = next((d.since for d in disks if d.since), None)
            checkpoint = Checkpoint(
                name, found.domain, found.consumer, found.job_id, created,
                CheckpointState.PENDING, found.bitmaps, found.checkpoint_xml,
                tuple(d.name for d in disks if d.since is None))
            # In one transaction, as a Start records them: a job adopted without its
            # checkpoint would complete with nothing joining the chain.
            job = await self._records.save(dataclasses.replace(
                job, mode="incremental" if since else "full", since=since, disks=disks),
                checkpoint)
            self._chains.recorded(checkpoint)
            log.error("rebuilt a running backup the state database did not know (was the "
                      "database lost?) from libvirt: appliances can read on and finish it",
                      domain=found.domain, job=found.job_id, consumer=found.consumer)
            await self._jobs.adopt(job)
