"""The repository's writers: one qemu-storage-daemon that serves each backup file for
writing while a copy fills it.

It starts with the first backup the daemon writes, from the event loop's thread (so the
kernel kills it when the daemon dies, qemu_nbd.TIED), and lives until the daemon stops
(`stop`). One that escaped a crash is ended by `Repository.recover`, like every NBD
server on a socket of the repository's sockets folder. A backup file costs it four QMP
commands where it cost two processes (`qemu-img create`, then a qemu-nbd): on a host
backing up 16 domains at once, those two processes took a fifth of the CPU time of an
incremental backup (`perf` over `scripts/bench --night`), their start and their exit.

For each file, which the caller made an empty qcow2 image (qcow2.py: of the disk's size,
naming its backing file by a name relative to it, so the folder can move as a whole),
in clusters of `qcow2.CLUSTER` bytes:

1. a `qcow2` node opens it alone, its backing chain left shut, through a `file` node of
   its own, past the page cache where `direct` (see repository.image_server), and never
   flushed: the caller syncs the file once, at the commit;
2. a writable NBD export of it, named by a fresh token, on the daemon's one socket.

The invariant that keeps step 1 right: **every write into a file over a backing file
covers whole clusters** (the disk's last one up to its end). qcow2 reads from below a
cluster only to complete a write that covers part of it; with the chain shut it would
complete it with zeroes (and a zero write of part of a cluster would zero all of it), so
a backup written in parts of clusters would be wrong. The copy grows its writes to whole clusters
(`stream.whole_clusters`, its `cluster`), and the repository refuses to commit a file
with a region that is not (`Repository.commit`). Opening the chain cost a file's open
per backup below, each night: 0.6 ms of the writer's CPU per link, a tenth of a
second per backup once a chain is half a year long.

`close` undoes them in reverse, the export first (its connections dropped), then the
node (qcow2's tables written into the file), so the file can be synced, renamed or
deleted. If the process dies, or its monitor falls out of step (a command not
answered within qsd.QMP_TIMEOUT), every copy into it fails, and the next `open` starts
another.

The QMP calls block: they run in worker threads, one file's at a time (one monitor).
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass
from pathlib import Path

import anyio
import structlog

from . import names, qemu_nbd
from .model import nbd_url
from .names import Served
from .qsd import PROGRAM, QMP_TIMEOUT, Monitor, StorageDaemonError

log = structlog.get_logger()


@dataclass(frozen=True)
class Opened:
    """A backup file served for writing: its export's NBD URI, and what `close` undoes."""

    url: str
    name: str
    node: str
    export: str


