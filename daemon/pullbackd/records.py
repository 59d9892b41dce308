"""The job records: every job the daemon knows, as stored, and who sees them.

A record changes in one way: `save` stores it (state.py: durable before anyone
hears of it), then shows it to Get and List and publishes it to the watchers.
`save(..., show=False)` stores without showing: ending.py shows a job's end only
once its checkpoint's fate was carried out.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import anyio
import structlog
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from .model import Change, Checkpoint, Job, Transition, brief, now
from .names import new_job_id

if TYPE_CHECKING:
    from .state import Store

log = structlog.get_logger()

#: Job changes a watcher may fall behind by before it is cut off.
WATCH_BUFFER = 1024


class Records:
    def __init__(self, store: Store, view: Callable[[Job], Job]) -> None:
        """`view`: a record as shown (with what changes too often to be stored)."""
        self._store = store
        self._view = view
        self._jobs: dict[str, Job] = {}
        self._watchers: set[MemoryObjectSendStream[Change]] = set()

    def load(self) -> None:
        """The jobs of the earlier runs, as stored."""
        for job in self._store.load_jobs():
            self._jobs[job.id] = job

    def get(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    def __getitem__(self, job_id: str) -> Job:
        return self._jobs[job_id]

    def __contains__(self, job_id: str) -> bool:
        return job_id in self._jobs

    def all(self) -> list[Job]:
        return list(self._jobs.values())

    def new_id(self) -> str:
        while (job_id := new_job_id()) in self._jobs:
            pass
        return job_id

    async def save(self, job: Job, checkpoint: Checkpoint | None = None, *,
                   show: bool = True, files: str | None = None) -> Job:
        """Store the job (a new state joins its history, its error is kept `brief`), with
        its checkpoint's new state and its domain's files in the same transaction if
        given, and (unless not `show`) show it. The job as stored."""
        before = self._jobs.get(job.id)
        history = before.history if before is not None and \
            len(before.history) > len(job.history) else job.history
        # A new job's own history counts as its last state's (a rebuilt job's: recovery.py).
        last = before.state if before is not None else history[-1].state if history else None
        if last != job.state or not history:
            history = (*history, Transition(job.state, now()))
        job = dataclasses.replace(job, history=history, error=brief(job.error))
        await self._store.save_job(job, checkpoint, files)
        if show:
            self.show(job)
        return job

    async def update(self, job: Job) -> None:
        """Store what changed of a job without a change of state (its sessions):
        watchers heard of it already."""
        await self._store.save_job(job)
        self._jobs[job.id] = job

    def show(self, job: Job) -> None:
        self._jobs[job.id] = job
        self.publish(Change("state", self._view(job)))

    def publish(self, change: Change) -> None:
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
        """Every change of any job, in order, while the context lasts; the stream ends
        (EndOfStream) for a watcher that falls WATCH_BUFFER changes behind."""
        send, receive = anyio.create_memory_object_stream[Change](WATCH_BUFFER)
        self._watchers.add(send)
        try:
            yield receive
        finally:
            self._watchers.discard(send)
            send.close()
            receive.close()

    async def forget_old(self, keep: float) -> None:
        """Drop jobs that ended over `keep` seconds ago."""
        cutoff = (datetime.now(UTC) - timedelta(seconds=keep)).isoformat(
            timespec="milliseconds").replace("+00:00", "Z")
        old = [j.id for j in self._jobs.values()
               if j.state.final and j.ended is not None and j.ended < cutoff]
        if old:
            await self._store.forget_jobs(old)
            for job_id in old:
                del self._jobs[job_id]
            log.info("forgot old jobs", jobs=len(old))
