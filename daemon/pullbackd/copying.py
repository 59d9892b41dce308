"""pullbackd's own copy of a streamed job: each disk, one after another, from the
source's export to the job's destination (the repository, or an appliance's NBD
server), and the copy's progress.

A copy into the repository commits its files only once every disk arrived, the
domain's own files (domainfiles.py) first;
whatever way it ends otherwise, no partial file outlives it (repository.py).
jobs.py decides what the copy's end makes of the job.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import anyio
import structlog

from . import crash, stream
from .domainfiles import DomainFiles
from .errors import PullbackError
from .manifest import recorder
from .model import LOCAL, Disk, Job, Progress, nbd_url
from .repository import Repository, Writer
from .source import BackupSource

log = structlog.get_logger()


@dataclass
class Live:
    """A running copy's progress across the job's disks, which go one after another."""

    sizes: list[int]
    started: float = field(default_factory=time.monotonic)
    #: Disks done, and the bytes they took.
    index: int = 0
    finished: int = 0
    #: The disk being copied now.
    current: stream.Progress | None = None
    #: Per disk: when its copy started and ended, and how it ended.
    starts: list[float] = field(default_factory=list)
    ends: list[float] = field(default_factory=list)
    results: list[stream.Progress] = field(default_factory=list)

    def disk_started(self) -> None:
        self.starts.append(time.monotonic())

    def disk_done(self, progress: stream.Progress) -> None:
        self.index += 1
        self.finished += progress.done
        self.current = None
        self.ends.append(time.monotonic())
        self.results.append(progress)

    def disk(self, i: int) -> tuple[int | None, int, float]:
        """Disk i: bytes to transfer (None until its extents are all read), done, seconds."""
        if i < self.index:
            r = self.results[i]
            return r.planned, r.done, self.ends[i] - self.starts[i]
        if i == self.index and self.current is not None:
            c = self.current
            return (c.planned if c.scanned >= c.size else None, c.done,
                    time.monotonic() - self.starts[i])
        return None, 0, 0.0

    def view(self) -> Progress:
        current = self.current
        done = self.finished + (current.done if current else 0)
        # Until a disk's extents are all read, what is left of it is estimated
        # from what was read so far; later disks from the same ratio.
        ratio = current.planned / current.scanned if current and current.scanned else 1.0
        here = (current.planned + (current.size - current.scanned) * ratio if current
                else self.sizes[self.index] if self.index < len(self.sizes) else 0)
        total = max(done, int(self.finished + here + sum(self.sizes[self.index + 1:]) * ratio))
        elapsed = time.monotonic() - self.started
        rate = int(done / elapsed) if elapsed > 0 else 0
        return Progress(done, total, rate, int((total - done) / rate) if rate else None)


class Copy:
    """One job's copy: `run` it once; `stop` cancels it and waits until it is over."""

    def __init__(self, job: Job, source: BackupSource, repository: Repository,
                 tuning: stream.Tuning, files: DomainFiles) -> None:
        """`files`: the domain's own files the backup began with, for the repository."""
        if not job.disks:
            raise AssertionError(f"job {job.id} has no disks to copy")
        self.job = job
        self.live = Live([d.size for d in job.disks])
        self._source = source
        self._repository = repository
        self._tuning = tuning
        self._files = files
        self._scope = anyio.CancelScope()
        self._over = anyio.Event()

    @property
    def stopped(self) -> bool:
        """Whether `stop` cancelled it (whoever stopped it ends the job)."""
        return self._scope.cancel_called

    async def stop(self) -> None:
        self._scope.cancel()
        await self._over.wait()

    async def run(self) -> str | None:
        """Copy every disk; None if every byte arrived (and, for the repository, is
        stored) or it was stopped, else what went wrong."""
        job = self.job
        writers: list[Writer] = []
        try:
            with self._scope:
                for disk in job.disks:
                    self.live.disk_started()
                    writer = None
                    if job.destination == LOCAL:
                        writer = await self._open_writer(disk)
                        writers.append(writer)
                    target = writer.url if writer else str(job.destination).replace(
                        "{disk}", disk.name)
                    result = await stream.stream(
                        self._url(disk), target, bitmap=disk.bitmap,
                        zeroed_destination=writer is not None and disk.mode == "full",
                        tuning=self._tuning,
                        on_progress=_follower(self.live, writer),
                        checksums=recorder(writer.regions) if writer else None,
                        cluster=writer.cluster if writer else None, size=disk.size,
                        # An appliance's socket, as the job's places were checked,
                        # and its starter's (root may send one anywhere allowed).
                        pinned=None if writer is not None else stream.Pinned(job.owner or None))
                    self.live.disk_done(result)
                if job.destination == LOCAL:
                    await self._repository.store_files(job.domain, job.consumer,
                                                       job.checkpoint, self._files)
                    crash.point("commit.files")
                for writer in writers:
                    await self._repository.commit(writer)
                writers.clear()
                crash.point("commit.stored")
            return None
        except Exception as e:
            log.warning("streaming failed", job=job.id, error=str(e))
            cause = None
            if not await anyio.to_thread.run_sync(stream.reachable, self._url(job.disks[0])):
                # The source's side went away: its word tells the cause better than
                # what the copy saw of it.
                try:
                    cause = await self._source.cause(job)
                except PullbackError as source_error:
                    log.warning("cannot tell why the copy failed", job=job.id,
                                error=str(source_error))
            return f"{cause} (the copy failed: {e})" if cause else \
                f"streaming to {job.destination} failed: {e}"
        finally:
            with anyio.CancelScope(shield=True):  # no partial file may outlive the copy
                for writer in writers:
                    await self._repository.abort(writer)
            self._over.set()

    def _url(self, disk: Disk) -> str:
        # Straight from the source: the endpoint is for appliances.
        return nbd_url(self._source.socket(self.job), str(disk.export))

    async def _open_writer(self, disk: Disk) -> Writer:
        job = self.job
        base = None if disk.since is None else await anyio.to_thread.run_sync(
            self._repository.at, job.domain, job.consumer, disk.name, disk.since)
        return await self._repository.begin(job.domain, job.consumer, disk.name, disk.size,
                                            job.id, job.checkpoint, job.created, base,
                                            tuple(d.name for d in job.disks))


def _follower(live: Live, writer: Writer | None) -> Callable[[stream.Progress], None]:
    """The copy's progress, for the job's statistics and the repository's write-behind."""
    def follow(progress: stream.Progress) -> None:
        live.current = progress
        if writer is not None:
            writer.behind.progress(progress)
    return follow
