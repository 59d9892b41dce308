"""Which source serves a job: libvirt's backups while the domain runs (LibvirtSource),
pullbackd's own while it is shut off (OfflineSource).

A job's source is chosen once, at its start, from the domain's state then, and recorded
with it (`Job.offline`): it stays the job's source for its whole life, restarts of
pullbackd included. jobs.py sees one BackupSource; this one passes each call on.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import anyio
import anyio.abc

from .chain import Base
from .domainfiles import DomainFiles
from .errors import DomainNotRunning
from .model import Job, Kind, Scratch
from .offline import OfflineSource
from .source import Begun, LibvirtSource, Plan, Sink, Unowned
from .virt import Virt


class Sources:
    def __init__(self, virt: Virt, online: LibvirtSource, offline: OfflineSource) -> None:
        self._virt = virt
        self.online = online
        self.offline = offline

    def _of(self, job: Job) -> LibvirtSource | OfflineSource:
        return self.offline if job.offline else self.online

    async def plan(self, domain: str, wanted: list[str] | None, kind: Kind) -> Plan:
        # The running domain first, as most are: one look at the domain, not two.
        try:
            return await self.online.plan(domain, wanted, kind)
        except DomainNotRunning:
            return await self.offline.plan(domain, wanted, kind)

    async def begin(self, job: Job, plan: Plan, bases: dict[str, Base]) -> None:
        await self._of(job).begin(job, plan, bases)

    async def files(self, job: Job, plan: Plan) -> DomainFiles:
        return await self._of(job).files(job, plan)

    async def freeze(self, job: Job, mountpoints: list[str] | None) -> int:
        return await self._of(job).freeze(job, mountpoints)

    async def thaw(self, job: Job) -> int:
        return await self._of(job).thaw(job)

    async def exports(self, job: Job, bases: dict[str, Base]) -> Begun:
        return await self._of(job).exports(job, bases)

    def socket(self, job: Job) -> Path:
        return self._of(job).socket(job)

    async def running(self, job: Job) -> bool:
        return await self._of(job).running(job)

    async def reachable(self, job: Job) -> bool:
        return await self._of(job).reachable(job)

    async def end(self, job: Job) -> bool:
        return await self._of(job).end(job)

    async def why_ended(self, job: Job, error: str | None) -> str:
        return await self._of(job).why_ended(job, error)

    def sweep(self, running: set[str]) -> None:
        self.online.sweep(running)
        self.offline.sweep(running)

    async def cause(self, job: Job) -> str | None:
        return await self._of(job).cause(job)

    async def usage(self, job: Job) -> Scratch | None:
        return await self._of(job).usage(job)

    async def follow(self, sink: Sink, started: Callable[[], None]) -> None:
        """Both sources' news; when libvirt is lost (the online source returns), so is
        this."""
        async with anyio.create_task_group() as tg:
            await tg.start(_follow, self.offline, sink)
            await self.online.follow(sink, started)
            tg.cancel_scope.cancel()

    async def unowned(self, busy: Callable[[str], bool]) -> list[Unowned]:
        return [*await self.online.unowned(busy), *await self.offline.unowned(busy)]

    async def end_unowned(self, backup: Unowned) -> None:
        await self.online.end_unowned(backup)


async def _follow(source: OfflineSource, sink: Sink, *,
                  task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
    await source.follow(sink, task_status.started)
