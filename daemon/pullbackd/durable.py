"""Files made durable, and new files made without following a link (blocking calls).

Every file pullbackd creates in a folder someone else could write into, or whose
content must survive a crash, is made here: created exclusively (`O_EXCL`), never
through a symlink left in its place (`O_NOFOLLOW`), and with `sync`, on disk
before the call returns; its folder's entry is on disk after `fsync_dir`.
"""

from __future__ import annotations

import os
from pathlib import Path


def write_new(path: Path, data: bytes, mode: int = 0o600, *, sync: bool = True,
              group: int | None = None) -> None:
    """A new file holding `data`; FileExistsError if anything is at `path`. With `group`,
    the file is that group's, and `mode` is set whatever the umask."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 mode)
    with open(fd, "wb") as f:
        if group is not None:
            os.fchown(fd, -1, group)
            os.fchmod(fd, mode)
        f.write(data)
        if sync:
            f.flush()
            os.fsync(f.fileno())


def fsync(file: Path | int) -> None:
    """A file's data on disk: by its path, or by a descriptor of ours."""
    if isinstance(file, int):
        os.fsync(file)
        return
    with file.open("rb") as f:
        os.fsync(f.fileno())


def fsync_dir(folder: Path) -> None:
    """The folder's entries (files made, renamed or removed in it) on disk."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
