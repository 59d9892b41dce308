"""Serving a pull job to its appliances: the job's endpoint (exports.py), its
limits ([exports] idle_timeout and max_lifetime), and how much each disk holds
for them to read.

A pull job is served from the moment it is ready until it ends; `Served.close`
is its last step, and cuts nobody off who has not been given the drain time
(`Served.drain`, Finish's wait).
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import quote

import anyio
import anyio.abc
import structlog

from . import stream
from .errors import SessionsActive
from .exports import Endpoint, Exports, OnSession
from .model import Appliance, Disk, Job, Kind, nbd_url
from .source import BackupSource, Begun

log = structlog.get_logger()

#: Measuring a disk blocks a thread for a while: a few at a time, apart from
#: the threads libvirt and the database calls need.
_MEASURE = anyio.CapacityLimiter(4)

#: Ends a job that expired: (job id, why).
Expire = Callable[[str, str], Awaitable[None]]


@dataclass(frozen=True)
class Limits:
    """How long a pull job waits for its appliances ([exports] in the configuration)."""

    #: Seconds Finish waits for open sessions to close.
    drain_timeout: float = 30.0
    #: Seconds without any session before the job expires; 0: never.
    idle_timeout: float = 3600.0
    #: Seconds a pull job may run at most; 0: no limit.
    max_lifetime: float = 0.0


def appliance(endpoint: Endpoint) -> Appliance:
    return Appliance(endpoint.active, endpoint.total, endpoint.bytes_read(),
                     endpoint.idle_since, tuple(endpoint.sessions()))


class Served:
    """One pull job being served: its endpoint, its limits' timer, and the bytes of
    data each disk holds for the appliances (measured in the background)."""

    def __init__(self, endpoint: Endpoint, exports: Exports) -> None:
        self.endpoint = endpoint
        self.transfers: dict[str, int] = {}
        self.timer = anyio.CancelScope()
        self._exports = exports

    async def drain(self, seconds: float) -> None:
        """Give open sessions `seconds` to close; raises SessionsActive if
        some stay open."""
        if self.endpoint.active:
            with anyio.move_on_after(seconds):
                await self.endpoint.drained()
            if self.endpoint.active:
                raise SessionsActive(self.endpoint.job_id, self.endpoint.active, seconds)

    async def close(self) -> Appliance:
        """Stop serving: sessions are closed, the endpoint removed. How it was used."""
        self.timer.cancel()
        endpoint = await self._exports.close(self.endpoint.job_id)
        return appliance(endpoint or self.endpoint)


class Serving:
    def __init__(self, exports: Exports, source: BackupSource, limits: Limits,
                 remote: str | None = None) -> None:
        """`remote`: "nbds://host:port" of the TCP endpoint, if there is one."""
        self.exports = exports
        self.limits = limits
        self._source = source
        self._remote = remote

    def disks(self, job: Job, begun: Begun, sizes: dict[str, int],
              fallbacks: dict[str, str | None]) -> tuple[Disk, ...]:
        """A job's disks as the source began them; a pull job's with the URIs its
        appliances read them at (its endpoint, and the TCP endpoint if there is one)."""
        disks = []
        for d in begun.disks:
            # Appliances read it: a pull job, not one pullbackd streams itself.
            read = d.export if job.kind == Kind.PULL else None
            disks.append(Disk(
                name=d.name, size=sizes[d.name],
                mode="incremental" if d.since else "full",
                export=d.export,
                url=nbd_url(self.exports.endpoint_path(job.id), read) if read else None,
                remote_url=f"{self._remote}/{quote(read, safe='')}"
                if read and self._remote else None,
                bitmap=d.bitmap, since=d.since, fallback=fallbacks.get(d.name),
                target=str(d.target) if d.target else None))
        return tuple(disks)

    async def open(self, job: Job, tg: anyio.abc.TaskGroup, on_session: OnSession,
                   expire: Expire) -> Served:
        """Open the job's endpoint for appliances (with the sessions it had, after a
        restart), and watch its limits: `expire` ends it."""
        endpoint = await self.exports.open(
            job.id, {str(d.export): d.name for d in job.disks}, tg, on_session,
            job.appliance.sessions if job.appliance else (),
            job.appliance.earlier if job.appliance else (0, 0))
        served = Served(endpoint, self.exports)
        tg.start_soon(self._expire, job, served, expire)
        tg.start_soon(self._measure, job, served)
        return served

    async def remove(self, job_id: str) -> None:
        """Remove the job's endpoint, if one is left (closing it first if open)."""
        await self.exports.close(job_id)

    async def _measure(self, job: Job, served: Served) -> None:
        """Find how much each disk holds for the appliance to read (for Get's ETA)."""
        for disk in job.disks:
            url = nbd_url(self._source.socket(job), str(disk.export))
            try:
                served.transfers[disk.name] = await anyio.to_thread.run_sync(
                    stream.transfer_size, url, disk.bitmap, limiter=_MEASURE)
            except Exception as e:  # the job may have ended meanwhile: only a statistic
                log.debug("could not measure a disk", job=job.id, disk=disk.name, error=str(e))
                return

    async def _expire(self, job: Job, served: Served, expire: Expire) -> None:
        """End the job as expired when no appliance used it for `idle_timeout`, or when
        it outlived `max_lifetime`. The timer is cancelled when the job ends otherwise."""
        limits = self.limits
        with served.timer:
            # From when it became ready, not from its Start: a job that waited its turn in
            # the queue ([jobs] max_active) gets the whole lifetime. Only a job served again
            # after a restart has been ready before (a new one is saved ready once served).
            ready = job.ready_since
            age = (datetime.now(UTC) - datetime.fromisoformat(ready)).total_seconds() \
                if ready else 0.0
            reason = (f"it ran for [exports] max_lifetime ({limits.max_lifetime:g} s); "
                      "appliances must finish sooner, or the limit be raised")
            with anyio.move_on_after(limits.max_lifetime - age if limits.max_lifetime
                                     else math.inf):
                if not limits.idle_timeout:
                    await anyio.sleep_forever()
                await served.endpoint.idle_for(limits.idle_timeout)
                reason = (f"no appliance used it for [exports] idle_timeout "
                          f"({limits.idle_timeout:g} s)")
        if served.timer.cancel_called:
            return  # the job ended otherwise
        log.warning("backup expired", job=job.id, reason=reason)
        # Outside the timer's scope: ending the job cancels the timer.
        await expire(job.id, reason)
