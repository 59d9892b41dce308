"""names.py: the sockets under `[exports] dir` fit in sun_path, and config loading refuses a
folder where the longest would not (no lab needed; real sockets, a real qemu-nbd)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import anyio
import nbd
import pytest

from pullbackd import config, names
from pullbackd.errors import InvalidParameter
from pullbackd.manifest import Region, checksum
from pullbackd.names import MAX_SOCKET_PATH, Layout, Served
from pullbackd.repository import Repository

MiB = 1 << 20


def exports_dir(parent: Path, over: int) -> Path:
    """A folder in `parent` whose longest socket is `over` bytes longer than fits
    (0: it just fits)."""
    one = Layout(parent / "x", parent / "scratch")
    room = MAX_SOCKET_PATH - len(os.fsencode(one.longest_socket()))
    if room + over < 0:
        pytest.skip(f"{parent} is too long to hold a folder that just fits")
    return parent / ("x" * (1 + room + over))


def load(tmp_path: Path, exports: Path) -> config.Config:
    path = tmp_path / "pullbackd.toml"
    path.write_text(f"[exports]\ndir = '{exports}'\n")
    return config.load(path)


def test_the_longest_socket_is_a_restore_of_the_repository() -> None:
    layout = Layout(Path("/e"), Path("/s"))
    token = "0" * len(names.socket_token())
    assert layout.longest_socket() == layout.repository_socket(Served.RESTORE_SOURCE, token)
    assert str(layout.longest_socket()) == "/e/.repository/r-00000000.src.sock"
    assert {str(p) for p in layout.sockets()} == {
        "/e/000000000000.sock", "/e/.qemu/000000000000.sock",
        "/e/.repository/w-00000000.sock", "/e/.repository/r-00000000.src.sock",
        "/e/.repository/r-00000000.dst.sock", "/e/.repository/v-00000000.sock",
        "/e/.repository/w-00000000.qmp.sock"}
    assert len(names.new_job_id()) == 12 and names.JOB_ID.fullmatch(names.new_job_id())


@pytest.mark.parametrize("length", [76, 77, 78, 79])
def test_the_folders_that_broke_every_restore_are_refused(tmp_path: Path, length: int) -> None:
    """Accepted before, when the check knew only the backup's socket name: then every
    Restore failed with "UNIX socket path ... is too long"."""
    exports = Path("/" + "e" * (length - 1))
    with pytest.raises(config.ConfigError, match=f"exports.dir is too long by {length - 75} "):
        load(tmp_path, exports)


def test_a_folder_just_too_long_is_refused(tmp_path: Path) -> None:
    with pytest.raises(config.ConfigError, match=r"exports.dir is too long by 1 byte: .*"
                                                 r"the longest of them .*r-00000000\.src\.sock"):
        load(tmp_path, exports_dir(tmp_path, 1))


def test_a_folder_that_just_fits_serves_every_socket(tmp_path: Path) -> None:
    """Config accepts it; a socket binds at the longest path, and the repository writes
    and restores a backup through servers bound there."""
    exports = exports_dir(tmp_path, 0)
    cfg = load(tmp_path, exports)
    layout = Layout(cfg.exports.dir, cfg.scratch.dir)
    longest = layout.longest_socket()
    assert len(os.fsencode(longest)) == MAX_SOCKET_PATH
    longest.parent.mkdir(parents=True)
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(longest))
        s.listen()
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(str(longest))
    longest.unlink()

    repository = Repository(tmp_path / "repo", layout.repository_sockets, 0)
    data = os.urandom(MiB)

    async def store() -> None:
        writer = await repository.begin("lab1", "c", "vda", 4 * MiB, "j", "cp", "t", None)
        try:
            await anyio.to_thread.run_sync(pwrite, writer.url, data)
        except BaseException:
            await repository.abort(writer)
            raise
        writer.regions.append(Region(MiB, MiB, checksum(data)))
        await repository.commit(writer)
        await repository.close()

    anyio.run(store)
    [manifest] = repository.manifests("lab1", "c", "vda")
    restored = tmp_path / "restored.raw"
    anyio.run(repository.restore, manifest, restored, "raw")
    assert restored.read_bytes() == bytes(MiB) + data + bytes(2 * MiB)
    assert anyio.run(repository.verify, manifest) == []
    assert list(layout.repository_sockets.iterdir()) == []


def pwrite(url: str, data: bytes) -> None:
    h = nbd.NBD()
    h.connect_uri(url)
    try:
        h.pwrite(data, MiB)
    finally:
        h.shutdown()


def test_repository_names() -> None:
    folder = Path("/r/dom/c/vda")
    assert names.disk_folder(Path("/r"), "dom", "c", "vda") == folder
    assert names.backup_name(7) == "0007.qcow2"
    assert names.manifest(folder, 7) == folder / "0007.json"
    assert names.manifest_of(folder / "0007.qcow2") == folder / "0007.json"
    assert names.partial(folder, 7) == folder / "0007.qcow2.partial"
    assert names.flat_partial(folder, 7) == folder / "0007.qcow2.flat.partial"
    assert names.temporary(folder / "0007.json") == folder / "0007.tmp"
    for leftover in (names.partial(folder, 7), names.flat_partial(folder, 7),
                     names.temporary(names.manifest(folder, 7))):
        assert any(leftover.match(pattern) for pattern in names.LEFTOVERS)
    for bad in ("", ".", "..", ".hidden", "a/b", "a\0b", "x" * 256):
        with pytest.raises(InvalidParameter):
            names.disk_folder(Path("/r"), "dom", bad, "vda")
