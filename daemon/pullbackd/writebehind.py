"""How a file a copy writes reaches the disk: past the page cache where the
filesystem allows it (`direct_io`), else flowing to disk as the copy goes
(`WriteBehind`). See repository.image_server for which the repository's servers use.
"""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

from . import stream


def direct_io(file: Path | int) -> bool:
    """Whether the filesystem of `file` (a path, never followed through a link; or a
    descriptor of ours) takes O_DIRECT (tmpfs before Linux 6.6 and some FUSE
    filesystems refuse it). Blocks; raises OSError if it cannot be opened at all."""
    path, follow = (f"/proc/self/fd/{file}", 0) if isinstance(file, int) else \
        (str(file), os.O_NOFOLLOW)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC | follow)
    except OSError as e:
        if e.errno == errno.EINVAL:
            return False
        raise
    os.close(fd)
    return True


class WriteBehind:
    """Keeps a file that a copy is writing flowing to disk.

    Each `step` bytes the copy reaches, a thread of its own asks the kernel to
    start writing the file's dirty pages back and to drop the pages already on
    disk (POSIX_FADV_DONTNEED). The fsync that makes the file count then waits for
    the last step only, not for the whole file; and a backup does not fill the
    host's page cache, which its domains need, with data nobody reads again.
    A file written past the page cache (`direct_io`) needs none of it: step 0.
    """

    def __init__(self, path: Path, step: int) -> None:
        """`step`: 0 asks for nothing (and starts no thread)."""
        self._step = step
        self._lock = threading.Lock()
        self._asked = 0
        self._due = threading.Event()
        self._closed = not step
        if not step:
            return
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self._thread = threading.Thread(target=self._run, name="pullbackd-write-behind",
                                        daemon=True)
        self._thread.start()

    def progress(self, progress: stream.Progress) -> None:
        """The copy's progress callback (any of its threads may call it)."""
        with self._lock:
            if not self._step or progress.done - self._asked < self._step:
                return
            self._asked = progress.done
        self._due.set()

    def __enter__(self) -> WriteBehind:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop (once; again does nothing). The caller fsyncs the file for what is left."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._due.set()
        self._thread.join()
        os.close(self._fd)

    def _run(self) -> None:
        while True:
            self._due.wait()
            self._due.clear()
            if self._closed:
                return
            os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_DONTNEED)

