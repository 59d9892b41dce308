"""The embedded repository's manifests, verify, write-behind, qemu-nbd servers and
recovery after a crash, on real files (no lab needed)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import nbd
import pytest
import xxhash

from pullbackd import api, crash, names, orphans, qemu_nbd, stream, verifying, writers
from pullbackd import repository as repository_module
from pullbackd.chain import Base
from pullbackd.domainfiles import DEFINITION, DomainFiles
from pullbackd.durable import fsync, fsync_dir
from pullbackd.errors import InvalidParameter, NoBackup, NoSuchCheckpoint, RepositoryError
from pullbackd.manifest import Manifest, Region, checksum, from_text, recorder, to_text
from pullbackd.model import LOCAL, Job, JobState, StartRequest
from pullbackd.qemu_nbd import Server
from pullbackd.rebuild import Rebuilder
from pullbackd.repository import Repository, regions, restorable
from pullbackd.source import Plan
from pullbackd.stream import Piece, Progress, whole_clusters
from pullbackd.uses import Uses
from pullbackd.writebehind import WriteBehind, direct_io

from .fakes import FakeSource, FakeVirt, Stall
from .images import MiB, assert_same
from .test_jobs import Rig, running
from .test_jobs import ended as job_ended

CLEAN, DAMAGED = 0x5A, 0x5B


def stored_backup(tmp_path: Path, manifest: dict[str, object]) -> tuple[Repository, Path]:
    """A 4 MiB full backup of lab1's vda holding 1 MiB of CLEAN at 1 MiB, with `manifest`."""
    repository = Repository(tmp_path / "repo", tmp_path / "sockets", 0)
    folder = repository.folder("lab1", "c", "vda")
    folder.mkdir(parents=True)
    image = folder / "0001.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), str(4 * MiB)],
                   check=True)
    qemu_io(image, f"write -P {CLEAN:#x} {MiB} {MiB}")
    (folder / "0001.json").write_text(json.dumps({
        "sequence": 1, "domain": "lab1", "consumer": "c", "disk": "vda", "job": "j",
        "checkpoint": "cp", "created": "2026-01-01T00:00:00.000Z", "mode": "full",
        "size": 4 * MiB, "backing": None} | manifest))
    return repository, image


def qemu_io(image: Path, command: str) -> None:
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", command, str(image)], check=True,
                   capture_output=True, timeout=60)


def verify(repository: Repository) -> list[str]:
    [manifest] = repository.manifests("lab1", "c", "vda")
    return anyio.run(repository.verify, manifest)


def test_new_manifests_name_their_checksums_and_verify_finds_damage(tmp_path: Path) -> None:
    data = bytes([CLEAN]) * MiB
    written = Manifest(1, "lab1", "c", "vda", "j", "cp", "t", "full", 4 * MiB, None,
                       bytes=2 * MiB)
    regions = (Region(MiB, MiB, xxhash.xxh3_128_hexdigest(data)), Region(3 * MiB, MiB, None))
    text = json.loads(to_text(written, regions))
    assert text["checksums"] == "xxh3-128"
    assert from_text(to_text(written, regions)) == (written, regions)
    repository, image = stored_backup(tmp_path, {k: text[k] for k in ("regions", "checksums")})
    assert verify(repository) == []
    qemu_io(image, f"write -P {DAMAGED:#x} {3 * MiB + 4096} 512")  # into the zero region
    assert len(verify(repository)) == 1
    qemu_io(image, f"write -P {DAMAGED:#x} {MiB + 4096} 512")
    assert len(verify(repository)) == 2


def test_manifests_from_before_they_named_their_checksums_are_sha256(tmp_path: Path) -> None:
    sha256 = hashlib.sha256(bytes([CLEAN]) * MiB).hexdigest()
    repository, image = stored_backup(tmp_path, {"regions": [[MiB, MiB, sha256]]})
    assert repository.manifests("lab1", "c", "vda")[0].checksums == "sha256"
    assert verify(repository) == []
    qemu_io(image, f"write -P {DAMAGED:#x} {2 * MiB - 512} 512")
    [problem] = verify(repository)
    assert f"1048576 bytes at {MiB}" in problem


def test_checksums_of_an_unknown_kind_are_a_problem_not_a_crash(tmp_path: Path) -> None:
    repository, _ = stored_backup(tmp_path, {"regions": [[MiB, MiB, "?"]], "checksums": "new"})
    assert verify(repository) == ["0001.qcow2: cannot check checksums of kind 'new'"]


def resident(path: Path) -> int:
    """Bytes of the file in the page cache."""
    return int(subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES",
                               str(path)], check=True, capture_output=True, text=True).stdout)


def test_write_behind_gets_what_was_written_to_disk_and_out_of_the_page_cache(
        tmp_path: Path) -> None:
    path = tmp_path / "backup.partial"
    data = os.urandom(16 * MiB)
    path.write_bytes(data)  # dirty pages: the kernel would keep them 30 s before writing
    assert resident(path) == len(data)
    with WriteBehind(path, MiB) as behind:
        done = 0
        # The first request starts writing the pages back, a later one finds them
        # clean and drops them: a copy asks every MiB it writes.
        deadline = time.monotonic() + 30
        while resident(path):
            assert time.monotonic() < deadline, f"{resident(path)} bytes still cached"
            done += MiB
            behind.progress(Progress(len(data), len(data), len(data), done))
            time.sleep(0.05)
    assert path.read_bytes() == data


def test_a_backup_is_written_past_the_page_cache(tmp_path: Path) -> None:
    """Where the filesystem takes O_DIRECT (this one does), a backup's data never sits in
    the host's page cache, and nothing is left for the kernel to write back."""
    repository = Repository(tmp_path / "repo", tmp_path / "sockets", MiB)
    data = os.urandom(2 * MiB)
    probe = tmp_path / "probe"
    probe.write_bytes(b"x")
    assert direct_io(probe)
    manifest = store(repository, data, MiB)
    # What is cached is what `qemu-img create` wrote (the qcow2 header and tables).
    assert resident(repository.folder("lab1", "c", "vda") / "0001.qcow2") <= 256 << 10
    assert_restores(repository, manifest, bytes(MiB) + data + bytes(MiB), tmp_path)


SIZE = 4 * MiB


def store(repository: Repository, data: bytes, offset: int) -> Manifest:
    """A full backup of lab1's vda holding `data` at `offset`, written through the
    repository's own writer."""
    async def run() -> Manifest:
        writer = await repository.begin("lab1", "c", "vda", SIZE, "j", "cp", "t", None)
        try:
            await anyio.to_thread.run_sync(pwrite, writer.url, data, offset)
        except BaseException:
            await repository.abort(writer)
            raise
        writer.regions.append(Region(offset, len(data), checksum(data)))
        try:
            return await repository.commit(writer)
        finally:
            await repository.close()
    return anyio.run(run)


def pwrite(url: str, data: bytes, offset: int) -> None:
    h = nbd.NBD()
    h.connect_uri(url)
    try:
        h.pwrite(data, offset)
    finally:
        h.shutdown()


def assert_restores(repository: Repository, manifest: Manifest, expected: bytes,
                    tmp_path: Path) -> None:
    restored = tmp_path / "restored.raw"
    restored.unlink(missing_ok=True)
    anyio.run(repository.restore, manifest, restored, "raw")
    assert_same(restored.read_bytes(), expected)


def ended(pid: int) -> bool:
    """Whether the process is gone (or a zombie: it serves nothing any more)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rpartition(")")[2].split()[0] == "Z"


def wait_ended(pid: int) -> None:
    deadline = time.monotonic() + 10
    while not ended(pid):
        assert time.monotonic() < deadline, f"{pid} is still there"
        time.sleep(0.01)


def cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_text().split("\0")[:-1]


#: A daemon beginning a backup: prints its writers' pid, then dies as told on stdin.
CRASHING = """
import os, sys
from pathlib import Path
import anyio
from pullbackd.repository import Repository

async def main() -> None:
    repository = Repository(Path(sys.argv[1]), Path(sys.argv[2]), 0)
    writer = await repository.begin("lab1", "c", "vda", 4 << 20, "j", "cp", "t", None)
    print(repository.writers.pid, flush=True)
    if sys.stdin.readline().strip() == "exit":
        os._exit(1)
    await anyio.sleep(3600)

