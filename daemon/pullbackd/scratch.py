"""Scratch space: where QEMU keeps the old data a guest overwrites while a pull
backup runs (`<scratch>/<job>.<disk>.qcow2`, names.py). pullbackd makes each file
(`create`: an empty qcow2 image of the disk's size, qcow2.py) and removes it when the job ends
(`remove`); libvirt takes it as it is.

A pull backup is refused when the scratch file system could not hold it in the
worst case (its disks' size, beside what the running ones may still grow to).
While pull backups run, the space is looked at every second (libvirt has no event
for it): falling under twice `[scratch] reserve` free warns; under the reserve,
a backup is ended only for space the scratch files took, as ending one gives back
nothing else. The watch holds the running backups to a line of free space, the
reserve, and notes what their scratch files hold whenever free space stands at it:

- Under the line, when those files grew since by at least what is missing (without
  their growth free space would stand at the line), the backup with the largest
  scratch files is ended, before QEMU runs out of room (its copy-before-write would
  then fail the guest's writes); then the next, while that still holds.
- Else the shortfall is not theirs (the reserve was raised by a reload, or something
  else fills the file system): nothing is ended, the log warns once (until free space
  is back at the reserve), and the line becomes half of what is free then, so that
  the scratch files may take half of what is left before a backup is ended for it.
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
        available = self.free() - self.reserve + used
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

    def free(self) -> int:
        """Bytes free in the scratch file system, to an unprivileged writer as QEMU is.
        Blocks."""
        return shutil.disk_usage(self.dir).free

    def _ran_out(self, free: int, line: int, reserve: int, held: int) -> str:
        """Why a backup whose scratch files held `held` bytes was ended (`watch`)."""
        under = f"the reserve of {reserve}" if line == reserve else (
            f"{line}, half of what was left when free space fell under the reserve "
            f"of {reserve} for another cause")
        return (f"scratch space ran out: {free} bytes left in {self.dir}, under {under}; "
                f"the backups' scratch files took it and this one's held the most "
                f"({held} bytes): it was ended before QEMU could fill the file system")

    async def watch(self, pulls: Callable[[], list[Job]],
                    warn: Callable[[list[Job], str], None],
                    end: Callable[[str, str], Awaitable[None]],
                    interval: float = 1.0) -> None:
        """Every `interval` seconds while `pulls()` run: under twice the reserve free,
        `warn(jobs, message)` once; under the reserve, `end(job id, why)` the one with
        the largest scratch files if theirs took the space, else a warning in the log
        (the module's docstring has the rule)."""
        low = False  # `warn` was told free space is low
        short = False  # the log was told of a shortfall the scratch files did not cause
        #: The free bytes the running backups are held to, and what each one's scratch
        #: files held when free space last stood at it (None: not looked at yet).
        line = 0
        held: dict[str, int] | None = None
        while True:
            await anyio.sleep(interval)
            running = pulls()
            reserve = self.reserve
            if not running or not reserve:
                low, short, held = False, False, None
                continue
            free = await anyio.to_thread.run_sync(self.free)
            sizes = await anyio.to_thread.run_sync(self.sizes, running)
            if held is None or free >= reserve:
                # Back at the reserve, or a first look (nothing to tell what took the
                # space before it: whatever is missing counts as not theirs).
                line, held, short = reserve, sizes, False
            line = min(line, reserve)  # a reload may lower the reserve under it
            if free >= line:
                held = sizes
                if reserve <= free < 2 * reserve and not low:
                    low = True
                    log.warning("scratch space low", free=free, dir=str(self.dir))
                    warn(running, f"scratch space is running low: {free} bytes left in "
                                  f"{self.dir}; backups end if their scratch files take it "
                                  f"under {reserve}")
                elif free >= 2 * reserve:
                    low = False
                continue
            grown = sum(max(size - held.get(job_id, 0), 0) for job_id, size in sizes.items())
            if free + grown >= line:
                # Their growth took it: ending the backup whose files hold the most gives
                # back the most (a backup whose files hold nothing gives back nothing, and
                # holds the most only if all do: then none grew).
                victim = max(running, key=lambda j: sizes.get(j.id, 0))
                await end(victim.id, self._ran_out(free, line, reserve, sizes.get(victim.id, 0)))
                continue
            # Not theirs: ending a backup would cut its readers off for nothing they did.
            if not short:
                short = True
                log.warning(
                    "scratch space is under [scratch] reserve, and not because backups' "
                    "scratch files grew (the reserve was raised, or something else fills "
                    "the file system): no backup is ended for it. Free space there, or "
                    "lower [scratch] reserve and reload; a backup is ended only if the "
                    "scratch files take half of what is left",
                    free=free, reserve=reserve, dir=str(self.dir),
                    scratch=sum(sizes.values()))
            line, held = free // 2, sizes
