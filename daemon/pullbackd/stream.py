"""The streaming engine: copy what a backup export holds into an NBD destination, with libnbd.

One planner reads the source's extents a window at a time (never the whole
disk's map first), merging the dirty bitmap with `base:allocation`: dirty data
is copied, dirty ranges the source reports as zero become zero writes (zeroes
written out where the destination has no zero command, or nothing, when the
destination starts out zero), clean ranges are skipped. It
cuts the work into requests and hands them to workers through a bounded queue: one
worker from the start, another each `Tuning.spread` bytes it finds to read, when both
the source and the destination allow multi-conn (an appliance's server that takes one
connection at a time never answers a second one). The queue takes requests a
`Tuning.in_flight` at a time: one at a time, each worker's take woke the planner and
each of its puts a worker, a thread hand-off per request (a sixth of the engine's Python
in a restore of scattered 64 KiB regions).

Requests fit what the destination advertises (NBD_INFO_BLOCK_SIZE, read on the first
destination connection before anything is planned): none is longer than its maximum
block size, and with a minimum block size every write covers whole blocks of it, as
whole clusters (`whole_clusters`); a disk whose size is not a multiple of it is refused
(`UnfitDestination`) before anything is written. A destination without flush (its
writes are stable once acknowledged) is not flushed at the end.

Each worker owns one connection to the source and one to the destination and
keeps a bounded number of asynchronous requests in flight, reading into
buffers from a pool (a fresh `nbd.Buffer` per request is several times
slower). The daemon shares one pool between all its copies, so that many
copies at once stay within one memory budget.

libnbd swallows exceptions raised in completion callbacks, so callbacks only
record that a request completed; the worker loop retires each one with
`aio_command_completed`, whose answer alone is the request's outcome (libnbd 1.14
tells a read the server answered short there, and not to the callback), and raises.

A client's destination (`pinned`: an appliance's server, as places.check approved it,
its socket's path resolved) is reached, at each connect (the first pair's, which the
capabilities above are read from, and each pair opened mid-copy), at the very socket
that path names, no link followed: each folder from / down, and the socket, is opened
O_PATH|O_NOFOLLOW from the one above it, and libnbd connects to /proc/self/fd/N, which
is that socket whatever is renamed meanwhile (`_pinned`). Whoever may write a folder on
the path (the appliance, in its own) could otherwise swap the socket, or a folder, for
a link once checked, or make one at a `{disk}` name Start could not look at: libnbd
follows links as it connects, and would write this VM's disk into another appliance's
server over its backup, or into any server pullbackd's user may reach and the appliance
may not (the repository's writers). A link anywhere on the way, or a "..", fails the
copy with UncheckedDestination before anything connects. Pinned rather than a check of
the server's peer credentials (SO_PEERCRED) once connected: a link could lead to another
server of the approved uid all the same, and SO_PEERCRED names whoever called listen(),
systemd for a socket-activated server, not who serves.

And the socket so reached must be the job's starter's (`Pinned.owner`, the uid the
control socket saw Start come from; root's jobs excepted): its owner is who bound it,
the user an appliance serves as (a socket unit's SocketUser=). Whoever may start backups
could otherwise name, inside [stream] destinations, another appliance's socket, or
make a `{disk}` socket Start could not look at one (a hard link keeps its owner), and
have pullbackd, which may reach it, write this VM's disk over that appliance's backup.

All of this blocks: `copy` runs in threads of its own. `stream` is the async
face the daemon uses, and cancels the copy when its caller is cancelled.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import math
import os
import queue
import select
import stat
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from urllib.parse import quote, unquote_plus, urlsplit

import anyio
import nbd
import structlog

from .roles import user_name

ALLOCATION = "base:allocation"
#: NBD_STATE_HOLE | NBD_STATE_ZERO in base:allocation; NBD_STATE_DIRTY in a dirty bitmap.
STATE_ZERO = 2
STATE_DIRTY = 1
MiB = 1 << 20
log = structlog.get_logger()


#: Seconds a thread of the copy waits at most before it looks whether the copy was
#: cancelled (how long Abort may wait for it).
POLL = 0.5
#: Seconds a server may take to close a connection once told goodbye.
CLOSE_TIMEOUT = 5.0
#: Seconds `reachable` gives a server to greet it.
REACHABLE_TIMEOUT = 5.0
#: Requests shorter than the request size are whole multiples of this (and shorter
#: ones powers of two): buffers come in those sizes alone (`split`, BufferPool).
STEP = 64 * 1024


class StreamError(Exception):
    """The copy failed; nothing it wrote may be trusted as a backup."""


class UnfitDestination(StreamError):
    """The destination cannot take this disk as its server advertises itself: nothing
    was written. Another destination (or one set up otherwise) is needed."""


@dataclass(frozen=True)
class Pinned:
    """A client's destination: its Unix socket reached with no link followed, and, with
    `owner` (a uid), that user's (see above)."""

    owner: int | None = None


class UncheckedDestination(StreamError):
    """The destination's socket cannot be reached as places.check approved it: a link
    on its path (put there since, or at a `{disk}` name), a "..", or a socket that is not
    the backup's starter's (`Pinned`). Nothing connected through it: what the copy wrote
    went to the socket at the path checked, if anywhere. The appliance must serve its
    socket, as its own user, at the path it gave, with no link on the way, and the backup
    be started again."""