anyio.run(main)
"""


@pytest.mark.parametrize("death", ["kill -9", "exit"])
def test_the_writer_of_a_crashed_daemon_dies_with_it(tmp_path: Path, death: str) -> None:
    repository = Repository(tmp_path / "repo", tmp_path / "sockets", 0)
    daemon = subprocess.Popen([sys.executable, "-c", CRASHING, str(repository.root),
                               str(tmp_path / "sockets")],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert daemon.stdin is not None and daemon.stdout is not None
    try:
        server = int(daemon.stdout.readline())
        assert "qemu-storage-daemon" in cmdline(server) and not ended(server)
        if death == "kill -9":
            daemon.kill()
        else:
            daemon.stdin.write("exit\n")
            daemon.stdin.flush()
        assert daemon.wait(timeout=30) in (-signal.SIGKILL, 1)
        deadline = time.monotonic() + 5
        while not ended(server):
            assert time.monotonic() < deadline, f"writer {server} outlived its daemon"
            time.sleep(0.01)
    finally:
        daemon.kill()
        daemon.wait()
    # What the crash left: the partial backup, and the sockets (NBD, QMP) of a server
    # killed with SIGKILL. Recovery removes them, and the repository stores again.
    folder = repository.folder("lab1", "c", "vda")
    assert [p.name for p in folder.iterdir()] == ["0001.qcow2.partial"]
    assert len(list((tmp_path / "sockets").iterdir())) == 2
    repository.recover()
    assert list(folder.iterdir()) == []
    assert list((tmp_path / "sockets").iterdir()) == []
    data = os.urandom(MiB)
    manifest = store(repository, data, MiB)
    assert manifest.sequence == 1
    assert_restores(repository, manifest, bytes(MiB) + data + bytes(2 * MiB), tmp_path)


def test_a_writer_killed_mid_backup_fails_it_and_the_next_backup_gets_another(
        tmp_path: Path) -> None:
    """The writer dies (kill -9) after the data arrived, before the commit: what qcow2
    held in memory is lost, so the commit fails and nothing is stored; the next backup
    starts a writer of its own."""
    repository = Repository(tmp_path / "repo", tmp_path / "sockets", 0)

    async def run() -> None:
        writer = await repository.begin("lab1", "c", "vda", SIZE, "j", "cp", "t", None)
        try:
            await anyio.to_thread.run_sync(pwrite, writer.url, os.urandom(MiB), 0)
            killed = repository.writers.pid
            assert killed is not None
            os.kill(killed, signal.SIGKILL)
            await anyio.to_thread.run_sync(wait_ended, killed)
            with pytest.raises(RepositoryError, match="died"):
                await repository.commit(writer)
        finally:
            await repository.abort(writer)
        assert not writer.partial.exists()

    anyio.run(run)
    assert_only_the_next_backup_is_stored(repository, tmp_path)


def assert_only_the_next_backup_is_stored(repository: Repository, tmp_path: Path) -> None:
    """After a backup that failed: nothing of it is stored, and the next one is, whole."""
    assert repository.manifests("lab1", "c", "vda") == []
    data = os.urandom(MiB)
    manifest = store(repository, data, MiB)
    assert manifest.sequence == 1
    assert_restores(repository, manifest, bytes(MiB) + data + bytes(2 * MiB), tmp_path)


def test_a_writer_that_does_not_answer_in_time_is_replaced(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The writer stops answering its monitor (stopped, as one stuck on its storage is)
    while a backup is committed, and answers again later: the commit fails, and the
    next backup gets a writer of its own instead of a monitor out of step for good."""
    monkeypatch.setattr(writers, "QMP_TIMEOUT", 1.0)
    repository = Repository(tmp_path / "repo", tmp_path / "sockets", 0)

    async def run() -> None:
        writer = await repository.begin("lab1", "c", "vda", SIZE, "j", "cp", "t", None)
        stuck = repository.writers.pid
        assert stuck is not None
        try:
            await anyio.to_thread.run_sync(pwrite, writer.url, os.urandom(MiB), 0)
            os.kill(stuck, signal.SIGSTOP)
            resume = threading.Timer(2.0, os.kill, (stuck, signal.SIGCONT))
            resume.start()
            try:
                with pytest.raises(RepositoryError, match="did not answer"):
                    await repository.commit(writer)
            finally:
                resume.join()
        finally:
            await repository.abort(writer)
        await anyio.to_thread.run_sync(wait_ended, stuck)
        assert not writer.partial.exists()

    anyio.run(run)
    assert_only_the_next_backup_is_stored(repository, tmp_path)


def serve(sock: Path, image: Path) -> Server:
    """`image` served the way the repository serves a backup being written, but by
    the test: an earlier run's server."""
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), str(SIZE)],
                   check=True)
    sock.parent.mkdir(mode=0o700, exist_ok=True)
    server = repository_module.image_server(image, "qcow2", sock, writable=True)
    server.start()
    return server


def test_recover_ends_an_earlier_runs_servers_and_removes_its_leftovers(
        tmp_path: Path) -> None:
    repository = Repository(tmp_path / "repo", tmp_path / "sockets", 0)
    data = os.urandom(MiB)
    manifest = store(repository, data, 2 * MiB)
    folder = repository.folder("lab1", "c", "vda")
    backup = (folder / "0001.qcow2").read_bytes()
    written = (folder / "0001.json").read_bytes()
    leftovers = [folder / "0001.qcow2.flat.partial", folder / "0003.tmp"]
    for leftover in leftovers:
        leftover.write_bytes(b"half")
    stale = tmp_path / "sockets" / "w-stale.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(stale))
    orphan = serve(tmp_path / "sockets" / "w-orphan.sock", folder / "0002.qcow2.partial")
    # A neighbour's, in a folder whose name starts with the sockets folder's: not ours.
    neighbour = serve(tmp_path / "sockets-too" / "w-1.sock", tmp_path / "neighbour.qcow2")
    try:
        repository.recover()
        # recover returns once the server is gone: reaped now, it would block otherwise.
        assert orphan.returncode is not None
        assert neighbour.returncode is None
        assert (tmp_path / "sockets-too" / "w-1.sock").exists()
    finally:
        for server in (orphan, neighbour):
            server.stop()
    assert list((tmp_path / "sockets").iterdir()) == []
    assert sorted(p.name for p in folder.iterdir()) == ["0001.json", "0001.qcow2"]
    assert (folder / "0001.qcow2").read_bytes() == backup
    assert (folder / "0001.json").read_bytes() == written
    assert repository.manifests("lab1", "c", "vda") == [manifest]
    assert anyio.run(repository.verify, manifest) == []
    assert_restores(repository, manifest, bytes(2 * MiB) + data + bytes(MiB), tmp_path)


#: Looks like a qemu-nbd of an earlier run, and shrugs off SIGTERM.
STUBBORN = """
import signal, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("ready", flush=True)
time.sleep(3600)
"""


