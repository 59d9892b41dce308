"""Where a client may have pullbackd write or connect.

A push backup's files go only into `[push] dirs`, a copy only to an NBD URI
`[stream] destinations` covers; the repository ("local") is always allowed.
Paths are resolved first: no "..", no symlink leads out of an allowed folder.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import structlog

from .errors import InvalidParameter, TargetNotWritable
from .model import LOCAL, Job, StartRequest
from .names import job_files
from .roles import user_name

log = structlog.get_logger()


@dataclass(frozen=True)
class Places:
    """`push_dirs` ([push] dirs) and `destinations` ([stream] destinations); None
    for either allows anything (tests)."""

    push_dirs: tuple[Path, ...] | None = ()
    destinations: tuple[str, ...] | None = ()

    def check(self, request: StartRequest) -> None:
        """Raise TargetNotWritable or InvalidParameter, naming the setting. Blocks
        (it looks at the file system)."""
        if request.target_dir is not None:
            # A relative path would be taken from the daemon's own folder.
            if not Path(request.target_dir).is_absolute():
                raise TargetNotWritable(request.target_dir, "not an absolute path")
            # Where it is, before whether it is there: nothing said of a folder outside
            # [push] dirs (that it exists, that it is read-only) to a caller.
            try:
                folder = Path(request.target_dir).resolve()
            except (OSError, RuntimeError, ValueError) as e:
                raise TargetNotWritable(request.target_dir, f"not a usable path ({e})") \
                    from None
            if self.push_dirs is not None and not any(
                    folder == d or d in folder.parents
                    for d in (d.resolve() for d in self.push_dirs)):
                raise TargetNotWritable(request.target_dir, (
                    f"not inside [push] dirs ({', '.join(map(str, self.push_dirs)) or 'none'});"
                    " have the host's administrator add the folder"))
            _check_target_dir(request.target_dir)
        if request.destination not in (None, LOCAL) and self.destinations is not None and \
                not any(_within(str(request.destination), a) for a in self.destinations):
            raise InvalidParameter("destination", (
                "not allowed by [stream] destinations "
                f"({', '.join(self.destinations) or 'none'}); have the host's administrator "
                "add it, or use \"local\""))


def _check_target_dir(target_dir: str) -> None:
    path = Path(target_dir)
    if not path.is_absolute():
        raise TargetNotWritable(target_dir, "not an absolute path")
    if not path.is_dir():
        raise TargetNotWritable(target_dir, "no such folder")
    # access(2) also says no for a read-only file system, even to root.
    if not os.access(path, os.W_OK | os.X_OK):
        raise TargetNotWritable(
            target_dir, f"not writable by pullbackd's user ({user_name(os.geteuid())})")



def _within(url: str, allowed: str) -> bool:
    """Whether an NBD URI is one `allowed` covers: the same scheme; for a Unix socket a
    path inside the allowed one (resolved: no "..", no symlink out of it), for TCP the
    same host and port; and no query key but `socket` unless `allowed` has it with the
    same value. A key given twice is refused: we would check one, libnbd use the other.
    Blocks (it resolves paths)."""
    u, a = urlsplit(url), urlsplit(allowed)
    if u.scheme != a.scheme or u.fragment:
        return False
    given, covered = parse_qsl(u.query, keep_blank_values=True), dict(parse_qsl(a.query))
    keys = [key for key, _ in given]
    if len(set(keys)) != len(keys) or any(
            key != "socket" and covered.get(key) != value for key, value in given):
        return False
    if u.scheme.endswith("+unix"):
        sockets = [dict(given).get("socket", ""), covered.get("socket", "")]
        if not all(sockets):
            return False
        try:
            path, folder = (Path(s).resolve() for s in sockets)
        except (OSError, RuntimeError, ValueError):  # a symlink loop, an unpaired surrogate
            return False
        return path == folder or folder in path.parents
    try:
        return bool(u.hostname) and (u.hostname, u.port) == (a.hostname, a.port)
    except ValueError:  # a port out of range
        return False


def remove_targets(job: Job) -> None:
    """A push that did not complete must not leave files that look like a backup. Blocks."""
    if job.target_dir is None:
        return
    for path in job_files(Path(job.target_dir), job.id):
        log.info("removing incomplete push target", job=job.id, path=str(path))
        path.unlink(missing_ok=True)