class BufferPool:
    """Read buffers for every copy at once: chunks as long as the longest request a copy
    of `request_size` makes (that, or a STEP if longer: a write covers whole clusters,
    and NBD's minimum block size is at most 64 KiB), at most `budget` bytes of them
    (one, if the budget is smaller). A request of any length takes a whole chunk,
    whichever is free, and reads into its first bytes.

    Never blocks: a worker that finds the budget spent goes on with the requests
    it has in flight (whose buffers come back) and asks again later. Nothing is ever
    let go: Debian 12's python3-libnbd (1.14) keeps a reference to what each request
    read into or wrote from, so a buffer let go is memory lost for good (a pool that
    made room for other sizes grew a daemon past 800 MiB). Each chunk is made once, and
    so is the view of each length into it (`split` makes requests of a few lengths).

    Chunks rather than buffers of each request's length: those held the budget in the
    lengths the night's full backups asked for (the request size), and left every
    incremental after them, whose requests are a cluster or two, one buffer of each
    shorter length between them all (`scripts/bench --night`: the incrementals took an
    eighth longer).

    A chunk is one request's at a time: `give` of a buffer not taken raises
    AssertionError, as two copies' reads into one chunk would mix their disks.
    """

    def __init__(self, budget: int, request_size: int) -> None:
        self.budget, self.chunk = budget, max(request_size, STEP)
        #: Chunks the budget makes at most.
        self._most = max(1, budget // self.chunk)
        self._lock = threading.Condition()
        self._chunks: list[memoryview] = []
        #: The view of each length into each chunk, made once (see the class).
        self._views: list[dict[int, nbd.Buffer]] = []
        #: Chunk of each view, by id.
        self._chunk_of: dict[int, int] = {}
        self._free: list[int] = []
        #: The view each chunk taken was handed out as, by chunk.
        self._taken: dict[int, int] = {}

    def take(self, length: int) -> nbd.Buffer | None:
        """A buffer of `length` bytes, or None while the budget is spent."""
        if length > self.chunk:
            raise ValueError(f"a request of {length} bytes is longer than the pool's "
                             f"chunks ({self.chunk} bytes)")
        with self._lock:
            if self._free:
                i = self._free.pop()
            elif len(self._chunks) < self._most:
                i = len(self._chunks)
                self._chunks.append(memoryview(bytearray(self.chunk)))
                self._views.append({})
            else:
                return None
            view = self._views[i].get(length)
            if view is None:
                view = self._views[i][length] = nbd.Buffer.from_buffer(
                    self._chunks[i][:length])
                self._chunk_of[id(view)] = i
            self._taken[i] = id(view)
            return view

    def give(self, buf: nbd.Buffer) -> None:
        """Back for the next request: also a buffer of a request that never completed,
        once its handle is closed."""
        with self._lock:
            i = self._chunk_of.get(id(buf), -1)
            if self._taken.get(i) != id(buf):  # not an assert: kept under python -O
                raise AssertionError("a buffer given back that was not taken")
            del self._taken[i]
            self._free.append(i)
            self._lock.notify()

    def spare(self) -> int:
        """Chunks no request holds: those free, and those the budget has room for yet."""
        with self._lock:
            return len(self._free) + self._most - len(self._chunks)

    def wait(self, timeout: float) -> None:
        """Until a buffer comes back (or `timeout`)."""
        with self._lock:
            self._lock.wait(timeout)


@dataclass(frozen=True)
class Tuning:
    """Defaults measured on 2 cores (see README). Requests larger than nbdcopy's
    256 KiB cost less here (Python pays per request, not per byte), but not past
    512 KiB: QEMU's NBD server allocates a buffer per read, and from 1 MiB on it
    often gets fresh pages from the kernel each time (on a fresh domain, 170,000
    page faults per GiB copied and 40 % more CPU for QEMU). More than 2
    connections only add GIL contention. At most connections x in_flight x
    request_size (8 MiB) of buffers per copy."""

    #: Bytes per read or write request.
    request_size: int = 512 * 1024
    #: Connection pairs (source, destination) used when the source allows multi-conn.
    connections: int = 2
    #: Bytes to read before the copy opens its second connection pair, and each next:
    #: on a host backing up many domains at once, most incrementals are a few MiB, and
    #: a pair costs the source and the destination a connection and a flush each. A
    #: pair opens only while the buffers have room for its requests in flight: with
    #: many copies at once they are all taken, and another pair would only add threads
    #: taking turns with the GIL (README).
    spread: int = 16 * MiB
    #: Requests in flight per connection pair.
    in_flight: int = 8
    #: Bytes of the source's extent map asked for at a time.
    window: int = 1024 * MiB
    #: Seconds a request may wait for its answer (the oldest one in flight, while no
    #: other one completes) before a silent server counts as gone. Time with nothing in
    #: flight (waiting for the planner, or for buffers) does not count.
    stall_timeout: float = 60.0
    #: Seconds the destination may take to confirm its flush at the end: a server with
    #: a writeback cache writes all it holds then, far more than any one request.
    flush_timeout: float = 600.0
    #: Seconds a connection may take, its NBD handshake included (the source's too: a
    #: frozen QEMU accepts and never greets).
    connect_timeout: float = 30.0
    #: For nbds:// destinations: the folder with ca-cert.pem (and client-cert.pem,
    #: client-key.pem when the server checks clients); None: libnbd's default.
    tls_certificates: str | None = None
    #: Buffers shared with other copies; None: the copy's own, as many as it can use.
    buffers: BufferPool | None = None


@dataclass(frozen=True)
class Progress:
    size: int
    #: The source has been planned up to here.
    scanned: int
    #: Bytes to copy or zero, found so far.
    planned: int
    #: Bytes copied or zeroed.
    done: int


@dataclass(frozen=True)
class Piece:
    offset: int
    length: int
    zero: bool


@dataclass
class _Counters:
    size: int
    scanned: int = 0
    planned: int = 0
    done: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def snapshot(self) -> Progress:
        with self.lock:
            return Progress(self.size, self.scanned, self.planned, self.done)


def merge_extents(allocation: list[tuple[int, int]], dirty: list[tuple[int, int]] | None,
                  offset: int, zeroed_destination: bool) -> tuple[list[Piece], int]:
    """Turn one window's extents into pieces of work.

    `allocation` and `dirty` are (length, flags) runs from `offset`; they may
    cover different lengths: only their common prefix is decided. Returns the
    pieces, merged where adjacent, and the offset up to which it decided.
    """
    end = offset + sum(length for length, _ in allocation)
    if dirty is not None:
        end = min(end, offset + sum(length for length, _ in dirty))
    pieces: list[Piece] = []
    for start, stop, zero, is_dirty in _overlay(allocation, dirty, offset, end):
        if not is_dirty or (zero and zeroed_destination):
            continue
        if pieces and pieces[-1].zero == zero and pieces[-1].offset + pieces[-1].length == start:
            last = pieces.pop()
            pieces.append(Piece(last.offset, stop - last.offset, zero))
        else:
            pieces.append(Piece(start, stop - start, zero))
    return pieces, end


def _overlay(allocation: list[tuple[int, int]], dirty: list[tuple[int, int]] | None,
             offset: int, end: int) -> Iterator[tuple[int, int, bool, bool]]:
    """Walk two run lists together: (start, stop, zero, dirty) up to `end`."""
    runs_a = deque(allocation)
    runs_d = deque(dirty) if dirty is not None else deque([(end - offset, STATE_DIRTY)])
    pos = offset
    while pos < end:
        (len_a, flags_a), (len_d, flags_d) = runs_a[0], runs_d[0]
        step = min(len_a, len_d, end - pos)
        yield pos, pos + step, bool(flags_a & STATE_ZERO), bool(flags_d & STATE_DIRTY)
        pos += step
        for runs, length, flags in ((runs_a, len_a, flags_a), (runs_d, len_d, flags_d)):
            runs.popleft()
            if length > step:
                runs.appendleft((length - step, flags))


#: Ranges of a disk, (start, end), sorted and apart.
Ranges = Sequence[tuple[int, int]]


def plan(h: nbd.NBD, bitmap: str | None, size: int, window: int, zeroed_destination: bool,
         stopped: Callable[[], bool] = lambda: False, only: Ranges | None = None,
         cluster: int | None = None, timeout: float = Tuning.stall_timeout
         ) -> Iterator[tuple[list[Piece], int]]:
    """The work a copy of `h` needs, a window of extents at a time: (pieces, planned up to).
    `only`: the ranges to copy, where a bitmap would tell (`bitmap` is then None).
    `cluster`: every piece covers whole clusters of that many bytes (`whole_clusters`).
    StreamError if the source leaves a window's extents unanswered `timeout` seconds, or
    once `stopped()`."""
    contexts = (ALLOCATION,) + ((bitmap,) if bitmap else ())
    offset = 0
    while offset < size and not stopped():
        runs: dict[str, list[tuple[int, int]]] = {c: [] for c in contexts}

        def extent(context: str, start: int, entries: list[int], err: object,
                   runs: dict[str, list[tuple[int, int]]] = runs) -> int:
            if context in runs:
                runs[context] += list(zip(entries[::2], entries[1::2], strict=True))
            return 0

        cookie = h.aio_block_status(min(window, size - offset), offset, extent)
        _until(h, functools.partial(h.aio_command_completed, cookie), timeout, stopped,
               f"the source did not answer for its extents at offset {offset}")
        if not all(runs.values()):
            raise StreamError(f"the source answered no extents at offset {offset}")
        dirty = runs[bitmap] if bitmap else None
        if only is not None:
            dirty = _runs(only, offset, offset + sum(n for n, _ in runs[ALLOCATION]))
        pieces, decided = merge_extents(runs[ALLOCATION], dirty, offset, zeroed_destination)
        decided = min(decided, size)
        if cluster is not None:
            pieces, decided = _to_cluster(pieces, offset, decided, cluster, size)
        offset = decided
        yield pieces, offset


def _to_cluster(pieces: list[Piece], start: int, decided: int, cluster: int, size: int
                ) -> tuple[list[Piece], int]:
    """A window's pieces in whole clusters, the window ending on a cluster's edge: what
    is decided of its last cluster is decided again with the next window. The source
    may answer less than a cluster (its extents are finer): that cluster is read whole."""
    if decided < size:
        edge = decided - decided % cluster
        if edge <= start:
            edge = min(start + cluster, size)
            return [Piece(start, edge - start, False)], edge
        pieces = [Piece(p.offset, min(p.offset + p.length, edge) - p.offset, p.zero)
                  for p in pieces if p.offset < edge]
        decided = edge
    return whole_clusters(pieces, cluster, size), decided


def whole_clusters(pieces: list[Piece], cluster: int, size: int) -> list[Piece]:
    """`pieces` (sorted, apart) grown to whole clusters of `cluster` bytes, the disk's
    last one ending at `size`: a cluster they cover only in part is read whole from the
    source (what they leave of it reads as it is, which is what the backup below holds);
    only a cluster a zero piece covers whole is zeroed. A write into a qcow2 overlay
    that covers whole clusters never copies anything from below it (writers.py)."""
    out: list[Piece] = []

    def add(start: int, stop: int, zero: bool) -> None:
        if start >= stop:
            return
        if out:
            last = out[-1]
            end = last.offset + last.length
            if start < end:  # a cluster two pieces share: it is read whole
                out[-1] = Piece(last.offset, max(end, stop) - last.offset, False)
                return
            if start == end and last.zero == zero:
                out[-1] = Piece(last.offset, stop - last.offset, zero)
                return
        out.append(Piece(start, stop - start, zero))

    for p in pieces:
        end = p.offset + p.length
        head, tail = p.offset - p.offset % cluster, min(size, -(-end // cluster) * cluster)
        inner_start = -(-p.offset // cluster) * cluster
        inner_end = end if end == size else end - end % cluster
        if not p.zero or inner_start >= inner_end:
            add(head, tail, False)
        else:
            add(head, inner_start, False)
            add(inner_start, inner_end, True)
            add(inner_end, tail, False)
    return out


def in_whole_clusters(offset: int, length: int, cluster: int, size: int) -> bool:
    """Whether a write covers whole clusters (the disk's last one up to `size`)."""
    end = offset + length
    return offset % cluster == 0 and (end % cluster == 0 or end == size)


def _runs(ranges: Ranges, start: int, end: int) -> list[tuple[int, int]]:
    """`ranges` from `start` to `end` as (length, flags) runs of a dirty bitmap."""
    runs = []
    pos = start
    for first, last in ranges[max(0, bisect.bisect_right(ranges, (start, start)) - 1):]:
        a, b = max(first, pos), min(last, end)
        if a >= end:
            break
        if a >= b:
            continue
        if a > pos:
            runs.append((a - pos, 0))
        runs.append((b - a, STATE_DIRTY))
        pos = b
    if pos < end:
        runs.append((end - pos, 0))
    return runs


def transfer_size(source: str, bitmap: str | None = None, window: int = Tuning.window) -> int:
    """Bytes of data a reader of `source` must transfer: every allocated block that does
    not read as zero (and, with `bitmap`, is dirty). Blocks."""
    contexts = (ALLOCATION,) + ((bitmap,) if bitmap else ())
    h = _connect(source, contexts)
    try:
        return sum(p.length for pieces, _ in plan(h, bitmap, h.get_size(), window, True)
                   for p in pieces)
    finally:
        _close(h)


def split(piece: Piece, request_size: int, granule: int = 1) -> Iterator[Piece]:
    """The requests of `piece`: of `request_size`; a piece of data's rest cut to whole
    STEPs, and what is left under a STEP in powers of two (so that buffers come in a few
    sizes: BufferPool), as long as each cut leaves whole `granule`s (clusters a write
    must cover whole: only a disk's last, partial one is not, and goes whole)."""
    offset, end = piece.offset, piece.offset + piece.length
    while offset < end:
        length = min(request_size, end - offset)
        if not piece.zero and length < request_size:
            cut = length - length % STEP if length >= STEP else \
                1 << (length.bit_length() - 1)
            if (length - cut) % granule == 0:
                length = cut
        yield Piece(offset, length, piece.zero)
        offset += length


def _connect(url: str, contexts: tuple[str, ...] = (), tls_certificates: str | None = None,
             timeout: float | None = None, cancel: threading.Event | None = None,
             name: str | None = None) -> nbd.NBD:
    """A handle connected to `url`. With `timeout` (a destination: a server that may
    accept and never answer), its handshake done within that many seconds, StreamError
    if not or once `cancel` is set. Without (QEMU's own export), as libnbd connects:
    driving the connection ourselves while libvirt ended the backup left libvirt's
    event thread waiting on QEMU for minutes. `name`: the server's, in errors (`url`
    by default)."""
    h = nbd.NBD()
    # libnbd zeroes each read buffer first, in case a caller looks at it after a
    # failed read. We never do (a failed read fails the copy), and the memset
    # cost an eighth of the engine's CPU.
    h.set_pread_initialize(False)
    if tls_certificates is not None:
        # From our configuration, never from the URI: callers name servers, not files.
        h.set_tls_certificates(tls_certificates)
    for context in contexts:
        h.add_meta_context(context)
    if timeout is None:
        h.connect_uri(url)
        return h
    try:
        h.aio_connect_uri(url)
        _until(h, h.aio_is_ready, timeout, None if cancel is None else cancel.is_set,
               f"{name or url}: no NBD handshake")
    except BaseException:
        _drop(h)
        raise
    return h


def unix_sockets(url: str) -> list[tuple[int, str]] | None:
    """The `socket` parameters of a Unix-socket NBD URI: each one's place among the
    "&"-separated parts of its query, and its path; None for another URI (TCP)."""
    u = urlsplit(url)
    if not u.scheme.endswith("+unix"):
        return None
    return [(i, unquote_plus(value)) for i, (key, _, value) in
            enumerate(part.partition("=") for part in u.query.split("&"))
            if unquote_plus(key) == "socket"]


@contextlib.contextmanager
def _pinned(url: str, pinned: Pinned = Pinned()) -> Iterator[str]:
    """`url`, its Unix socket named by a descriptor of the socket its path leads to with
    no link followed (`_pinned_socket`), for as long as the context lasts: a connect to
    the URL yielded reaches that socket whatever is renamed meanwhile. Other URLs (TCP)
    as they are. UncheckedDestination, or StreamError if the socket is not there."""
    found = unix_sockets(url)
    if found is None:
        yield url
        return
    if len(found) != 1:
        raise UncheckedDestination(f"{url} names {len(found)} sockets, not one")
    [(index, path)] = found
    fd = _pinned_socket(path, pinned.owner)
    try:
        u = urlsplit(url)
        parts = u.query.split("&")
        parts[index] = f"socket={quote(f'/proc/self/fd/{fd}')}"
        yield f"{u.scheme}://{u.netloc}{u.path}?{'&'.join(parts)}" + \
            (f"#{u.fragment}" if u.fragment else "")
    finally:
        os.close(fd)


def _pinned_socket(path: str, owner: int | None) -> int:
    """An O_PATH descriptor of the socket at `path`, absolute, reached with no link
    followed: each folder from / down, then the socket, opened O_PATH|O_NOFOLLOW from the
    one above it (a link so opened is the link itself, and refused). Raises
    UncheckedDestination for a link or a "." or ".." on the way (a path places.check
    resolved has none), or a socket not `owner`'s (a uid; None: anyone's), StreamError if
    a part of it is not there or not what it must be (the appliance's server is not
    listening)."""
    names = path.split("/")
    if not path.startswith("/") or not all(names[1:]) or any(n in (".", "..") for n in names):
        raise UncheckedDestination(
            f"the destination's socket {path} is not the resolved path places.check approved")
    fd = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        walked = ""
        for i, name in enumerate(names[1:], 1):
            walked += "/" + name
            try:
                below = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            except OSError as e:
                raise StreamError(f"cannot reach the destination's socket {path}: "
                                  f"{walked}: {e.strerror}") from None
            os.close(fd)
            fd = below
            mode = os.fstat(fd).st_mode
            if stat.S_ISLNK(mode):
                raise UncheckedDestination(
                    f"{walked} is a link (to {_link(walked)}), on the way to the "
                    f"destination's socket {path}: pullbackd follows no link to a "
                    "destination (the path was resolved as the backup's places were "
                    "checked), and sent nothing through it. Have the appliance serve its "
                    "socket at the path it gave, with no link on the way, and start the "
                    "backup again")
            if i < len(names) - 1 and not stat.S_ISDIR(mode):
                raise StreamError(f"cannot reach the destination's socket {path}: "
                                  f"{walked} is not a folder")
        if not stat.S_ISSOCK(mode):
            raise StreamError(f"the destination {path} is not a socket: no NBD server "
                              "listens there")
        if owner is not None and (uid := os.fstat(fd).st_uid) != owner:
            raise UncheckedDestination(
                f"the destination's socket {path} is {user_name(uid)}'s, not "
                f"{user_name(owner)}'s, who started the backup: pullbackd writes a backup "
                "only into a server of whoever started it, and sent nothing there. Have "
                "the appliance serve its socket as its own user (a socket unit: "
                "SocketUser=), and start the backup again")
        return fd
    except BaseException:
        os.close(fd)
        raise


def _link(path: str) -> str:
    """Where the link at `path` points, for a message."""
    try:
        return repr(os.readlink(path))
    except OSError as e:
        return f"somewhere: {e.strerror}"


def _drop(h: nbd.NBD) -> None:
    """Close a handle, and its connection, now. Left to the garbage collector, a handle
    an exception's traceback holds stays connected for as long as the exception lives:
    and QEMU's NBD server waits for every client before libvirt can end a backup (a
    copy cancelled while it connected held libvirt's job lock for minutes)."""
    h.__del__()  # nbd_close(3)
    del h._o  # what __del__ closes: the collector's own call then does nothing


def _until(h: nbd.NBD, done: Callable[[], bool], timeout: float,
           cancel: Callable[[], bool] | None, what: str) -> None:
    """Drive `h` until `done()`: StreamError after `timeout` seconds, or once `cancel()`;
    nbd.Error if the connection fails."""
    deadline = time.monotonic() + timeout
    while not done():
        if h.aio_is_dead() or h.aio_is_closed():
            raise StreamError(f"{what}: the connection ended")
        if cancel is not None and cancel():
            raise StreamError("cancelled")
        left = deadline - time.monotonic()
        if left <= 0:
            raise StreamError(f"{what} within {timeout:g} s")
        h.poll(max(1, int(min(left, POLL) * 1000)))


def _connect_source(url: str, contexts: tuple[str, ...], timeout: float) -> nbd.NBD:
    """`_connect(url, contexts)`, libnbd's own connect (see there why QEMU's export is
    not connected by a loop of ours), given up after `timeout` seconds: StreamError. A
    frozen QEMU's socket still accepts (the kernel does) and never greets, and waiting
    for it held the copy, and Abort with it, for good. The connect goes on in a thread
    of its own, which closes the handle if it ever connects: never a connection of ours
    cut mid-handshake, nor one left open. A cancelled copy still waits for it (a live
    QEMU greets within milliseconds), not to leave it under way as the backup ends."""
    lock = threading.Lock()
    arrived = threading.Event()
    outcome: list[nbd.NBD | Exception] = []
    given_up = False

    def connect() -> None:
        got: nbd.NBD | Exception
        try:
            got = _connect(url, contexts)
        except Exception as e:
            got = e
        with lock:
            if not given_up:
                outcome.append(got)
                arrived.set()
                return
        if isinstance(got, nbd.NBD):
            _close(got)

    threading.Thread(target=connect, name="pullbackd-connect", daemon=True).start()
    arrived.wait(timeout)
    with lock:
        if not outcome:
            given_up = True
            raise StreamError(f"{url}: no NBD handshake within {timeout:g} s")
    if isinstance(got := outcome[0], Exception):
        raise got
    return got


def reachable(url: str, timeout: float = REACHABLE_TIMEOUT) -> bool:
    """Whether an NBD server answers at `url` (a handshake within `timeout` seconds,
    then goodbye): a server that accepts and never greets (a frozen QEMU) is not. Blocks,
    for `timeout` + CLOSE_TIMEOUT at most. Our own loop connects (`_connect`'s concern
    is a connection while libvirt ends the backup: asked after the copy failed, this one
    is over before the job ends it)."""
    try:
        _close(_connect(url, timeout=timeout))
    except (nbd.Error, StreamError):
        return False
    return True


def _close(h: nbd.NBD) -> None:
    """Say goodbye (NBD_CMD_DISC), then close the handle: within CLOSE_TIMEOUT whatever
    the server does (libnbd's shutdown waits for it without end: a server that stopped
    answering held a failed, or cancelled, copy for good)."""
    with contextlib.suppress(nbd.Error, StreamError):  # the copy's own error says why
        h.aio_disconnect(0)
        _until(h, lambda: bool(h.aio_is_closed() or h.aio_is_dead()), CLOSE_TIMEOUT, None,
               "the server did not close the connection")
    _drop(h)


@dataclass(frozen=True)
class Checksums:
    """A checksum of each piece of data, handed over once the piece is written."""

    #: The checksum of a piece's data. Called once it is read, while the data is still
    #: in the CPU's cache (by the time its write is done, it is not).
    of: Callable[[bytearray], str]
    #: Told of each piece once written, with its checksum (None for zeroes).
    written: Callable[[Piece, str | None], None]


class _Copy:
    def __init__(self, source: str, destination: str, bitmap: str | None,
                 zeroed_destination: bool, tuning: Tuning,
                 on_progress: Callable[[Progress], None] | None,
                 checksums: Checksums | None, cancel: threading.Event,
                 only: Ranges | None = None, cluster: int | None = None,
                 size: int | None = None, pinned: Pinned | None = None) -> None:
        self.source, self.destination, self.bitmap = source, destination, bitmap
        #: A client's destination: its socket reached with no link followed (`_pinned`).
        self.pinned = pinned
        self.size = size
        self.only = only
        self.cluster = cluster
        #: Fitted to the destination, and to whole clusters, by `_fit`.
        self.request_size = tuning.request_size
        self.zeroed_destination = zeroed_destination
        self.tuning = tuning
        self.on_progress = on_progress
        self.checksums = checksums
        self.cancel = cancel
        self.errors: list[BaseException] = []
        self.failed = threading.Event()
        #: The connection pairs' threads: one from the start, more as the planner finds
        #: work for them (`Tuning.spread`).
        self.workers: list[threading.Thread] = []
        self.buffers = tuning.buffers or BufferPool(
            tuning.connections * tuning.in_flight * tuning.request_size, tuning.request_size)
        if tuning.request_size > self.buffers.chunk:
            raise ValueError(f"requests of {tuning.request_size} bytes from a pool of "
                             f"{self.buffers.chunk}-byte buffers")

    def fail(self, error: BaseException) -> None:
        self.errors.append(error)
        self.failed.set()

    def stopped(self) -> bool:
        return self.cancel.is_set() or self.failed.is_set()

    def run(self) -> Progress:
        contexts = (ALLOCATION,) + ((self.bitmap,) if self.bitmap else ())
        try:
            planner_handle = _connect_source(self.source, contexts, self.tuning.connect_timeout)
        except nbd.Error as e:
            raise StreamError(f"cannot read the source: {e}") from e
        try:
            for context in contexts:
                if not planner_handle.can_meta_context(context):
                    raise StreamError(f"the source does not offer {context}")
            size = planner_handle.get_size()
            if self.size is not None and size != self.size:
                raise StreamError(
                    f"the source is {size} bytes, not the {self.size} the backup was planned "
                    f"for: the disk was resized as its backup started; start it again")
            # The first pair's destination, connected first: what it advertises shapes
            # the plan. Kept for the first worker: a server that takes one connection
            # at a time (or serves only one, as qemu-nbd without --persistent) would not
            # take another.
            dst = self._connect_destination()
            try:
                multi_conn = planner_handle.can_multi_conn() and dst.can_multi_conn()
                if self.only is not None:
                    # Nothing past the last range is read: the destination may end there
                    # (a restore of a disk that shrank, from older files than its size).
                    size = min(size, max((end for _, end in self.only), default=0))
                self._fit(dst, size)
                connections = self.tuning.connections if multi_conn else 1
                counters = _Counters(size)
                work: queue.Queue[list[Piece] | None] = queue.Queue(maxsize=connections * 2)
                planner = threading.Thread(target=self._guard, args=(
                    self._plan, planner_handle, contexts, counters, work, connections),
                    name="pullbackd-plan")
                self._start_worker(work, counters, dst)  # the worker closes it from here on
            except BaseException:
                _close(dst)
                raise
            planner.start()
            planner.join()
            for t in self.workers:  # the planner started them, and is done
                t.join()
        except nbd.Error as e:
            raise StreamError(f"cannot read the source: {e}") from e
        finally:
            _close(planner_handle)
        if self.errors:
            if isinstance(first := self.errors[0], StreamError):
                raise first  # its kind tells what to do (UncheckedDestination)
            raise StreamError(str(first)) from first
        if self.cancel.is_set():
            raise StreamError("cancelled")
        return counters.snapshot()

    def _connect_destination(self) -> nbd.NBD:
        """Each pair's, the first one's (which the plan is fitted to) and those opened
        mid-copy alike: a pinned destination's socket is looked for afresh each time."""
        try:
            with _pinned(self.destination, self.pinned) if self.pinned else \
                    contextlib.nullcontext(self.destination) as url:
                return _connect(url, tls_certificates=self.tuning.tls_certificates,
                                timeout=self.tuning.connect_timeout, cancel=self.cancel,
                                name=self.destination)
        except nbd.Error as e:
            raise StreamError(str(e)) from e

    def _fit(self, dst: nbd.NBD, size: int) -> None:
        """Requests the destination takes: at most its maximum block size long, and, with
        a minimum block size, writes of whole blocks (clusters of it). QEMU's servers (the
        repository's writer, qemu-nbd) advertise 1 byte and 32 MiB: the tuned requests."""
        minimum = dst.get_block_size(nbd.SIZE_MINIMUM)
        maximum = dst.get_block_size(nbd.SIZE_MAXIMUM)
        if minimum > 1:
            if size % minimum:
                # The disk's last write would be short of a block, and refused once all
                # the rest was written (the NBD spec has exports hold whole blocks).
                raise UnfitDestination(
                    f"the disk's {size} bytes are not whole blocks of the destination's "
                    f"minimum block size, {minimum} bytes: it cannot write the disk's end; "
                    "use a destination without that constraint")
            self.cluster = minimum if self.cluster is None else math.lcm(self.cluster,
                                                                         minimum)
        request_size = self.tuning.request_size
        if maximum:
            request_size = min(request_size, maximum)
        if self.cluster is not None:
            request_size = max(self.cluster, request_size - request_size % self.cluster)
        if request_size > self.buffers.chunk:
            raise UnfitDestination(
                f"the destination's minimum block size, {minimum} bytes, is larger than "
                "the NBD protocol allows (64 KiB); use another destination")
        if maximum and request_size > maximum:
            raise UnfitDestination(
                f"the destination takes at most {maximum} bytes per request, less than "
                f"the {request_size} bytes each write must cover whole; use a destination "
                "without that constraint")
        self.request_size = request_size

    def _guard(self, fn: Callable[..., None], *args: object) -> None:
        try:
            fn(*args)
        except BaseException as e:
            self.fail(e)

    def _plan(self, h: nbd.NBD, contexts: tuple[str, ...], counters: _Counters,
              work: queue.Queue[list[Piece] | None], connections: int) -> None:
        """Queue the requests, `in_flight` at a time (and what is left of each window's);
        another worker (a connection pair) joins the first each `spread` bytes to read,
        up to `connections`, while the buffers have room for its requests."""
        reads = 0
        batch: list[Piece] = []
        try:
            for pieces, offset in plan(h, self.bitmap, counters.size, self.tuning.window,
                                       self.zeroed_destination, self.stopped, self.only,
                                       self.cluster, self.tuning.stall_timeout):
                with counters.lock:
                    counters.scanned = offset
                    counters.planned += sum(p.length for p in pieces)
                for piece in pieces:
                    for request in split(piece, self.request_size, self.cluster or 1):
                        if self.cluster is not None and not in_whole_clusters(
                                request.offset, request.length, self.cluster, counters.size):
                            raise StreamError(f"BUG: a write of {request.length} bytes at "
                                              f"{request.offset} is not in whole clusters")
                        if len(self.workers) < min(connections,
                                                   1 + reads // self.tuning.spread) \
                                and self.buffers.spare() >= self.tuning.in_flight:
                            self._start_worker(work, counters)
                        batch.append(request)
                        if len(batch) == self.tuning.in_flight:
                            self._put(work, batch)
                            batch = []
                        reads += 0 if request.zero else request.length
                if batch:  # not held while the next window's extents are asked for
                    self._put(work, batch)
                    batch = []
        finally:
            for _ in self.workers:
                self._put(work, None, force=True)

    def _start_worker(self, work: queue.Queue[list[Piece] | None], counters: _Counters,
                      dst: nbd.NBD | None = None) -> None:
        """A connection pair's worker; `dst`: its destination, connected already."""
        worker = threading.Thread(target=self._guard, args=(self._work, work, counters, dst),
                                  name=f"pullbackd-copy-{len(self.workers)}")
        worker.start()
        self.workers.append(worker)

    def _put(self, work: queue.Queue[list[Piece] | None], item: list[Piece] | None,
             force: bool = False) -> None:
        while True:
            if self.stopped() and not force:
                return
            try:
                work.put(item, timeout=POLL)
                return
            except queue.Full:
                if force and self.stopped():
                    # Workers may be gone; drop queued work so the end marker fits.
                    with contextlib.suppress(queue.Empty):
                        work.get_nowait()

    def _work(self, work: queue.Queue[list[Piece] | None], counters: _Counters,
              dst: nbd.NBD | None) -> None:
        pump = None
        try:
            src = _connect_source(self.source, (), self.tuning.connect_timeout)
        except BaseException:
            if dst is not None:
                _close(dst)
            raise
        try:
            if dst is None:
                dst = self._connect_destination()
            try:
                if (room := dst.get_size()) < counters.size:
                    # An incremental fitted whenever nothing past its end had changed.
                    raise StreamError(f"the destination holds {room} bytes, less than the "
                                      f"disk's {counters.size}")
                pump = _Pump(self, src, dst, counters)
                pump.run(work)
                if not self.stopped() and not dst.can_flush():
                    # Allowed by the NBD spec: its writes are stable once acknowledged.
                    log.debug("the destination has no flush; none sent",
                              destination=self.destination)
                elif not self.stopped():
                    cookie = dst.aio_flush()
                    _until(dst, lambda: bool(dst.aio_command_completed(cookie)),
                           self.tuning.flush_timeout, self.cancel.is_set,
                           "the destination did not confirm its flush")
            finally:
                _close(dst)
        finally:
            _close(src)
            if pump is not None:
                pump.release()


class _Pump:
    """One connection pair: reads from the source, writes what arrived to the destination."""

    def __init__(self, copy: _Copy, src: nbd.NBD, dst: nbd.NBD, counters: _Counters) -> None:
        self.copy, self.src, self.dst, self.counters = copy, src, dst, counters
        self.pool = copy.buffers
        #: Buffers taken from the pool and not given back, by id.
        self.held: dict[int, nbd.Buffer] = {}
        #: Requests taken from the work queue, not yet sent (the first may wait for a
        #: buffer).
        self.taken: deque[Piece] = deque()
        # Filled by completion callbacks, emptied by the loop: callbacks must
        # not raise (libnbd would swallow it) nor call into the same handle.
        self.read: deque[_Request] = deque()
        self.written: deque[_Request] = deque()
        self.in_flight = 0
        self.last_progress = time.monotonic()
        self.poller = _Poller(src, dst)
        #: Zeroes to write where the destination zeroes nothing itself (no
        #: NBD_CMD_WRITE_ZEROES, as some appliances' servers): a zero piece is at most
        #: a request long. Pages never written: they cost no memory.
        self.zeroes = None if dst.can_zero() else memoryview(bytes(copy.request_size))

    def run(self, work: queue.Queue[list[Piece] | None]) -> None:
        more = True
        checksums = self.copy.checksums
        while (more or self.in_flight or self.taken) and not self.copy.stopped():
            more = self.submit(work) if more else False
            if self.in_flight:
                self.poller.wait(POLL)
            if self.read:
                self.last_progress = time.monotonic()  # the source answered
            while self.read:
                request = self.read.popleft()
                _retire(self.src, request, "reading")
                buf = request.buf
                assert buf is not None  # a read's
                if checksums is not None:
                    request.checksum = checksums.of(buf.to_buffer())
                request.cookie = self.dst.aio_pwrite(buf, request.piece.offset,
                                                     _on(self.written, request))
            self.reap()

    def submit(self, work: queue.Queue[list[Piece] | None]) -> bool:
        """Fill the window of requests in flight; False once the planner is done."""
        while self.in_flight < self.copy.tuning.in_flight:
            if not self.taken:
                try:
                    batch = work.get(block=self.in_flight == 0, timeout=POLL)
                except queue.Empty:
                    return True
                if batch is None:
                    return False
                self.taken.extend(batch)
            piece = self.taken[0]
            if not self.in_flight:  # the clock runs from the first request in flight
                self.last_progress = time.monotonic()
            if piece.zero:
                self.taken.popleft()
                request = _Request(piece, None)
                done = _on(self.written, request)
                if self.zeroes is None:
                    request.cookie = self.dst.aio_zero(piece.length, piece.offset, done)
                else:
                    request.cookie = self.dst.aio_pwrite(self.zeroes[:piece.length],
                                                         piece.offset, done)
            else:
                buf = self.pool.take(piece.length)
                if buf is None:
                    # Other copies hold the buffers: go on with ours, if any.
                    if not self.in_flight:
                        self.pool.wait(0.1)
                    return True
                self.taken.popleft()
                self.held[id(buf)] = buf
                request = _Request(piece, buf)
                request.cookie = self.src.aio_pread(buf, piece.offset, _on(self.read, request))
            self.in_flight += 1
        return True

    def reap(self) -> None:
        done = 0
        while self.written:
            request = self.written.popleft()
            _retire(self.dst, request, "writing")
            piece, buf = request.piece, request.buf
            if self.copy.checksums is not None:
                self.copy.checksums.written(piece, request.checksum)
            if buf is not None:
                del self.held[id(buf)]
                self.pool.give(buf)
            self.in_flight -= 1
            done += piece.length
        now = time.monotonic()
        if done:
            self.last_progress = now
            with self.counters.lock:
                self.counters.done += done
            if self.copy.on_progress is not None:
                self.copy.on_progress(self.counters.snapshot())
        elif self.in_flight and now - self.last_progress > self.copy.tuning.stall_timeout:
            raise StreamError(f"no progress for {self.copy.tuning.stall_timeout:g} s: "
                              "a server stopped answering")

    def release(self) -> None:
        """Once the handles are closed: the buffers of requests that never completed
        (the copy failed or was cancelled) go back to the pool."""
        for buf in self.held.values():
            self.pool.give(buf)
        self.held.clear()


class _Request:
    """A request in flight: what it is about, and libnbd's cookie for it."""

    __slots__ = ("buf", "checksum", "cookie", "piece")

    def __init__(self, piece: Piece, buf: nbd.Buffer | None) -> None:
        self.piece, self.buf = piece, buf
        #: The checksum of the data read, once read (None for zeroes).
        self.checksum: str | None = None
        #: Set once the call that issued it returns: before the loop looks at it.
        self.cookie = 0


def _on(into: deque[_Request], request: _Request) -> Callable[[object], int]:
    """A completion callback: `request` goes `into` the deque, for the loop to retire.
    It does not retire the command itself (returns 0): libnbd's verdict on it is
    `aio_command_completed`'s, not the callback's error (a read the server answered
    short reaches the callback without one in libnbd 1.14)."""
    def done(err: object) -> int:
        into.append(request)
        return 0
    return done


def _retire(h: nbd.NBD, request: _Request, what: str) -> None:
    """Retire a completed command: StreamError if libnbd says it failed."""
    try:
        h.aio_command_completed(request.cookie)
    except nbd.Error as e:
        raise StreamError(f"{what} {request.piece.length} bytes at {request.piece.offset} "
                          f"failed: {e}") from e


class _Poller:
    """Waits until one of a connection pair's handles can make progress, and lets
    libnbd make it. Their sockets are looked up once: each call into libnbd lets go
    of the GIL, and with several copies the way back costs."""

    def __init__(self, *handles: nbd.NBD) -> None:
        self.handles = {h.aio_get_fd(): h for h in handles}
        self.poll = select.poll()

    def wait(self, timeout: float) -> None:
        for fd, h in self.handles.items():
            direction = h.aio_get_direction()
            events = 0
            if direction & nbd.AIO_DIRECTION_READ:
                events |= select.POLLIN
            if direction & nbd.AIO_DIRECTION_WRITE:
                events |= select.POLLOUT
            self.poll.register(fd, events)
        for fd, events in self.poll.poll(timeout * 1000):
            h = self.handles[fd]
            if events & (select.POLLIN | select.POLLHUP | select.POLLERR):
                h.aio_notify_read()
            if events & select.POLLOUT:
                h.aio_notify_write()


def copy(source: str, destination: str, *, bitmap: str | None = None,
         zeroed_destination: bool = False, tuning: Tuning | None = None,
         on_progress: Callable[[Progress], None] | None = None,
         checksums: Checksums | None = None,
         cancel: threading.Event | None = None, only: Ranges | None = None,
         cluster: int | None = None, size: int | None = None,
         pinned: Pinned | None = None) -> Progress:
    """Copy a source export into a destination export; blocks until done.

    With `bitmap` (a `qemu:dirty-bitmap:...` meta context) only dirty ranges
    move; with `only`, only those ranges (and the destination need only reach the
    end of the last). With `zeroed_destination` (a fresh
    image), ranges the source reports as zero are skipped instead of written as
    zeros. With `cluster`, every write covers whole clusters of that many bytes
    (`whole_clusters`). With `size`, a source of another size is an error before
    anything is written. With `pinned` (a client's destination, as places.check gave
    it back), its Unix socket is reached at each connect with no link followed, and
    must be `pinned.owner`'s (`_pinned`): UncheckedDestination if not. Raises
    StreamError.
    """
    return _Copy(source, destination, bitmap, zeroed_destination, tuning or Tuning(),
                 on_progress, checksums, cancel or threading.Event(), only, cluster,
                 size, pinned).run()


async def stream(source: str, destination: str, *, bitmap: str | None = None,
                 zeroed_destination: bool = False, tuning: Tuning | None = None,
                 on_progress: Callable[[Progress], None] | None = None,
                 checksums: Checksums | None = None, only: Ranges | None = None,
                 cluster: int | None = None, size: int | None = None,
                 pinned: Pinned | None = None) -> Progress:
    """`copy` off the event loop. Cancelling the caller stops the copy, and
    returns only once its threads are gone (but for a connect to a source that did not
    greet within `Tuning.connect_timeout`, which ends by itself: `_connect_source`)."""
    cancel = threading.Event()

    async def stop_when_cancelled() -> None:
        try:
            await anyio.sleep_forever()
        finally:
            cancel.set()  # the copy's threads notice within their poll interval

    # Kept out of the task group, which would wrap an error in an ExceptionGroup.
    outcome: Progress | StreamError | None = None
    async with anyio.create_task_group() as tg:
        tg.start_soon(stop_when_cancelled)
        try:
            # Not abandoned on cancel: we return only once the threads are gone.
            outcome = await anyio.to_thread.run_sync(lambda: copy(
                source, destination, bitmap=bitmap, zeroed_destination=zeroed_destination,
                tuning=tuning, on_progress=on_progress, checksums=checksums, cancel=cancel,
                only=only, cluster=cluster, size=size, pinned=pinned))
        except StreamError as e:
            outcome = e
        finally:
            tg.cancel_scope.cancel()
    if isinstance(outcome, StreamError):
        if cancel.is_set():
            await anyio.lowlevel.checkpoint()  # delivers our caller's cancellation
        raise outcome
    assert outcome is not None
    return outcome
