"""Files made durable, and new files made without following a link (blocking calls).

Every file pullbackd creates in a folder someone else could write into, or whose
content must survive a crash, is made here: created exclusively (`O_EXCL`), never
through a symlink left in its place (`O_NOFOLLOW`), and with `sync`, on disk
before the call returns; its folder's entry is on disk after `fsync_dir`. A
folder made with `makedirs` is on disk when it returns, and so is every folder
made on its way (a folder's entry is in its parent: mkdir(parents=True) and a
sync of the last folder alone could lose the first ones at a power cut). In a
folder a caller named (a restore's), the file is made in the folder the caller's
path was checked to lead to, never one a link swapped in since (`create_in`), and
removed only if it is still the file made (`unlink_same`).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


class Moved(Exception):
    """A folder's path no longer leads where it was checked to: a link on the way."""


def create_in(folder: Path, name: str, mode: int = 0o600) -> int:
    """A new file `name` in `folder` (a path without links, checked by the caller),
    open to read and write: its descriptor. FileExistsError if the name is taken;
    Moved if `folder` no longer leads to that folder."""
    dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if os.readlink(f"/proc/self/fd/{dir_fd}") != str(folder):
            raise Moved(str(folder))
        return os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW |
                       os.O_CLOEXEC, mode, dir_fd=dir_fd)
    finally:
        os.close(dir_fd)


def unlink_same(path: Path, made: os.stat_result) -> None:
    """Remove `path` if it is still the file `made` (another file, or a link, in its
    place stays), looked at and removed in one folder whatever its path does meanwhile."""
    with contextlib.suppress(OSError):
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            st = os.stat(path.name, dir_fd=dir_fd, follow_symlinks=False)
            if (st.st_dev, st.st_ino) == (made.st_dev, made.st_ino):
                os.unlink(path.name, dir_fd=dir_fd)
        finally:
            os.close(dir_fd)


def fill(fd: int, path: Path, data: bytes, *, sync: bool = False) -> None:
    """`data` into the new, empty file `fd` made at `path` (with `sync`, on disk, its name
    too); if that fails, the file goes (if `path` is still it) before the error is
    raised."""
    try:
        with open(fd, "wb", closefd=False) as f:
            f.write(data)
        if sync:
            os.fsync(fd)
            fsync_dir(path.parent)
    except BaseException:
        unlink_same(path, os.fstat(fd))
        raise


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


def makedirs(folder: Path) -> None:
    """`folder`, made with every folder missing on its way (as mkdir(parents=True,
    exist_ok=True)), each on disk with its name before the call returns: the folder each
    was made in is synced, and the last one made too. Folders already there are left as
    they are."""
    missing = []
    at = folder
    while not at.is_dir():
        missing.append(at)
        at = at.parent
    for made in reversed(missing):
        # exist_ok: made meanwhile by another thread; synced here all the same, as that
        # thread may not have yet.
        made.mkdir(exist_ok=True)
        fsync_dir(made.parent)
    if missing:
        fsync_dir(folder)
