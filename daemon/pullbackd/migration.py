"""The migration gate: a domain moves only once its appliances are done with it.

Migrate drains the domain first. No new backup starts (MigrationPending); the
running ones keep serving, and their appliances may still open sessions (one
disk after another). The gate opens when no session is open and every job of
the domain has ended, or, for a pull job, has had no session for [migration]
grace seconds: such a job is then ended as failed, its checkpoint rolled back
(nobody confirmed the data). pullbackd's own copies (streamed, push) are
waited for. Past the drain timeout, the migration is refused (MigrationBlocked)
and every backup goes on untouched, unless forced: then the backups are
aborted and the migration goes ahead.

The domain's chains travel in its own metadata (see chain.py); the pullbackd
where it lands takes them in before its first backup there.
"""

from __future__ import annotations

import math
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from datetime import UTC, datetime

import anyio
import structlog

from .admission import Admission
from .errors import DomainNotRunning, MigrationBlocked, PullbackError
from .jobs import Jobs
from .model import Job, JobState
from .virt import Virt

log = structlog.get_logger()


@dataclass(frozen=True)
class Step:
    """How far a migration has come: draining, migrating, completed or failed."""

    state: str
    #: Draining: the domain's backups still running, and their open sessions.
    jobs: tuple[str, ...] = ()
    sessions: int = 0
    #: Failed: why.
    message: str | None = None


class Migrations:
    def __init__(self, jobs: Jobs, admission: Admission, virt: Virt, grace: float,
                 drain_timeout: float) -> None:
        self._jobs = jobs
        self._admission = admission
        self._virt = virt
        self.grace = grace
        self.drain_timeout = drain_timeout

    async def migrate(self, domain: str, destination: str, *, live: bool = True,
                      copy_storage: bool = False, unsafe: bool = False,
                      drain_timeout: float | None = None, force: bool = False
                      ) -> AsyncGenerator[Step, None]:
        if not (await self._virt.domain(domain)).running:
            raise DomainNotRunning(domain)
        with self._admission.draining(domain):
            deadline = time.monotonic() + (self.drain_timeout if drain_timeout is None
                                           else drain_timeout)
            open_jobs, sessions, _ = self._blockers(domain)
            yield Step("draining", tuple(j.id for j in open_jobs), sessions)
            if not await self._gate(domain, deadline):
                open_jobs, sessions, _ = self._blockers(domain)
                if not force:
                    raise MigrationBlocked(domain, [j.id for j in open_jobs], sessions)
                for job in open_jobs:
                    log.warning("aborting a backup for a forced migration", job=job.id)
                    await self._jobs.abort(job.id)
            for job in self._blockers(domain)[0]:
                await self._jobs.end_for_migration(job.id)
            yield Step("migrating")
            log.info("migrating", domain=domain, destination=destination)
            try:
                # Shielded: libvirt runs it to its end whoever listens.
                with anyio.CancelScope(shield=True):
                    await self._virt.migrate(domain, destination, live=live,
                                             copy_storage=copy_storage, unsafe=unsafe)
            except PullbackError as e:
                log.warning("migration failed", domain=domain, error=str(e))
                yield Step("failed", message=str(e))
                return
            log.info("migrated", domain=domain, destination=destination)
            yield Step("completed")

    def _blockers(self, domain: str) -> tuple[list[Job], int, float]:
        """The domain's jobs still open, their open sessions, and the seconds until the
        gate could open if nothing changes (math.inf: not by waiting alone)."""
        open_jobs = [j for j in self._jobs.all() if j.domain == domain and not j.state.final]
        sessions = sum(j.appliance.active for j in open_jobs if j.appliance)
        wait = 0.0
        for job in open_jobs:
            if job.state == JobState.QUEUED:
                continue  # it never started: nothing to wait for
            if job.appliance is None or job.appliance.idle_since is None:
                wait = math.inf  # a copy of ours, or a session open: only an event helps
                continue
            idle = (datetime.now(UTC) - datetime.fromisoformat(job.appliance.idle_since)
                    ).total_seconds()
            wait = max(wait, self.grace - idle)
        return open_jobs, sessions, max(wait, 0.0)

    async def _gate(self, domain: str, deadline: float) -> bool:
        """Wait until the gate opens (True) or the deadline passes (False)."""
        with self._jobs.watch() as changes:
            while True:
                open_jobs, _, wait = self._blockers(domain)
                if not open_jobs or wait == 0:
                    return True
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                # A job's change (state, session) or the grace running out.
                with anyio.move_on_after(min(left, wait)):
                    await changes.receive()