def test_recover_kills_a_server_that_ignores_sigterm(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(orphans, "ORPHAN_GRACE", 0.5)
    repository = Repository(tmp_path / "repo", tmp_path / "sockets", 0)
    stubborn = subprocess.Popen(["qemu-nbd", "-c", STUBBORN, "--socket",
                                 str(tmp_path / "sockets" / "w-1.sock")],
                                executable=sys.executable, stdout=subprocess.PIPE, text=True)
    try:
        assert stubborn.stdout is not None and stubborn.stdout.readline() == "ready\n"
        assert cmdline(stubborn.pid)[0] == "qemu-nbd"
        started = time.monotonic()
        repository.recover()
        assert stubborn.poll() == -signal.SIGKILL
        assert 0.5 <= time.monotonic() - started < 5
    finally:
        stubborn.kill()
        stubborn.wait()


def test_a_qemu_nbd_that_cannot_start_fails_at_once(tmp_path: Path) -> None:
    repository, image = stored_backup(tmp_path, {"regions": []})
    [manifest] = repository.manifests("lab1", "c", "vda")
    # A qcow2 header of no version qemu-nbd knows: it cannot open it, and exits.
    image.write_bytes(b"QFI\xfb" + bytes(508))
    # "exited", not "not serving after 30 s": it was not waited for.
    with pytest.raises(RepositoryError, match="qemu-nbd exited with 1"):
        anyio.run(repository.restore, manifest, tmp_path / "restored.raw", "raw")
    assert not (tmp_path / "restored.raw").exists()


def test_a_planted_symlink_is_never_written_through(tmp_path: Path) -> None:
    """A temporary name with a symlink on it (the attack on Prune): the link goes, the
    file it pointed to stays as it was."""
    folder = tmp_path / "disk"
    folder.mkdir()
    victim = tmp_path / "victim"
    victim.write_text("root's")
    (folder / "0001.tmp").symlink_to(victim)
    repository_module._durable_write(folder / "0001.json", '{"a": 1}')
    assert victim.read_text() == "root's"
    assert (folder / "0001.json").read_text() == '{"a": 1}'
    assert not (folder / "0001.tmp").exists() and not (folder / "0001.tmp").is_symlink()


def test_only_files_pullbackd_wrote_are_read(tmp_path: Path) -> None:
    """A manifest that is a link, or a backup file of another user's, is refused rather
    than read (or served) as root."""
    repository, image = stored_backup(tmp_path, {"regions": []})
    assert len(repository.manifests("lab1", "c", "vda")) == 1
    os.chown(image, 65534, 65534)  # nobody's
    [manifest] = repository.manifests("lab1", "c", "vda")
    with pytest.raises(RepositoryError, match="not a file pullbackd wrote"):
        anyio.run(repository.verify, manifest)
    os.chown(image, 0, 0)
    folder = image.parent
    (folder / "0001.json").rename(tmp_path / "elsewhere.json")
    (folder / "0001.json").symlink_to(tmp_path / "elsewhere.json")
    with pytest.raises(RepositoryError, match="not a file pullbackd wrote"):
        repository.manifests("lab1", "c", "vda")


Write = tuple[int, int, int | None]  # offset, length, byte (None: zeroes)


def chain(repository: Repository, steps: list[list[Write]], base: Manifest | None = None,
          before: bytes = bytes(SIZE), sizes: list[int] | None = None) -> list[Manifest]:
    """Backups of lab1's vda, a full and then incrementals (or only incrementals, over
    `base`, of a disk that held `before`), each writing its step's writes (apart)
    through the repository's own writer as the engine writes them: into an incremental
    in whole clusters (stream.whole_clusters), what a cluster holds beside a write read
    from the disk as it is; zeroes as NBD zero writes; with their regions. `sizes`:
    the disk's size at each step (SIZE if not given), resized as QEMU resizes a disk
    (cut short, or grown with zeroes)."""
    async def run() -> list[Manifest]:
        manifests: list[Manifest] = [base] if base else []
        disk = bytearray(before)
        for n, writes in enumerate(steps):
            size = sizes[n] if sizes else SIZE
            disk = resized(disk, size)
            writer = await repository.begin("lab1", "c", "vda", size, f"j{n}", f"cp{n}", "t",
                                            manifests[-1] if manifests else None)
            for offset, length, byte in writes:
                disk[offset:offset + length] = bytes([byte or 0]) * length
            pieces = [Piece(offset, length, byte is None)
                      for offset, length, byte in sorted(writes)]
            if writer.cluster is not None:
                pieces = whole_clusters(pieces, writer.cluster, size)
            try:
                await anyio.to_thread.run_sync(write_all, writer.url, pieces, bytes(disk))
            except BaseException:
                await repository.abort(writer)
                raise
            writer.regions += [Region(p.offset, p.length, None if p.zero else checksum(
                disk[p.offset:p.offset + p.length])) for p in pieces]
            manifests.append(await repository.commit(writer))
        await repository.close()
        return manifests[1:] if base else manifests
    return anyio.run(run)


def resized(disk: bytearray, size: int) -> bytearray:
    """A disk's bytes once QEMU resized it to `size`: cut short, or grown with zeroes."""
    return disk[:size] + bytes(max(0, size - len(disk)))


def write_all(url: str, pieces: list[Piece], disk: bytes) -> None:
    h = nbd.NBD()
    h.connect_uri(url)
    try:
        for p in pieces:
            if p.zero:
                h.zero(p.length, p.offset)
            else:
                h.pwrite(disk[p.offset:p.offset + p.length], p.offset)
    finally:
        h.shutdown()


def verify_all(repository: Repository) -> tuple[int, list[str]]:
    return anyio.run(repository.verify_disk, "lab1", "c", "vda")


#: Each backup of `many`: 64 KiB of its own byte at its own place, zeroes at another,
#: and a small unaligned write; backup 0 is a full one.
def many(count: int) -> list[list[Write]]:
    return [[(n * 128 << 10, 64 << 10, 0x20 + n), (SIZE - (n + 1) * (64 << 10), 64 << 10, None),
             (2 * MiB + n * 4096 + 100, 300, 0x80 + n)] for n in range(count)]


def host_offset(image: Path, offset: int) -> int:
    """Where in `image` itself (not in its backing files) the data at guest `offset` is."""
    mapping = json.loads(subprocess.run(
        ["qemu-img", "map", "--output=json", "-f", "qcow2", str(image)],
        check=True, capture_output=True, text=True).stdout)
    [extent] = [e for e in mapping if e["start"] <= offset < e["start"] + e["length"]]
    assert extent["depth"] == 0 and extent["data"], extent
    return int(extent["offset"]) + offset - int(extent["start"])


def flip(path: Path, at: int) -> None:
    """One byte of the file, changed on disk (as bit rot would)."""
    with path.open("r+b") as f:
        f.seek(at)
        byte = f.read(1)[0]
        f.seek(at)
        f.write(bytes([byte ^ 0x01]))


@pytest.mark.parametrize("victim", [0, 4, 5, 9])
def test_verify_finds_one_damaged_byte_in_any_one_of_many_backups(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, victim: int) -> None:
    # Files served in turns of 4: the damage is found in the first turn, or a later one.
    monkeypatch.setattr(verifying, "FILES_PER_SERVER", 4)
    repository = Repository(tmp_path / "repo", tmp_path / "sockets", 0)
    manifests = chain(repository, many(10))
    assert verify_all(repository) == (10, [])
    image = repository.folder("lab1", "c", "vda") / manifests[victim].file
    offset, length, _ = many(10)[victim][0]
    flip(image, host_offset(image, offset + 1000))
    assert verify_all(repository) == (10, [
        f"{manifests[victim].file}: {length} bytes at {offset} differ from what was written"])


def test_verify_names_a_file_qemu_cannot_open_and_checks_the_others(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One file of a batch with a header QEMU refuses: Verify failed as a whole, naming
    the batch's first file, and checked nothing of the disk."""
    monkeypatch.setattr(verifying, "FILES_PER_SERVER", 4)
    # Not ASCII: QEMU quotes the path JSON-escaped.
    repository = Repository(tmp_path / "répo", tmp_path / "sockets", 0)
    manifests = chain(repository, many(6))
    folder = repository.folder("lab1", "c", "vda")
    image = folder / manifests[5].file
    offset, length, _ = many(6)[5][0]
    flip(image, host_offset(image, offset))
    with (folder / manifests[2].file).open("r+b") as f:
        f.seek(4)
        f.write(struct.pack(">I", 9))  # qcow2 version 9
    count, problems = verify_all(repository)
    assert count == 6 and len(problems) == 2
    assert problems[0].startswith(f"{manifests[2].file}: QEMU cannot open it (")
    assert "Unsupported qcow2 version 9" in problems[0]
    assert problems[1] == f"{manifests[5].file}: {length} bytes at {offset} differ from what " \
                          "was written"


def test_a_restore_of_a_backup_pruned_since_it_was_looked_up_says_so(tmp_path: Path) -> None:
    """Restore looks the backup up, then a Prune drops it: the restore read the chain as
    the prune left it ("the repository lost this file"), or another backup's data."""
    repository = Repository(tmp_path / "repo", tmp_path / "sockets", 0)
    manifests = chain(repository, many(3))
    looked_up = repository.at("lab1", "c", "vda", manifests[1].checkpoint)
    anyio.run(repository.prune, "lab1", "c", "vda", 1)
    for m in (looked_up, manifests[2]):  # dropped; the kept one, folded into
        with pytest.raises(RepositoryError, match=r"this backup changed since it was looked "
                                                  r"up .* look it up and restore again"):
            anyio.run(repository.restore, m, tmp_path / "restored.raw", "raw")
        assert not (tmp_path / "restored.raw").exists()


def test_a_command_that_fails_names_the_file_it_was_for(tmp_path: Path) -> None:
    with pytest.raises(RepositoryError) as e:
        anyio.run(repository_module._run, tmp_path / "restored.raw", "sh", "-c",
                  "echo 'too large' >&2; exit 1")
    assert e.value.parameters == {"path": str(tmp_path / "restored.raw"),
                                  "reason": "too large"}


def test_verify_finds_zeroes_that_are_no_longer_zero(tmp_path: Path) -> None:
    repository = Repository(tmp_path / "repo", tmp_path / "sockets", 0)
    manifests = chain(repository, many(3))
    image = repository.folder("lab1", "c", "vda") / manifests[1].file
    offset, length, byte = many(3)[1][1]
    assert byte is None
    qemu_io(image, f"write -P {DAMAGED:#x} {offset + length - 512} 512")
    assert verify_all(repository) == (3, [
        f"0002.qcow2: {length} bytes at {offset} differ from what was written"])


@pytest.mark.parametrize("victim", [0, 1])
def test_verify_finds_what_a_backup_holds_that_it_never_wrote(tmp_path: Path,
                                                              victim: int) -> None:
    """A cluster a backup file holds beyond its regions (its tables damaged, say) would
    restore over what older backups hold there, and no checksum vouches for it."""
    repository = Repository(tmp_path / "repo", tmp_path / "sockets", 0)
    manifests = chain(repository, many(3))
    assert verify_all(repository) == (3, [])
    image = repository.folder("lab1", "c", "vda") / manifests[victim].file
    stray = 3 * MiB + (64 << 10)  # no backup of `many` writes there
    qemu_io_alone(image, f"write -P {DAMAGED:#x} {stray + 512} 512")
    assert verify_all(repository) == (3, [
        f"{manifests[victim].file}: holds {64 << 10} bytes at {stray} that it never wrote"])


def qemu_io_alone(image: Path, command: str) -> None:
    """qemu-io on the file alone, without its backing file."""
    options = {"driver": "qcow2", "backing": None,
               "file": {"driver": "file", "filename": str(image)}}
    subprocess.run(["qemu-io", "-c", command, f"json:{json.dumps(options)}"],
                   check=True, capture_output=True, timeout=60)


def lose_mapping(image: Path, offset: int) -> None:
    """The qcow2 `image` forgets what it held of the cluster at guest `offset` (its L2
    entry cleared): reads there fall through to its backing file."""
    with image.open("r+b") as f:
        header = f.read(48)
        cluster_bits = int.from_bytes(header[20:24], "big")
        l1_table = int.from_bytes(header[40:48], "big")
        cluster = offset >> cluster_bits
        per_l2 = (1 << cluster_bits) // 8
        f.seek(l1_table + cluster // per_l2 * 8)
        l2_table = int.from_bytes(f.read(8), "big") & 0x00FF_FFFF_FFFF_FE00
        assert l2_table, "no L2 table there"
        f.seek(l2_table + cluster % per_l2 * 8)
        assert int.from_bytes(f.read(8), "big"), "nothing mapped there"
        f.seek(l2_table + cluster % per_l2 * 8)
        f.write(bytes(8))


def test_verify_reads_what_an_overlay_lost_through_its_chain(tmp_path: Path) -> None:
    """A region an incremental's own file no longer holds reads through its chain, as a
    restore would: found where the backing file shows different bytes, not where it
    shows the same."""
    repository = Repository(tmp_path / "repo", tmp_path / "sockets", 0)
    same = (2 * MiB, 64 << 10, 0x33)
    manifests = chain(repository, [[(MiB, 64 << 10, 0x11), same],
                                   [(MiB, 64 << 10, None), same]])
    image = repository.folder("lab1", "c", "vda") / manifests[1].file
    lose_mapping(image, 2 * MiB)  # the backing file holds the same bytes there
    assert verify_all(repository) == (2, [])
    lose_mapping(image, MiB)  # zeroes, over the full backup's 0x11
    assert verify_all(repository) == (2, [
        f"0002.qcow2: {64 << 10} bytes at {MiB} differ from what was written"])


def test_flattened_backups_still_verify(tmp_path: Path) -> None:
    repository = Repository(tmp_path / "repo", tmp_path / "sockets", 0)
    chain(repository, many(4))
    dropped = anyio.run(repository.prune, "lab1", "c", "vda", 2)
    assert [m.sequence for m in dropped] == [1, 2]
    [flat, _] = repository.manifests("lab1", "c", "vda")
    assert flat.backing is None and regions(repository, flat)
    assert verify_all(repository) == (2, [])
    image = repository.folder("lab1", "c", "vda") / flat.file
    region = next(r for r in regions(repository, flat) if r.checksum is not None)
    flip(image, host_offset(image, region.offset))
    assert verify_all(repository) == (2, [
        f"0003.qcow2: {region.length} bytes at {region.offset} differ from what was written"])


def test_a_prune_cut_short_after_flattening_still_restores_the_zeroes(tmp_path: Path) -> None:
    """A crash between a prune's two steps (`prune.flattened`: a kept backup replaced by
    its flattened copy, its manifest not yet rewritten) leaves a manifest naming a
    backing file the file no longer reads through: what the backup holds as zeroes
    over older data restores as zeroes, not as the older data."""
    repository = Repository(tmp_path / "repo", tmp_path / "sockets", 0)
    full, incremental = chain(repository, [[(0, MiB, 0x10)], [(0, 64 << 10, None)]])
    folder = repository.folder("lab1", "c", "vda")
    before = {name: (folder / name).read_bytes()
              for name in (full.file, "0001.json", "0002.json")}
    assert [m.sequence for m in anyio.run(repository.prune, "lab1", "c", "vda", 1)] == [1]
    for name, data in before.items():  # what the crash left: all but the new manifest
        (folder / name).write_bytes(data)
    stale = repository.at("lab1", "c", "vda", incremental.checkpoint)
    assert stale.backing == full.file
    expected = bytes(64 << 10) + bytes([0x10]) * (MiB - (64 << 10)) + bytes(SIZE - MiB)
    assert_restores(repository, stale, expected, tmp_path)
    count, [problem] = verify_all(repository)  # the manifest does not describe the file
    assert count == 2 and "that it never wrote" in problem
    repository.recover()  # as the next start does: the manifest follows the file
    mended = repository.at("lab1", "c", "vda", incremental.checkpoint)
    assert (mended.backing, mended.mode) == (None, "full")
    assert_restores(repository, mended, expected, tmp_path)
    assert verify_all(repository) == (2, [])
    assert [m.sequence for m in anyio.run(repository.prune, "lab1", "c", "vda", 1)] == [1]
    assert_restores(repository, repository.at("lab1", "c", "vda", None), expected, tmp_path)


#: A daemon's Prune of lab1's vda down to its newest backup (it dies where crash.ENV says).
PRUNING = """
import sys
from pathlib import Path
import anyio
from pullbackd.repository import Repository

anyio.run(Repository(Path(sys.argv[1]), Path(sys.argv[2]), 0).prune, "lab1", "c", "vda", 1)
"""


def test_a_prune_killed_between_two_dropped_manifests_leaves_whole_backups(
        tmp_path: Path) -> None:
    """A prune that drops two backups (0001, and 0002 over it) is killed once it removed
    the first manifest (crash point prune.unlinked). It removed them oldest first: 0002
    stayed listed over a 0001 that was no backup, which Verify reported at every run, a
    restore of 0002 could not read, and every later Prune refused. Newest first, what
    stays listed is whole: the next start removes the file whose manifest went, and the
    next Prune drops the rest."""
    repository = Repository(tmp_path / "repo", tmp_path / "sockets", 0)
    chain(repository, [[(0, MiB, 0x10)], [(MiB, MiB, 0x20)], [(2 * MiB, MiB, 0x30)]])
    killed = subprocess.run([sys.executable, "-c", PRUNING, str(repository.root),
                             str(tmp_path / "sockets")], env=os.environ | {
                                 crash.ENV: "prune.unlinked"},
                            capture_output=True, text=True, timeout=120, check=False)
    assert killed.returncode == crash.STATUS, killed.stderr
    assert "crash point prune.unlinked" in killed.stderr
    repository.recover()  # as the next start does
    assert verify_all(repository) == (2, [])
    folder = repository.folder("lab1", "c", "vda")
    assert sorted(p.name for p in folder.iterdir()) == [
        "0001.json", "0001.qcow2", "0003.json", "0003.qcow2"]
    first = bytes([0x10]) * MiB
    assert_restores(repository, repository.at("lab1", "c", "vda", "cp0"),
                    first + bytes(SIZE - MiB), tmp_path)
    last = first + bytes([0x20]) * MiB + bytes([0x30]) * MiB + bytes(SIZE - 3 * MiB)
    assert_restores(repository, repository.at("lab1", "c", "vda", "cp2"), last, tmp_path)
    assert [m.sequence for m in anyio.run(repository.prune, "lab1", "c", "vda", 1)] == [1]
    assert verify_all(repository) == (1, [])
    assert_restores(repository, repository.at("lab1", "c", "vda", None), last, tmp_path)


def test_a_prune_and_the_backups_uses_exclude_each_other(tmp_path: Path) -> None:
    """A prune refuses a disk's backups while a backup is being written over them; a
    backup over one that a prune dropped since it chose it is refused; and while a
    prune runs, every other use of that disk's backups is refused (Uses)."""
    repository = Repository(tmp_path / "repo", tmp_path / "sockets", 0)
    manifests = chain(repository, many(3))

    async def run() -> None:
        writer = await repository.begin("lab1", "c", "vda", SIZE, "j", "cp", "t",
                                        manifests[-1])
        try:
            with pytest.raises(RepositoryError, match="in use by a backup being written"):
                await repository.prune("lab1", "c", "vda", 1)
        finally:
            await repository.abort(writer)
        assert [m.sequence for m in await repository.prune("lab1", "c", "vda", 2)] == [1]
        with pytest.raises(RepositoryError, match="pruned since the backup began"):
            await repository.begin("lab1", "c", "vda", SIZE, "j", "cp", "t", manifests[0])
        await repository.close()

    anyio.run(run)
    assert [m.sequence for m in repository.manifests("lab1", "c", "vda")] == [2, 3]
    assert verify_all(repository) == (2, [])
    folder = repository.folder("lab1", "c", "vda")
    uses = Uses()
    with uses.pruning(folder):
        with pytest.raises(RepositoryError, match="a prune of these backups runs"):
            uses.take(folder)
        with pytest.raises(RepositoryError, match="in use"), uses.pruning(folder):
            pass
        uses.take(folder.parent / "vdb")  # another disk's backups are free
    with uses.using(folder), pytest.raises(RepositoryError, match="in use"), \
            uses.pruning(folder):
        pass
    with uses.pruning(folder):
        pass


def test_one_backup_of_a_disk_is_written_at_a_time(tmp_path: Path) -> None:
    """A second copy into the same disk's backups is refused while the first writes (it
    would take the first's number, and remove its partial file); the first is stored
    whole, and the next one after it is taken."""
    repository = Repository(tmp_path / "repo", tmp_path / "sockets", 0)
    data = os.urandom(MiB)

    async def run() -> None:
        first = await repository.begin("lab1", "c", "vda", SIZE, "j1", "cp1", "t", None)
        try:
            with pytest.raises(RepositoryError, match="a backup of this disk is being "
                                                      "written"):
                await repository.begin("lab1", "c", "vda", SIZE, "j2", "cp2", "t", None)
            other = await repository.begin("lab1", "c", "vdb", SIZE, "j2", "cp2", "t", None)
            await repository.abort(other)  # another disk's backups are free
            await anyio.to_thread.run_sync(pwrite, first.url, data, MiB)
            first.regions.append(Region(MiB, MiB, checksum(data)))
        except BaseException:
            await repository.abort(first)
            raise
        await repository.commit(first)
        await repository.close()

    anyio.run(run)
    [manifest] = repository.manifests("lab1", "c", "vda")
    assert_restores(repository, manifest, bytes(MiB) + data + bytes(2 * MiB), tmp_path)
    assert store(repository, data, 0).sequence == 2


def test_recover_ends_an_earlier_runs_verify_server(tmp_path: Path) -> None:
    repository = Repository(tmp_path / "repo", tmp_path / "sockets", 0)
    manifests = chain(repository, many(2))
    folder = repository.folder("lab1", "c", "vda")  # and the sockets' folder, made by begin
    server = verifying.server([folder / m.file for m in manifests],
                              tmp_path / "sockets" / "v-00000000.sock")
    server.start()
    try:
        repository.recover()
        assert server.returncode is not None
        assert list((tmp_path / "sockets").iterdir()) == []
    finally:
        server.stop()


def test_a_chain_restores_at_every_point(tmp_path: Path) -> None:
    """Each point of a chain restores to what was written up to it: data over data,
    zeroes over data, data over zeroes, unaligned writes."""
    steps: list[list[Write]] = [
        [(0, MiB, 0x10), (2 * MiB, MiB, 0x11)],
        [(MiB // 2, 64 << 10, 0x20), (2 * MiB + 100, 5000, None)],
        [(0, 4096, None), (3 * MiB, 300, 0x30), (2 * MiB, 64 << 10, 0x31)],
        [(MiB // 2 + 512, 1024, 0x40), (2 * MiB + 200, 300, None)],
        [(SIZE - 4096, 4096, 0x50)],
    ]
    repository = Repository(tmp_path / "repo", tmp_path / "sockets", 0)
    manifests = chain(repository, steps)
    expected = bytearray(SIZE)
    for manifest, writes in zip(manifests, steps, strict=True):
        for offset, length, byte in writes:
            expected[offset:offset + length] = bytes([byte or 0]) * length
        assert_restores(repository, manifest, bytes(expected), tmp_path)


@pytest.mark.parametrize("files", [1, 2])
def test_a_chain_longer_than_one_segment_restores(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, files: int) -> None:
    """Read in segments of `files` files each (one: every file on its own)."""
    monkeypatch.setattr(verifying, "FILES_PER_SEGMENT", files)
    test_a_chain_restores_at_every_point(tmp_path)


@pytest.mark.parametrize("files", [1, 2, verifying.FILES_PER_SEGMENT])
def test_a_disk_shrunk_and_grown_again_restores_zeroes_where_it_was_cut(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, files: int) -> None:
    """What a disk lost when it shrank does not come back when it grows: a file shows
    its backing file only as far as the backing file goes (qcow2's rule), in one
    segment and across segments alike. Each point restores as `qemu-img convert`
    reads it through its chain, and as the disk was."""
    monkeypatch.setattr(verifying, "FILES_PER_SEGMENT", files)
    steps: list[list[Write]] = [
        [(0, MiB, 0x10), (SIZE - MiB, MiB, 0x11)],
        [(64 << 10, 64 << 10, 0x20)],
        [(SIZE - (64 << 10), 64 << 10, 0x30)],
        [(SIZE // 2, 64 << 10, None), (MiB, 64 << 10, 0x40)],
    ]
    sizes = [SIZE, SIZE // 2, SIZE, SIZE + MiB]
    repository = Repository(tmp_path / "repo", tmp_path / "sockets", 0)
    manifests = chain(repository, steps, sizes=sizes)
    expected = bytearray()
    folder = repository.folder("lab1", "c", "vda")
    for manifest, writes, size in zip(manifests, steps, sizes, strict=True):
        expected = resized(expected, size)
        for offset, length, byte in writes:
            expected[offset:offset + length] = bytes([byte or 0]) * length
        assert_restores(repository, manifest, bytes(expected), tmp_path)
        through = tmp_path / "through.raw"
        subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw",
                        str(folder / manifest.file), str(through)], check=True)
        assert_same(through.read_bytes(), bytes(expected))


def test_allocation_asked_a_window_at_a_time_restores_and_verifies(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Block status asked for in windows far smaller than the disk, ending inside a
    cluster (a disk larger than one window is read so): every point still restores,
    and every backup verifies."""
    monkeypatch.setattr(verifying, "WINDOW", (192 << 10) + 512)
    test_a_chain_restores_at_every_point(tmp_path)
    assert verify_all(Repository(tmp_path / "repo", tmp_path / "sockets", 0)) == (5, [])


def test_a_restore_is_on_disk_with_its_name_before_it_is_done(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A restore reported done survives a power loss: its data synced, then the folder
    that names it (without the second, the file could be gone after a reboot)."""
    repository = Repository(tmp_path / "repo", tmp_path / "sockets", 0)
    data = os.urandom(MiB)
    manifest = store(repository, data, MiB)
    synced: list[tuple[str, Path]] = []

    def recorded(kind: str, sync: Callable[[Path], None]) -> Callable[[Path], None]:
        def record(path: Path) -> None:
            # The file by its descriptor (its name may be a user's to change).
            synced.append((kind, restored if isinstance(path, int) else path))
            sync(path)
        return record

    monkeypatch.setattr(repository_module, "fsync", recorded("file", fsync))
    monkeypatch.setattr(repository_module, "fsync_dir", recorded("folder", fsync_dir))
    restored = tmp_path / "out" / "restored.raw"
    restored.parent.mkdir()
    anyio.run(repository.restore, manifest, restored, "raw")
    assert synced[-2:] == [("file", restored), ("folder", restored.parent)]
    assert_same(restored.read_bytes(), bytes(MiB) + data + bytes(2 * MiB))


def test_the_folders_a_first_backup_makes_are_on_disk_before_it_is_stored(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first backup of a domain, consumer and disk makes their folders, and those of
    its domain files: each is on disk before the backup is stored (its parent synced,
    which holds its name). Only the last of them was: a power cut could lose the first
    backup of a new domain, consumer or disk, the job recorded completed. (A power cut
    cannot be made here: the syncs are recorded.)"""
    synced: list[Path] = []
    real = os.fsync

    def recording(fd: int) -> None:
        synced.append(Path(os.readlink(f"/proc/self/fd/{fd}")))
        real(fd)

    monkeypatch.setattr(os, "fsync", recording)
    repository = Repository(tmp_path / "repo", tmp_path / "sockets", 0)
    repository.root.mkdir()
    anyio.run(repository.store_files, "lab2", "c", "pullbackd.c.j",
              DomainFiles({DEFINITION: b"<domain/>"}))
    files = repository.files_folder("lab2", "c", "pullbackd.c.j")
    made = [files.parent, files.parent.parent, files.parent.parent.parent]  # .domain, c, lab2
    assert [folder for folder in made if folder.parent not in synced] == []
    synced.clear()
    manifest = store(repository, os.urandom(MiB), MiB)  # lab1's vda, consumer c
    assert manifest.file == "0001.qcow2"
    disk = repository.folder("lab1", "c", "vda")
    made = [disk, disk.parent, disk.parent.parent]
    # Each before the backup file is made in it (its commit syncs the file and the folder).
    before = synced[:synced.index(disk)]
    assert [folder for folder in made if folder.parent not in before] == []


def test_backups_are_numbered_on_past_9999(tmp_path: Path) -> None:
    """A chain in use for long (a backup every 15 minutes for 104 days) reaches number
    10000: it is newer than 9999, the next one builds on it, every point restores, and a
    prune drops the oldest."""
    repository = Repository(tmp_path / "repo", tmp_path / "sockets", 0)
    [full] = chain(repository, [[(0, MiB, 0x10)]])
    folder = repository.folder("lab1", "c", "vda")
    # That full backup, as number 9999 of the chain.
    (folder / full.file).rename(folder / names.backup_name(9999))
    names.manifest(folder, full.sequence).rename(names.manifest(folder, 9999))
    old = json.loads(names.manifest(folder, 9999).read_text())
    names.manifest(folder, 9999).write_text(json.dumps(old | {"sequence": 9999}))
    oldest = repository.at("lab1", "c", "vda", None)
    assert oldest.file == "9999.qcow2"
    steps: list[list[Write]] = [[(MiB, 64 << 10, 0x20)], [(2 * MiB, 64 << 10, 0x30)],
                                [(MiB, 64 << 10, None)]]
    before = bytes([0x10]) * MiB + bytes(SIZE - MiB)
    newer = chain(repository, steps, base=oldest, before=before)
    assert [(m.sequence, m.backing) for m in newer] == [
        (10000, "9999.qcow2"), (10001, "10000.qcow2"), (10002, "10001.qcow2")]
    assert [m.sequence for m in repository.manifests("lab1", "c", "vda")] == [
        9999, 10000, 10001, 10002]
    expected = bytearray(before)
    for manifest, writes in zip(newer, steps, strict=True):
        for offset, length, byte in writes:
            expected[offset:offset + length] = bytes([byte or 0]) * length
        assert_restores(repository, manifest, bytes(expected), tmp_path)
    dropped = anyio.run(repository.prune, "lab1", "c", "vda", 2)
    assert [m.sequence for m in dropped] == [9999, 10000]
    assert_restores(repository, newer[-1], bytes(expected), tmp_path)


def test_an_incremental_of_changes_finer_than_a_cluster_restores_exactly(
        tmp_path: Path) -> None:
    """A disk of 4 KiB clusters has a 4 KiB dirty bitmap: the engine reads each cluster of
    the backup file that a change touches whole, so the incremental, written with its
    backing chain shut, still holds every byte of the disk (qemu-img compare)."""
    disk = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096",
                    str(disk), str(SIZE)], check=True)
    subprocess.run(["qemu-img", "bitmap", "--add", "-g", "4096", str(disk), "b"], check=True)
    qemu_io(disk, f"write -P 0x11 0 {SIZE}")
    repository = Repository(tmp_path / "repo", tmp_path / "sockets", 0)

    async def backup(base: Manifest | None) -> Manifest:
        writer = await repository.begin("lab1", "c", "vda", SIZE, "j", "cp", "t", base)
        sock = tmp_path / "disk.sock"
        try:
            with Server(disk, "qcow2", sock, read_only=True, program=[
                    "qemu-nbd", "--read-only", "--format", "qcow2", "--bitmap", "b",
                    "--shared", "4", "--socket", str(sock), str(disk)]) as server:
                await stream.stream(server.url, writer.url, zeroed_destination=base is None,
                                    bitmap="qemu:dirty-bitmap:b" if base else None,
                                    checksums=recorder(writer.regions), cluster=writer.cluster)
        except BaseException:
            await repository.abort(writer)
            raise
        return await repository.commit(writer)

    full = anyio.run(backup, None)
    subprocess.run(["qemu-img", "bitmap", "--clear", str(disk), "b"], check=True)
    for command in ("write -P 0x22 4096 4096", "write -P 0x33 61440 8192",
                    "write -z 131072 4096", f"write -z {MiB} 65536",
                    f"write -P 0x44 {SIZE - 4096} 4096"):
        qemu_io(disk, command)

    async def incremental() -> Manifest:
        try:
            return await backup(full)
        finally:
            await repository.close()

    newest = anyio.run(incremental)
    assert newest.backing == full.file
    assert all(r.offset % (64 << 10) == 0 for r in regions(repository, newest))
    subprocess.run(["qemu-img", "compare", "-q", str(repository.folder("lab1", "c", "vda") /
                                                      newest.file), str(disk)], check=True)


def test_a_write_into_part_of_a_cluster_of_an_incremental_is_no_backup(
        tmp_path: Path) -> None:
    """With its backing chain shut, the writer would complete the cluster with zeroes: the
    commit refuses the file, and the chain is left as it was."""
    repository = Repository(tmp_path / "repo", tmp_path / "sockets", 0)
    full = store(repository, b"\x11" * SIZE, 0)

    async def run() -> None:
        writer = await repository.begin("lab1", "c", "vda", SIZE, "j2", "cp2", "t", full)
        try:
            await anyio.to_thread.run_sync(pwrite, writer.url, b"\x22" * 4096, 4096)
            writer.regions.append(Region(4096, 4096, checksum(b"\x22" * 4096)))
            with pytest.raises(RepositoryError, match="part of a 65536-byte cluster"):
                await repository.commit(writer)
        finally:
            await repository.abort(writer)
            await repository.close()

    anyio.run(run)
    assert repository.manifests("lab1", "c", "vda") == [full]
    folder = repository.folder("lab1", "c", "vda")
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [full.file, names.manifest(folder, full.sequence).name])


@pytest.mark.parametrize("damage", ["truncated", "a key renamed", "not text"])
def test_a_damaged_manifest_is_named_and_stops_nothing_else(
        tmp_path: Path, damage: str) -> None:
    """A manifest cut short (a disk that filled), edited or overwritten: the daemon's
    start (which lists every stored job) goes on without it; what needs it fails naming
    the file and what to do, not with a bare JSON error."""
    repository = Repository(tmp_path / "repo", tmp_path / "sockets", 0)
    first, _ = chain(repository, many(2))
    path = repository.folder("lab1", "c", "vda") / "0002.json"
    text = path.read_text()
    path.write_bytes({"truncated": text[:len(text) // 2].encode(),
                      "a key renamed": text.replace('"job"', '"jbo"').encode(),
                      "not text": b"\xff\xfe" * 100}[damage])
    assert repository.stored_jobs() == {first.job}
    for reading in (lambda: repository.at("lab1", "c", "vda", None),
                    lambda: verify_all(repository)):
        with pytest.raises(RepositoryError, match=r"0002\.json: damaged manifest .* move it"):
            reading()


def test_a_restore_target_swapped_for_a_link_writes_nothing_through_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The folder is a user's: the restore's new file renamed and a link to root's file
    put in its place, as the restore goes on (qemu-img and qemu-nbd opened the name, and
    wrote the backup into root's file). Its folder swapped for a link as it begins: the
    restore refuses."""
    repository = Repository(tmp_path / "repo", tmp_path / "sockets", 0)
    data = os.urandom(MiB)
    manifest = store(repository, data, MiB)
    victim = tmp_path / "root's file"
    victim.write_bytes(b"root's own" * 1000)
    folder = tmp_path / "user's folder"
    folder.mkdir()
    restored = folder / "restored.raw"
    running = repository_module._run

    async def swapping(path: Path, *command: str) -> None:
        if command[:2] == ("qemu-img", "create") and not restored.is_symlink():
            restored.rename(folder / "moved.raw")
            restored.symlink_to(victim)
        await running(path, *command)

    monkeypatch.setattr(repository_module, "_run", swapping)
    anyio.run(repository.restore, manifest, restored, "raw")
    assert victim.read_bytes() == b"root's own" * 1000
    assert_same((folder / "moved.raw").read_bytes(), bytes(MiB) + data + bytes(2 * MiB))

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "swapped").symlink_to(elsewhere)
    with pytest.raises(InvalidParameter, match="its folder moved"):
        anyio.run(repository.restore, manifest, tmp_path / "swapped" / "x.raw", "raw")
    assert list(elsewhere.iterdir()) == []


def test_a_backing_name_damaged_in_a_header_is_found_not_followed(tmp_path: Path) -> None:
    """One bit turns 0003.qcow2 into 0001.qcow2 in the newest file's header: a restore
    read another backup's data, Verify (each file alone) found nothing, and a prune
    would have folded the wrong data in with fresh checksums."""
    repository = Repository(tmp_path / "repo", tmp_path / "sockets", 0)
    manifests = chain(repository, [[(0, MiB, 0x10)], [(0, 64 << 10, 0x20)],
                                   [(64 << 10, 64 << 10, 0x30)], [(3 * MiB, 64 << 10, 0x40)]])
    image = repository.folder("lab1", "c", "vda") / manifests[-1].file
    header = image.read_bytes()[:4096]
    at = header.index(b"0003.qcow2") + 3
    with image.open("r+b") as f:
        f.seek(at)
        f.write(bytes([header[at] ^ 0x02]))  # '3' -> '1'
    count, problems = verify_all(repository)
    assert count == 4 and problems == [
        "0004.qcow2: its header names 0001.qcow2 as its backing file, its manifest "
        "0003.qcow2: the file is damaged; restore a backup before it, or one whose chain "
        "does not hold it"]
    with pytest.raises(RepositoryError, match=r"its header names 0001\.qcow2"):
        anyio.run(repository.restore, manifests[-1], tmp_path / "restored.raw", "raw")
    assert not (tmp_path / "restored.raw").exists()
    with pytest.raises(RepositoryError, match="verify failed, nothing pruned"):
        anyio.run(repository.prune, "lab1", "c", "vda", 1)
    assert len(repository.manifests("lab1", "c", "vda")) == 4


def test_damage_beside_a_small_region_of_a_full_backup_is_found(tmp_path: Path) -> None:
    """A full backup's region may be smaller than a cluster (4 KiB of data on a sparse
    disk); a restore copies the whole cluster, so damage 32 KiB past the region reached
    the restored disk while Verify, which checked the region alone, found nothing."""
    repository = Repository(tmp_path / "repo", tmp_path / "sockets", 0)
    manifest = store(repository, os.urandom(4096), MiB)
    assert [(r.offset, r.length) for r in regions(repository, manifest)] == [(MiB, 4096)]
    assert verify(repository) == []
    image = repository.folder("lab1", "c", "vda") / manifest.file
    qemu_io(image, f"write -P {DAMAGED:#x} {MiB + (32 << 10)} 512")
    assert verify(repository) == [
        f"0001.qcow2: {(64 << 10) - 4096} bytes at {MiB + 4096}, beside what it wrote, "
        "are no longer zeroes"]


def test_a_file_whose_manifest_was_lost_mid_chain_is_kept_and_reported(
        tmp_path: Path) -> None:
    """No crash leaves a file without its manifest that later backups build on: the next
    start deleted it all the same (the chain after it could never be restored again),
    and Verify said nothing."""
    repository = Repository(tmp_path / "repo", tmp_path / "sockets", 0)
    chain(repository, many(3))
    folder = repository.folder("lab1", "c", "vda")
    (folder / "0002.json").unlink()
    repository.recover()
    assert (folder / "0002.qcow2").exists()
    count, problems = verify_all(repository)
    assert count == 2 and problems == [
        "0003.qcow2: its backing file 0002.qcow2 has no manifest: it cannot be restored; "
        "restore a backup before it"]


def test_the_domain_files_of_backups_no_disk_lists_go_at_the_next_start(
        tmp_path: Path) -> None:
    """A prune cut short after it dropped the disks' backups, before their domain files
    (tests/test_crash.py, prune.dropping), left those files for ever: the next prune drops
    only its own. The next start removes the files of every checkpoint no disk's backup is
    listed at, and keeps the others; beside a manifest that cannot be read, it removes none
    (which files that backup needs is unknown), and the daemon starts all the same."""
    repository = Repository(tmp_path / "repo", tmp_path / "sockets", 0)
    manifests = chain(repository, many(3))
    consumer = names.consumer_folder(repository.root, "lab1", "c")
    listed = [names.checkpoint_files(consumer, m.checkpoint) for m in manifests]
    dropped = names.checkpoint_files(consumer, "pullbackd.c.dropped")
    for folder in (*listed, dropped):
        folder.mkdir(parents=True)
        (folder / "domain.xml").write_text("<domain/>")
    second = names.manifest(repository.folder("lab1", "c", "vda"), 2)
    saved = second.read_bytes()
    second.write_text("not a manifest")
    repository.recover()
    assert dropped.is_dir()
    second.write_bytes(saved)
    repository.recover()
    assert not dropped.exists()
    assert all((folder / "domain.xml").is_file() for folder in listed)


def test_a_prune_that_finds_one_disk_damaged_drops_nothing_of_any_disk(
        tmp_path: Path) -> None:
    """Prune verifies before it drops anything; over a domain's disks, it verified and
    pruned them one after the other: vda's older backups were dropped, then vdb's damage
    answered "verify failed, nothing pruned", and the domain files of the backups dropped
    were left behind. Every disk is verified first now: nothing of any disk changes. Once
    the damage is gone, both disks are pruned, and each restores as it was."""
    repository = Repository(tmp_path / "repo", tmp_path / "sockets", 0)
    chain(repository, many(3))
    vda = repository.folder("lab1", "c", "vda")
    vdb = repository.folder("lab1", "c", "vdb")  # pruned after vda
    shutil.copytree(vda, vdb)
    for path in vdb.glob("*.json"):
        path.write_text(json.dumps(json.loads(path.read_text()) | {"disk": "vdb"}))
    damaged = vdb / "0003.qcow2"
    offset, length, _ = many(3)[2][0]
    at = host_offset(damaged, offset + 1000)
    flip(damaged, at)
    before = {p: p.read_bytes() for p in sorted(repository.root.rglob("*")) if p.is_file()}

    async def prune() -> None:
        (tmp_path / "source").mkdir()
        async with running(tmp_path, FakeSource(FakeVirt(), tmp_path / "source")) as rig:
            rebuilder = Rebuilder(repository, rig.virt, tmp_path / "libvirt", "tss",
                                  stream.Tuning(), rig.jobs.did_not_complete)
            backups = api.BackupAPI(api.Parts(rig.jobs, rig.migrations, rig.chains,
                                              repository, rebuilder, stream.Tuning()))
            with pytest.raises(RepositoryError) as refused:
                await backups.Prune("lab1", 1, consumer="c")
            assert refused.value.parameters == {"path": str(vdb), "reason": (
                f"verify failed, nothing pruned: 0003.qcow2: {length} bytes at {offset} "
                "differ from what was written")}
            assert {p: p.read_bytes() for p in sorted(repository.root.rglob("*"))
                    if p.is_file()} == before
            flip(damaged, at)
            assert await backups.Prune("lab1", 1, consumer="c") == {"dropped": ["cp0", "cp1"]}
            await repository.close()

    anyio.run(prune)
    disk = bytearray(SIZE)
    for offset, length, byte in (write for writes in many(3) for write in writes):
        disk[offset:offset + length] = bytes([byte or 0]) * length
    for name in ("vda", "vdb"):
        assert [m.sequence for m in repository.manifests("lab1", "c", name)] == [3]
        assert_restores(repository, repository.at("lab1", "c", name, None), bytes(disk),
                        tmp_path)


def test_a_backup_is_looked_up_by_its_manifests_first_line_and_damage_after_it_is_verifys(
        tmp_path: Path) -> None:
    """Starts, restores and prunes look a backup up by its manifest's first line (its
    fields): a full backup of a 1 TiB disk holds some two million regions, which every
    look-up read whole (seconds, and hundreds of MiB, per Start). Damage in the regions
    after it is Verify's to find, as that backup's problem, the others still verified."""
    repository = Repository(tmp_path / "repo", tmp_path / "sockets", 0)
    manifests = chain(repository, many(3))
    folder = repository.folder("lab1", "c", "vda")
    second = names.manifest(folder, 2)
    first_line = second.read_text().partition("\n")[0] + "\n"
    assert json.loads(second.read_text())["regions"]  # the regions follow it
    second.write_text(first_line + "[0, 65536, \"cut short")
    assert repository.at("lab1", "c", "vda", manifests[1].checkpoint) == manifests[1]
    assert [m.sequence for m in repository.manifests("lab1", "c", "vda")] == [1, 2, 3]
    count, problems = verify_all(repository)
    assert count == 3
    assert len(problems) == 1 and problems[0].startswith("0002.qcow2: damaged manifest")


#: d1's definition as the serving source gives it: the fake source's two disks.
TWO_DISKS = """<domain><name>d1</name><devices>
<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
<source file='/d/vda.qcow2'/><target dev='vda'/></disk>
<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
<source file='/d/vdb.qcow2'/><target dev='vdb'/></disk>
</devices></domain>"""


@dataclass
class ServingSource(FakeSource):
    """The fake source, serving each backup's disks for pullbackd's own copy as QEMU does:
    what they held (`held`) when the backup began, as exports on the job's socket; its
    domains' definitions name the two disks."""

    held: dict[str, bytes] = field(default_factory=dict)
    servers: dict[str, qemu_nbd.Server] = field(default_factory=dict)

    async def files(self, job: Job, plan: Plan) -> DomainFiles:
        files = await super().files(job, plan)
        return DomainFiles({**files.files, DEFINITION: TWO_DISKS.encode()})

    async def begin(self, job: Job, plan: Plan, bases: dict[str, Base]) -> None:
        await super().begin(job, plan, bases)
        folder = self.dir / job.id
        await anyio.Path(folder).mkdir()
        images = []
        for exported in self.backups[job.domain].begun.disks:
            raw = folder / f"{exported.name}.raw"
            await anyio.Path(raw).write_bytes(self.held[exported.name])
            images.append(folder / str(exported.export))  # each served as its export
            await anyio.run_process(["qemu-img", "convert", "-f", "raw", "-O", "qcow2",
                                     str(raw), str(images[-1])])
        server = self.servers[job.id] = verifying.server(images, self.socket(job))
        await server.astart()

    async def end(self, job: Job) -> bool:
        if (server := self.servers.pop(job.id, None)) is not None:
            await server.astop()
        return await super().end(job)


@dataclass
class Held:
    """Backups of d1 into the repository, each held before vdb's commit (vda's done),
    and restores of them through the API into `folder`."""

    rig: Rig
    source: ServingSource
    backups: api.BackupAPI
    repository: Repository
    folder: Path
    #: A disk's next commit waits on its stall (then fails, if it says so: the writer's
    #: failure, as the disk filled).
    holding: dict[str, tuple[Stall, bool]] = field(default_factory=dict)

    async def commit(self, repository: Repository, writer: repository_module.Writer) -> bool:
        """Whether the commit of `writer` may go on, once released."""
        if (held := self.holding.pop(writer.manifest.disk, None)) is None:
            return True
        stall, fails = held
        stall.reached.set()
        await stall.released.wait()
        return not fails

    async def backup(self, fails: bool = False) -> tuple[Job, dict[str, bytes], Stall]:
        """A backup of d1 with new data, held once vda's file is committed."""
        self.source.held = {disk: os.urandom(size) for disk, size in self.source.sizes.items()}
        stall = Stall()
        self.holding["vdb"] = (stall, fails)
        job = await self.rig.jobs.start(StartRequest("d1", destination=LOCAL))
        with anyio.fail_after(30):
            await stall.reached.wait()
        assert self.newest("vda") == job.id and self.newest("vdb") != job.id
        return job, self.source.held, stall

    def newest(self, disk: str) -> str | None:
        """The job of the newest manifest of d1's `disk`."""
        manifests = self.repository.manifests("d1", "default", disk)
        return manifests[-1].job if manifests else None

    async def assert_domain(self, name: str, job: Job, held: dict[str, bytes]) -> None:
        """RestoreDomain without `at` restores `job`'s backup, every disk as it `held`."""
        reply = await self.backups.RestoreDomain("d1", name, str(self.folder), format="raw")
        assert reply["name"] in self.rig.virt.defined
        assert (reply["checkpoint"], reply["dropped"]) == (job.checkpoint, [])
        assert sorted(d["name"] for d in reply["disks"]) == sorted(held) == ["vda", "vdb"]
        for disk in reply["disks"]:
            assert_same(await anyio.Path(disk["file"]).read_bytes(), held[disk["name"]])

    async def vda(self, name: str, at: str | None = None) -> tuple[str, bytes]:
        """Restore of vda: its checkpoint, and the disk restored."""
        reply = await self.backups.Restore("d1", "vda", str(self.folder / name), at=at,
                                           format="raw")
        return reply["checkpoint"], await anyio.Path(reply["file"]).read_bytes()


@pytest.mark.asyncio
async def test_a_restore_without_a_checkpoint_takes_the_newest_complete_backup(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A backup into the repository is committed disk after disk, and is a backup once its
    job completed. A restore without a checkpoint took the newest manifest's: while a
    backup of d1 was being committed (vda's stored, vdb's not yet), or after it failed
    between the two until its files were removed, RestoreDomain defined d1 as it was at
    that backup with vdb "dropped" (as if the backup did not hold it), and Restore of vda
    gave that backup's. Both take the newest backup whose job completed, every disk as it
    was then; the checkpoint of a job that did not complete holds none (NoSuchCheckpoint),
    and with no complete backup at all, NoBackup says so."""
    source = ServingSource(FakeVirt(), tmp_path / "source")
    source.dir.mkdir()
    (tmp_path / "restore").mkdir()
    repository = Repository(tmp_path / "repo", tmp_path / "sockets", 0)
    used = {repository}
    commit = Repository.commit

    async def held_commit(self: Repository, writer: repository_module.Writer) -> Manifest:
        used.add(self)  # the jobs' own, to close
        if not await d1.commit(self, writer):
            await self.abort(writer)
            raise RepositoryError(str(writer.partial), "No space left on device")
        return await commit(self, writer)

    monkeypatch.setattr(Repository, "commit", held_commit)
    async with running(tmp_path, source) as rig:
        d1 = Held(rig, source, api.BackupAPI(api.Parts(
            rig.jobs, rig.migrations, rig.chains, repository,
            Rebuilder(repository, rig.virt, tmp_path / "libvirt", "tss", stream.Tuning(),
                      rig.jobs.did_not_complete),
            stream.Tuning(), restore_dirs=(tmp_path / "restore",))), repository,
            tmp_path / "restore")

        # The first backup, vda committed: no backup is complete yet.
        first, first_held, stall = await d1.backup()
        with pytest.raises(NoBackup) as none:
            await d1.assert_domain("r0", first, first_held)
        assert none.value.parameters == {"domain": "d1", "consumer": "default", "disk": None}
        with pytest.raises(NoBackup) as none:
            await d1.vda("vda0.raw")
        assert none.value.parameters == {"domain": "d1", "consumer": "default", "disk": "vda"}
        with pytest.raises(NoSuchCheckpoint):
            await d1.vda("vda0.raw", at=first.checkpoint)
        assert not list(d1.folder.iterdir()) and not rig.virt.defined
        stall.release()
        assert (await job_ended(rig.jobs, first.id)).state == JobState.COMPLETED

        # The second, vda committed: the first is the newest complete backup.
        second, second_held, stall = await d1.backup()
        await d1.assert_domain("r1", first, first_held)
        checkpoint, vda = await d1.vda("vda1.raw")
        assert checkpoint == first.checkpoint
        assert_same(vda, first_held["vda"])
        stall.release()
        assert (await job_ended(rig.jobs, second.id)).state == JobState.COMPLETED
        await d1.assert_domain("r2", second, second_held)

        # The third fails at vdb's commit; until its end removed vda's, it is no backup.
        end = source.stall("end")
        third, _, stall = await d1.backup(fails=True)
        stall.release()
        with anyio.fail_after(30):
            await end.reached.wait()
        assert d1.newest("vda") == third.id
        await d1.assert_domain("r3", second, second_held)
        end.release()
        assert (await job_ended(rig.jobs, third.id)).state == JobState.FAILED
        assert d1.newest("vda") == second.id
        for one in used:
            await one.close()


def test_the_newest_backup_restored_is_one_every_disk_of_it_reached(tmp_path: Path) -> None:
    """A backup's manifests name every disk it stores: one that a crash cut short between
    two disks' commits, whose job the daemon no longer knows (its database lost, or moved
    aside as damaged: no job is known unfinished), is not the newest backup a restore
    takes, which would define the domain with the disk not reached "dropped"; named,
    it restores what it holds."""
    repository = Repository(tmp_path / "repo", tmp_path / "sockets", 0)
    disks = ("vda", "vdb")
    data = {("cp1", d): os.urandom(MiB) for d in disks} | {("cp2", "vda"): os.urandom(MiB)}

    async def run() -> None:
        try:
            for (checkpoint, disk), written in data.items():  # cp2's vdb never committed
                writer = await repository.begin("lab1", "c", disk, SIZE, f"j-{checkpoint}",
                                                checkpoint, checkpoint, None, disks)
                await anyio.to_thread.run_sync(pwrite, writer.url, written, 0)
                writer.regions.append(Region(0, MiB, checksum(written)))
                await repository.commit(writer)
        finally:
            await repository.close()

    anyio.run(run)
    none_unfinished: Callable[[str], bool] = lambda job: False  # noqa: E731
    newest = restorable(repository, "lab1", "c", None, none_unfinished)
    assert {d: m.checkpoint for d, m in newest.items()} == {"vda": "cp1", "vdb": "cp1"}
    assert restorable(repository, "lab1", "c", None, none_unfinished,
                                 "vda")["vda"].checkpoint == "cp1"
    named = restorable(repository, "lab1", "c", "cp2", none_unfinished)
    assert list(named) == ["vda"]
    assert_restores(repository, named["vda"], data[("cp2", "vda")] + bytes(SIZE - MiB),
                    tmp_path)
    assert_restores(repository, newest["vdb"], data[("cp1", "vdb")] + bytes(SIZE - MiB),
                    tmp_path)
