"""Where a client may have pullbackd write or connect.

A push backup's files go only into `[push] dirs`, a copy only to an NBD URI
`[stream] destinations` covers; the repository ("local") is always allowed.
Paths are resolved first: no "..", no symlink leads out of an allowed folder.

Invariants:
- What was checked is what is used: `check` gives back the request with its
  `target_dir` and its destination's socket resolved, and the job keeps those (libvirt,
  as root, creates the push files; a symlink a client re-points after the check must
  not move them). A destination's socket is then reached at each connect with no link
  followed (stream.py, `pinned`): an appliance may write the folder that holds its
  socket, and swap the socket, or a folder, for a link once checked.
- A destination's socket is its caller's (who bound it), unless root called: looked at
  here when Start can (not a `{disk}` socket), and at each connect (stream.py, `Pinned`).
  Whoever may start backups could otherwise have pullbackd write into another
  appliance's server that pullbackd may reach.
- Nobody but root and pullbackd's user can change the folders between a push dir and a
  push's target_dir (each is theirs and not writable by group or others): the resolved
  path stays where it was checked until the files are made. The push dir itself, and
  what is above it, are the operator's choice.
- A queued job is checked again, by the same `check`, as its turn comes (starting.py).

A push's files are removed if it does not complete (`remove_targets`), and are on
disk, with their names, before it is recorded completed (`sync_targets`).
"""

from __future__ import annotations

import dataclasses
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, quote, unquote_plus, urlsplit

import structlog

from .durable import fsync
from .errors import InvalidParameter, TargetNotWritable
from .model import LOCAL, Job, StartRequest
from .names import job_files
from .roles import user_name
from .stream import unix_sockets

log = structlog.get_logger()


@dataclass(frozen=True)
class Places:
    """`push_dirs` ([push] dirs) and `destinations` ([stream] destinations); None
    for either allows anything (tests)."""

    push_dirs: tuple[Path, ...] | None = ()
    destinations: tuple[str, ...] | None = ()

    def check(self, request: StartRequest) -> StartRequest:
        """The request as its job is to use it: `target_dir`, and the socket of an NBD
        URI `destination`, resolved. Raises TargetNotWritable or InvalidParameter,
        naming the setting. Blocks (it looks at the file system)."""
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
            push_dir = None
            if self.push_dirs is not None:
                push_dir = max((d for d in (d.resolve() for d in self.push_dirs)
                                if folder == d or d in folder.parents),
                               key=lambda d: len(d.parts), default=None)
                if push_dir is None:
                    raise TargetNotWritable(request.target_dir, (
                        f"not inside [push] dirs ({', '.join(map(str, self.push_dirs)) or 'none'});"
                        " have the host's administrator add the folder"))
            _check_target_dir(request.target_dir, folder)
            if push_dir is not None:
                _check_owners(request.target_dir, push_dir, folder)
            request = dataclasses.replace(request, target_dir=str(folder))
        if request.destination not in (None, LOCAL):
            if self.destinations is not None and \
                    not any(_within(str(request.destination), a) for a in self.destinations):
                raise InvalidParameter("destination", (
                    "not allowed by [stream] destinations "
                    f"({', '.join(self.destinations) or 'none'}); have the host's administrator "
                    "add it, or use \"local\""))
            request = dataclasses.replace(request, destination=_resolved(request.destination))
            _check_socket_owner(request)
        return request


def _check_target_dir(target_dir: str, folder: Path) -> None:
    """`folder` (`target_dir` resolved) is a folder pullbackd's user can write into."""
    if not folder.is_dir():
        raise TargetNotWritable(target_dir, "no such folder")
    # access(2) also says no for a read-only file system, even to root.
    if not os.access(folder, os.W_OK | os.X_OK):
        raise TargetNotWritable(
            target_dir, f"not writable by pullbackd's user ({user_name(os.geteuid())})")


