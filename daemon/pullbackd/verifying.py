"""Verify: every region a backup wrote, read again from the backup's own file and
compared with its manifest; and the backup files of a chain served for it and for a
restore.

A region of backup k is in file k itself, never only in a file below it: qcow2
allocates in the file being written every range written to it, data or zeroes
(a zero write sets the clusters' zero flag, which reads as zeroes even without
a backing file), and a flattened backup stands alone. So file k read on its
own, without its backing file, holds every region of backup k, and one
qemu-storage-daemon can serve a whole chain at once, each file alone
(`backing: null`) as an export named after the file, where a qemu-nbd per
backup would open, each time, the whole chain below it.

The invariant: Verify finds exactly what reading each backup through its backing
chain would (as a restore reads it, and as Verify once did with a qemu-nbd per
backup): each data region reads back with its checksum, each zero region reads
as zeroes. A region its own file holds reads the same alone as through the
chain. One that an overlay does not hold (`qemu:allocation-depth` not 1 across
it: only damage does that, a lost mapping) is read through its chain instead,
where its backing files show through. Every region of every backup is read, a
few requests in flight on each of a few connections (READERS, IN_FLIGHT).

And a file holds nothing beyond its regions (rounded out to whole clusters: qcow2
allocates whole ones): a range it holds that no region covers (damage to its
tables, say) is what a restore would read there, over what older backups hold,
and no checksum vouches for it.

A restore reads a chain in segments, consecutive files served as one export that
reads through them (`segment_server`, `held`, `url`): newest first, what each
segment holds and no newer one holds (repository.py).

`check` and `held` block: the repository runs them in a worker thread, with the
server started from the event loop's (qemu_nbd.TIED).
"""

from __future__ import annotations

import bisect
import json
import math
import queue
import select
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import nbd

from . import qcow2, qemu_nbd

PROGRAM = "qemu-storage-daemon"
ALLOCATION_DEPTH = "qemu:allocation-depth"
#: Files one qemu-storage-daemon opens at most (one descriptor each); a longer
#: chain is served in turns.
FILES_PER_SERVER = 256
#: Files of a chain a restore reads through at once (`segment_server`). A read
#: through d files costs QEMU a lookup in each: a 30-link chain read through at once
#: restored faster than its files read one by one, or in segments of 8 (README,
#: `scripts/bench --repository`), but a 1 MiB read took 0.4 ms through 100 files and
#: 1.6 ms through 300.
FILES_PER_SEGMENT = 32
#: Connections reading at once (each its own export), and requests in flight on each.
READERS = 2
IN_FLIGHT = 8
#: Clients one server takes at once: Verify's READERS, or a restore's copy (a planner
#: and a connection per stream.Tuning.connections), with room to spare.
CONNECTIONS = 8
#: Bytes of block status asked for at a time: the most one NBD request may ask
#: (its length has 32 bits), in whole MiB. A file is walked whole before it is read:
#: a 16 TiB disk is 4,096 requests.
WINDOW = (1 << 32) - (1 << 20)
#: Seconds the server may leave a request unanswered.
STALL_TIMEOUT = 60.0


@dataclass(frozen=True)
class Expected:
    """What one backup file must hold: `regions` (offset, length, checksum; None for
    zeroes), checksummed by `checksum`."""

    file: Path
    regions: Sequence[tuple[int, int, str | None]]
    checksum: Callable[[memoryview], str]
    #: Whether the file is an overlay on a backing file (an incremental).
    backed: bool
    #: The disk's size in bytes.
    size: int


def server(files: Sequence[Path], sock: Path) -> qemu_nbd.Server:
    """One qemu-storage-daemon (not started yet) serving each of `files` on its own,
    read-only and without its backing file, as the export named after the file (so
    their names must differ), on `sock`; tied to the thread that starts it."""
    nodes = [_node(i, path, None) for i, path in enumerate(files)]
    return _server(files, nodes, list(enumerate(files)), sock)


def segment_server(files: Sequence[Path], sock: Path) -> qemu_nbd.Server:
    """One qemu-storage-daemon (not started yet) serving consecutive files of a chain,
    newest first, as one read-only export named after the first (`files[0].name`), on
    `sock`: each file's backing file is the next one, the last has none. QEMU reads the
    chain given, and follows no backing file name of the files' headers. Tied to the
    thread that starts it."""
    nodes = [_node(i, path, f"n{i + 1}" if i + 1 < len(files) else None)
             for i, path in enumerate(files)]
    # A node is defined before one that names it as its backing file.
    return _server(files, nodes[::-1], [(0, files[0])], sock)


def _node(i: int, path: Path, backing: str | None) -> dict[str, object]:
    return {"driver": "qcow2", "node-name": f"n{i}", "read-only": True, "backing": backing,
            "file": {"driver": "file", "filename": str(path), "read-only": True}}


