"""The streaming engine: planning is pure and tested as such; copies run against real
QEMU exports into real qemu-nbd and nbdkit servers, and end in a byte-for-byte comparison."""

from __future__ import annotations

import itertools
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import anyio
import nbd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pullbackd import stream
from pullbackd.qemu_nbd import Server
from pullbackd.stream import Piece, Tuning, merge_extents

from .conftest import DISK_SIZE, Daemon, Lab
from .images import Disk, MiB

K = 1024
DATA, ZERO, DIRTY, CLEAN = 0, stream.STATE_ZERO, stream.STATE_DIRTY, 0


def test_merge_full_copies_data_and_zeroes_holes_unless_destination_is_zero() -> None:
    allocation = [(64 * K, DATA), (128 * K, ZERO), (64 * K, DATA)]
    pieces, end = merge_extents(allocation, None, 1000, zeroed_destination=False)
    assert end == 1000 + 256 * K
    assert pieces == [Piece(1000, 64 * K, False), Piece(1000 + 64 * K, 128 * K, True),
                      Piece(1000 + 192 * K, 64 * K, False)]
    pieces, _ = merge_extents(allocation, None, 0, zeroed_destination=True)
    assert pieces == [Piece(0, 64 * K, False), Piece(192 * K, 64 * K, False)]


def test_merge_incremental_moves_dirty_ranges_only_and_zero_writes_dirty_zeroes() -> None:
    allocation = [(96 * K, DATA), (96 * K, ZERO)]
    dirty = [(64 * K, CLEAN), (64 * K, DIRTY), (32 * K, CLEAN), (32 * K, DIRTY),
             (64 * K, CLEAN)]
    pieces, end = merge_extents(allocation, dirty, 0, zeroed_destination=False)
    # The two runs end together at 192 KiB: the rest of the bitmap waits for the next window.
    assert end == 192 * K
    assert pieces == [Piece(64 * K, 32 * K, False), Piece(96 * K, 32 * K, True),
                      Piece(160 * K, 32 * K, True)]


def test_merge_decides_only_the_common_prefix() -> None:
    pieces, end = merge_extents([(1 * MiB, DATA)], [(64 * K, DIRTY)], 0, False)
    assert (pieces, end) == ([Piece(0, 64 * K, False)], 64 * K)


