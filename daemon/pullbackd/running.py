"""What a job holds until it has ended (jobs.py keeps one per job, starting.py makes
them): the lock every change of the job's state happens under, its endpoint while
served, its copy while running; and the job as shown with what they know."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import UTC, datetime

import anyio

from .copying import Copy
from .model import Disk, Job, JobState, Kind
from .serving import Served, appliance


@dataclass
class Running:
    """What a job holds until it has ended."""

    #: Every change of the job's state happens under it.
    lock: anyio.Lock = dataclasses.field(default_factory=anyio.Lock)
    #: Pull: its endpoint and limits, while ready.
    served: Served | None = None
    #: Stream: pullbackd's copy, while running.
    copy: Copy | None = None

    def view(self, job: Job) -> Job:
        """The job with what changes too often to be stored: progress, sessions, and
        each disk's statistics."""
        if self.copy is not None:
            job = dataclasses.replace(job, progress=self.copy.live.view())
        if self.served is not None:
            job = dataclasses.replace(job, appliance=appliance(self.served.endpoint))
        if job.disks and job.kind != Kind.PUSH:
            job = dataclasses.replace(job, disks=tuple(
                self._disk(job, i, disk) for i, disk in enumerate(job.disks)))
        return job

    def _disk(self, job: Job, i: int, disk: Disk) -> Disk:
        if self.copy is not None:
            transfer, done, seconds = self.copy.live.disk(i)
        else:
            # Read by appliances, since the exports were up.
            served = self.served
            transfer = served.transfers.get(disk.name) if served else None
            done = served.endpoint.bytes_read(disk.name) if served else sum(
                s.bytes_read for s in (job.appliance.sessions if job.appliance else ())
                if s.disk == disk.name)
            ready = next((t.at for t in job.history if t.state == JobState.READY), None)
            seconds = (datetime.now(UTC) - datetime.fromisoformat(ready)).total_seconds() \
                if ready else 0.0
        rate = int(done / seconds) if seconds > 0 else 0
        left = None if transfer is None else max(transfer - done, 0)
        eta = None if left is None else 0 if not left else int(left / rate) if rate else None
        return dataclasses.replace(disk, transfer=transfer, done=done, rate=rate, eta=eta)
