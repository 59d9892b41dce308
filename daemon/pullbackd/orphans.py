"""NBD servers of an earlier run: the qemu-nbd processes (and qemu-storage-daemons
of the writer and of Verify) still serving on a socket in the repository's
sockets folder after a crash, found by their command line (`find`) and ended
through pidfds (`end`). Only the daemon that owns the repository may end them;
Repository.recover does, at start.
"""

from __future__ import annotations

import itertools
import os
import select
import signal
import time
from pathlib import Path

import structlog

from . import verifying
from .errors import RepositoryError

log = structlog.get_logger()


#: How long `recover` gives a qemu-nbd of an earlier run to end after SIGTERM, and
#: then after SIGKILL.
ORPHAN_GRACE = 10.0


def find(sockets: Path) -> dict[int, str]:
    """The qemu-nbd processes serving on a socket in `sockets`, each with its socket."""
    folder = os.path.abspath(sockets)
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (sock := served_socket(int(entry), folder)) is not None:
            found[int(entry)] = sock
    return found


def served_socket(pid: int, folder: str) -> str | None:
    """The socket the process `pid` serves on if it is a qemu-nbd (or a Verify's or the
    writer's qemu-storage-daemon) serving on one in `folder`, else None."""
    try:
        argv = [os.fsdecode(a) for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")]
    except OSError:  # gone meanwhile, or not ours to look at
        return None
    program = os.path.basename(argv[0])
    if program not in ("qemu-nbd", verifying.PROGRAM):
        return None
    # As qemu_nbd.command, verifying.server or writers write it, or by hand. cmdline ends in a
    # NUL: the last argument too has a following (empty) one.
    for arg, following in itertools.pairwise(argv):
        if program == verifying.PROGRAM:
            options = following.split(",") if arg == "--nbd-server" else []
            sock = next((o.removeprefix("addr.path=") for o in options
                         if o.startswith("addr.path=")), "")
        elif arg == "--socket":
            sock = following
        elif arg.startswith("--socket="):
            sock = arg.removeprefix("--socket=")
        else:
            continue
        if sock and os.path.dirname(os.path.abspath(sock)) == folder:
            return sock
    return None


def end(orphans: dict[int, str]) -> None:
    """End the processes `orphans` (pid: socket): SIGTERM, then SIGKILL for those
    still there after ORPHAN_GRACE. Through pidfds, so a pid that a new process took
    over meanwhile is never signalled."""
    pidfds: dict[int, int] = {}
    try:
        for pid, sock in orphans.items():
            try:
                fd = os.pidfd_open(pid)
            except ProcessLookupError:
                continue
            # The pid is held now: look again that it is still the qemu-nbd we found.
            if served_socket(pid, os.path.dirname(os.path.abspath(sock))) != sock:
                os.close(fd)
                continue
            pidfds[pid] = fd
            log.warning("ending a qemu-nbd of an earlier run", pid=pid, socket=sock)
            _signal(fd, pid, sock, signal.SIGTERM)
        deadline = time.monotonic() + ORPHAN_GRACE
        stubborn = [pid for pid, fd in pidfds.items() if not _exits(fd, deadline)]
        for pid in stubborn:
            log.warning("killing a qemu-nbd of an earlier run", pid=pid, socket=orphans[pid])
            _signal(pidfds[pid], pid, orphans[pid], signal.SIGKILL)
        deadline = time.monotonic() + ORPHAN_GRACE
        for pid in stubborn:
            if not _exits(pidfds[pid], deadline):
                raise RepositoryError(orphans[pid], f"qemu-nbd {pid} of an earlier run "
                                                    "does not end")
    finally:
        for fd in pidfds.values():
            os.close(fd)


def _signal(pidfd: int, pid: int, sock: str, sig: signal.Signals) -> None:
    try:
        signal.pidfd_send_signal(pidfd, sig)
    except ProcessLookupError:  # it ended meanwhile
        pass
    except PermissionError as e:
        raise RepositoryError(sock, f"cannot end qemu-nbd {pid}: {e.strerror}") from e


def _exits(pidfd: int, deadline: float) -> bool:
    """Whether the process ends before `deadline` (its pidfd becomes readable)."""
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(max(0, int((deadline - time.monotonic()) * 1000))))