def _server(files: Sequence[Path], nodes: list[dict[str, object]],
            exports: list[tuple[int, Path]], sock: Path) -> qemu_nbd.Server:
    argv = [*qemu_nbd.TIED, PROGRAM]
    for node in nodes:
        argv += ["--blockdev", json.dumps(node)]
    argv += ["--nbd-server", f"addr.type=unix,addr.path={sock},max-connections={CONNECTIONS}"]
    for i, path in exports:
        argv += ["--export", f"type=nbd,id=e{i},node-name=n{i},name={path.name},"
                             "allocation-depth=on"]
    # Named after their folder: an error names the file it is about.
    return qemu_nbd.Server(files[0].parent if files else sock, "qcow2", sock, program=argv)


def check(sock: Path, expected: Sequence[Expected]) -> list[list[str]]:
    """The problems of each backup in `expected` (in its order; none: it passed), read
    from the server on `sock` (`server`). Blocks. Raises nbd.Error if a file cannot be
    read at all."""
    work: queue.SimpleQueue[int] = queue.SimpleQueue()
    for i in range(len(expected)):
        work.put(i)
    found: list[list[str]] = [[] for _ in expected]
    errors: list[BaseException] = []

    def read() -> None:
        try:
            while not errors:
                try:
                    i = work.get_nowait()
                except queue.Empty:
                    return
                found[i] = _check_file(sock, expected[i])
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=read, name=f"pullbackd-verify-{n}")
               for n in range(min(READERS, len(expected)))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return found


def _check_file(sock: Path, backup: Expected) -> list[str]:
    regions = backup.regions
    h = nbd.NBD()
    h.set_pread_initialize(False)  # every read that fails fails the check
    h.add_meta_context(ALLOCATION_DEPTH)
    h.set_export_name(backup.file.name)
    h.connect_unix(str(sock))
    try:
        own = _own(h, backup.size)
        held = [_within(o, n, own) for o, n, _ in regions] if backup.backed \
            else [True] * len(regions)
        mine = [i for i, ok in enumerate(held) if ok]
        ok = dict(zip(mine, _compare(h, backup, [regions[i] for i in mine]), strict=True))
        # A full backup's regions may be smaller than a cluster; what the cluster holds
        # beside them was zeroes on the disk (the source said so), and a restore copies
        # the whole cluster. (An incremental writes whole clusters, its regions too.)
        beside = [] if backup.backed else [(start, end) for start, end in subtract(
            _clusters(regions, backup.size), union([(o, o + n) for o, n, _ in regions], []))
            if any(h.pread(end - start, start))]
    finally:
        h.shutdown()
    if lost := [i for i, k in enumerate(held) if not k]:
        # Not in the overlay itself (only damage does that): read through its chain,
        # as a restore reads it.
        with qemu_nbd.connect(backup.file, "qcow2") as chain:
            ok |= dict(zip(lost, _compare(chain, backup, [regions[i] for i in lost]),
                           strict=True))
    return [f"{backup.file.name}: {length} bytes at {offset} differ from what was written"
            for i, (offset, length, _) in enumerate(regions) if not ok[i]] + [
        f"{backup.file.name}: holds {end - start} bytes at {start} that it never wrote"
        for start, end in subtract(own, _clusters(regions, backup.size))] + [
        f"{backup.file.name}: {end - start} bytes at {start}, beside what it wrote, are "
        "no longer zeroes" for start, end in beside]