@st.composite
def writes(draw: st.DrawFn) -> tuple[int, list[Piece]]:
    """A disk's size (not always whole clusters) and pieces on it, sorted and apart."""
    size = draw(st.integers(1, 12)) * 4 * K - draw(st.sampled_from([0, 0, 512, 3 * K]))
    cuts = sorted(draw(st.sets(st.integers(0, size // 512), max_size=12)))
    pieces = []
    for start, stop in zip(cuts[::2], cuts[1::2], strict=False):
        if draw(st.booleans()) and start < stop:
            pieces.append(Piece(start * 512, min(stop * 512, size) - start * 512,
                                draw(st.booleans())))
    return size, pieces


@settings(max_examples=500, deadline=None, database=None)
@given(writes(), st.sampled_from([4 * K, 16 * K]))
def test_whole_clusters_write_the_same_disk_with_the_chain_shut(
        sized: tuple[int, list[Piece]], cluster: int) -> None:
    """Written over an overlay whose backing chain is shut (what a cluster does not get
    written reads as zero), the grown pieces leave the disk the pieces would over its
    backup below; each covers whole clusters, and zeroes only what is zero."""
    size, pieces = sized
    below = bytes(range(1, 256)) * (size // 255 + 1)
    disk = bytearray(below[:size])  # the source: the backup below, then the pieces
    for n, p in enumerate(pieces):
        disk[p.offset:p.offset + p.length] = bytes([0 if p.zero else 0x80 + n]) * p.length
    overlay: dict[int, bytes] = {}  # cluster -> its bytes, once written
    grown = stream.whole_clusters(pieces, cluster, size)
    for p in grown:
        assert stream.in_whole_clusters(p.offset, p.length, cluster, size)
        for c in range(p.offset, p.offset + p.length, cluster):
            data = bytes(disk[c:min(c + cluster, size)])
            assert not p.zero or data == bytes(len(data))
            overlay[c] = data
    assert [(p.offset, p.offset + p.length) for p in grown] == sorted(
        (p.offset, p.offset + p.length) for p in grown)
    restored = bytearray(below[:size])  # the chain: the overlay's clusters over below
    for c, data in overlay.items():
        restored[c:c + len(data)] = data
    assert restored == disk


def test_a_window_ends_on_a_clusters_edge() -> None:
    # Extents to 100 KiB: the cluster at 64 KiB is decided with the next window.
    pieces, end = stream._to_cluster([Piece(60 * K, 40 * K, False)], 0, 100 * K, 64 * K,
                                     MiB)
    assert (pieces, end) == ([Piece(0, 64 * K, False)], 64 * K)
    # Less than one cluster decided: that cluster is read whole.
    pieces, end = stream._to_cluster([], 64 * K, 70 * K, 64 * K, MiB)
    assert (pieces, end) == ([Piece(64 * K, 64 * K, False)], 128 * K)


def test_split_makes_requests_of_a_few_sizes() -> None:
    """Data in requests of request_size, its rest in whole STEPs, and under a STEP in
    powers of two (buffers come in those sizes: BufferPool); never less than whole clusters
    but for a disk's last, partial one; zeroes need no buffer, and go whole."""
    assert list(stream.split(Piece(10, 25, False), 10)) == [
        Piece(10, 10, False), Piece(20, 10, False), Piece(30, 4, False), Piece(34, 1, False)]
    assert list(stream.split(Piece(10, 25, True), 10)) == [
        Piece(10, 10, True), Piece(20, 10, True), Piece(30, 5, True)]
    assert list(stream.split(Piece(0, 1088 * K, False), 512 * K, 64 * K)) == [
        Piece(0, 512 * K, False), Piece(512 * K, 512 * K, False),
        Piece(1024 * K, 64 * K, False)]
    assert list(stream.split(Piece(0, 448 * K, False), 512 * K, 64 * K)) == [
        Piece(0, 448 * K, False)]
    assert list(stream.split(Piece(0, 200 * K + 3 * K, False), 512 * K)) == [
        Piece(0, 192 * K, False), Piece(192 * K, 8 * K, False), Piece(200 * K, 2 * K, False),
        Piece(202 * K, K, False)]
    # A disk's last cluster, partial: 64 KiB and 1536 bytes go whole.
    assert list(stream.split(Piece(0, 64 * K + 1536, False), 512 * K, 64 * K)) == [
        Piece(0, 64 * K + 1536, False)]


@given(st.integers(1, 1 << 24), st.sampled_from([1, 512, 64 * K]))
def test_split_covers_its_piece_in_few_sizes(length: int, granule: int) -> None:
    requests = list(stream.split(Piece(0, length, False), 512 * K, granule))
    assert sum(r.length for r in requests) == length
    assert all(a.offset + a.length == b.offset for a, b in itertools.pairwise(requests))
    # Every request but a last one carrying a partial granule is of a few sizes.
    for r in requests[:-1]:
        assert r.length % granule == 0, (r, granule)
        assert (r.length % stream.STEP == 0 and r.length <= 512 * K) or (
            r.length < stream.STEP and r.length & (r.length - 1) == 0), r


@contextmanager
def serve(command: list[str], sock: Path) -> Iterator[str]:
    """Run an NBD server on a Unix socket; yield its URI once it listens."""
    proc = subprocess.Popen(command, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not listening(sock):  # bounded: the server listens within milliseconds
            assert proc.poll() is None and time.monotonic() < deadline, command
            time.sleep(0.01)
        yield f"nbd+unix:///?socket={sock}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def listening(sock: Path) -> bool:
    """Whether a socket listens at `sock` (/proc/net/unix, its flags). Its file is not
    enough: a server binds, then listens, and a connection in between is refused; nor is
    a connection, which a qemu-nbd without --persistent would take as its only client."""
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        if len(fields) == 8 and fields[7] == str(sock) and int(fields[3], 16) & ACCEPTCON:
            return True
    return False


#: /proc/net/unix's flag of a listening socket (__SO_ACCEPTCON).
ACCEPTCON = 0x10000


@contextmanager
def qemu_nbd(image: Path) -> Iterator[str]:
    """`image` served by qemu-nbd, writable, for several connections at once; its URI."""
    with Server(image, "qcow2", image.with_suffix(".sock")) as server:
        yield server.url


def compare(image: Path, disk: Disk, tmp_path: Path) -> None:
    expected = tmp_path / f"{disk.name}.expected.raw"
    expected.write_bytes(disk.expected)
    subprocess.run(["qemu-img", "compare", "-q", "-F", "raw", str(image), str(expected)],
                   check=True, timeout=300)


@pytest.mark.parametrize("tuning", [Tuning(), Tuning(request_size=64 * K, connections=1,
                                                     in_flight=1, window=1 * MiB),
                                    Tuning(request_size=256 * K, connections=4, spread=MiB)],
                         ids=["default", "one-request-at-a-time", "a-pair-per-mebibyte"])
def test_full_then_incremental_into_a_qcow2_chain(
        lab: Lab, daemon: Daemon, tmp_path: Path, tuning: Tuning) -> None:
    vda = Disk(lab, "lab2", "vda")
    vda.write(0, 3 * MiB + 512, 0x5E)
    vda.write(20 * MiB, 8 * MiB, 0xA7)
    vda.write(DISK_SIZE - 4096, 4096, 0x01)
    full = tmp_path / "full.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(full), str(DISK_SIZE)],
                   check=True)
    job = daemon.ctl.job("Start", domain="lab2", disks=["vda"], consumer="engine")
    seen: list[stream.Progress] = []
    with qemu_nbd(full) as url:
        result = stream.copy(job["disks"][0]["url"], url, zeroed_destination=True,
                             tuning=tuning, on_progress=seen.append)
    daemon.ctl.call("Finish", id=job["id"])
    assert result.scanned == DISK_SIZE and result.done == result.planned
    assert seen and seen[-1].done == result.done
    assert result.planned < DISK_SIZE  # the holes were not copied
    compare(full, vda, tmp_path)

    vda.mark()
    vda.write(MiB, 64 * K, 0x11)
    vda.write(40 * MiB + 100, 300 * K, 0x22)
    vda.zero(20 * MiB, 64 * K)  # a trim over data: zeroes that must reach the overlay
    overlay = tmp_path / "incr.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(full), "-F", "qcow2",
                    str(overlay)], check=True)
    job = daemon.ctl.job("Start", domain="lab2", disks=["vda"], consumer="engine",
                         mode="incremental")
    disk = job["disks"][0]
    with qemu_nbd(overlay) as url:
        result = stream.copy(disk["url"], url, bitmap=disk["bitmap"], tuning=tuning)
    daemon.ctl.call("Finish", id=job["id"])
    assert result.planned == sum(n for _, n in vda.dirty_since_mark())
    compare(overlay, vda, tmp_path)


def test_buffer_pool_keeps_to_its_budget_and_never_lets_a_buffer_go() -> None:
    """Debian 12's libnbd binding keeps a reference to what each request read into or
    wrote from: a buffer the pool let go was lost memory, without end. So the pool's
    chunks, and the view of each length into each, are made once and reused."""
    pool = stream.BufferPool(3 * MiB, MiB)
    a, b = pool.take(MiB), pool.take(MiB)
    c = pool.take(MiB)
    assert a is not None and b is not None and c is not None
    assert pool.take(MiB) is None  # spent
    assert pool.take(64 * K) is None  # whatever the length: a request takes a chunk
    pool.give(a)
    again = pool.take(MiB)
    assert again is a  # reused, not made again
    pool.give(again)
    short = pool.take(64 * K)
    assert short is not None and short.size() == 64 * K
    pool.give(short)
    assert pool.take(64 * K) is short
    with pytest.raises(AssertionError):
        pool.give(a)  # not taken: two requests would share a chunk
    with pytest.raises(ValueError):
        pool.take(MiB + 1)  # longer than a chunk
    # A budget smaller than a chunk still has one.
    alone = stream.BufferPool(MiB, 4 * MiB)
    assert stream.BufferPool(MiB, 4 * K).chunk == stream.STEP  # a write covers a cluster
    big = alone.take(4 * MiB)
    assert big is not None and alone.take(4 * MiB) is None


def test_shorter_requests_get_the_whole_budget_after_longer_ones() -> None:
    """A night's full backups fill the pool with buffers of the request size; each
    incremental after them makes requests of a cluster or two. Buffers of each length
    apart held the whole budget in the full's, and left every incremental of the night
    one buffer of each shorter length between them all: they waited for each other."""
    pool = stream.BufferPool(4 * MiB, 512 * K)
    full = [pool.take(512 * K) for _ in range(8)]
    for buf in full:
        assert buf is not None
        pool.give(buf)
    shorter = [pool.take(length) for length in (64 * K, 128 * K) * 4]
    assert all(buf is not None for buf in shorter)
    assert [buf.size() for buf in shorter if buf is not None] == [64 * K, 128 * K] * 4
    assert pool.take(64 * K) is None


def test_a_short_request_reads_into_the_start_of_its_chunk(tmp_path: Path) -> None:
    """What libnbd reads into a view of a chunk lands in that chunk's first bytes, the
    request's length of them."""
    image = tmp_path / "disk.raw"
    image.write_bytes(bytes(range(256)) * 1024)
    sock = tmp_path / "nbd.sock"
    with serve(["qemu-nbd", "-f", "raw", "-k", str(sock), str(image)], sock) as url:
        h = nbd.NBD()
        h.connect_uri(url)
        pool = stream.BufferPool(MiB, 256 * K)
        buf = pool.take(64 * K)
        assert buf is not None
        cookie = h.aio_pread(buf, 4096 + 1)
        while not h.aio_command_completed(cookie):
            h.poll(-1)
        expected = (bytes(range(256)) * 1024)[4097:4097 + 64 * K]
        assert bytes(buf.to_buffer()) == expected
        pool.give(buf)
        whole = pool.take(256 * K)  # the same chunk: the only one made
        assert whole is not None and bytes(whole.to_buffer()[:64 * K]) == expected
        h.shutdown()


def test_copies_sharing_a_small_pool_all_complete(
        lab: Lab, daemon: Daemon, tmp_path: Path) -> None:
    vdb = Disk(lab, "lab2", "vdb")
    vdb.write(MiB, 5 * MiB, 0x6B)
    vdb.write(30 * MiB + 4096, 2 * MiB, 0x6C)
    job = daemon.ctl.job("Start", domain="lab2", disks=["vdb"], consumer="pool")
    # Two requests' worth for three copies, each of which would keep 16 in flight.
    tuning = Tuning(request_size=256 * K, buffers=stream.BufferPool(512 * K, 256 * K))
    images = [tmp_path / f"copy{i}.qcow2" for i in range(3)]
    failures: list[BaseException] = []

    def run(image: Path) -> None:
        try:
            with qemu_nbd(image) as url:
                stream.copy(job["disks"][0]["url"], url, zeroed_destination=True, tuning=tuning)
        except BaseException as e:
            failures.append(e)

    for image in images:
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image),
                        str(DISK_SIZE)], check=True)
    workers = [threading.Thread(target=run, args=(image,)) for image in images]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)  # a hang guard, not a timing assertion
    daemon.ctl.call("Finish", id=job["id"])
    assert failures == [] and not any(w.is_alive() for w in workers)
    for image in images:
        compare(image, vdb, tmp_path)


