"""pullbackctl: drive pullbackd from a shell.

Tables for people; with --json, exactly the varlink reply's parameters. A
varlink error prints its name and parameters and exits 1, and so does what
pullbackctl itself cannot do here (`Unsaved`); a daemon that cannot be reached,
does not answer within --timeout, or does not answer as varlink, exits 2.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

from . import errors
from .control.client import Client, VarlinkError
from .control.codec import ProtocolError
from .roles import user_name

DEFAULT_SOCKET = "/run/pullbackd/control.sock"
IFACE = "org.pullbackd.Backup"
#: Seconds pullbackd has to answer (--timeout).
DEFAULT_TIMEOUT = 30.0
#: The methods that only read and answer at once: the timeout bounds the whole call.
#: Any other changes something or runs long (Start freezes a guest, Finish waits for the
#: sessions, Verify reads every backup, Watch follows a job): pullbackd has the timeout
#: to answer at all (org.varlink.service.GetInfo, first), then as long as the call takes,
#: as pullbackctl cut off would not know what was done.
READS = frozenset({"List", "Get", "ListCheckpoints", "DomainFiles", "ReadDomainFile"})


class Daemon(Client):
    """pullbackd's control socket, with pullbackctl's --timeout: pullbackd has `timeout`
    seconds to take the connection, to answer each call that READS, and to answer at all
    before the first other call (TimeoutError if it does not); None: no limit."""

    def __init__(self, path: str, timeout: float | None) -> None:
        super().__init__(path, timeout)
        self._bound = timeout
        self._answered = timeout is None

    def call(self, method: str, **parameters: Any) -> dict[str, Any]:
        self._wait_for(method)
        return super().call(method, **parameters)

    def stream(self, method: str, **parameters: Any) -> Iterator[dict[str, Any]]:
        self._wait_for(method)
        return super().stream(method, **parameters)

    def _wait_for(self, method: str) -> None:
        if method.rpartition(".")[2] in READS:
            self.timeout = self._bound
            return
        if not self._answered:
            self.timeout = self._bound
            with contextlib.suppress(VarlinkError):  # an error is an answer too
                super().call("org.varlink.service.GetInfo")
            self._answered = True
        self.timeout = None


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
                     for row in rows)


def _state(job: dict[str, Any]) -> str:
    return f"queued #{job['position']}" if job.get("position") else job["state"]


def _done(job: dict[str, Any]) -> str:
    """How far a job has come, in a few characters: its disks' bytes done of to transfer."""
    transfer = [d.get("transfer") for d in job["disks"]]
    done = sum(d.get("done") or 0 for d in job["disks"])
    if not job["disks"] or job["state"] in ("queued", "starting"):
        return "-"
    if None in transfer or not sum(t or 0 for t in transfer):
        return _size(done)
    return f"{min(100, 100 * done // sum(t or 0 for t in transfer))}%"


def format_jobs(jobs: list[dict[str, Any]]) -> str:
    rows = [["ID", "DOMAIN", "CONSUMER", "STATE", "MODE", "CREATED", "DISKS", "DONE"]]
    rows += [[j["id"], j["domain"], j["consumer"], _state(j), j["mode"], j["created"],
              ",".join(d["name"] for d in j["disks"]) or "-", _done(j)] for j in jobs]
    return _table(rows)


