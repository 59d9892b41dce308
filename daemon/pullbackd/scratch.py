"""Scratch space: where QEMU keeps the old data a guest overwrites while a pull
backup runs (`<scratch>/<job>.<disk>.qcow2`, names.py). pullbackd makes each file
(`create`: an empty qcow2 image of the disk's size, qcow2.py) and removes it when the job ends
(`remove`); libvirt takes it as it is.

A pull backup is refused when the scratch file system could not hold it in the
worst case (its disks' size, beside what the running ones may still grow to);
while pull backups run, falling under twice `[scratch] reserve` free warns, and
under the reserve the backup with the largest scratch files is ended, before
QEMU runs out of room (its copy-before-write would then fail the guest's
writes). libvirt has no event for it: the space is looked at every second.
"""

from __future__ import annotations

import shutil
from collections.abc import Awaitable, Callable

import anyio
import structlog

from . import qcow2
from .durable import write_new
from .errors import InsufficientScratch, LibvirtError
from .model import Job
from .names import Layout

log = structlog.get_logger()


def create(layout: Layout, job_id: str, sizes: dict[str, int], qemu_gid: int | None) -> None:
    """The job's scratch files, one per disk (`sizes`: its bytes): empty qcow2 images,
    created exclusively. pullbackd makes them and libvirt takes them as they are
    (`VIR_DOMAIN_BACKUP_BEGIN_REUSE_EXTERNAL`), labelled for QEMU as it labels its own:
    libvirt's own took a `blockdev-create` job of QEMU per file, 8 ms of libvirtd's and
    QEMU's CPU per backup beside 0.5 of ours (bench/night.py's floor, both ways). libvirt
    leaves them at the end: `remove`. With `qemu_gid` ([exports] qemu_group), each is
    also that group's, 0660: QEMU opens them where libvirt hands no file over to it
    (qemu.conf dynamic_ownership = 0). Blocks."""
    for disk, size in sizes.items():
        try:
            image = qcow2.empty(size)
        except qcow2.ImageError as e:
            raise LibvirtError(-1, f"cannot make a scratch file: {e}") from None
        write_new(layout.scratch_file(job_id, disk), image,
                  0o600 if qemu_gid is None else 0o660, sync=False, group=qemu_gid)


def remove(layout: Layout, job_id: str) -> None:
    """The job's scratch files gone. Blocks."""
    for path in layout.scratch_files(job_id):
        path.unlink(missing_ok=True)


class ScratchSpace:
    def __init__(self, layout: Layout, reserve: int) -> None:
        """`reserve`: bytes to keep free ([scratch] reserve); 0 watches nothing."""
        self.dir = layout.scratch
        self._layout = layout
        self.reserve = reserve

    def check(self, size: int, running: list[Job]) -> None:
        """Raise InsufficientScratch if a pull backup of disks of `size` bytes might
        not fit beside the `running` pull backups. Blocks."""
        self.dir.mkdir(parents=True, exist_ok=True)  # libvirt needs it there too
        needed = size + sum(d.size for j in running for d in j.disks)
        used = sum(self.sizes(running).values())
        available = shutil.disk_usage(self.dir).free - self.reserve + used
        if needed > available:
            raise InsufficientScratch(str(self.dir), needed, max(available, 0))

    def sizes(self, jobs: list[Job], per_disk: bool = False) -> dict[str, int]:
        """Bytes each job's scratch files hold, by job id (or by "<id>.<disk>"). Blocks."""
        sizes: dict[str, int] = {}
        for j in jobs:
            for path in self._layout.scratch_files(j.id):
                key = path.name.removesuffix(".qcow2") if per_disk else j.id
                try:
                    size = path.stat().st_blocks * 512
                except FileNotFoundError:
                    continue  # the job ended between the listing and now
                sizes[key] = sizes.get(key, 0) + size
        return sizes

    async def watch(self, pulls: Callable[[], list[Job]],
                    warn: Callable[[list[Job], str], None],
                    end: Callable[[str, str], Awaitable[None]],
                    interval: float = 1.0) -> None:
        """Every `interval` seconds while `pulls()` run: under twice the reserve free,
        `warn(jobs, message)` once; under the reserve, `end(job id, why)` the one
        with the largest scratch files."""
        warned = False
        while True:
            await anyio.sleep(interval)
            running = pulls()
            if not running or not self.reserve:
                warned = False
                continue
            usage = await anyio.to_thread.run_sync(shutil.disk_usage, self.dir)
            if usage.free < self.reserve:
                sizes = await anyio.to_thread.run_sync(self.sizes, running)
                victim = max(running, key=lambda j: sizes.get(j.id, 0))
                await end(victim.id, (
                    f"scratch space ran out: {usage.free} bytes left in {self.dir}, "
                    f"under the reserve of {self.reserve}; the backup was ended "
                    "before QEMU could fill it"))
            elif usage.free < 2 * self.reserve and not warned:
                warned = True
                log.warning("scratch space low", free=usage.free, dir=str(self.dir))
                warn(running, f"scratch space is running low: {usage.free} bytes left in "
                              f"{self.dir}; backups end at {self.reserve}")
            elif usage.free >= 2 * self.reserve:
                warned = False