def _clusters(regions: Sequence[tuple[int, int, str | None]], size: int
              ) -> list[tuple[int, int]]:
    """The whole clusters the regions touch, up to `size`: sorted and apart."""
    c = qcow2.CLUSTER
    return union([(o // c * c, min(-(-(o + n) // c) * c, size)) for o, n, _ in regions if n],
                 [])


def _own(h: nbd.NBD, size: int) -> list[tuple[int, int]]:
    """The ranges (start, end) up to `size` the export's own files hold (data or zeroes):
    allocation depth not 0 (a file on its own holds what is at depth 1; through a
    segment, depth d is its d-th file; 0 is a range none of them holds). Sorted and
    apart."""
    return union([(start, min(end, size)) for start, end, depth in _depths(h, 0, size)
                  if depth], [])


def _within(offset: int, length: int, ranges: Sequence[tuple[int, int]]) -> bool:
    """Whether [offset, offset + length) lies in `ranges` (sorted and apart)."""
    if not length:
        return True
    i = bisect.bisect_right(ranges, (offset, math.inf)) - 1
    return i >= 0 and offset + length <= ranges[i][1]


def _depths(h: nbd.NBD, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(start, end, depth) runs of the export's allocation depth from `start` on, until
    they cover `end`."""
    offset = start
    while offset < end:
        runs: list[tuple[int, int]] = []

        def extent(context: str, _start: int, entries: list[int], _err: object,
                   runs: list[tuple[int, int]] = runs) -> int:
            if context == ALLOCATION_DEPTH:
                runs += zip(entries[::2], entries[1::2], strict=True)
            return 0

        h.block_status(min(WINDOW, end - offset), offset, extent)
        if not runs:
            raise nbd.Error(f"no allocation depth at offset {offset}", 0)
        for length, depth in runs:
            yield offset, offset + length, depth
            offset += length


def _compare(h: nbd.NBD, backup: Expected,
             regions: Sequence[tuple[int, int, str | None]]) -> list[bool]:
    """Whether each region reads back as written: IN_FLIGHT reads at a time, each
    region's buffer reused once it is checked."""
    ok = [False] * len(regions)
    done: deque[tuple[int, nbd.Buffer]] = deque()
    failed: list[int] = []
    in_flight = 0
    todo = iter(range(len(regions)))
    more = True
    while more or in_flight:
        while more and in_flight < IN_FLIGHT:
            i = next(todo, None)
            if i is None:
                more = False
                break
            offset, length, _ = regions[i]
            if not length:  # nothing to read: an empty region
                ok[i] = regions[i][2] in (None, backup.checksum(memoryview(b"")))
                continue
            buf = _buffer(length if offset + _round(length) > backup.size else _round(length))

            def completed(err: object, i: int = i, buf: nbd.Buffer = buf) -> int:
                # Record only: libnbd swallows what a callback raises.
                (failed.append(i) if getattr(err, "value", 0) else done.append((i, buf)))
                return 1
            h.aio_pread(buf, offset, completed)
            in_flight += 1
        if in_flight and not done and not failed:
            _wait(h)
        if failed:
            offset, length, _ = regions[failed[0]]
            raise nbd.Error(f"{backup.file.name}: reading {length} bytes at {offset} failed", 0)
        while done:
            i, buf = done.popleft()
            in_flight -= 1
            length, expected = regions[i][1:]
            ok[i] = buf.is_zero(0, length) if expected is None else \
                backup.checksum(memoryview(buf.to_buffer())[:length]) == expected
            _give(buf)
    return ok


#: Read buffers, by size, kept for every next read: Debian 12's python3-libnbd (1.14)
#: keeps a reference to each buffer a read used, so one let go is memory lost for good
#: (one per region length Verify ever met). A region is read into a buffer of the
#: next power of two (`_round`: what follows it in the file is read too, and not
#: looked at), so that they come in a few sizes.
_BUFFERS: dict[int, list[nbd.Buffer]] = {}
_BUFFERS_LOCK = threading.Lock()  # files are checked in threads of their own


def _round(length: int) -> int:
    return 1 << (length - 1).bit_length()


def _buffer(size: int) -> nbd.Buffer:
    with _BUFFERS_LOCK:
        free = _BUFFERS.get(size)
        if free:
            return free.pop()
    return nbd.Buffer(size)


def _give(buf: nbd.Buffer) -> None:
    with _BUFFERS_LOCK:
        _BUFFERS.setdefault(buf.size(), []).append(buf)


def _wait(h: nbd.NBD) -> None:
    """Until libnbd made progress on `h` (a reply arrived, a request went out); nbd.Error
    after STALL_TIMEOUT seconds without."""
    direction = h.aio_get_direction()
    events = (select.POLLIN if direction & nbd.AIO_DIRECTION_READ else 0) | \
        (select.POLLOUT if direction & nbd.AIO_DIRECTION_WRITE else 0)
    poller = select.poll()
    poller.register(h.aio_get_fd(), events)
    ready = poller.poll(STALL_TIMEOUT * 1000)
    if not ready:
        raise nbd.Error(f"no answer for {STALL_TIMEOUT:g} s", 0)
    for _, revents in ready:
        if revents & (select.POLLIN | select.POLLHUP | select.POLLERR):
            h.aio_notify_read()
        if revents & select.POLLOUT:
            h.aio_notify_write()


def url(sock: Path, name: str) -> str:
    """The NBD URI of export `name` of the server on `sock`."""
    return f"nbd+unix:///{name}?socket={sock}"


def held(sock: Path, name: str, size: int) -> list[tuple[int, int]]:
    """The ranges (start, end) up to `size` that export `name` of the server on `sock`
    holds in its own files (data or zeroes): a file on its own (`server`), or a
    segment's files (`segment_server`), not what would show through from below them.
    Blocks; raises nbd.Error."""
    h = nbd.NBD()
    h.add_meta_context(ALLOCATION_DEPTH)
    h.set_export_name(name)
    h.connect_unix(str(sock))
    try:
        return _own(h, size)
    finally:
        h.shutdown()


def union(a: Sequence[tuple[int, int]], b: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """The ranges in `a` or `b`, sorted and apart (adjacent ones joined)."""
    out: list[tuple[int, int]] = []
    for start, end in sorted([*a, *b]):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        elif start < end:
            out.append((start, end))
    return out


def subtract(a: Sequence[tuple[int, int]], b: Sequence[tuple[int, int]]
             ) -> list[tuple[int, int]]:
    """The ranges in `a` and not in `b` (both sorted and apart), sorted and apart."""
    out = []
    j = 0
    for start, end in a:
        while j < len(b) and b[j][1] <= start:
            j += 1
        pos, k = start, j
        while k < len(b) and b[k][0] < end:
            if b[k][0] > pos:
                out.append((pos, b[k][0]))
            pos = max(pos, b[k][1])
            k += 1
        if pos < end:
            out.append((pos, end))
    return out