def _gauge(done: int, total: int | None, width: int = 20) -> str:
    if not total:
        return "-"
    filled = min(width, width * done // total)
    return f"[{'#' * filled}{'.' * (width - filled)}] {min(100, 100 * done // total):3d}%"


def format_job(job: dict[str, Any]) -> str:
    fields = ["domain", "consumer", "mode", "checkpoint", "since", "target_dir",
              "destination", "created", "ended", "error"]
    lines = [f"{'id':<12}{job['id']}", f"{'state':<12}{_state(job)}"]
    lines += [f"{name:<12}{job[name]}" for name in fields if job.get(name) is not None]
    if job.get("owner") is not None:
        lines.append(f"{'owner':<12}{_user(job['owner'])}")
    if job.get("consistency"):
        frozen = f", frozen {job['frozen']:.3f} s" if job.get("frozen") is not None else ""
        lines.append(f"{'consistent':<12}{job['consistency']}{frozen}")
    if job.get("progress"):
        lines.append(f"{'progress':<12}{bar(job['progress'])}")
    if job.get("scratch"):
        lines.append(f"{'scratch':<12}{_size(job['scratch']['used'])} used of at most "
                     f"{_size(job['scratch']['limit'])}")
    if job.get("appliance"):
        a = job["appliance"]
        idle = f", idle since {a['idle_since']}" if a.get("idle_since") else ""
        lines.append(f"{'sessions':<12}{a['active']} open, {a['total']} so far, "
                     f"{_size(a['bytes_read'])} read{idle}")
    if job.get("history"):
        lines.append(f"{'history':<12}" + ", ".join(f"{t['state']} {t['at']}"
                                                     for t in job["history"]))
    if job["disks"]:
        rows = [["DISK", "SIZE", "MODE", "SINCE", "DONE", "", "RATE", "ETA", "SCRATCH",
                 "WHERE"]]
        rows += [[d["name"], _size(d["size"]), d["mode"], d.get("since") or "-",
                  _gauge(d.get("done") or 0, d.get("transfer")),
                  f"{_size(d.get('done') or 0)} of "
                  f"{_size(d['transfer']) if d.get('transfer') is not None else '?'}",
                  f"{_size(d['rate'])}/s" if d.get("rate") else "-",
                  f"{d['eta']} s" if d.get("eta") is not None else "-",
                  _size(d["scratch"]) if d.get("scratch") is not None else "-",
                  d.get("url") or d.get("target") or "-"] for d in job["disks"]]
        lines += ["", _table(rows)]
        lines += [f"{d['name']}: full because {d['fallback']}"
                  for d in job["disks"] if d.get("fallback")]
    if job.get("appliance") and job["appliance"]["sessions"]:
        rows = [["SESSION", "PEER", "DISK", "STARTED", "ENDED", "READ"]]
        rows += [[str(s["id"]), s["peer"], s.get("disk") or "-", s["started"],
                  s.get("ended") or "open", _size(s["bytes_read"])]
                 for s in job["appliance"]["sessions"]]
        lines += ["", _table(rows)]
    return "\n".join(lines)


def format_step(step: dict[str, Any]) -> str:
    line = str(step["state"])
    if step["state"] == "draining":
        line += (f": waiting for {', '.join(step['jobs'])} ({step['sessions']} sessions open)"
                 if step["jobs"] else ": no backups running")
    elif step.get("message"):
        line += f": {step['message']}"
    return line


def _user(uid: int | None) -> str:
    """Who a uid the daemon sent is, here ("-" for none)."""
    return "-" if uid is None else user_name(uid)


def format_checkpoints(checkpoints: list[dict[str, Any]]) -> str:
    rows = [["CHECKPOINT", "CONSUMER", "OWNER", "JOB", "CREATED", "DISKS"]]
    rows += [[c["name"], c["consumer"], _user(c.get("owner")), c["job"], c["created"],
              ",".join(c["disks"])] for c in checkpoints]
    return _table(rows)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pullbackctl", description=__doc__.splitlines()[0])
    p.add_argument("--socket", default=os.environ.get("PULLBACKD_SOCKET", DEFAULT_SOCKET),
                   help=f"control socket (default: $PULLBACKD_SOCKET or {DEFAULT_SOCKET})")
    p.add_argument("--json", action="store_true", help="print the reply as JSON")
    p.add_argument("--timeout", type=_seconds, default=DEFAULT_TIMEOUT, metavar="S",
                   help=f"seconds pullbackd has to answer (default: {DEFAULT_TIMEOUT:g}; "
                        "0: no limit); a call that changes something or runs long (start, "
                        "finish, verify, restore, watch...) then takes as long as it takes")
    top = p.add_subparsers(dest="group", required=True)
    backup = top.add_parser("backup", help="backup jobs").add_subparsers(dest="cmd", required=True)
    _add_start(backup)
    for where, name in ((backup, "list"), (top, "jobs")):
        listing = where.add_parser(name, help="list jobs")
        listing.add_argument("--domain")
        listing.add_argument("--state")
    top.add_parser("show", help="show a job: state, sessions, per-disk progress").add_argument(
        "id")
    for name, what in (("show", "show a job"), ("finish", "the appliance is done: end the job"),
                       ("abort", "end the job now, as aborted")):
        cmd = backup.add_parser(name, help=what)
        cmd.add_argument("id")
        if name == "finish":
            cmd.add_argument("--failed", action="store_true",
                             help="the appliance's copy is not good: drop the checkpoint")
    files = backup.add_parser("files", help="save the domain's own files of a job's backup "
                                            "(definition, NVRAM, TPM state) into a new folder")
    files.add_argument("id")
    files.add_argument("--to", required=True, metavar="DIR", type=os.path.abspath)
    _add_restore(top)
    verify = top.add_parser("verify", help="re-read the local repository's backups and check "
                                           "them against their manifests")
    verify.add_argument("domain")
    verify.add_argument("--consumer")
    repo = top.add_parser("repo", help="the local repository").add_subparsers(
        dest="cmd", required=True)
    prune = repo.add_parser("prune", help="keep the newest N backups of each disk")
    prune.add_argument("domain")
    prune.add_argument("--keep", type=int, required=True, metavar="N")
    prune.add_argument("--consumer")
    watch = top.add_parser("watch", help="follow a job until it ends, or every job")
    watch.add_argument("id", nargs="?")
    _add_migrate(top)
    checkpoints = top.add_parser("checkpoints", help="list a domain's checkpoint chains")
    checkpoints.add_argument("domain")
    checkpoints.add_argument("--consumer")
    chain = top.add_parser("chain", help="checkpoint chains").add_subparsers(
        dest="cmd", required=True)
    delete = chain.add_parser("delete", help="delete a consumer's chain")
    delete.add_argument("domain")
    delete.add_argument("--consumer", required=True)
    return p


def _seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds (0: no limit)")
    return seconds


def _add_start(backup: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    start = backup.add_parser("start", help="start a backup of a domain, running or shut off")
    start.add_argument("domain")
    start.add_argument("--disk", action="append", dest="disks", metavar="DISK",
                       help="a disk to back up (repeatable; default: every disk)")
    start.add_argument("--mode", choices=("full", "incremental", "differential"),
                       help="default: full")
    start.add_argument("--since", metavar="CHECKPOINT", help="for --mode differential")
    start.add_argument("--consumer", help="the backup product's chain (default: default)")
    start.add_argument("--target-dir", metavar="DIR",
                       help="push: libvirt writes qcow2 files here instead of serving NBD")
    start.add_argument("--destination", metavar="local|URI",
                       help="pullbackd copies the backup itself: into the local repository, "
                            "or to an NBD URI ({disk} is replaced by each disk's name)")
    start.add_argument("--allow-scratch-overcommit", action="store_true",
                       help="start even if the scratch folder cannot hold the worst case")
    start.add_argument("--quiesce", choices=("auto", "required", "off"),
                       help="freeze the guest's filesystems through its agent as the backup "
                            "begins (default: auto, crash-consistent with a warning if the "
                            "agent does not answer)")
    start.add_argument("--mountpoint", action="append", dest="mountpoints", metavar="PATH",
                       help="a mount point in the guest to freeze (repeatable; default: all)")
    start.add_argument("--no-queue", action="store_true",
                       help="fail with TooManyJobs instead of waiting when [jobs] max_active "
                            "backups run")
    start.add_argument("--wait", action="store_true",
                       help="follow the job until it ends, with a progress bar; exit 1 "
                            "unless it completed")


def _add_restore(top: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    domain = top.add_parser("restore-domain", help="bring a domain back from the local "
                                                   "repository as a new domain")
    domain.add_argument("domain")
    domain.add_argument("--name", required=True, help="the new domain's name")
    domain.add_argument("--dir", required=True, type=os.path.abspath,
                        help="where its disks and NVRAM go (one of [restore] dirs)")
    domain.add_argument("--consumer")
    domain.add_argument("--at", metavar="CHECKPOINT", help="default: the newest complete backup")
    domain.add_argument("--format", choices=("raw", "qcow2"), help="default: qcow2")
    restore = top.add_parser("restore", help="rebuild a disk image from the local repository")
    restore.add_argument("domain")
    restore.add_argument("--disk", required=True)
    restore.add_argument("--consumer")
    restore.add_argument("--at", metavar="CHECKPOINT", help="default: the newest complete backup")
    restore.add_argument("--to", required=True, metavar="FILE", type=os.path.abspath)
    restore.add_argument("--format", choices=("raw", "qcow2"), help="default: raw")


def _add_migrate(top: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    migrate = top.add_parser("migrate", help="migrate a domain once its appliances are done "
                                             "with it")
    migrate.add_argument("domain")
    migrate.add_argument("destination", metavar="DEST_URI", help="the destination's libvirt URI")
    migrate.add_argument("--copy-storage", action="store_true", help="copy the disks too")
    migrate.add_argument("--unsafe", action="store_true",
                         help="let libvirt migrate disks it cannot check are shared safely")
    migrate.add_argument("--offline", action="store_true", help="not live: pause the guest")
    migrate.add_argument("--drain-timeout", type=int, metavar="S",
                         help="seconds to wait for the backups (default: [migration] "
                              "drain_timeout)")
    migrate.add_argument("--force", action="store_true",
                         help="past the drain timeout, abort the backups and migrate")


def _given(**params: Any) -> dict[str, Any]:
    """The parameters the user gave: the daemon supplies the defaults."""
    return {k: v for k, v in params.items() if v is not None}


def bar(progress: dict[str, Any], width: int = 30) -> str:
    done, total = progress["done"], max(progress["total"], 1)
    filled = width * done // total
    eta = f", {progress['eta']} s left" if progress.get("eta") is not None else ""
    return (f"[{'#' * filled}{'.' * (width - filled)}] {100 * done // total:3d}%  "
            f"{_size(done)} of {_size(progress['total'])}, {_size(progress['rate'])}/s{eta}")


def follow(client: Client, job_id: str | None, as_json: bool) -> dict[str, Any] | None:
    """Print a job's events (or every job's) until it ends; return its last state."""
    tty = sys.stderr.isatty()
    job = None
    for reply in client.stream(f"{IFACE}.Watch", **_given(id=job_id)):
        event, job = reply["event"], reply["event"]["job"]
        if as_json:
            print(json.dumps(reply), flush=True)
        elif event["kind"] == "progress" and job_id is not None and job.get("progress"):
            print(f"\r{bar(job['progress'])}" if tty else bar(job["progress"]),
                  end="" if tty else "\n", file=sys.stderr, flush=True)
        else:
            line = f"{job['id']}  {job['domain']}  {event['kind']:<8} {_state(job)}"
            if event["kind"] == "progress" and job.get("progress"):
                line += f"  {bar(job['progress'], 10)}"
            elif event["kind"] == "progress":
                line += f"  {_done(job)}"
            elif event.get("session"):
                s = event["session"]
                line += (f"  session {s['id']} {'closed' if s['ended'] else 'opened'} by "
                         f"{s['peer']}" + (f", {_size(s['bytes_read'])} read of {s['disk']}"
                                           if s["ended"] else ""))
            elif event.get("message"):
                line += f"  {event['message']}"
            print(("\n" if tty and job_id else "") + line, file=sys.stderr, flush=True)
    return job


class Unsaved(Exception):
    """pullbackd answered, and pullbackctl could not do its own part here (write a file):
    not an unreachable daemon."""


def save_files(client: Client, job_id: str, folder: Path) -> dict[str, Any]:
    """The job's domain files, each read whole and checked against its sha256, into the
    new folder `folder` (as they are named: "tpm/..." in a subfolder). Raises Unsaved
    for what fails here (the OSErrors left are the connection's)."""
    listing = client.call(f"{IFACE}.DomainFiles", id=job_id)
    try:
        folder.mkdir(mode=0o700)
    except OSError as e:
        raise Unsaved(f"cannot create {folder}: {e.strerror}; name a new folder") from None
    left = f"what was saved is in {folder}: remove it, and save again into a new folder"
    try:
        _save(client, job_id, folder, listing["files"])
    except Unsaved as e:
        raise Unsaved(f"{e}; {left}") from None
    except BaseException:  # the daemon: its message follows, and says what to do about it
        print(f"pullbackctl: {left}", file=sys.stderr)
        raise
    return {"saved": [e["name"] for e in listing["files"]], "missing": listing["missing"],
            "folder": str(folder)}


def _save(client: Client, job_id: str, folder: Path, files: list[dict[str, Any]]) -> None:
    for entry in files:
        data, offset = b"", 0
        while offset is not None:
            reply = client.call(f"{IFACE}.ReadDomainFile", id=job_id, name=entry["name"],
                                offset=offset)
            data += base64.b64decode(reply["data"])
            offset = reply["next"]
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise Unsaved(f"{entry['name']} changed while it was read")
        path = folder.joinpath(*PurePosixPath(entry["name"]).parts)
        if not path.resolve().is_relative_to(folder.resolve()):
            raise Unsaved(f"{entry['name']} would leave {folder}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            with path.open("xb") as f:
                f.write(data)
        except OSError as e:
            raise Unsaved(f"cannot write {path}: {e.strerror}") from None


def migrate(client: Client, args: argparse.Namespace) -> dict[str, Any]:
    """Migrate, each step printed as it comes; the last step."""
    step: dict[str, Any] = {}
    for reply in client.stream(f"{IFACE}.Migrate", **_given(
            domain=args.domain, destination=args.destination,
            live=False if args.offline else None,
            copy_storage=args.copy_storage or None, unsafe=args.unsafe or None,
            drain_timeout=args.drain_timeout, force=args.force or None)):
        step = reply["step"]
        if args.json:
            print(json.dumps(reply), flush=True)
        else:
            print(format_step(step), file=sys.stderr, flush=True)
    return {"step": step}


def run(args: argparse.Namespace) -> dict[str, Any]:
    with Daemon(args.socket, args.timeout or None) as client:
        match args.group, getattr(args, "cmd", None):
            case "backup", "start":
                reply = client.call(f"{IFACE}.Start", **_given(
                    domain=args.domain, disks=args.disks, mode=args.mode, since=args.since,
                    consumer=args.consumer, target_dir=args.target_dir,
                    destination=args.destination,
                    allow_scratch_overcommit=args.allow_scratch_overcommit or None,
                    queue=False if args.no_queue else None, quiesce=args.quiesce,
                    mountpoints=args.mountpoints))
                if args.wait:
                    reply = {"job": follow(client, reply["job"]["id"], as_json=False)}
                return reply
            case "watch", _:
                return {"job": follow(client, args.id, as_json=args.json)}
            case "migrate", _:
                return migrate(client, args)
            case ("backup", "list") | ("jobs", _):
                jobs: list[dict[str, Any]] = []
                after = None
                while True:  # every page
                    page = client.call(f"{IFACE}.List", **_given(
                        domain=args.domain, state=args.state, after=after))
                    jobs += page["jobs"]
                    if (after := page["next"]) is None:
                        return {"jobs": jobs}
            case ("backup", "show") | ("show", _):
                return client.call(f"{IFACE}.Get", id=args.id)
            case "backup", "finish":
                return client.call(f"{IFACE}.Finish", id=args.id, success=not args.failed)
            case "backup", "abort":
                return client.call(f"{IFACE}.Abort", id=args.id)
            case "checkpoints", _:
                return client.call(f"{IFACE}.ListCheckpoints",
                                   **_given(domain=args.domain, consumer=args.consumer))
            case "backup", "files":
                return save_files(client, args.id, Path(args.to))
            case "restore-domain", _:
                return client.call(f"{IFACE}.RestoreDomain", **_given(
                    domain=args.domain, name=args.name, dir=args.dir, consumer=args.consumer,
                    at=args.at, format=args.format))
            case "restore", _:
                return client.call(f"{IFACE}.Restore", **_given(
                    domain=args.domain, disk=args.disk, consumer=args.consumer, at=args.at,
                    to=args.to, format=args.format))
            case "repo", "prune":
                return client.call(f"{IFACE}.Prune", **_given(
                    domain=args.domain, keep=args.keep, consumer=args.consumer))
            case "verify", _:
                return client.call(f"{IFACE}.Verify",
                                   **_given(domain=args.domain, consumer=args.consumer))
            case "chain", "delete":
                return client.call(f"{IFACE}.DeleteChain", domain=args.domain,
                                   consumer=args.consumer)
    raise AssertionError(args)


def verified(args: argparse.Namespace, reply: dict[str, Any]) -> int:
    """Print what Verify found; exit 1 if a backup is damaged, or if there was none to
    check (a misspelt domain or consumer must not pass a nightly check), whatever the
    output's format."""
    if args.json:
        print(json.dumps(reply, indent=2))
    else:
        print("\n".join([*reply["problems"], f"{reply['checked']} backups checked, "
                                              f"{len(reply['problems'])} problems"]))
    if not reply["checked"] and not reply["problems"]:
        whose = args.domain + (f" (consumer {args.consumer})" if args.consumer else "")
        print(f"pullbackctl: no backup of {whose} in the repository: nothing was checked; "
              "check the names (pullbackctl checkpoints DOMAIN), or back it up with "
              "--destination local first", file=sys.stderr)
        return 1
    return 1 if reply["problems"] else 0


def _meaning(e: VarlinkError) -> str | None:
    """What an error of pullbackd's means and what to do next, as errors.py words it (the
    wire carries its name and parameters alone); None for another interface's, or one
    whose parameters this version does not know."""
    interface, _, name = e.name.rpartition(".")
    kind = getattr(errors, name, None)
    if interface != IFACE or not (isinstance(kind, type) and
                                  issubclass(kind, errors.PullbackError)):
        return None
    make: Any = kind  # each error's own parameters, not PullbackError's
    try:
        return str(make(**e.parameters))
    except TypeError:
        return None


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        reply = run(args)
        if args.group == "migrate":
            return 0 if reply["step"].get("state") == "completed" else 1
        if args.group == "watch" or getattr(args, "wait", False):
            # Exit 0 only for a job that completed; `watch --json` already printed events.
            job = reply["job"]
            if job is not None and not (args.group == "watch" and args.json):
                print(json.dumps(reply, indent=2) if args.json else format_job(job))
            return 0 if job is None or job["state"] == "completed" else 1
    except VarlinkError as e:
        if e.short_name == "PermissionDenied":
            print(f"pullbackctl: refused: your role ({e.parameters.get('role')}) does not "
                  f"allow {e.parameters.get('method')}; ask the host's administrator for "
                  "one in [roles] of pullbackd's configuration", file=sys.stderr)
            return 1
        print(f"error: {e.name} {json.dumps(e.parameters)}", file=sys.stderr)
        if (meaning := _meaning(e)) is not None:
            print(f"pullbackctl: {meaning}", file=sys.stderr)
        return 1
    except Unsaved as e:
        print(f"pullbackctl: {e}", file=sys.stderr)
        return 1
    except TimeoutError:
        print(f"pullbackctl: pullbackd does not answer on {args.socket} (waited "
              f"{args.timeout:g} s): is it hung? see `systemctl status pullbackd` and "
              "`journalctl -u pullbackd`; --timeout S waits longer (0: as long as it takes)",
              file=sys.stderr)
        return 2
    except OSError as e:
        print(f"pullbackctl: cannot talk to pullbackd on {args.socket}: {e}", file=sys.stderr)
        return 2
    except ProtocolError as e:
        print(f"pullbackctl: cannot talk to pullbackd on {args.socket}: it does not answer "
              f"as varlink ({e}); is this pullbackd's control socket?", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    if args.group == "verify":
        return verified(args, reply)
    show(args, reply)
    return 0


def show(args: argparse.Namespace, reply: dict[str, Any]) -> None:
    """Print a command's reply: JSON with --json, else as its kind reads best."""
    if args.json:
        print(json.dumps(reply, indent=2))
    elif "jobs" in reply:
        print(format_jobs(reply["jobs"]))
    elif "checkpoints" in reply:
        print(format_checkpoints(reply["checkpoints"]))
    elif "saved" in reply:
        print("\n".join([*(f"saved {reply['folder']}/{n}" for n in reply["saved"]),
                         *(f"missing: {m}" for m in reply["missing"])]))
    elif "uuid" in reply:
        print("\n".join([f"defined {reply['name']} ({reply['uuid']}) as of {reply['checkpoint']}",
                         *(f"  {d['name']}: {d['file']}" for d in reply["disks"]),
                         *([f"  nvram: {reply['nvram']}"] if reply["nvram"] else []),
                         *([f"  tpm: {reply['tpm']}"] if reply["tpm"] else []),
                         *(f"  left out: {d} (not in the backup)" for d in reply["dropped"]),
                         *(f"  not in the backup: {m}" for m in reply["missing"])]))
    elif "deleted" in reply:
        print("\n".join(reply["deleted"]) or "nothing to delete")
    elif "dropped" in reply:
        print("\n".join(reply["dropped"]) or "nothing to prune")
    elif "file" in reply:
        print(f"restored {reply['file']} as of {reply['checkpoint']}")
    else:
        print(format_job(reply["job"]))


if __name__ == "__main__":
    sys.exit(main())
