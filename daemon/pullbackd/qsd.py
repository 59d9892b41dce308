"""qemu-storage-daemon: how pullbackd serves the disks of a domain that is shut off.

One process per job (offline.py). It opens each disk's image (a `file` node and a format
node named after the disk, over the layers under it) for writing, so that QEMU repairs one
a crash left dirty, then at once read-only (`_opened`), and listens for QMP on a Unix
socket, and serves NBD on another. Whoever starts it reads the layers (`layered`): pullbackd
itself, or the job's root unit (storage_unit.py) when the images are root's. They are those
the domain's definition names: a header that names another file, or an external data file
(QEMU would open it itself), is refused before anything opens it. pullbackd
never opens the images itself: what it needs to know of them (their bitmaps, whether they
are layered) it asks the daemon (`open`), then drives it over QMP (`serve`):

1. one transaction, the images reopened for writing for it alone, adds the job's checkpoint
   bitmap to every qcow2 disk (persistent, recording, named after the checkpoint, as
   libvirt names its own) and, for a disk backed up since an earlier checkpoint, a
   temporary bitmap `backup-<disk>` (not persistent, disabled) merged from that
   checkpoint's bitmap: libvirt keeps every checkpoint's bitmap recording, so that one
   alone holds every change since it;
2. each image is reopened read-only: the bitmaps are written into it now, and a process
   killed from here on leaves no bitmap in use (an image open for writing at a kill marks
   every bitmap in it inconsistent: every consumer's chain would restart);
3. one read-only export per disk (`<disk>-<token>`, the meta context
   `qemu:dirty-bitmap:backup-<disk>` as QEMU's own pull backups have it); or, for a push
   backup, a backup job per disk into its target file (all of it, or the clusters the
   temporary bitmap marks), as libvirt's push backups do.

The same daemon, opened and not served, takes a checkpoint's bitmaps out of the images
(`remove_bitmaps`, writable for that transaction alone too): after a start that failed, and
when a checkpoint of a shut-off domain is deleted.

While it holds the images, QEMU cannot open them for writing: a start of the domain fails
("Failed to get "write" lock"). A qcow2 node makes QEMU lock its file so; a raw one passes
its users' needs on, and an export lets anyone write: for each raw image (a file or a block
device) the daemon inherits a descriptor holding the lock QEMU's own would, "writing not
shared" (`hold_writers_off`), for as long as it lives. `quit` ends it. Its output goes to a
file beside its PID file (logged when it stops, quoted when a start fails). It is not tied
to pullbackd's life: like QEMU's backups, it outlives a restart of pullbackd, which finds
it again by its PID file and its QMP socket.

The QMP calls are blocking socket calls: they run in worker threads (`anyio.to_thread`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import os
import signal
import socket
import struct
import subprocess
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import anyio
import structlog
from anyio.abc import Process

from . import bitmaps, qcow2
from .bitmaps import Bitmap
from .durable import fill, write_new
from .names import backup_bitmap

log = structlog.get_logger()

PROGRAM = "qemu-storage-daemon"
#: Seconds QMP may take to answer one command (a transaction writes bitmaps: fsync).
QMP_TIMEOUT = 30.0
#: Seconds the daemon may take to come up (its QMP socket there), and to end at `quit`.
START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0


#: QEMU's image locking (block/file-posix.c): an OFD lock on byte 100 + a permission's bit
#: says "I have it", on byte 200 + the bit "I do not share it"; BLK_PERM_WRITE is bit 1. A
#: QEMU that wants to write tests the second; one that writes holds the first.
WRITE_HELD = 101
WRITE_NOT_SHARED = 201


class StorageDaemonError(Exception):
    """qemu-storage-daemon failed; the message is its own (offline.py passes it on to the
    caller as LibvirtError: it is libvirt's QEMU, run by us)."""


@dataclass(frozen=True)
class Image:
    """A disk to serve: its name (the domain's target, e.g. vda), its file and format, and
    whether it gets the checkpoint's bitmap (only a qcow2 image can hold one)."""

    disk: str
    path: Path
    format: str = "qcow2"
    bitmap: bool = True
    #: The layers under it (an external snapshot's overlay), backing file first: opened
    #: read-only, each as the backing of the one above.
    backing: tuple[tuple[Path, str], ...] = ()
    #: A block device (an LVM volume, say), not a file.
    device: bool = False
    #: The layers the domain's definition names under it (xml.DomainDisk.backing): its
    #: headers must name these and no other (`layered`). None: it names none.
    declared: tuple[tuple[str, str | None], ...] | None = None

    @property
    def protocol(self) -> str:
        return "host_device" if self.device else "file"

    @property
    def below(self) -> str | None:
        """The node of the layer right under it."""
        return _below(self.disk) if self.backing else None


def _below(disk: str) -> str:
    return f"{disk}-1"


@dataclass(frozen=True)
class Found:
    """What the daemon found in a disk's image on opening it."""

    #: The node of the layer right under it (an external snapshot's overlay), if any.
    below: str | None
    #: Its persistent bitmaps, by name.
    bitmaps: dict[str, Bitmap]

    @property
    def layered(self) -> bool:
        return self.below is not None


@dataclass(frozen=True)
class Export:
    """One disk to export, since the checkpoint `since` (None: in full)."""

    disk: str
    name: str
    since: str | None

    @property
    def bitmap(self) -> str | None:
        return None if self.since is None else backup_bitmap(self.disk)


@dataclass(frozen=True)
class Target:
    """One disk to push into a new qcow2 file (`new_target`), since the checkpoint `since`
    (None: full). The daemon gets the file's descriptor `fd`, never its name: the folder
    may be a user's, who could put a link in its place."""

    disk: str
    path: Path
    since: str | None
    fd: int

    @property
    def bitmap(self) -> str | None:
        return None if self.since is None else backup_bitmap(self.disk)


class Monitor:
    """A QMP connection (blocking: use it from a worker thread).

    A reply that does not come within the timeout, or a connection that fails, raises
    StorageDaemonError and leaves the monitor `broken`: what it reads next could be the
    late reply to an earlier command, and a timed-out socket reads nothing more. Every
    later command raises StorageDaemonError at once; its owner decides what becomes of
    the process (writers.py ends the repository's writer)."""

    def __init__(self, path: Path, timeout: float = QMP_TIMEOUT) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        self._timeout = timeout
        #: Why the connection is out of step, once it is.
        self.broken: str | None = None
        try:
            self._sock.connect(str(path))
            self._file = self._sock.makefile("rwb")
            #: Events that came before a command's reply, for `event`.
            self._events: list[dict[str, Any]] = []
            self._read("its greeting")
            self.execute("qmp_capabilities")
        except BaseException:
            self._sock.close()
            raise

    def execute(self, command: str, **arguments: Any) -> Any:
        self._in_step()
        message: dict[str, Any] = {"execute": command}
        if arguments:
            message["arguments"] = arguments
        try:
            self._file.write(json.dumps(message).encode() + b"\n")
            self._file.flush()
        except OSError as e:  # it died
            raise self._break(f"qemu-storage-daemon's monitor: {e.strerror}") from None
        while True:
            reply = self._read(command)
            if "error" in reply:
                raise StorageDaemonError(
                    f"qemu-storage-daemon refused {command}: {reply['error'].get('desc')}")
            if "return" in reply:
                return reply["return"]
            if "event" in reply:
                self._events.append(reply)

    def event(self, name: str, **data: Any) -> dict[str, Any]:
        """The next event `name` whose data holds `data` (the events before it that
        nobody waits for are dropped); raises StorageDaemonError after the timeout."""
        def wanted(e: dict[str, Any]) -> bool:
            return bool(e["event"] == name and data.items() <= e.get("data", {}).items())

        while self._events:
            if wanted(event := self._events.pop(0)):
                return event
        self._in_step()
        while True:
            reply = self._read(f"the event {name}")
            if "event" in reply and wanted(reply):
                return reply

    def _read(self, awaited: str) -> dict[str, Any]:
        """The next message; StorageDaemonError (and `broken`) if `awaited` (what the
        caller waits for) does not come within the timeout or the connection fails."""
        try:
            line = self._file.readline()
        except TimeoutError:
            raise self._break(f"qemu-storage-daemon did not answer {awaited} within "
                              f"{self._timeout:g} s") from None
        except OSError as e:  # it died
            raise self._break(f"qemu-storage-daemon's monitor: {e.strerror}") from None
        if not line:
            raise self._break("qemu-storage-daemon closed its monitor")
        reply: dict[str, Any] = json.loads(line)
        return reply

    def _in_step(self) -> None:
        if self.broken is not None:
            raise StorageDaemonError(f"qemu-storage-daemon's monitor is out of step: "
                                     f"{self.broken}")

    def _break(self, reason: str) -> StorageDaemonError:
        self.broken = reason
        return StorageDaemonError(reason)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._file.close()
        self._sock.close()


class StorageDaemon:
    """The qemu-storage-daemon of one job: `qmp` and `nbd` sockets, `pidfile`."""

    def __init__(self, qmp: Path, nbd: Path, pidfile: Path, unit: str | None = None) -> None:
        """`unit`: the systemd unit to run it in, as root (storage_unit.py); None: it is
        pullbackd's own child."""
        self.qmp = qmp
        self.nbd = nbd
        self.pidfile = pidfile
        self.unit = unit
        #: What the job asks of its unit: the domain, and its disks (storage_unit.py).
        self.spec = pidfile.with_suffix(".spec")
        #: What it writes on stderr, read when a start fails and logged when it stops.
        self.log = pidfile.with_suffix(".log")
        #: The domain whose images it holds, for libvirt's hook (libvirt-hooks/qemu.d);
        #: on a second line, the checkpoint whose bitmaps it removes (`open`).
        self.marker = pidfile.with_suffix(".domain")
        #: The process, if this run of pullbackd started it (to reap it when it ends).
        self._proc: Process | None = None
        #: Its monitor, from `open` to the end of `serve` (or to `stop`).
        self._monitor: Monitor | None = None

    def command(self, images: Sequence[Image], pidfile: bool = True) -> list[str]:
        """Its command line; without `pidfile`, the caller writes the PID file."""
        argv = [PROGRAM, "--chardev", f"socket,id=qmp,path={self.qmp},server=on,wait=off",
                "--monitor", "chardev=qmp"]
        if pidfile:
            argv += ["--pidfile", str(self.pidfile)]
        for image in images:
            # The bottom layer first: each node names the one under it as its backing.
            layers = list(enumerate(image.backing, 1))
            for i, (path, fmt) in reversed(layers):
                under = f",backing={image.disk}-{i + 1}" if i < len(layers) else ""
                argv += ["--blockdev", f"driver=file,node-name=file-{image.disk}-{i},"
                                       f"filename={_escape(path)},cache.direct=off,read-only=on",
                         "--blockdev", f"driver={fmt},node-name={image.disk}-{i},"
                                       f"file=file-{image.disk}-{i},read-only=on{under}"]
            argv += ["--blockdev", f"driver={image.protocol},node-name=file-{image.disk},"
                                   f"filename={_escape(image.path)},cache.direct=off",
                     "--blockdev", f"driver={image.format},node-name={image.disk},"
                                   f"file=file-{image.disk},read-only=off"
                                   + (f",backing={image.below}" if image.below else "")]
        argv += ["--nbd-server", f"addr.type=unix,addr.path={self.nbd},max-connections=64"]
        return argv

    async def open(self, domain: str, images: Sequence[Image], removing: str | None = None,
                   still_off: Callable[[], Awaitable[None]] | None = None) -> dict[str, Found]:
        """Start it holding `images` (read-only once it returns: `_opened`), and what it
        found in each (their layers are read by whoever starts it: `layered`). With
        `removing`, it holds them only to remove that checkpoint's bitmaps: libvirt's
        hook lets a start of the domain wait for it, rather than refuse it as it refuses
        one under a backup. `still_off` is awaited once the marker is written and before
        the daemon starts: it raises if the domain started (the hook let a start through
        before the marker was there; from the marker on, it refuses one), and `open`
        raises that, having started nothing. Raises StorageDaemonError (with what it
        said) and leaves nothing running."""
        for path in self._files():
            path.unlink(missing_ok=True)
        marker = domain if removing is None else f"{domain}\n{removing}"
        await anyio.to_thread.run_sync(_write_new, self.marker, marker)
        try:
            if still_off is not None:
                await still_off()
            self._proc = await self._launch(domain, images)
        except BaseException:
            for path in self._files():
                path.unlink(missing_ok=True)
            raise
        try:
            self._monitor = await self._connect(self._proc)
            return await anyio.to_thread.run_sync(_opened, self._monitor, images)
        except BaseException as e:
            raise await self._abandon(e) from None

    async def serve(self, images: Sequence[Image], found: dict[str, Found], checkpoint: str,
                    exports: Sequence[Export], targets: Sequence[Target] = ()) -> None:
        """Once `open`: add the bitmaps, reopen the images read-only, export each disk, or
        push it into its target (a qcow2 file made already). Raises StorageDaemonError
        (with what it said) and leaves nothing running; the bitmaps it added may be left
        in the images (`remove_bitmaps` of another daemon takes them out)."""
        monitor = self._opened()
        try:
            served: list[Export | Target] = [*exports, *targets]
            await anyio.to_thread.run_sync(_prepare, monitor, images, found, checkpoint, served)
            await anyio.to_thread.run_sync(_push, monitor, targets)
        except BaseException as e:
            raise await self._abandon(e) from None
        finally:
            self._close_monitor()

    async def remove_bitmaps(self, images: Sequence[Image], found: dict[str, Found],
                             name: str) -> None:
        """Once `open`: the bitmap `name` out of the images that have it, in one
        transaction. Raises StorageDaemonError; `stop` it either way."""
        actions = [{"type": "block-dirty-bitmap-remove", "data": {"node": disk, "name": name}}
                   for disk, there in found.items() if name in there.bitmaps]
        await anyio.to_thread.run_sync(_written, self._opened(), images, found, actions)

    def _opened(self) -> Monitor:
        if self._monitor is None:
            raise AssertionError("qemu-storage-daemon is not open")
        return self._monitor

    def _close_monitor(self) -> None:
        if self._monitor is not None:
            self._monitor.close()
            self._monitor = None

    async def _abandon(self, error: BaseException) -> BaseException:
        """End it after a step of `open` or `serve` failed with `error`, and its files;
        the error to raise (with what it said). Shielded: never leave it holding the
        images."""
        with anyio.CancelScope(shield=True):
            self._close_monitor()  # one monitor at a time: `quit` needs it
            proc, self._proc = self._proc, None
            # `quit` closes the images as they should be: killed while they are open
            # for writing, it would leave every bitmap in them inconsistent.
            if proc is None:
                await self._end_unit()
            else:
                if proc.returncode is None:
                    with anyio.move_on_after(STOP_TIMEOUT):
                        with contextlib.suppress(OSError, StorageDaemonError):
                            await anyio.to_thread.run_sync(_quit, self.qmp)
                        await proc.wait()
                    if proc.returncode is None:
                        proc.kill()
                await proc.wait()
            said = await anyio.to_thread.run_sync(self._said)
            for path in self._files():
                path.unlink(missing_ok=True)
        if isinstance(error, StorageDaemonError) and said:
            return StorageDaemonError(f"{error} ({said})")
        return error

    async def _launch(self, domain: str, images: Sequence[Image]) -> Process | None:
        """Start it: as pullbackd's child (its process), or in its unit (None)."""
        if self.unit is not None:
            await anyio.to_thread.run_sync(_write_new, self.spec, json.dumps({
                "domain": domain, "disks": [{"disk": i.disk, "bitmap": i.bitmap}
                                            for i in images]}))
            await _systemctl("start", self.unit)
            return None
        images = await anyio.to_thread.run_sync(layered, images)
        # Its own session: not in pullbackd's process group, not killed with it.
        fd = await anyio.to_thread.run_sync(
            os.open, self.log, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        held: list[int] = []
        try:
            try:
                held = await anyio.to_thread.run_sync(hold_writers_off, images)
            except OSError as e:
                raise StorageDaemonError(f"cannot keep writers off an image: {e}") from None
            return await anyio.open_process(self.command(images), stdin=subprocess.DEVNULL,
                                            stdout=fd, stderr=fd, start_new_session=True,
                                            pass_fds=held)
        finally:
            for each in (fd, *held):
                os.close(each)

    async def _end_unit(self) -> None:
        """`quit` its unit's daemon, and stop the unit if it does not end by itself."""
        with anyio.move_on_after(STOP_TIMEOUT):
            with contextlib.suppress(OSError, StorageDaemonError):
                await anyio.to_thread.run_sync(_quit, self.qmp)
            while await self.running():  # noqa: ASYNC110 (systemd tells no one: we ask)
                await anyio.sleep(0.05)
        if await self.running():
            with contextlib.suppress(StorageDaemonError):
                await _systemctl("stop", str(self.unit))

    def _files(self) -> tuple[Path, ...]:
        # The marker before the PID file: one left without it would look to libvirt's
        # hook like a daemon coming up, and refuse a start of the domain.
        return self.marker, self.qmp, self.nbd, self.pidfile, self.log, self.spec

    def _said(self) -> str:
        """The end of what it wrote (at most 8 KiB). Blocks."""
        try:
            with open(self.log, "rb") as f:
                f.seek(max(os.fstat(f.fileno()).st_size - 8192, 0))
                return f.read().decode(errors="replace").strip()
        except OSError:
            return ""

    async def _connect(self, proc: Process | None) -> Monitor:
        """Its monitor, once it listens (the socket file comes a moment before)."""
        with anyio.move_on_after(START_TIMEOUT):
            while proc.returncode is None if proc is not None else await self.running():
                try:
                    return await anyio.to_thread.run_sync(Monitor, self.qmp)
                except (OSError, StorageDaemonError):
                    # Not listening yet, or ending: it listens before it opens the images,
                    # and an image it cannot open ends it.
                    await anyio.sleep(0.01)
        ended = proc.returncode is not None if proc is not None else not await self.running()
        raise StorageDaemonError("qemu-storage-daemon did not start" + (
            "" if ended else f" within {START_TIMEOUT:g} s"))

    def pid(self) -> int | None:
        """Its PID, if it runs (by its PID file, checked against /proc)."""
        try:
            pid = int(self.pidfile.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            return None
        if os.path.basename(os.fsdecode(cmdline[0])) != PROGRAM or \
                os.fsencode(str(self.pidfile)) not in cmdline:
            return None
        return pid

    async def running(self) -> bool:
        """Whether it runs; OSError if systemctl cannot be run to ask its unit."""
        if self.unit is not None:  # root's: its /proc is not ours to read
            proc = await anyio.run_process(["systemctl", "is-active", "--quiet", self.unit],
                                           check=False)
            return proc.returncode == 0
        return await anyio.to_thread.run_sync(self.pid) is not None

    async def stop(self) -> None:
        """`quit`, or SIGKILL if it does not answer (its images are read-only by then);
        then its files go."""
        self._close_monitor()
        if self.unit is not None:
            await self._end_unit()
        elif (pid := await anyio.to_thread.run_sync(self.pid)) is not None:
            try:
                await anyio.to_thread.run_sync(_quit, self.qmp)
            except (OSError, StorageDaemonError):
                _kill(pid)
            with anyio.move_on_after(STOP_TIMEOUT):
                await self._gone()
            if await anyio.to_thread.run_sync(self.pid) is not None:
                _kill(pid)
        if self._proc is not None:
            await self._proc.wait()  # ours: reaped, not left a zombie
            self._proc = None
        if said := await anyio.to_thread.run_sync(self._said):
            log.info("qemu-storage-daemon said", qmp=str(self.qmp), output=said)
        for path in self._files():
            path.unlink(missing_ok=True)

    async def _gone(self) -> None:
        if self._proc is not None:
            await self._proc.wait()
            return
        # Started by an earlier run of pullbackd: not our child, nothing to wait on.
        while await anyio.to_thread.run_sync(self.pid) is not None:  # noqa: ASYNC110
            await anyio.sleep(0.02)


def _write_new(path: Path, text: str) -> None:
    """A new file holding `text`, readable by all (libvirt's hook runs as root anyway)."""
    write_new(path, text.encode(), 0o644, sync=False)


async def _systemctl(*args: str) -> None:
    try:
        proc = await anyio.run_process(["systemctl", *args], check=False)
    except OSError as e:
        raise StorageDaemonError(f"cannot run systemctl {' '.join(args)}: {e}") from None
    if proc.returncode != 0:
        raise StorageDaemonError(f"systemctl {' '.join(args)}: "
                                 f"{proc.stderr.decode(errors='replace').strip()}")


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _found(nodes: list[dict[str, Any]], images: Sequence[Image]) -> dict[str, Found]:
    """What it found in each image, from `query-named-block-nodes` (each image's node is
    named after its disk, the layer under it `_below`)."""
    by_name = {node.get("node-name"): node for node in nodes}
    found = {}
    for image in images:
        if (node := by_name.get(image.disk)) is None:
            raise StorageDaemonError(f"qemu-storage-daemon has no node for {image.disk}")
        below = _below(image.disk)
        found[image.disk] = Found(below if below in by_name else None, bitmaps.of(node))
    return found


def _opened(monitor: Monitor, images: Sequence[Image]) -> dict[str, Found]:
    """What the daemon found in each image, which it opened for writing (QEMU repairs an
    image a crash left dirty only then: reopened for writing later, it would not, and
    new bitmaps would go over the guest's data), then reopened read-only: an image open
    for writing marks its bitmaps in use, and a kill then (a monitor out of step, a stop
    that times out) would leave them all inconsistent, every consumer's chain to restart.
    It is writable again for a transaction of bitmaps alone (`_written`)."""
    found = _found(monitor.execute("query-named-block-nodes", flat=True), images)
    _reopen(monitor, images, found, read_only=True)
    return found


def _written(monitor: Monitor, images: Sequence[Image], found: dict[str, Found],
             actions: list[dict[str, Any]]) -> None:
    """The transaction `actions`, the images it changes reopened for writing for it
    alone."""
    changed = [i for i in images if any(a["data"]["node"] == i.disk for a in actions)]
    if not changed:
        return
    _reopen(monitor, changed, found, read_only=False)
    try:
        monitor.execute("transaction", actions=actions)
    finally:
        if monitor.broken is None:  # the monitor is in step: a refused transaction
            _reopen(monitor, changed, found, read_only=True)


def _reopen(monitor: Monitor, images: Sequence[Image], found: dict[str, Found],
            read_only: bool) -> None:
    monitor.execute("blockdev-reopen", options=[
        {"driver": image.format, "node-name": image.disk, "file": f"file-{image.disk}",
         "read-only": read_only} | _backing(found[image.disk]) for image in images])


def _backing(found: Found) -> dict[str, str]:
    """A reopen's option that keeps the layer under the image (left out, it would go)."""
    return {"backing": found.below} if found.below else {}


#: Layers under an image beyond which `layered` refuses it (a loop of backing files, say).
MAX_LAYERS = 64


def layered(images: Sequence[Image]) -> list[Image]:
    """The images with the layers under each one (its `backing`), read one layer at a time
    from the headers by the side that starts the daemon, which may read them. Raises
    StorageDaemonError before the daemon, or qemu-img, opens a file the domain does not use:

    - where the domain's definition names the layers (`declared`, an empty
      `<backingStore/>` included), the headers must name exactly those (file, and format
      where both state one): a header naming another file would have the daemon, root
      under the unit, serve that file (a QEMU that wrote the header, reading /etc/shadow);
    - where it names none, the headers are followed as libvirt follows them at the
      domain's start, and as libvirt does, a layer whose format is stated nowhere is
      refused (QEMU would guess it from the file's content);
    - an image with an external data file (qcow2's `data_file`) is refused: QEMU opens that
      file itself, for writing, outside the layers checked here.

    Blocks."""
    return [_layered(image) for image in images]


def _layered(image: Image) -> Image:
    declared = image.declared
    header: list[tuple[Path, str]] = []  # the layers under it, as the headers name them
    path, fmt = image.path, image.format
    while fmt != "raw":  # a raw file has no header, so nothing under it
        done = subprocess.run(["qemu-img", "info", "-U", "--output=json", "-f", fmt,
                               str(path)], check=False, capture_output=True, text=True,
                              stdin=subprocess.DEVNULL)
        if done.returncode != 0:
            raise StorageDaemonError(f"qemu-img info: {done.stderr.strip()}")
        info = json.loads(done.stdout)
        if data_file := info.get("format-specific", {}).get("data", {}).get("data-file"):
            raise StorageDaemonError(
                f"disk {image.disk}: {path} keeps its data in an external file, {data_file}, "
                "which QEMU would open itself, for writing, outside the layers checked "
                "against the domain's definition: refused, nothing served; convert the image "
                "into one without (qemu-img convert), or back the disk up while the domain "
                "runs")
        if (name := info.get("full-backing-filename")) is None:
            break
        below, stated = Path(name), str(info.get("backing-filename-format", ""))
        header.append((below, stated))
        if declared is not None:
            i = len(header) - 1
            if i >= len(declared) or Path(declared[i][0]) != below or \
                    (stated and declared[i][1] not in (None, stated)):
                _disagree(image, declared, header)  # and `below` is not opened
            stated = declared[i][1] or stated  # libvirt's format, where it gives one
        if not stated:
            raise StorageDaemonError(
                f"disk {image.disk}: {path} names no format for its backing file {below} "
                "(QEMU would guess it from the file's content, and libvirt refuses that "
                "too); state it in the image (qemu-img rebase -u -b FILE -F FORMAT) or in "
                "the domain's <backingStore>")
        if len(header) > MAX_LAYERS:
            raise StorageDaemonError(f"disk {image.disk}: more than {MAX_LAYERS} layers under "
                                     f"{image.path} (its backing files form a loop?)")
        header[-1] = (below, stated)
        path, fmt = below, stated
    if declared is not None and len(header) != len(declared):
        _disagree(image, declared, header)
    return dataclasses.replace(image, backing=tuple(header))


def _disagree(image: Image, declared: tuple[tuple[str, str | None], ...],
              header: list[tuple[Path, str]]) -> NoReturn:
    def chain(layers: Sequence[tuple[Path | str, str | None]]) -> str:
        return ", ".join(f"{path} ({fmt or 'format not stated'})" for path, fmt in layers) \
            or "none"

    raise StorageDaemonError(
        f"disk {image.disk}: the domain's definition names the layers under {image.path} "
        f"as: {chain(declared)}; its image headers as: {chain(header)}; refused, nothing "
        "under it opened: make them agree, fixing the image (qemu-img rebase -u) or the "
        "definition's <backingStore> (virsh edit)")


def _prepare(monitor: Monitor, images: Sequence[Image], found: dict[str, Found],
             checkpoint: str, served: Sequence[Export | Target]) -> None:
    """The bitmaps, the images reopened read-only, the exports (the module's steps)."""
    actions: list[dict[str, Any]] = []
    for image in images:
        if image.bitmap:
            actions.append({"type": "block-dirty-bitmap-add", "data": {
                "node": image.disk, "name": checkpoint, "persistent": True}})
    for export in served:
        if export.since is not None:
            actions += [
                {"type": "block-dirty-bitmap-add", "data": {
                    "node": export.disk, "name": export.bitmap, "persistent": False,
                    "disabled": True}},
                {"type": "block-dirty-bitmap-merge", "data": {
                    "node": export.disk, "target": export.bitmap,
                    "bitmaps": [export.since]}}]
    _written(monitor, images, found, actions)
    for export in served:
        if isinstance(export, Target):
            continue
        monitor.execute(
            "block-export-add", type="nbd", id=f"export-{export.disk}",
            **{"node-name": export.disk}, name=export.name, writable=False,
            **({"bitmaps": [export.bitmap]} if export.bitmap else {}))


def new_target(path: Path, size: int) -> int:
    """A new, empty qcow2 file of `size` bytes at `path` (never one there already, never
    through a link), open to read and write: its descriptor, for a Target. Raises
    FileExistsError, OSError, qcow2.ImageError. Blocks."""
    image = qcow2.empty(size)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o644)
    try:
        fill(fd, path, image)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _push(monitor: Monitor, targets: Sequence[Target]) -> None:
    """A backup job per target: the whole disk, or the clusters its bitmap marks."""
    for target in targets:
        # The file through our descriptor of it (the daemon opens it now, as `start` has
        # it open): whatever its name leads to since.
        monitor.execute("blockdev-add", driver="qcow2", **{"node-name": f"target-{target.disk}"},
                        file={"driver": "file",
                              "filename": f"/proc/{os.getpid()}/fd/{target.fd}"})
        monitor.execute(
            "blockdev-backup", **{"job-id": f"push-{target.disk}", "auto-dismiss": False},
            device=target.disk, target=f"target-{target.disk}",
            sync="full" if target.bitmap is None else "bitmap",
            **({} if target.bitmap is None else {"bitmap": target.bitmap,
                                                  "bitmap-mode": "never"}))


def pushed(qmp: Path) -> tuple[bool, str | None]:
    """Whether every push job of the daemon ended, and the first error if one failed. A
    push that ended well has its target closed here (written through and flushed) before
    it counts as done. Blocks; raises OSError or StorageDaemonError if it cannot ask."""
    monitor = Monitor(qmp, timeout=QMP_TIMEOUT)
    try:
        jobs = monitor.execute("query-jobs")
        if any(j["status"] != "concluded" for j in jobs):
            return False, None
        errors = [f"{j['id']}: {j['error']}" for j in jobs if j.get("error")]
        if errors:
            return True, errors[0]
        for job in jobs:
            monitor.execute("job-dismiss", id=job["id"])
            monitor.execute("blockdev-del", **{"node-name": "target-" + job["id"].removeprefix(
                "push-")})
        return True, None
    finally:
        monitor.close()


def _quit(qmp: Path) -> None:
    monitor = Monitor(qmp, timeout=5.0)
    try:
        with contextlib.suppress(StorageDaemonError):  # it may close before it answers
            monitor.execute("quit")
    finally:
        monitor.close()


def hold_writers_off(images: Sequence[Image]) -> list[int]:
    """For each raw image, a descriptor holding QEMU's lock that keeps writers off it, as
    the qemu-storage-daemon that inherits them (from a fork and exec) holds them until it
    ends. Raises OSError (an image that cannot be opened, or a QEMU that writes it)."""
    held: list[int] = []
    try:
        for image in images:
            if image.format != "raw":
                continue  # its format's node keeps writers off
            fd = os.open(image.path, os.O_RDONLY | os.O_CLOEXEC)
            held.append(fd)
            lock = struct.pack("hhqqi4x", fcntl.F_RDLCK, os.SEEK_SET, WRITE_NOT_SHARED, 1, 0)
            try:
                fcntl.fcntl(fd, fcntl.F_OFD_SETLK, lock)
            except OSError as e:
                raise OSError(e.errno, f"{image.path} is open for writing elsewhere (the "
                                       f"domain runs?): {e.strerror}") from None
            # That keeps new writers off; one that was there first (a running domain that
            # shares the disk) holds WRITE_HELD, which this lock does not meet.
            probe = struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, WRITE_HELD, 1, 0)
            held_by = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, probe)
            if struct.unpack("hhqqi4x", held_by)[0] != fcntl.F_UNLCK:
                raise OSError(errno.EBUSY, f"{image.path} is open for writing elsewhere (a "
                                           "running domain that shares the disk?)")
    except BaseException:
        for fd in held:
            os.close(fd)
        raise
    return held


def _escape(path: Path) -> str:
    """A path as a value of QEMU's key=value options (a comma is doubled)."""
    return str(path).replace(",", ",,")