def _check_owners(target_dir: str, push_dir: Path, folder: Path) -> None:
    """Every folder below `push_dir` down to `folder` is root's or pullbackd's user's and
    not writable by group or others: whoever else could write one could replace the
    folder below it with a symlink once it was checked, and libvirt (root) would follow
    it. Read without following links: one there now was not there when resolved."""
    ours = {0, os.geteuid()}
    path = push_dir
    for name in folder.relative_to(push_dir).parts:
        path = path / name
        try:
            st = os.lstat(path)
        except OSError as e:
            raise TargetNotWritable(target_dir, f"{path} cannot be looked at ({e.strerror})") \
                from None
        if not stat.S_ISDIR(st.st_mode):
            raise TargetNotWritable(target_dir, f"{path} changed while it was checked; "
                                               "start the backup again")
        if st.st_uid not in ours:
            raise TargetNotWritable(target_dir, (
                f"{path} belongs to {user_name(st.st_uid)}, who could replace what is in it "
                f"with a link elsewhere; have the host's administrator give it to "
                f"{user_name(os.geteuid())} or root, or push elsewhere"))
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise TargetNotWritable(target_dir, (
                f"{path} is writable by its group or others, who could replace what is in "
                f"it with a link elsewhere; have the host's administrator `chmod go-w` it"))


def _check_socket_owner(request: StartRequest) -> None:
    """A destination's socket, if Start can look at it (not a `{disk}` one), is its
    caller's (root's calls excepted): stream.py checks it again at each connect
    (`Pinned`)."""
    if not request.owner or request.destination is None:
        return
    found = unix_sockets(request.destination)
    if found is None or len(found) != 1 or "{disk}" in (path := found[0][1]):
        return
    try:
        st = os.lstat(path)
    except OSError:
        return  # not served yet: the copy finds it, or fails
    if st.st_uid != request.owner:
        raise InvalidParameter("destination", (
            f"its socket {path} is {user_name(st.st_uid)}'s, not yours "
            f"({user_name(request.owner)}): pullbackd writes a backup only into a server of "
            "whoever starts it; serve your socket as your own user (a socket unit: "
            "SocketUser=)"))


def _resolved(url: str) -> str:
    """`url` with the path of its Unix socket resolved, as `_within` checked it: libnbd
    connects to that, not through a symlink a client re-points later. The rest of the
    URL stays as it was given."""
    u = urlsplit(url)
    if not u.scheme.endswith("+unix"):
        return url
    parts = u.query.split("&")
    for i, part in enumerate(parts):
        key, _, value = part.partition("=")
        if unquote_plus(key) == "socket" and value:
            try:
                path = str(Path(unquote_plus(value)).resolve())
            except (OSError, RuntimeError, ValueError):
                return url  # refused by `_within` when destinations are checked
            if path != unquote_plus(value):
                # Braces kept: "{disk}" in the path is replaced by each disk's name.
                parts[i] = f"{key}={quote(path, safe='/{}')}"
    if parts == u.query.split("&"):
        return url
    return f"{u.scheme}://{u.netloc}{u.path}?{'&'.join(parts)}" + \
        (f"#{u.fragment}" if u.fragment else "")


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


def sync_targets(job: Job) -> None:
    """A push that ended well: its files, and their names in their folder, on disk before
    it is recorded completed (libvirt and QEMU write them, and nothing syncs the folder
    that holds their names). Raises OSError naming the file or folder. Blocks."""
    if job.target_dir is None:
        return
    # Nothing followed, nothing waited on, that someone put in a file's place (a link, a
    # FIFO): an fsync of it fails the push.
    for path in [d.target for d in job.disks if d.target is not None]:
        _sync(path, os.O_NOFOLLOW | os.O_NONBLOCK)
    _sync(job.target_dir, os.O_DIRECTORY)


def _sync(path: str, flags: int) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | flags)
        try:
            fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        raise OSError(e.errno, e.strerror, path) from None
