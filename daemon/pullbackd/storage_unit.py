"""The root side of a shut-off domain's backup, for a pullbackd that is not root.

A shut-off domain's images are root's on a host (libvirt gives them back when the domain
stops), and the checkpoint's bitmap is written into them: pullbackd's own user cannot open
them. With `[offline] unit` set (the package sets "pullbackd-storage"), pullbackd asks
systemd to start the template unit `pullbackd-storage@<job>.service` (polkit lets
pullbackd's user start and stop those units, and no other), whose program is this one, as
root:

    pullbackd-storage JOB

It reads what the job asks (`<job>.spec` beside the job's PID file, written by pullbackd:
the domain, and its disks that get the checkpoint's bitmap) and trusts none of it but the
names: the domain must be shut off, each disk must be one of its file or block disks, and the
images and their formats are what libvirt says, not what the spec says. The layers under
them are those libvirt's definition names, which the images' headers must name too, or
where it names none those the headers name, as libvirt follows them; an image with an
external data file is refused (qsd.layered, exit status 2, before anything opens them).
It then becomes the job's qemu-storage-daemon, with the command line
qsd.py makes, its output in the job's log file. Its sockets, PID file and log are root's,
for the group pullbackd (the unit's Group= and UMask=0007): pullbackd drives it over QMP as
it drives one of its own. The files it makes in pullbackd's folder are made new, never
through a link left there.

What this guards is the contract: a spec that names another domain's disks, or a disk of a
running domain, opens nothing. It is no wall against pullbackd's user itself: QMP gives the
daemon's powers to whoever drives it, and that user is in the group libvirt, which is as
much as root on a libvirt host.

Exit status 2: the job asked for something it may not have (nothing was opened).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from . import config, virt, xml
from .durable import write_new
from .errors import LibvirtError, NoSuchDomain
from .names import JOB_ID, Layout
from .qsd import Image, StorageDaemon, StorageDaemonError, hold_writers_off, layered

REFUSED = 2


class Refused(Exception):
    """The job's spec asks for what it may not have."""


def images(uri: str, spec: dict[str, object]) -> tuple[str, list[Image]]:
    """The domain and the images the spec may have: its disks as libvirt has them."""
    domain, disks = spec.get("domain"), spec.get("disks")
    if not isinstance(domain, str) or not isinstance(disks, list) or not disks:
        raise Refused("the spec names no domain, or no disk")
    found = {d.target: d for d in xml.parse_disks(virt.shut_off_definition(uri, domain))}
    chosen = []
    for entry in disks:
        if not isinstance(entry, dict) or not isinstance(entry.get("disk"), str):
            raise Refused(f"not a disk: {entry!r}")
        disk = found.get(entry["disk"])
        if disk is None or disk.type not in ("file", "block") or disk.source is None:
            raise Refused(f"{domain} has no file or block disk {entry['disk']!r}")
        path, fmt = Path(disk.source), disk.format or "raw"
        chosen.append(Image(disk.target, path, fmt, bool(entry.get("bitmap")) and
                            fmt == "qcow2", device=disk.type == "block",
                            declared=disk.backing))
    return domain, layered(chosen)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pullbackd-storage", description=__doc__.splitlines()[0])
    parser.add_argument("job")
    parser.add_argument("--config", type=Path, default=Path("/etc/pullbackd/pullbackd.toml"))
    args = parser.parse_args(argv)
    if not JOB_ID.fullmatch(args.job):
        print(f"pullbackd-storage: not a job id: {args.job!r}", file=sys.stderr)
        return REFUSED
    cfg = config.load(args.config)
    layout = Layout(cfg.exports.dir, cfg.scratch.dir)
    qsd = StorageDaemon(layout.qsd_monitor(args.job), layout.qemu_socket(args.job),
                        layout.qsd_pidfile(args.job))
    # Everything from here on is in the job's log, which pullbackd quotes when a start fails.
    fd = os.open(qsd.log, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o660)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    try:
        spec = json.loads(qsd.spec.read_text())
        domain, chosen = images(cfg.libvirt.uri, spec if isinstance(spec, dict) else {})
    except (OSError, ValueError, Refused, LibvirtError, NoSuchDomain, StorageDaemonError) as e:
        print(f"pullbackd-storage: job {args.job}: refused: {e}", file=sys.stderr, flush=True)
        return REFUSED
    print(f"pullbackd-storage: job {args.job}: serving {domain}: "
          f"{', '.join(str(i.path) for i in chosen)}", file=sys.stderr, flush=True)
    # The PID file, here rather than by qemu-storage-daemon, which would follow a link
    # left in its place (the folder is pullbackd's): exec keeps the PID.
    try:
        # Kept through the exec: qemu-storage-daemon holds them (qsd.py).
        for fd in hold_writers_off(chosen):
            os.set_inheritable(fd, True)
    except OSError as e:
        print(f"pullbackd-storage: job {args.job}: cannot keep writers off an image: {e}",
              file=sys.stderr, flush=True)
        return 1
    write_new(qsd.pidfile, f"{os.getpid()}\n".encode(), 0o640, sync=False)
    command = qsd.command(chosen, pidfile=False)
    os.execvp(command[0], command)


if __name__ == "__main__":
    sys.exit(main())
