"""pullbackctl: drive pullbackd from a shell.

Tables for people; with --json, exactly the varlink reply's parameters. A
varlink error prints its name and parameters and exits 1; an unreachable
daemon exits 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from .control.client import Client, VarlinkError

DEFAULT_SOCKET = "/run/pullbackd/control.sock"
IFACE = "org.pullbackd.Backup"


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


def format_jobs(jobs: list[dict[str, Any]]) -> str:
    rows = [["ID", "DOMAIN", "STATE", "MODE", "CREATED", "DISKS"]]
    rows += [[j["id"], j["domain"], j["state"], j["mode"], j["created"],
              ",".join(d["name"] for d in j["disks"])] for j in jobs]
    return _table(rows)


def format_job(job: dict[str, Any]) -> str:
    lines = [f"job      {job['id']}", f"domain   {job['domain']}", f"state    {job['state']}",
             f"mode     {job['mode']}", f"created  {job['created']}"]
    if job.get("ended"):
        lines.append(f"ended    {job['ended']}")
    if job.get("error"):
        lines.append(f"error    {job['error']}")
    if job["disks"]:
        rows = [["DISK", "SIZE", "MODE", "URL"]]
        rows += [[d["name"], _size(d["size"]), d["mode"], d["url"]] for d in job["disks"]]
        lines += ["", _table(rows)]
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pullbackctl", description=__doc__.splitlines()[0])
    p.add_argument("--socket", default=os.environ.get("PULLBACKD_SOCKET", DEFAULT_SOCKET),
                   help=f"control socket (default: $PULLBACKD_SOCKET or {DEFAULT_SOCKET})")
    p.add_argument("--json", action="store_true", help="print the reply as JSON")
    top = p.add_subparsers(dest="group", required=True)
    backup = top.add_parser("backup", help="backup jobs").add_subparsers(dest="cmd", required=True)
    start = backup.add_parser("start", help="start a full pull-mode backup of a running domain")
    start.add_argument("domain")
    start.add_argument("--disk", action="append", dest="disks", metavar="DISK",
                       help="a disk to back up (repeatable; default: every disk)")
    backup.add_parser("list", help="list jobs")
    for name, what in (("show", "show a job"), ("finish", "the appliance is done: end the job"),
                       ("abort", "end the job now, as aborted")):
        backup.add_parser(name, help=what).add_argument("id")
    return p


def run(args: argparse.Namespace) -> dict[str, Any]:
    with Client(args.socket) as client:
        match args.cmd:
            case "start":
                params: dict[str, Any] = {"domain": args.domain}
                if args.disks:
                    params["disks"] = args.disks
                return client.call(f"{IFACE}.Start", **params)
            case "list":
                return client.call(f"{IFACE}.List")
            case "show":
                return client.call(f"{IFACE}.Get", id=args.id)
            case "finish":
                return client.call(f"{IFACE}.Finish", id=args.id)
            case "abort":
                return client.call(f"{IFACE}.Abort", id=args.id)
    raise AssertionError(args.cmd)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        reply = run(args)
    except VarlinkError as e:
        print(f"error: {e.name} {json.dumps(e.parameters)}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"pullbackctl: cannot talk to pullbackd on {args.socket}: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(reply, indent=2))
    elif "jobs" in reply:
        print(format_jobs(reply["jobs"]))
    else:
        print(format_job(reply["job"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
