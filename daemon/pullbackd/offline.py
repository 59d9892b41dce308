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
  lock"), and a kill of the daemon from then on leaves no bitmap in use (a start that fails
  before quits it, and takes the new bitmap out again).
- No domain runs on images a daemon of pullbackd opens (for a job, or to `forget`): its
  marker comes first, and libvirt's hook refuses a start from then on; the domain is seen
  still off after that, before the daemon starts (a start the hook let through before is
  seen: the daemon is not started). The images' locks alone do not keep QEMU off a block device.
- An image with a backing file (an external snapshot's overlay) is served through its
  chain, and backed up in full: a checkpoint's bitmap may be spread over the layers
  (libvirt merges every layer's), and the top one alone would miss writes. The new
  checkpoint's bitmap goes into the top layer, which takes every write from then on.
- The layers served under an image are those the domain's definition names
  (`<backingStore>`), which the images' headers must name too, or, where it names none,
  those the headers name, as libvirt follows them; an image with an external data file is
  refused (qsd.layered, which the unit runs too).
- A disk backed up since a checkpoint starts from that checkpoint's own bitmap, present,
  recording and consistent in its image (bitmaps.py); else in full, with why.
- The checkpoint exists in libvirt only once its bitmaps exist in the images; a start that
  fails leaves neither.
- The daemon outlives pullbackd (its own session): a later run finds it by its PID file.
- pullbackd opens no image itself (they are root's on a host, and the daemon is then
  root's unit, storage_unit.py): what it decides from the images (their bitmaps, whether
  they are layered) the job's daemon tells once it opened them (`StorageDaemon.open`),
  before it adds or serves anything; a checkpoint's bitmaps go out of them through a
  daemon opened for that alone (`forget`), after a start that failed, and when a
  checkpoint of the shut-off domain is deleted (chain.py).

A push backup (`target_dir`) runs a backup job per disk in the daemon, into new qcow2
files named as libvirt names its own; the job ends when they all ended. pullbackd makes
each file (never through a link left at its name) and the daemon opens it through
pullbackd's descriptor, whatever its name leads to since (the folder may be a user's).
"""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio
import structlog

from . import bitmaps, crash, xml
from .chain import Base
from .domainfiles import DomainFiles, Reader
from .durable import unlink_same
from .errors import ImageNotReachable, InvalidParameter, LibvirtError
from .model import Job, Kind, Scratch
from .names import Layout, export_token, job_file, new_job_id
from .qcow2 import ImageError
from .qsd import (
    Export,
    Found,
    Image,
    StorageDaemon,
    StorageDaemonError,
    Target,
    new_target,
    pushed,
)
from .roles import user_name
from .source import Begun, Exported, Plan, Sink, Unowned, select_disks
from .virt import AgentError, Domain, Virt

log = structlog.get_logger()

#: Why a disk with a backing file is backed up in full while its domain is off.
LAYERED = ("it has a backing file (an external snapshot's overlay), and its checkpoints' "
           "bitmaps may be spread over the layers: backed up in full while the domain is "
           "off, and its chain restarts here")
#: Seconds between two looks at whether the jobs' daemons still run.
WATCH_INTERVAL = 1.0


class OfflineSource:
    """Shut-off domains, served by a qemu-storage-daemon per job: its NBD socket is
    `layout.qemu_socket(job)`, as QEMU's would be, its QMP socket and PID file beside it."""

    def __init__(self, virt: Virt, layout: Layout, files: Reader, unit: str = "") -> None:
        """`unit`: the systemd template unit that runs each job's daemon as root ([offline]
        unit); empty: pullbackd runs them itself."""
        self._virt = virt
        self._layout = layout
        self._files = files
        self._unit = unit
        #: Jobs whose daemon runs (or ran) in this run of pullbackd: job id -> the job.
        self._watched: dict[str, Job] = {}
        #: Each job's export names, from `begin` to `exports`.
        self._exports: dict[str, list[Export]] = {}
        #: Each job's daemon (the one this run started keeps its process, to reap it).
        self._daemons: dict[str, StorageDaemon] = {}

    def _daemon(self, job_id: str) -> StorageDaemon:
        if (daemon := self._daemons.get(job_id)) is None:
            daemon = self._daemons[job_id] = StorageDaemon(
                self._layout.qsd_monitor(job_id), self._layout.qemu_socket(job_id),
                self._layout.qsd_pidfile(job_id),
                f"{self._unit}@{job_id}.service" if self._unit else None)
        return daemon

    async def plan(self, domain: str, wanted: list[str] | None, kind: Kind) -> Plan:
        dom = await self._virt.domain(domain, definition=True)
        if dom.running:  # the router asked while it was off
            raise LibvirtError(-1, f"{domain!r} started meanwhile; start the backup again")
        disks = xml.parse_disks(dom.xml)
        chosen, skip = select_disks(domain, disks, wanted)
        for disk in (d for d in disks if d.target in chosen):
            if disk.type not in ("file", "block") or disk.source is None:
                raise InvalidParameter("disks", (
                    f"{disk.target} of the shut-off domain {domain!r} is a {disk.type} disk: "
                    "only files and block devices are served while a domain is off; start "
                    "it, or leave the disk out"))
            # The root unit opens the images itself, and says why it cannot: pullbackd's
            # service sees no block device and no /home (PrivateDevices=, ProtectHome=).
            why = None if self._unit else \
                await anyio.to_thread.run_sync(_unreachable, Path(disk.source))
            if why is not None:
                raise ImageNotReachable(domain, disk.target, disk.source, why)
        sizes = {disk: await self._virt.capacity(domain, disk) for disk in chosen}
        full = {d.target: why for d in disks if d.target in chosen and (why := d.no_bitmap)}
        return Plan(tuple(chosen), skip, sizes, full, offline=True, clean=dom.clean,
                    definition=dom.definition)

    async def begin(self, job: Job, plan: Plan, bases: dict[str, Base]) -> None:
        dom = await self._virt.domain(job.domain)
        if dom.running:
            raise LibvirtError(-1, f"{job.domain!r} started meanwhile; start the backup again")
        images = _images(job.domain, dom, bases)
        daemon = self._daemon(job.id)
        try:
            found = await daemon.open(job.domain, images, still_off=self._still_off(
                job.domain, f"{job.domain!r} started meanwhile; start the backup again"))
        except StorageDaemonError as e:
            raise LibvirtError(-1, str(e)) from None  # it is libvirt's QEMU, run by us
        for disk, base in bases.items():
            if base.bitmap and found[disk].layered:
                bases[disk] = Base(None, LAYERED)
            elif base.checkpoint is not None:
                bitmap = found[disk].bitmaps.get(base.checkpoint)
                if not bitmaps.usable(bitmap):
                    state = "is missing" if bitmap is None else "is inconsistent (left in use)"
                    bases[disk] = Base(None, f"the bitmap of {base.checkpoint} in the image "
                                             f"{state}; this disk's chain restarts here")
        self._exports[job.id] = await self._serve(job, daemon, images, found, bases)
        self._watched[job.id] = job
        crash.point("start.served")
        with_bitmap = [i.disk for i in images if i.bitmap]
        if not with_bitmap:
            return
        try:
            await self._virt.redefine_checkpoint(job.domain, xml.made_checkpoint(
                job.checkpoint, await self._newest(job.domain), int(time.time()), with_bitmap,
                plan.skip + tuple(d for d in bases if d not in with_bitmap)), validate=False)
        except BaseException:
            with anyio.CancelScope(shield=True):  # the bitmaps must not outlive the failure
                await self._stop(job.id)
                await self._forget_bitmaps(job.domain, images, job.checkpoint)
            raise

    async def _serve(self, job: Job, daemon: StorageDaemon, images: list[Image],
                     found: dict[str, Found], bases: dict[str, Base]) -> list[Export]:
        """The job's daemon, `open`, serving `images`: an export of each disk, or a push of
        each into a new file (`target_dir`); its exports. If it fails, nothing is left of
        it: no daemon, no bitmap, no file that looks like a backup."""
        token = export_token()
        exports = [Export(d, f"{d}-{token}", b.checkpoint) for d, b in bases.items()] \
            if job.target_dir is None else []
        targets: list[Target] = []
        served = False
        try:
            if job.target_dir is not None:
                for disk, base in bases.items():  # new files, like libvirt's push targets
                    path = job_file(Path(job.target_dir), job.id, disk)
                    fd = await _create(path, await self._virt.capacity(job.domain, disk))
                    targets.append(Target(disk, path, base.checkpoint, fd))
            served = True
            await daemon.serve(images, found, job.checkpoint, exports, targets)
        except BaseException as e:
            with anyio.CancelScope(shield=True):
                await self._stop(job.id)  # if it was not served: the images go back
                for target in targets:
                    await anyio.to_thread.run_sync(unlink_same, target.path,
                                                   os.fstat(target.fd))
                if served:  # it may have added the bitmaps before it failed
                    await self._forget_bitmaps(job.domain, images, job.checkpoint)
            if isinstance(e, StorageDaemonError):
                raise LibvirtError(-1, str(e)) from None
            raise
        finally:
            for target in targets:  # the daemon holds them now, if it runs
                os.close(target.fd)
        return exports

    async def _forget_bitmaps(self, domain: str, images: list[Image], checkpoint: str) -> None:
        """The checkpoint's bitmaps out of the images, after a start that failed."""
        try:
            await self.forget(domain, [i.disk for i in images if i.bitmap], checkpoint)
        except LibvirtError as e:
            log.warning("cannot remove the bitmaps of a backup that did not start",
                        domain=domain, checkpoint=checkpoint, error=str(e))

    async def forget(self, domain: str, disks: list[str], checkpoint: str) -> None:
        """Take the bitmap of `checkpoint` out of the images of the shut-off domain's
        `disks` that hold one, through a daemon of its own (a fresh id: a start of the
        domain meanwhile waits for it in libvirt's hook, and a start of pullbackd ends
        it if it is left). Raises LibvirtError (the domain runs, say: libvirt deletes
        them then)."""
        dom = await self._virt.domain(domain)
        if dom.running:
            raise LibvirtError(-1, f"{domain!r} runs now: libvirt deletes the bitmaps")
        qcow2 = [d for d in xml.parse_disks(dom.xml)
                 if d.target in disks and d.format == "qcow2" and d.source is not None]
        if not qcow2:
            return
        images = _images(domain, dom, {d.target: Base(None, bitmap=False) for d in qcow2})
        job_id = new_job_id()
        daemon = self._daemon(job_id)
        try:
            found = await daemon.open(domain, images, removing=checkpoint,
                                      still_off=self._still_off(domain, (
                                          f"{domain!r} runs now: libvirt deletes the bitmaps")))
            await daemon.remove_bitmaps(images, found, checkpoint)
        except StorageDaemonError as e:
            raise LibvirtError(-1, f"cannot remove the bitmap {checkpoint} from the images of "
                                   f"{domain!r}: {e}") from None
        finally:
            with anyio.CancelScope(shield=True):  # the images go back to the domain
                await self._stop(job_id)

    def _still_off(self, domain: str, started: str) -> Callable[[], Awaitable[None]]:
        """For `StorageDaemon.open`: raises LibvirtError(`started`) if the domain runs once
        the marker is written. libvirt's hook refuses a start from then on; one it let
        through before is running by now (libvirt marks it active, under the domain's
        lock, before it lets go of it after the hook), and the daemon must not start."""
        async def still_off() -> None:
            if (await self._virt.domain(domain)).running:
                raise LibvirtError(-1, started)
        return still_off

    async def _newest(self, domain: str) -> str | None:
        """The domain's newest checkpoint: the parent of one made now (libvirt's own next
        checkpoint takes it as parent in turn, and the tree stays one line)."""
        newest: tuple[int, str] | None = None
        for name in await self._virt.checkpoints(domain):
            info = xml.parse_checkpoint(await self._virt.checkpoint_xml(domain, name))
            if newest is None or (info.created or 0) >= newest[0]:
                newest = (info.created or 0, name)
        return None if newest is None else newest[1]

    async def files(self, job: Job, plan: Plan) -> DomainFiles:
        return await self._files.capture(job.domain, plan.definition)

    async def freeze(self, job: Job, mountpoints: list[str] | None) -> int:
        raise AgentError("the domain is shut off: nothing to freeze")

    async def thaw(self, job: Job) -> int:
        return 0  # nothing was frozen

    async def exports(self, job: Job, bases: dict[str, Base]) -> Begun:
        if job.target_dir is not None:
            return Begun(None, tuple(
                Exported(d, None, None, job_file(Path(job.target_dir), job.id, d),
                         bases[d].checkpoint) for d in bases))
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
            self._watched[job.id] = job  # adopted: watched from now on
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
        self._daemons.pop(job_id, None)

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
        """A daemon that ended without pullbackd asking ends its job, and so does the end
        of a push backup's copy (`Sink.ended`)."""
        started()
        while True:
            await anyio.sleep(WATCH_INTERVAL)
            for job_id, job in list(self._watched.items()):
                outcome = await self._outcome(job)
                if outcome is not None and self._watched.get(job_id) is job:
                    del self._watched[job_id]
                    # A push's daemon has nothing more to do: the images go back to the
                    # domain before the job ends.
                    await self._stop(job_id)
                    sink.ended(job.domain, *outcome)

    async def _outcome(self, job: Job) -> tuple[bool, str | None] | None:
        """How the job's backup ended, if it did: its daemon is gone, or it pushed all."""
        daemon = self._daemon(job.id)
        try:
            if not await daemon.running():
                return False, "qemu-storage-daemon ended"
        except OSError:  # systemctl could not be run (no process to spare, say)
            return None  # asked again at the next look
        if job.target_dir is None:
            return None
        try:
            done, error = await anyio.to_thread.run_sync(pushed, daemon.qmp)
        except (OSError, StorageDaemonError):
            return None  # asked again at the next look
        return (error is None, error) if done else None

    async def unowned(self, busy: Callable[[str], bool]) -> list[Unowned]:
        return []  # a daemon no job owns is stopped by `sweep`

    async def end_unowned(self, backup: Unowned) -> None:
        await self._stop(backup.job_id)



def _images(domain: str, dom: Domain, bases: dict[str, Base]) -> list[Image]:
    """The images of the domain `dom`'s disks in `bases`; raises LibvirtError if a disk
    changed since it was planned."""
    found = {d.target: d for d in xml.parse_disks(dom.xml)}
    if missing := [d for d in bases if d not in found or found[d].source is None]:
        raise LibvirtError(-1, f"disk {missing[0]} of {domain!r} changed meanwhile; "
                               "start the backup again")
    return [Image(d, Path(found[d].source or ""), found[d].format or "raw", b.bitmap,
                  device=found[d].type == "block", declared=found[d].backing)
            for d, b in bases.items()]


def _unreachable(image: Path) -> str | None:
    """Why this process cannot serve the image, if it cannot: it is not there, or it cannot
    read and write it (the bitmap goes into it). Blocks."""
    if not image.exists():
        return "no such file"
    if not os.access(image, os.R_OK | os.W_OK):
        return (f"not readable and writable by pullbackd's user ({user_name(os.geteuid())}): "
                "back it up while the domain runs, or let that user read and write it")
    return None


async def _create(path: Path, size: int) -> int:
    """A push target (qsd.new_target); one already there is refused."""
    try:
        return await anyio.to_thread.run_sync(new_target, path, size)
    except FileExistsError:
        raise LibvirtError(-1, f"{path} exists already") from None
    except (OSError, ImageError) as e:
        raise LibvirtError(-1, f"cannot create {path}: {e}") from None