@pytest.fixture
def export(lab: Lab, daemon: Daemon) -> Iterator[str]:
    vda = Disk(lab, "lab2", "vda")
    vda.write(0, 48 * MiB, 0x42)
    job = daemon.ctl.job("Start", domain="lab2", disks=["vda"], consumer="faults")
    yield job["disks"][0]["url"]
    daemon.ctl.call("Abort", id=job["id"])


def nbdkit(tmp_path: Path, *args: str) -> AbstractContextManager[str]:
    sock = tmp_path / "nbdkit.sock"
    return serve(["nbdkit", "--foreground", "--unix", str(sock), *args], sock)


def test_destination_smaller_than_the_disk(export: str, tmp_path: Path) -> None:
    with nbdkit(tmp_path, "memory", "1M") as url, pytest.raises(stream.StreamError):
        stream.copy(export, url)


def test_destination_failing_writes(export: str, tmp_path: Path) -> None:
    with nbdkit(tmp_path, "--filter=error", "memory", str(DISK_SIZE), "error-pwrite=EIO",
                "error-pwrite-rate=100%") as url, \
            pytest.raises(stream.StreamError, match=r"writing \d+ bytes at \d+ failed"):
        stream.copy(export, url)


def test_destination_gone_mid_stream_fails_the_copy(export: str, tmp_path: Path) -> None:
    failure: list[BaseException] = []

    def run(url: str) -> None:
        try:
            stream.copy(export, url, tuning=Tuning(request_size=64 * K))
        except BaseException as e:
            failure.append(e)

    # Every write waits 50 ms, so the copy is still going when the server dies.
    with nbdkit(tmp_path, "--filter=delay", "memory", str(DISK_SIZE), "wdelay=50ms") as url:
        worker = threading.Thread(target=run, args=(url,))
        worker.start()
        time.sleep(0.5)
    worker.join(timeout=120)  # a hang guard, not a timing assertion
    assert not worker.is_alive(), "the copy hung after its destination went away"
    assert len(failure) == 1 and isinstance(failure[0], stream.StreamError)


