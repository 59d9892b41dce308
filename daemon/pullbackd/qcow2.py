"""Empty qcow2 images, as `qemu-img create` makes them: a pull backup's scratch files
(scratch.py) and the repository's backup files (repository.py) start as one.

`qemu-img create` runs once per kind of image (its size, and the length of its backing
file's name) and its bytes are kept (a few clusters of header and tables: 192 KiB for
a disk of a TiB). An image over a backing file is made with a name of the same length,
unique, in place of the backing file's: each image of that kind then differs from it
only in those bytes, which qcow2 keeps verbatim where its header points (no checksum
covers them). A name too short to be told apart from the rest of the bytes gets an image
of its own. Every image is version 3 (`compat=1.1`, whose zeroed clusters are marked
zero: writers.py needs it) in clusters of `CLUSTER` bytes.

Making a backup file this way, rather than with a `blockdev-create` job of the
repository's writer, saved that writer 6 of its 9 ms of CPU per file (the job, its
events, and the file node it writes through).
"""

from __future__ import annotations

import functools
import os
import secrets
import string
import struct
import subprocess
import tempfile
from pathlib import Path

#: Bytes per cluster (qcow2's default, said aloud: the repository's copies write whole
#: clusters of it).
CLUSTER = 64 * 1024


class ImageError(Exception):
    """qemu-img could not make the image (its message)."""


def empty(size: int, backing: str | None = None) -> bytes:
    """An empty qcow2 image of `size` bytes, over the qcow2 image `backing` (a file name,
    as the image names it) if given. Raises ImageError. Blocks."""
    if size <= 0 or size % 512:
        # qemu-img would round it up: an image larger than its disk.
        raise ImageError(f"{size} bytes is not a whole number of 512-byte sectors")
    if backing is None:
        return _made(size, None)
    if not backing or "\0" in backing:
        raise ImageError(f"not a backing file name: {backing!r}")
    name = backing.encode()
    placeholder = _placeholder(len(name))
    template = _made(size, placeholder)
    if template.count(placeholder.encode()) != 1:
        # Too short a name to be told apart from the rest: made for it alone.
        return _made(size, backing)
    at = template.index(placeholder.encode())
    return template[:at] + name + template[at + len(name):]


#: A qcow2 header's start: magic, version, where the backing file's name is and its length.
_HEADER = struct.Struct(">4sIQI")
_MAGIC = b"QFI\xfb"


def backing_file(image: Path) -> str | None:
    """The name of the backing file a qcow2 image reads through, as its header names it
    (None for a standalone image); never through a symlink. Raises ImageError if the
    file is no qcow2 image, OSError if it cannot be read. Blocks."""
    fd = os.open(image, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        magic, _version, offset, length = _HEADER.unpack(os.pread(fd, _HEADER.size, 0)
                                                         .ljust(_HEADER.size, b"\0"))
        if magic != _MAGIC:
            raise ImageError(f"{image} is no qcow2 image")
        if not offset:
            return None
        name = os.pread(fd, length, offset)
    finally:
        os.close(fd)
    if len(name) != length:
        raise ImageError(f"{image} is cut short in its backing file's name")
    return name.decode(errors="surrogateescape")


@functools.lru_cache(maxsize=8)
def _placeholder(length: int) -> str:
    """A name of `length` characters that no image's bytes hold by chance."""
    return "".join(secrets.choice(string.ascii_lowercase) for _ in range(length))


@functools.lru_cache(maxsize=64)
def _made(size: int, backing: str | None) -> bytes:
    with tempfile.TemporaryDirectory(prefix="pullbackd-") as folder:
        image = Path(folder) / "empty.qcow2"
        command = ["qemu-img", "create", "-q", "-f", "qcow2",
                   "-o", f"cluster_size={CLUSTER},compat=1.1"]
        if backing is not None:
            # -u: the backing file is not there to open; the size is given.
            command += ["-u", "-b", backing, "-F", "qcow2"]
        done = subprocess.run([*command, str(image), str(size)], capture_output=True,
                              text=True, check=False)
        if done.returncode != 0:
            raise ImageError(f"qemu-img: {done.stderr.strip()}")
        return image.read_bytes()
