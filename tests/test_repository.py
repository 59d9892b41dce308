"""The embedded repository's manifests, verify and write-behind, on real files (no lab
needed)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from pathlib import Path

import anyio
import xxhash

from pullbackd.repository import Manifest, Region, Repository, WriteBehind
from pullbackd.stream import Progress

from .images import MiB

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
                       (Region(MiB, MiB, xxhash.xxh3_128_hexdigest(data)),
                        Region(3 * MiB, MiB, None)))
    text = json.loads(written.to_json())
    assert text["checksums"] == "xxh3-128"
    assert Manifest.from_json(written.to_json()) == written
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