def test_cancelling_the_async_stream_stops_the_copy(export: str, tmp_path: Path) -> None:
    async def cancel_soon(url: str) -> bool:
        with anyio.move_on_after(0.5) as scope:
            await stream.stream(export, url, tuning=Tuning(request_size=64 * K))
        return scope.cancelled_caught

    # At 50 ms a write, 48 MiB in 64 KiB requests cannot be done in 0.5 s.
    with nbdkit(tmp_path, "--filter=delay", "memory", str(DISK_SIZE), "wdelay=50ms") as url:
        threads = {t.name for t in threading.enumerate()}
        assert anyio.run(cancel_soon, url)
        left = {t.name for t in threading.enumerate()} - threads
        assert not {name for name in left if name.startswith("pullbackd-")}, left


def test_a_destination_smaller_than_the_disk_fails_an_incremental_too(
        tmp_path: Path) -> None:
    """Only what changed is written, all of it within the destination's first MiB: the
    copy succeeded, into an export that could not hold the disk."""
    image = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), str(64 * MiB)],
                   check=True)
    subprocess.run(["qemu-img", "bitmap", "--add", str(image), "b"], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P 0x5a 0 {64 * K}", str(image)],
                   check=True, stdout=subprocess.DEVNULL)
    (tmp_path / "dst").mkdir()
    sock = tmp_path / "disk.sock"
    with serve(["qemu-nbd", "--read-only", "--format", "qcow2", "--bitmap", "b", "--shared",
                "4", "--persistent", "--socket", str(sock), str(image)], sock) as src, \
            nbdkit(tmp_path / "dst", "memory", "1M") as dst, \
            pytest.raises(stream.StreamError, match=r"holds 1048576 bytes, less than the "
                                                    r"disk's 67108864"):
        stream.copy(src, dst, bitmap="qemu:dirty-bitmap:b")


def test_ranges_to_copy_need_a_destination_only_as_long_as_they_go(tmp_path: Path) -> None:
    """A restore reads older files than its disk, which may be longer (the disk shrank
    since): what it copies ends within the destination, and only that is read."""
    (tmp_path / "dst").mkdir()
    with nbdkit(tmp_path, "pattern", f"size={64 * MiB}") as src, \
            nbdkit(tmp_path / "dst", "memory", "1M") as dst:
        copied = stream.copy(src, dst, only=[(0, 64 * K), (MiB - 4 * K, MiB)])
        h = nbd.NBD()
        h.connect_uri(dst)
        try:
            assert h.pread(64 * K, 0) == pattern(0, 64 * K)
            assert h.pread(4 * K, MiB - 4 * K) == pattern(MiB - 4 * K, 4 * K)
            assert h.pread(MiB - 68 * K, 64 * K) == bytes(MiB - 68 * K)
        finally:
            h.shutdown()
    assert (copied.size, copied.done) == (MiB, 68 * K)


