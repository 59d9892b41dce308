"""A backup's manifest: what the repository knows of one backup file (its job,
checkpoint, time, backing file, and a checksum of each region written), kept
beside the file as JSON (`<NNNN>.json`, named by names.py): its fields on the first
line, its regions after them (`to_text`), so that a look-up reads the first line alone.
A file without its manifest is not a backup (repository.py); Verify reads a file back
against it (verifying.py).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import xxhash

from . import names, stream

#: How the regions of a new backup are checksummed. Verify looks for damage, not
#: for an adversary (whoever could change a backup file could change its manifest
#: too), and XXH3's 128-bit hash lets damage through once in 2**128 tries; sha256's
#: strength is against forged collisions, which buy nobody anything here. XXH3 hashes
#: 40 GiB/s here, sha256 1.7 (with SHA-NI): sha256 made a streamed full backup cost
#: the machine a third more CPU.
CHECKSUM = "xxh3-128"
CHECKSUMS: dict[str, Callable[[bytes | bytearray | memoryview], str]] = {
    "xxh3-128": xxhash.xxh3_128_hexdigest,
    "sha256": lambda data: hashlib.sha256(data).hexdigest(),  # manifests before xxh3-128
}


def checksum(data: bytes | bytearray | memoryview, kind: str = CHECKSUM) -> str:
    return CHECKSUMS[kind](data)


@dataclass(frozen=True)
class Region:
    offset: int
    length: int
    #: The checksum of the data written (of the manifest's kind), or None for a zero write.
    checksum: str | None


def recorder(regions: list[Region]) -> stream.Checksums:
    """Keeps a checksum of each region a copy writes in `regions`, for the manifest
    (the copy's threads call it)."""
    def record(piece: stream.Piece, value: str | None) -> None:
        regions.append(Region(piece.offset, piece.length, value))
    return stream.Checksums(checksum, record)


@dataclass(frozen=True)
class Manifest:
    """A backup's own fields: all but its regions, which only what reads its data back
    needs (`from_text`); every look-up of a backup reads these alone (`from_first_line`)."""

    sequence: int
    domain: str
    consumer: str
    disk: str
    job: str
    checkpoint: str
    created: str
    mode: str
    size: int
    #: The file this one is an overlay on, in the same folder; None for a full backup.
    backing: str | None
    #: The bytes its regions hold.
    bytes: int = 0
    #: The kind of the regions' checksums.
    checksums: str = CHECKSUM
    #: Every disk its backup stores (this one among them), each in its own folder:
    #: a backup is whole once each has its manifest (empty: written before they were
    #: named).
    disks: tuple[str, ...] = ()

    @property
    def file(self) -> str:
        return names.backup_name(self.sequence)


#: What ends a manifest's first line: its regions follow, one per line.
_REGIONS = ', "regions": [\n'


def to_text(manifest: Manifest, regions: Sequence[Region]) -> str:
    """A manifest as JSON: its fields on the first line (a raw newline is in no JSON
    string), then its regions, one per line, so that `from_first_line` reads a backup's fields
    without its regions (a full backup of a 1 TiB disk has some two million)."""
    return (json.dumps(asdict(manifest))[:-1] + _REGIONS
            + ",\n".join(json.dumps([r.offset, r.length, r.checksum]) for r in regions)
            + "\n]}\n")


def from_first_line(first_line: str) -> Manifest:
    """A manifest's fields from its first line (`to_text`); ValueError if the line is not
    one (a manifest written before this layout: read it whole with `from_text`)."""
    if not first_line.endswith(_REGIONS):
        raise ValueError("not a manifest's first line")
    return _manifest(json.loads(first_line[:-1] + "]}"))


def from_text(text: str) -> tuple[Manifest, tuple[Region, ...]]:
    """A manifest and its regions, in any layout pullbackd wrote."""
    data: dict[str, Any] = json.loads(text)
    regions = tuple(Region(*r) for r in data["regions"])
    data.setdefault("bytes", sum(r.length for r in regions))  # written before it was kept
    return _manifest(data), regions


def _manifest(data: dict[str, Any]) -> Manifest:
    data.pop("regions")
    data.setdefault("checksums", "sha256")  # written before manifests named theirs
    data["disks"] = tuple(data.get("disks", ()))
    return Manifest(**data)