class Writers:
    """The writer's process, started when first needed, and the files it serves."""

    def __init__(self, sockets: Path) -> None:
        """`sockets`: the repository's sockets folder (only the daemon enters it)."""
        self._sockets = sockets
        self._server: qemu_nbd.Server | None = None
        self._monitor: Monitor | None = None
        self._starting = anyio.Lock()
        self._qmp = threading.Lock()
        self._ids = itertools.count(1)

    @property
    def pid(self) -> int | None:
        """The process's id, while it runs."""
        return None if self._server is None else self._server.pid

    async def open(self, image: Path, direct: bool) -> Opened:
        """Serve `image` (an empty qcow2 image, qcow2.py) for writing; raises
        StorageDaemonError."""
        monitor, sock = await self._running()
        n, name = next(self._ids), names.socket_token()
        opened = Opened(nbd_url(sock, name), name, f"w{n}", f"e{n}")
        # Shielded: once open, the file is the caller's to close, so it must get it.
        with anyio.CancelScope(shield=True):
            try:
                await anyio.to_thread.run_sync(self._open, monitor, opened, image, direct)
            except StorageDaemonError:
                await self._failed(monitor)
                raise
        return opened

    async def close(self, opened: Opened) -> None:
        """Stop serving the file and close it. Shielded: a file half closed would be
        synced, renamed or deleted while still open. Raises StorageDaemonError if that
        fails, or if the process died meanwhile (the file is closed then, but what
        qcow2 held of it in memory may be lost: it is no backup)."""
        with anyio.CancelScope(shield=True):
            monitor = self._monitor
            if monitor is None or self._server is None or self._server.returncode is not None:
                raise StorageDaemonError("qemu-storage-daemon, the repository's writer, "
                                         "died while it wrote the file")
            try:
                await anyio.to_thread.run_sync(self._close, monitor, opened)
            except StorageDaemonError as e:
                await self._failed(monitor)
                raise StorageDaemonError(f"qemu-storage-daemon, the repository's writer, "
                                         f"died or failed while it wrote the file: {e}") from None

    async def _failed(self, monitor: Monitor) -> None:
        """After a command failed: a writer whose monitor is out of step (a reply that
        did not come in time) can open no file and close none, so it ends, and with it
        every copy into it (their files are closed then, as `close` says: no backups);
        the next `open` starts another. One that only refused a command goes on."""
        if monitor.broken is None:
            return
        async with self._starting:
            if self._monitor is monitor:
                log.warning("ending the repository's writer: its monitor is out of step",
                            reason=monitor.broken, pid=self.pid)
                await self.stop()

    async def stop(self) -> None:
        """End the process (its files closed) if it runs."""
        server, monitor = self._server, self._monitor
        self._server = self._monitor = None
        if monitor is not None:
            monitor.close()
        if server is not None:
            await server.astop()

    async def _running(self) -> tuple[Monitor, Path]:
        async with self._starting:
            server = self._server
            if server is None or server.returncode is not None:
                await self.stop()
                await anyio.Path(self._sockets).mkdir(mode=0o700, parents=True, exist_ok=True)
                token = names.socket_token()
                sock = names.repository_socket(self._sockets, Served.BACKUP, token)
                qmp = names.writer_monitor(self._sockets, token)
                server = qemu_nbd.Server(qmp, "qcow2", sock, program=[
                    *qemu_nbd.TIED, PROGRAM,
                    "--chardev", f"socket,id=qmp,path={qmp},server=on,wait=off",
                    "--monitor", "chardev=qmp",
                    "--nbd-server", f"addr.type=unix,addr.path={sock}"])
                try:
                    await server.astart()  # from the loop's thread: tied to the daemon
                except qemu_nbd.ServeError as e:
                    raise StorageDaemonError(f"the repository's writer did not start: "
                                             f"{e.reason}") from None
                try:
                    self._monitor = await anyio.to_thread.run_sync(Monitor, qmp, QMP_TIMEOUT)
                except BaseException:
                    await server.astop()
                    raise
                self._server = server
            assert self._monitor is not None
            return self._monitor, server.socket

    def _open(self, monitor: Monitor, opened: Opened, image: Path, direct: bool) -> None:
        with self._qmp:
            # Its backing chain shut: see the invariant above. (Version 3 marks zeroed
            # clusters zero; a version 2 file with no backing open would only discard
            # them, and they would read from below again.)
            monitor.execute("blockdev-add", driver="qcow2", **{"node-name": opened.node},
                            file={"driver": "file", "filename": str(image),
                                  "cache": {"direct": direct, "no-flush": True}},
                            backing=None)
            try:
                monitor.execute("block-export-add", type="nbd", id=opened.export,
                                **{"node-name": opened.node}, name=opened.name,
                                writable=True)
            except BaseException:
                monitor.execute("blockdev-del", **{"node-name": opened.node})
                raise

    def _close(self, monitor: Monitor, opened: Opened) -> None:
        with self._qmp:
            monitor.execute("block-export-del", id=opened.export, mode="hard")
            # Deleted once its last request is done: until then its node is in use.
            monitor.event("BLOCK_EXPORT_DELETED", id=opened.export)
            monitor.execute("blockdev-del", **{"node-name": opened.node})