@pytest.mark.parametrize(("held", "pairs"), [(0, 2), (12, 1)])
def test_a_second_pair_opens_only_while_the_buffers_have_room_for_it(
        tmp_path: Path, held: int, pairs: int) -> None:
    """Other copies hold `held` of the pool's 16 buffers: a pair needs 8 for its requests
    in flight, and with fewer to spare a second one would only add threads."""
    pool = stream.BufferPool(16 * 64 * K, 64 * K)
    others = [pool.take(64 * K) for _ in range(held)]
    tuning = Tuning(request_size=64 * K, spread=MiB, buffers=pool)
    (tmp_path / "dst").mkdir()
    with nbdkit(tmp_path, "pattern", f"size={8 * MiB}") as src, \
            nbdkit(tmp_path / "dst", "memory", f"{8 * MiB}") as dst:
        copy = stream._Copy(src, dst, None, False, tuning, None, None, threading.Event())
        copy.run()
        h = nbd.NBD()
        h.connect_uri(dst)
        try:
            assert h.pread(8 * MiB, 0) == pattern(0, 8 * MiB)
        finally:
            h.shutdown()
    assert len(copy.workers) == pairs
    assert pool.spare() == 16 - held
    for buf in others:
        assert buf is not None
        pool.give(buf)


def pattern(offset: int, length: int) -> bytes:
    """What nbdkit's pattern plugin serves there: each 8-byte word is its own offset,
    big-endian."""
    start = offset // 8 * 8
    words = b"".join(struct.pack(">Q", o) for o in range(start, offset + length, 8))
    return words[offset - start:offset - start + length]


@pytest.mark.parametrize("silent", ["destination", "source", "planner"])
def test_a_server_that_stops_answering_fails_the_copy_which_lets_it_go(
        tmp_path: Path, silent: str) -> None:
    """A server frozen mid-copy (SIGSTOP: a host cut off, storage hung): the stall timeout
    fails the copy, which then returns (it waited for the server to close each connection,
    for ever); a source that stops answering for its extents fails it too (it waited with
    nothing in flight, which no stall timeout counted)."""
    (tmp_path / "dst").mkdir()
    source = ["--filter=delay", "data", "0x5a @1048576 0xa5", f"size={MiB << 10}",
              "delay-extents=3600"] if silent == "planner" else ["pattern", f"size={MiB << 10}"]
    failure: list[BaseException] = []
    with nbdkit(tmp_path, *source) as src, \
            nbdkit(tmp_path / "dst", "memory", f"{MiB << 10}") as dst:
        servers = _children()

        def run() -> None:
            try:
                stream.copy(src, dst, tuning=Tuning(stall_timeout=1.0))
            except BaseException as e:
                failure.append(e)

        worker = threading.Thread(target=run)
        worker.start()
        frozen = [pid for pid, cmd in servers.items()
                  if (silent == "destination") == ("memory" in cmd)]
        if silent != "planner":
            time.sleep(0.3)
            for pid in frozen:
                os.kill(pid, signal.SIGSTOP)
        try:
            worker.join(timeout=60)  # a hang guard, not a timing assertion
        finally:
            for pid in frozen:
                os.kill(pid, signal.SIGCONT)
        assert not worker.is_alive(), "the copy hung on a server that stopped answering"
    assert len(failure) == 1 and isinstance(failure[0], stream.StreamError), failure
    assert ("extents" in str(failure[0])) == (silent == "planner"), failure[0]


def _children() -> dict[int, str]:
    """This process's children (the nbdkit servers) and their command lines."""
    found = {}
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        for pid in (task / "children").read_text().split():
            found[int(pid)] = Path(f"/proc/{pid}/cmdline").read_text()
    return found


def test_a_copy_waiting_for_its_planner_is_not_stalled(tmp_path: Path) -> None:
    """Time with nothing in flight is no stall: the planner takes longer than the stall
    timeout to find the disk's last piece (the source answers each request for its
    extents slowly, over a disk of holes), and the copy waits for it."""
    expected = tmp_path / "expected.raw"
    with expected.open("wb") as f:
        f.truncate(32 * MiB)
        f.write(b"\x5a")
        f.seek(32 * MiB - 1)
        f.write(b"\xa5")
    target = tmp_path / "target.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(target), str(32 * MiB)],
                   check=True)
    with nbdkit(tmp_path, "--filter=delay", "data", f"0x5a @{32 * MiB - 1} 0xa5",
                f"size={32 * MiB}", "delay-extents=100ms") as src, qemu_nbd(target) as dst:
        stream.copy(src, dst, zeroed_destination=True,
                    tuning=Tuning(window=MiB, stall_timeout=1.5))
    subprocess.run(["qemu-img", "compare", "-q", "-F", "raw", str(target), str(expected)],
                   check=True, timeout=300)


