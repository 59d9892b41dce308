"""Empty qcow2 images made from qemu-img's (qcow2.py), read back by qemu-img itself."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from pullbackd import qcow2

MiB = 1 << 20


def info(image: Path) -> dict[str, object]:
    done = subprocess.run(["qemu-img", "info", "--output=json", "-U", str(image)],
                          capture_output=True, text=True, check=True)
    result: dict[str, object] = json.loads(done.stdout)
    return result


@pytest.mark.parametrize("backing", [None, "0001.qcow2", "0002.qcow2", "10000.qcow2", "b"])
def test_an_empty_image_is_what_qemu_img_reads(tmp_path: Path, backing: str | None) -> None:
    if backing is not None:  # qemu-img check opens it
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(tmp_path / backing),
                        str(3 * MiB + 512)], check=True)
    image = tmp_path / "new.qcow2"
    image.write_bytes(qcow2.empty(3 * MiB + 512, backing))
    subprocess.run(["qemu-img", "check", "-q", str(image)], check=True)
    read = info(image)
    assert read["virtual-size"] == 3 * MiB + 512
    assert read["cluster-size"] == qcow2.CLUSTER
    assert read["format-specific"] == {"type": "qcow2", "data": {
        "compat": "1.1", "compression-type": "zlib", "lazy-refcounts": False,
        "refcount-bits": 16, "corrupt": False, "extended-l2": False}}
    assert read.get("backing-filename") == backing
    assert read.get("backing-filename-format") == (None if backing is None else "qcow2")


def test_images_of_one_kind_differ_in_their_backing_file_alone(tmp_path: Path) -> None:
    first, second = qcow2.empty(64 * MiB, "0001.qcow2"), qcow2.empty(64 * MiB, "0002.qcow2")
    assert len(first) == len(second)
    assert [i for i, (a, b) in enumerate(zip(first, second, strict=True)) if a != b] == \
        [first.index(b"0001.qcow2") + 3]


def test_data_written_over_an_empty_image_reads_back_over_its_backing(tmp_path: Path) -> None:
    base = tmp_path / "0001.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), str(4 * MiB)],
                   check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 4M", str(base)],
                   check=True, capture_output=True)
    top = tmp_path / "0002.qcow2"
    top.write_bytes(qcow2.empty(4 * MiB, base.name))
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P 0x22 {MiB} {MiB}", str(top)],
                   check=True, capture_output=True)
    expected = tmp_path / "expected.raw"
    expected.write_bytes(b"\x11" * MiB + b"\x22" * MiB + b"\x11" * 2 * MiB)
    subprocess.run(["qemu-img", "compare", "-q", "-f", "qcow2", "-F", "raw", str(top),
                    str(expected)], check=True)


@pytest.mark.parametrize("backing", ["", "a\0b"])
def test_a_name_that_is_no_file_name_is_refused(backing: str) -> None:
    with pytest.raises(qcow2.ImageError):
        qcow2.empty(MiB, backing)


@pytest.mark.parametrize("size", [0, -512, MiB + 1, MiB + 511])
def test_a_size_qemu_img_would_round_is_refused(size: int) -> None:
    with pytest.raises(qcow2.ImageError, match="512-byte sectors"):
        qcow2.empty(size)


@pytest.mark.parametrize("backing", [None, "0001.qcow2", "10000.qcow2", "ünï.qcow2"])
def test_the_backing_file_is_read_from_the_header(tmp_path: Path, backing: str | None) -> None:
    image = tmp_path / "image.qcow2"
    image.write_bytes(qcow2.empty(1 << 20, backing))
    assert qcow2.backing_file(image) == backing
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", "-U", str(image)],
                                     check=True, capture_output=True, text=True).stdout)
    assert info.get("backing-filename") == backing


def test_a_file_that_is_no_qcow2_image_has_no_backing_file_to_read(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    raw.write_bytes(bytes(4096))
    with pytest.raises(qcow2.ImageError):
        qcow2.backing_file(raw)
    link = tmp_path / "link"
    link.symlink_to(raw)
    with pytest.raises(OSError):
        qcow2.backing_file(link)
