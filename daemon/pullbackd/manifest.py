"""A backup's manifest: what the repository knows of one backup file (its job,
checkpoint, time, backing file, and a checksum of each region written), kept
beside the file as JSON (`<NNNN>.json`, named by names.py). A file without its
manifest is not a backup (repository.py); Verify reads a file back against it
(verifying.py).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
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
    regions: tuple[Region, ...] = field(default=())
    #: The kind of the regions' checksums.
    checksums: str = CHECKSUM

    @property
    def file(self) -> str:
        return names.backup_name(self.sequence)

    @property
    def bytes(self) -> int:
        return sum(r.length for r in self.regions)

    def to_json(self) -> str:
        return json.dumps(asdict(self) | {
            "bytes": self.bytes,
            "regions": [[r.offset, r.length, r.checksum] for r in self.regions],
        }, indent=1)

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        data: dict[str, Any] = json.loads(text)
        data.pop("bytes", None)  # derived from the regions
        data.setdefault("checksums", "sha256")  # written before manifests named theirs
        return cls(**data | {"regions": tuple(Region(*r) for r in data["regions"])})