def test_zeroes_are_written_out_where_the_destination_cannot_zero(tmp_path: Path) -> None:
    """An appliance's NBD server without NBD_CMD_WRITE_ZEROES (nbdkit's nozero filter),
    over a file full of old data: the source's zero ranges are written out as zeroes,
    and the file is the disk (the copy failed with EINVAL before)."""
    size = 8 * MiB
    target, expected = tmp_path / "target.raw", bytearray(size)
    target.write_bytes(b"\xee" * size)
    expected[0], expected[MiB] = 0x5a, 0xa5
    (tmp_path / "dst").mkdir()
    with nbdkit(tmp_path, "data", f"0x5a @{MiB} 0xa5", f"size={size}") as src, \
            nbdkit(tmp_path / "dst", "--filter=nozero", "file", str(target)) as dst:
        h = nbd.NBD()
        h.connect_uri(dst)
        assert not h.can_zero()
        h.shutdown()
        stream.copy(src, dst)
    assert target.read_bytes() == expected


def test_a_source_of_another_size_than_planned_writes_nothing(tmp_path: Path) -> None:
    """A disk resized between the size the backup was planned with and its start: the copy
    fails before it writes (a shrunk disk would be stored larger, with a tail of zeroes;
    a grown one would be cut short), and says to start again."""
    size = 8 * MiB
    target = tmp_path / "target.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(target), str(size)],
                   check=True)
    blank, pattern = tmp_path / "blank.raw", tmp_path / "pattern.raw"
    blank.write_bytes(bytes(size))
    # nbdkit's pattern: each 8 bytes hold their own offset.
    pattern.write_bytes(b"".join(struct.pack(">Q", o) for o in range(0, size, 8)))

    def same(a: Path, b: Path) -> bool:
        return subprocess.run(["qemu-img", "compare", "-q", "-F", "raw", str(a), str(b)],
                              check=False, timeout=300).returncode == 0

    with nbdkit(tmp_path, "pattern", f"size={size}") as src:
        with qemu_nbd(target) as dst, pytest.raises(stream.StreamError,
                                                    match="resized as its backup started"):
            stream.copy(src, dst, zeroed_destination=True, size=6 * MiB)
        assert same(target, blank)
        with qemu_nbd(target) as dst:
            stream.copy(src, dst, zeroed_destination=True, size=size)  # as planned
        assert same(target, pattern)


#: An NBD server (nbdkit's python plugin) writing into the file `file=`, whose flush
#: takes `flush=` seconds, as a server writing back a large cache does.
SLOW_FLUSH = """
import os, time
API_VERSION = 2
config_ = {}
def config(key, value): config_[key] = value
def open(readonly): return os.open(config_["file"], os.O_RDWR)
def close(fd): os.close(fd)
def get_size(fd): return os.fstat(fd).st_size
def can_write(fd): return True
def can_flush(fd): return True
def can_multi_conn(fd): return True
def pread(fd, buf, offset, flags): buf[:] = os.pread(fd, len(buf), offset)
def pwrite(fd, buf, offset, flags): os.pwrite(fd, buf, offset)
def flush(fd, flags):
    time.sleep(float(config_["flush"]))
    os.fsync(fd)
"""


@pytest.mark.parametrize("flush_timeout", [60.0, 1.0])
def test_a_destination_slow_to_flush_is_waited_for_until_the_flush_timeout(
        tmp_path: Path, flush_timeout: float) -> None:
    """The final flush takes longer than any request may (the stall timeout): it is
    waited for, up to its own timeout."""
    image = tmp_path / "source.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), str(8 * MiB)],
                   check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P 0x3c {MiB} {3 * MiB}",
                    str(image)], check=True, capture_output=True)
    target = tmp_path / "target.raw"
    target.write_bytes(b"\xff" * 8 * MiB)
    plugin = tmp_path / "slow_flush.py"
    plugin.write_text(SLOW_FLUSH)
    tuning = Tuning(stall_timeout=1.0, flush_timeout=flush_timeout)
    with qemu_nbd(image) as src, nbdkit(tmp_path, "python", str(plugin), f"file={target}",
                                        "flush=2.5") as dst:
        if flush_timeout < 2.5:
            with pytest.raises(stream.StreamError,
                               match="the destination did not confirm its flush within 1 s"):
                stream.copy(src, dst, tuning=tuning)
            return
        stream.copy(src, dst, tuning=tuning)
    subprocess.run(["qemu-img", "compare", "-q", "-f", "qcow2", "-F", "raw", str(image),
                    str(target)], check=True, timeout=300)


@contextmanager
def silent_server(path: Path) -> Iterator[str]:
    """A Unix socket that accepts (the kernel does, into the backlog) and never says a word."""
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.listen(16)
    try:
        yield f"nbd+unix:///?socket={path}"
    finally:
        server.close()


