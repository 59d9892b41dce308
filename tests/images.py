"""Disk images in tests: what a lab disk must hold, and reading backups back with libnbd.

Every data-path test ends by comparing what a backup rebuilds, byte for byte,
with what was written through the guest.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import nbd
import pytest

from .conftest import DISK_SIZE, Lab

MiB = 1 << 20
CHUNK = 4 * MiB
#: QEMU's dirty bitmaps on a qcow2 with 64 KiB clusters count in 64 KiB blocks.
GRANULARITY = 64 << 10

Extent = tuple[int, int]  # offset, length


class Disk:
    """What a lab disk must hold, written through the guest and mirrored here.

    Starts by zeroing the whole disk, so it does not matter what earlier tests wrote.
    """

    def __init__(self, lab: Lab, domain: str, name: str) -> None:
        self.lab, self.domain, self.name = lab, domain, name
        self.expected = bytearray(DISK_SIZE)
        self.written: list[Extent] = []
        self.zero(0, DISK_SIZE)
        self.written.clear()

    def write(self, offset: int, length: int, byte: int) -> None:
        self.lab.write(self.domain, self.name, offset, length, byte)
        self.expected[offset:offset + length] = bytes([byte]) * length
        self.written.append((offset, length))

    def zero(self, offset: int, length: int) -> None:
        self.lab.zero(self.domain, self.name, offset, length)
        self.expected[offset:offset + length] = bytes(length)
        self.written.append((offset, length))

    def dirty_since_mark(self) -> list[Extent]:
        """The writes since the last `mark`, as a dirty bitmap of GRANULARITY would show them."""
        return merge([(o // GRANULARITY * GRANULARITY,
                       -(-(o + n) // GRANULARITY) * GRANULARITY - o // GRANULARITY * GRANULARITY)
                      for o, n in self.written])

    def mark(self) -> None:
        self.written.clear()


def merge(extents: list[Extent]) -> list[Extent]:
    merged: list[Extent] = []
    for offset, length in sorted(extents):
        if merged and offset <= merged[-1][0] + merged[-1][1]:
            last_offset, last_length = merged[-1]
            merged[-1] = (last_offset, max(last_length, offset + length - last_offset))
        else:
            merged.append((offset, length))
    return merged


def connect(url: str, *contexts: str) -> nbd.NBD:
    h = nbd.NBD()
    for context in contexts:
        h.add_meta_context(context)
    h.connect_uri(url)
    assert h.is_read_only()
    for context in contexts:
        assert h.can_meta_context(context), context
    return h


def read_export(url: str) -> bytes:
    h = connect(url, "base:allocation")
    try:
        size = h.get_size()
        return b"".join(h.pread(min(CHUNK, size - off), off) for off in range(0, size, CHUNK))
    finally:
        h.shutdown()


def dirty_extents(h: nbd.NBD, context: str) -> list[Extent]:
    """The extents a dirty-bitmap meta context marks dirty, a window at a time."""
    size = h.get_size()
    dirty: list[Extent] = []
    seen: list[int] = []

    def extent(ctx: str, start: int, entries: list[int], err: object) -> int:
        if ctx == context:
            seen.extend(entries)
        return 0

    offset = 0
    while offset < size:
        seen.clear()
        h.block_status(min(CHUNK * 16, size - offset), offset, extent)
        assert seen, "the server answered nothing for the dirty bitmap"
        for length, flags in zip(seen[::2], seen[1::2], strict=True):
            if flags & 1:
                dirty.append((offset, length))
            offset += length
    return merge(dirty)


def copy_full(url: str, path: Path) -> None:
    subprocess.run(["nbdcopy", url, str(path)], check=True, timeout=300)


def apply_incremental(url: str, context: str, path: Path) -> list[Extent]:
    """Copy the dirty extents of an incremental export onto an earlier image; return them."""
    h = connect(url, context)
    try:
        extents = dirty_extents(h, context)
        with path.open("r+b") as image:
            for offset, length in extents:
                for o in range(offset, offset + length, CHUNK):
                    image.seek(o)
                    image.write(h.pread(min(CHUNK, offset + length - o), o))
        return extents
    finally:
        h.shutdown()


def assert_same(actual: bytes, expected: bytes | bytearray) -> None:
    assert len(actual) == len(expected)
    if actual != expected:
        first = next(i for i, (a, b) in enumerate(zip(actual, expected, strict=True)) if a != b)
        pytest.fail(f"first difference at byte {first}: "
                    f"{actual[first]:#x} != expected {expected[first]:#x}")


def assert_image(path: Path, disk: Disk, tmp_path: Path) -> None:
    """The rebuilt image equals the disk model: compared by Python and by qemu-img."""
    assert_same(path.read_bytes(), disk.expected)
    expected = tmp_path / f"{disk.domain}-{disk.name}.expected.raw"
    expected.write_bytes(disk.expected)
    subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", str(expected),
                    str(path)], check=True, timeout=300)
