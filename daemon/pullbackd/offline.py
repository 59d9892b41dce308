"""Shut-off domains: pullbackd serves their disks itself.

libvirt 9.0 makes no checkpoint for an inactive domain, and its backup jobs need QEMU. The
field knows two ways round that; both were measured here (README, "Shut-off domains"), and
this is the first: the domain stays off, a qemu-storage-daemon of the job's own (qsd.py)
opens its images, adds the checkpoint's bitmap, and exports each disk with the dirty bitmap
since the base checkpoint, as QEMU's pull backups do; libvirt then takes the checkpoint in by
redefinition, so that the chain goes on when the domain runs again, and back. The other,
starting the domain paused (`START_PAUSED | START_AUTODESTROY`), shows the domain running to
everyone, lets anyone resume it under the backup, and ends it with pullbackd's connection:
a restart of pullbackd would cut every reader.

Invariants:
- A job's daemon holds every image of the job's disks, read-only once it serves: QEMU cannot
  open them for writing, so the domain cannot start under the backup ("Failed to get "write"
  lock"), and a kill of the daemon leaves no bitmap in use.
- A disk backed up since a checkpoint starts from that checkpoint's own bitmap, present and
  consistent in its image (bitmaps.py); else in full, with why.
- The checkpoint exists in libvirt only once its bitmaps exist in the images; a start that
  fails leaves neither.
- The daemon outlives pullbackd (its own session): a later run finds it by its PID file.

Push backups (`target_dir`) of a shut-off domain are not offered yet.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from pathlib import Path

import anyio
import structlog

from . import bitmaps, xml
from .chain import Base
from .errors import DomainNotRunning, ImageNotReachable, InvalidParameter, LibvirtError
from .model import Job, Kind, Scratch
from .names import Layout, export_token
from .qsd import Export, Image, StorageDaemon, StorageDaemonError
from .roles import user_name
from .source import Begun, Exported, Plan, Sink, Unowned, select_disks
from .virt import AgentError, Virt

log = structlog.get_logger()

#: Seconds between two looks at whether the jobs' daemons still run.
WATCH_INTERVAL = 1.0


class OfflineSource:
    """Shut-off domains, served by a qemu-storage-daemon per job: its NBD socket is
    `layout.qemu_socket(job)`, as QEMU's would be, its QMP socket and PID file beside it."""

    def __init__(self, virt: Virt, layout: Layout) -> None:
        self._virt = virt
        self._layout = layout
        #: Jobs whose daemon runs (or ran) in this run of pullbackd: job id -> domain.
        self._watched: dict[str, str] = {}
        #: Each job's export names, from `begin` to `exports`.
        self._exports: dict[str, list[Export]] = {}

    def _daemon(self, job_id: str) -> StorageDaemon:
        return StorageDaemon(self._layout.qsd_monitor(job_id), self._layout.qemu_socket(job_id),
                             self._layout.qsd_pidfile(job_id))

    async def plan(self, domain: str, wanted: list[str] | None, kind: Kind) -> Plan:
        dom = await self._virt.domain(domain)
        if dom.running:
            raise DomainNotRunning(domain)  # the router never asks: the other source's
        if kind == Kind.PUSH:
            raise InvalidParameter("target_dir", (
                f"{domain!r} is shut off: push backups of a shut-off domain are not offered "
                "yet; use a pull backup, or a destination"))
        disks = xml.parse_disks(dom.xml)
        chosen, skip = select_disks(domain, disks, wanted)
        for disk in disks:
            if disk.target in chosen and (disk.type != "file" or disk.source is None):
                raise InvalidParameter("disks", (
                    f"{disk.target} of the shut-off domain {domain!r} is a {disk.type} disk: "
                    "only file disks are served while a domain is off; start it, or leave "
                    "the disk out"))
        for disk in disks:
            if disk.target in chosen and disk.source is not None:
                why = await anyio.to_thread.run_sync(_unreachable, Path(disk.source))
                if why is not None:
                    raise ImageNotReachable(domain, disk.target, disk.source, why)
        sizes = {disk: await self._virt.capacity(domain, disk) for disk in chosen}
        full = {d.target: why for d in disks if d.target in chosen and (why := d.no_bitmap)}
        return Plan(tuple(chosen), skip, sizes, full, offline=True)

    async def begin(self, job: Job, bases: dict[str, Base], skip: tuple[str, ...]) -> None:
        dom = await self._virt.domain(job.domain)
        if dom.running:
            raise LibvirtError(-1, f"{job.domain!r} started meanwhile; start the backup again")
        found = {d.target: d for d in xml.parse_disks(dom.xml)}
        images = [Image(d, Path(found[d].source or ""), found[d].format or "raw", b.bitmap)
                  for d, b in bases.items()]
        for image in images:
            base = bases[image.disk]
            if base.checkpoint is not None:
                flags = (await bitmaps.of(image.path)).get(base.checkpoint)
                if not bitmaps.usable(flags):
                    state = "is missing" if flags is None else "is inconsistent (left in use)"
                    bases[image.disk] = Base(None, f"the bitmap of {base.checkpoint} in the "
                                                   f"image {state}; this disk's chain "
                                                   "restarts here")
        token = export_token()
        exports = [Export(d, f"{d}-{token}", b.checkpoint) for d, b in bases.items()]
        with_bitmap = [i.disk for i in images if i.bitmap]
        daemon = self._daemon(job.id)
        try:
            await daemon.start(images, job.checkpoint, exports)
        except StorageDaemonError as e:
            raise LibvirtError(-1, str(e)) from None
        self._watched[job.id] = job.domain
        self._exports[job.id] = exports
        if not with_bitmap:
            return
        try:
            await self._virt.redefine_checkpoint(job.domain, xml.made_checkpoint(
                job.checkpoint, await self._newest(job.domain), int(time.time()), with_bitmap,
                skip + tuple(d for d in bases if d not in with_bitmap)), validate=False)
        except BaseException:
            with anyio.CancelScope(shield=True):  # the bitmaps must not outlive the failure
                await self._stop(job.id)
                for image in images:
                    if image.bitmap:
                        with contextlib.suppress(LibvirtError):
                            await bitmaps.remove(image.path, job.checkpoint)
            raise

    async def _newest(self, domain: str) -> str | None:
        """The domain's newest checkpoint: the parent of one made now (libvirt's own next
        checkpoint takes it as parent in turn, and the tree stays one line)."""
        newest: tuple[int, str] | None = None
        for name in await self._virt.checkpoints(domain):
            info = xml.parse_checkpoint(await self._virt.checkpoint_xml(domain, name))
            if newest is None or (info.created or 0) >= newest[0]:
                newest = (info.created or 0, name)
        return None if newest is None else newest[1]

    async def freeze(self, job: Job, mountpoints: list[str] | None) -> None:
        raise AgentError("the domain is shut off: nothing to freeze")

    async def thaw(self, job: Job) -> None:
        pass  # nothing was frozen

    async def exports(self, job: Job, bases: dict[str, Base]) -> Begun:
        exports = self._exports.pop(job.id, None)
        if exports is None:
            raise LibvirtError(-1, "the exports of this backup are not known in this run")
        return Begun(self.socket(job), tuple(
            Exported(e.disk, e.name, f"qemu:dirty-bitmap:{e.bitmap}" if e.bitmap else None,
                     None, e.since) for e in exports))

    def socket(self, job: Job) -> Path:
        return self._layout.qemu_socket(job.id)

    async def running(self, job: Job) -> bool:
        if await self._daemon(job.id).running():
            self._watched[job.id] = job.domain  # adopted: watched from now on
            return True
        return False

    async def reachable(self, job: Job) -> bool:
        return await anyio.Path(self.socket(job)).is_socket()

    async def end(self, job: Job) -> bool:
        was = await self._daemon(job.id).running()
        await self._stop(job.id)
        return was

    async def _stop(self, job_id: str) -> None:
        self._watched.pop(job_id, None)
        self._exports.pop(job_id, None)
        await self._daemon(job_id).stop()

    async def why_ended(self, job: Job, error: str | None) -> str:
        reason = "the qemu-storage-daemon serving the shut-off domain's disks ended"
        return f"{reason}: {error}" if error else reason

    def sweep(self, running: set[str]) -> None:
        for job_id in sorted(self._layout.qsd_jobs() - running):
            log.warning("stopping a qemu-storage-daemon no job owns", job=job_id)
            anyio.from_thread.run(self._stop, job_id)

    async def cause(self, job: Job) -> str | None:
        if await self._daemon(job.id).running():
            return None
        return await self.why_ended(job, None)

    async def usage(self, job: Job) -> Scratch | None:
        return None  # no scratch: nothing writes the images while they are served

    async def follow(self, sink: Sink, started: Callable[[], None]) -> None:
        """A daemon that ended without pullbackd asking ends its job (`Sink.ended`)."""
        started()
        while True:
            await anyio.sleep(WATCH_INTERVAL)
            for job_id, domain in list(self._watched.items()):
                if not await self._daemon(job_id).running() and \
                        self._watched.get(job_id) == domain:
                    del self._watched[job_id]
                    sink.ended(domain, False, "qemu-storage-daemon ended")

    async def unowned(self, busy: Callable[[str], bool]) -> list[Unowned]:
        return []  # a daemon no job owns is stopped by `sweep`

    async def end_unowned(self, backup: Unowned) -> None:
        await self._stop(backup.job_id)



def _unreachable(image: Path) -> str | None:
    """Why this process cannot read and write the image (the bitmap goes into it), if it
    cannot. Blocks."""
    if not image.exists():
        return "no such file"
    if not os.access(image, os.R_OK | os.W_OK):
        return f"not readable and writable by pullbackd's user ({user_name(os.geteuid())})"
    return None