def test_a_destination_that_never_answers_fails_the_copy_in_time(tmp_path: Path) -> None:
    image = tmp_path / "source.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), str(MiB)],
                   check=True)
    with qemu_nbd(image) as source, silent_server(tmp_path / "silent.sock") as silent, \
            pytest.raises(stream.StreamError, match="no NBD handshake within 1 s"):
        stream.copy(source, silent, tuning=Tuning(connect_timeout=1))


@pytest.mark.asyncio
async def test_a_copy_stuck_on_a_silent_destination_is_cancelled_at_once(
        tmp_path: Path) -> None:
    """Abort cancels the copy: it must not wait for the other side (before, it waited
    until that side died: for ever, here)."""
    image = tmp_path / "source.qcow2"
    await anyio.run_process(["qemu-img", "create", "-q", "-f", "qcow2", str(image), str(MiB)])
    with qemu_nbd(image) as source, silent_server(tmp_path / "silent.sock") as silent:
        with anyio.fail_after(30):  # a hang fails the test instead of stalling it
            with anyio.move_on_after(1) as waited:
                await stream.stream(source, silent)
        assert waited.cancelled_caught


def test_a_destination_that_takes_one_connection_gets_one(tmp_path: Path) -> None:
    """A source that allows multi-conn, an appliance's server that does not (qemu-nbd
    with its default --shared=1): the copy keeps to one connection pair past `spread`
    (a second one was reset, or never got its handshake, and failed the copy)."""
    size = 8 * MiB
    target, pattern = tmp_path / "target.raw", tmp_path / "pattern.raw"
    target.write_bytes(b"\xee" * size)
    # nbdkit's pattern: each 8 bytes hold their own offset.
    pattern.write_bytes(b"".join(struct.pack(">Q", o) for o in range(0, size, 8)))
    sock = tmp_path / "dst.sock"
    with nbdkit(tmp_path, "pattern", f"size={size}") as src, \
            serve(["qemu-nbd", "-f", "raw", "--socket", str(sock), str(target)], sock) as dst:
        h = nbd.NBD()
        h.connect_uri(src)
        assert h.can_multi_conn()
        h.shutdown()
        stream.copy(src, dst, tuning=Tuning(spread=MiB, connect_timeout=10))
    assert target.read_bytes() == pattern.read_bytes()


@pytest.mark.parametrize("policy", ["blocksize-maximum=65536", "blocksize-minimum=4096"])
def test_requests_fit_the_destinations_block_sizes(tmp_path: Path, policy: str) -> None:
    """An appliance's server with a maximum block size of 64 KiB, or one with a minimum
    of 4 KiB, the source's extents in 512 bytes (a qcow2 of 512-byte clusters): it gets
    requests it takes, and the disk (512 KiB requests failed with EINVAL, and 512-byte
    zero writes were refused as unaligned)."""
    size = 8 * MiB
    image = tmp_path / "source.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=512",
                    str(image), str(size)], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P 0x5a 0 {size}",
                    "-c", "write -z 1536 512", "-c", f"write -z {MiB + 512} {3 * 512}",
                    "-c", f"write -P 0xa5 {4 * MiB + 512} 512", str(image)],
                   check=True, capture_output=True)
    target = tmp_path / "target.raw"
    target.write_bytes(b"\xee" * size)
    (tmp_path / "dst").mkdir()
    with qemu_nbd(image) as src, nbdkit(
            tmp_path / "dst", "--filter=blocksize-policy", "file", str(target), policy,
            "blocksize-error-policy=error") as dst:
        stream.copy(src, dst)
    subprocess.run(["qemu-img", "compare", "-q", "-f", "qcow2", "-F", "raw", str(image),
                    str(target)], check=True, timeout=300)


def test_a_disk_that_is_not_whole_blocks_of_the_destination_is_refused(
        tmp_path: Path) -> None:
    """A disk of 8 MiB + 512 bytes, a destination whose minimum block size is 4 KiB: its
    end cannot be written, and the copy says so before it writes anything (it failed as
    it wrote the end, with the rest written)."""
    target = tmp_path / "target.raw"
    target.write_bytes(b"\xee" * (8 * MiB + 4 * K))
    (tmp_path / "dst").mkdir()
    with nbdkit(tmp_path, "pattern", f"size={8 * MiB + 512}") as src, nbdkit(
            tmp_path / "dst", "--filter=blocksize-policy", "file", str(target),
            "blocksize-minimum=4096", "blocksize-error-policy=error") as dst, \
            pytest.raises(stream.UnfitDestination, match="minimum block size, 4096 bytes"):
        stream.copy(src, dst)
    assert target.read_bytes() == b"\xee" * (8 * MiB + 4 * K)


#: An NBD server (nbdkit's python plugin) writing into the file `file=` with O_SYNC: its
#: writes are stable once acknowledged, and it advertises no flush (the NBD spec allows it).
NO_FLUSH = """
import os
API_VERSION = 2
config_ = {}
def config(key, value): config_[key] = value
def open(readonly): return os.open(config_["file"], os.O_RDWR | os.O_SYNC)
def close(fd): os.close(fd)
def get_size(fd): return os.fstat(fd).st_size
def can_write(fd): return True
def can_flush(fd): return False
def can_multi_conn(fd): return True
def pread(fd, buf, offset, flags): buf[:] = os.pread(fd, len(buf), offset)
def pwrite(fd, buf, offset, flags): os.pwrite(fd, buf, offset)
"""


