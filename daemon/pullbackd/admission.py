"""Admission: which backup may start now, which waits, and which is refused.

- One job per domain (libvirt allows one backup job per domain, and would make a
  second caller wait 30 s on its job lock and then fail): a domain is *claimed*
  by its job from the moment Start accepts it until the job has ended.
- At most `[jobs] max_active` claimed jobs run; the others wait in the queue, in
  order, or are refused (TooManyJobs) if they asked not to wait.
- A domain being drained for a migration (migration.py) takes no new backup.

In memory only: jobs.py stores the queued requests, and rebuilds the claims
and the queue from the state database at start.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from .errors import BackupInProgress, MigrationPending, TooManyJobs
from .model import StartRequest


class Admission:
    def __init__(self, max_active: int = 0) -> None:
        """`max_active`: 0 for no limit."""
        self.max_active = max_active
        #: domain -> the id of its job that has not ended.
        self._claims: dict[str, str] = {}
        #: Queued jobs in order, and what each asked for.
        self._queue: dict[str, StartRequest] = {}
        self._draining: set[str] = set()

    def holder(self, domain: str) -> str | None:
        """The job that claims the domain, if any."""
        return self._claims.get(domain)

    def claimed(self) -> set[str]:
        return set(self._claims.values())

    def admit(self, request: StartRequest) -> bool:
        """Whether a new job of `request` may start now (True) or must wait in the
        queue (False). Raises MigrationPending, BackupInProgress, or TooManyJobs
        for a request that asked not to wait."""
        self.check(request.domain)
        if self._queue or self._full():
            if not request.queue:
                raise TooManyJobs(self.max_active, self._running())
            return False
        return True

    def check(self, domain: str) -> None:
        """Raise MigrationPending or BackupInProgress if no job of `domain` may start."""
        self.check_drain(domain)
        if domain in self._claims:
            raise BackupInProgress(domain, self._claims[domain])

    def check_drain(self, domain: str) -> None:
        """Raise MigrationPending if a migration drains `domain` (a queued job's turn)."""
        if domain in self._draining:
            raise MigrationPending(domain)

    def claim(self, domain: str, job_id: str) -> None:
        """Claim the domain for a job (check() first, with no await in between)."""
        self.check(domain)
        self._claims[domain] = job_id

    def enqueue(self, domain: str, job_id: str, request: StartRequest) -> int:
        """Claim the domain for a job that waits; its place in the queue, from 1."""
        self.claim(domain, job_id)
        self._queue[job_id] = request
        return len(self._queue)

    def position(self, job_id: str) -> int | None:
        """A queued job's place in the queue, from 1."""
        return list(self._queue).index(job_id) + 1 if job_id in self._queue else None

    def unqueue(self, job_id: str) -> StartRequest | None:
        """Take a job out of the queue (it starts, or was aborted); its request."""
        return self._queue.pop(job_id, None)

    def ready(self) -> Iterator[tuple[str, StartRequest]]:
        """Queued jobs, oldest first, while there is room for one more to run: each
        taken out of the queue (it holds its place under max_active from then on)."""
        while self._queue and not self._full():
            job_id = next(iter(self._queue))
            yield job_id, self._queue.pop(job_id)

    def release(self, job_id: str, domain: str) -> bool:
        """The job no longer holds its domain (nor a place under max_active).
        Whether it did."""
        if self._claims.get(domain) != job_id:
            return False
        del self._claims[domain]
        return True

    @contextmanager
    def draining(self, domain: str) -> Iterator[None]:
        """No backup of `domain` starts while the context lasts (a migration's
        drain). Raises MigrationPending if one is draining it already."""
        if domain in self._draining:
            raise MigrationPending(domain)
        self._draining.add(domain)
        try:
            yield
        finally:
            self._draining.discard(domain)

    def _running(self) -> int:
        """Jobs that hold a place under max_active: claimed, and not waiting."""
        return len(self._claims) - len(self._queue)

    def _full(self) -> bool:
        return bool(self.max_active) and self._running() >= self.max_active