def test_a_destination_without_flush_is_not_flushed(tmp_path: Path) -> None:
    """The copy completes (it failed at the end, all data arrived: 'server does not
    support flush operations')."""
    size = 4 * MiB
    target, plugin = tmp_path / "target.raw", tmp_path / "no_flush.py"
    target.write_bytes(bytes(size))
    plugin.write_text(NO_FLUSH)
    (tmp_path / "dst").mkdir()
    with nbdkit(tmp_path, "pattern", f"size={size}") as src, \
            nbdkit(tmp_path / "dst", "python", str(plugin), f"file={target}") as dst:
        h = nbd.NBD()
        h.connect_uri(dst)
        assert not h.can_flush()
        h.shutdown()
        stream.copy(src, dst)
    assert target.read_bytes() == b"".join(struct.pack(">Q", o) for o in range(0, size, 8))


def test_a_source_answering_reads_short_fails_the_copy(tmp_path: Path) -> None:
    """A source whose reads answer success with data for half of each read
    (tests/short_reads.py): libnbd 1.14 tells it only to `aio_command_completed`, not to
    the completion callback. The copy fails and writes nothing (it wrote the reads'
    buffers as they were, half stale, and reported them written)."""
    size = 8 * MiB
    target = tmp_path / "target.raw"
    target.write_bytes(b"\xee" * size)
    reported: list[Piece] = []
    checksums = stream.Checksums(of=lambda data: "", written=lambda p, _: reported.append(p))
    sock = tmp_path / "short.sock"
    (tmp_path / "dst").mkdir()
    server = [sys.executable, str(Path(__file__).with_name("short_reads.py")), str(sock),
              str(size)]
    with serve(server, sock) as src, \
            nbdkit(tmp_path / "dst", "file", str(target)) as dst, \
            pytest.raises(stream.StreamError, match=r"reading \d+ bytes at \d+ failed"):
        stream.copy(src, dst, checksums=checksums)
    assert reported == []
    assert target.read_bytes() == b"\xee" * size


def test_a_source_that_never_greets_fails_the_copy_and_is_not_reachable(
        tmp_path: Path) -> None:
    """A frozen QEMU's export: the kernel accepts, no NBD handshake ever comes. The copy
    fails after its connect timeout, and `reachable` says no (both waited for good)."""
    outcomes: list[BaseException | bool] = []

    def run(silent: str) -> None:
        try:
            stream.copy(silent, f"nbd+unix:///?socket={tmp_path}/unused.sock",
                        tuning=Tuning(connect_timeout=1))
        except BaseException as e:
            outcomes.append(e)
        outcomes.append(stream.reachable(silent, timeout=1))

    with silent_server(tmp_path / "silent.sock") as silent:
        worker = threading.Thread(target=run, args=(silent,), daemon=True)
        worker.start()
        worker.join(timeout=60)  # a hang guard, not a timing assertion
        assert not worker.is_alive(), f"hung on a source that never greets: {outcomes}"
    assert len(outcomes) == 2 and isinstance(outcomes[0], stream.StreamError), outcomes
    assert "no NBD handshake within 1 s" in str(outcomes[0])
    assert outcomes[1] is False


def test_a_pinned_destination_is_reached_with_no_link_on_its_way(tmp_path: Path) -> None:
    """`_pinned`: the socket its path names, reached through a descriptor; a folder on the
    way swapped for a link (to the same folder, even), or a "..", is refused as unchecked;
    a socket not there is an error of its own (no server listens), not an attack."""
    folder = tmp_path / "appliance"
    folder.mkdir()
    sock = folder / "vda.sock"
    with serve(["nbdkit", "-f", "-U", str(sock), "memory", str(MiB)], sock) as url:
        with stream._pinned(url) as pinned:
            assert "/proc/self/fd/" in pinned
            h = nbd.NBD()
            h.connect_uri(pinned)
            assert h.get_size() == MiB
            h.shutdown()
        folder.rename(tmp_path / "moved")
        folder.symlink_to(tmp_path / "moved")
        with pytest.raises(stream.UncheckedDestination, match=f"{folder} is a link"), \
                stream._pinned(url):
            pass
        for unchecked in (f"nbd+unix:///?socket={tmp_path}/x/../moved/vda.sock",
                          f"nbd+unix:///?socket={sock}&socket={tmp_path}/moved/vda.sock"):
            with pytest.raises(stream.UncheckedDestination), stream._pinned(unchecked):
                pass
        with pytest.raises(stream.StreamError, match="No such file") as e, \
                stream._pinned(f"nbd+unix:///?socket={tmp_path}/moved/vdb.sock"):
            pass
        assert not isinstance(e.value, stream.UncheckedDestination)
        with stream._pinned("nbds://host:10809/vda") as as_given:  # no path to pin
            assert as_given == "nbds://host:10809/vda"
