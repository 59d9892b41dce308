"""libvirt XML: pure builders and parsers, no libvirt calls.

Builders use ElementTree, never string formatting, so a path or name can never
inject markup. Parsers read back what libvirt actually chose (export names,
sockets, scratch files) instead of assuming what we asked for.
References: https://libvirt.org/formatbackup.html, https://libvirt.org/formatdomain.html
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path


class XMLError(ValueError):
    """libvirt gave us XML we cannot understand."""


@dataclass(frozen=True)
class DomainDisk:
    """A disk as the domain definition describes it."""

    target: str
    device: str
    type: str
    source: str | None
    format: str | None
    readonly: bool

    @property
    def backupable(self) -> bool:
        """Whether a backup can include it: a writable disk, not removable media."""
        return self.device in ("disk", "lun") and not self.readonly


@dataclass(frozen=True)
class BackupDisk:
    """One disk of a running backup job, as libvirt reports it."""

    name: str
    export: str
    bitmap: str | None
    scratch: Path | None


@dataclass(frozen=True)
class BackupJob:
    """A running pull-mode backup, as libvirt reports it."""

    socket: Path
    disks: tuple[BackupDisk, ...]


@dataclass(frozen=True)
class PullRequest:
    """What to ask libvirt for: one NBD socket, a scratch file per disk."""

    socket: Path
    #: disk target -> scratch file, for each disk to back up.
    scratch: dict[str, Path]
    #: disks of the domain that are not to be backed up.
    skip: tuple[str, ...] = ()


def parse_disks(domain_xml: str) -> list[DomainDisk]:
    root = _parse(domain_xml)
    disks = []
    for disk in root.iterfind("./devices/disk"):
        target = disk.find("target")
        if target is None or not target.get("dev"):
            raise XMLError("a disk without a target")
        source = disk.find("source")
        driver = disk.find("driver")
        disks.append(DomainDisk(
            target=target.get("dev", ""),
            device=disk.get("device", "disk"),
            type=disk.get("type", "file"),
            source=None if source is None else (
                source.get("file") or source.get("dev") or source.get("name")
            ),
            format=None if driver is None else driver.get("type"),
            readonly=disk.find("readonly") is not None,
        ))
    return disks


def pull_backup(request: PullRequest) -> str:
    root = ET.Element("domainbackup", mode="pull")
    ET.SubElement(root, "server", transport="unix", socket=str(request.socket))
    disks = ET.SubElement(root, "disks")
    for name, scratch in request.scratch.items():
        disk = ET.SubElement(disks, "disk", name=name, backup="yes", type="file")
        ET.SubElement(disk, "scratch", file=str(scratch))
    # Every disk is named: libvirt backs up unlisted disks too when it can.
    for name in request.skip:
        ET.SubElement(disks, "disk", name=name, backup="no")
    return ET.tostring(root, encoding="unicode")


def parse_backup(backup_xml: str) -> BackupJob:
    root = _parse(backup_xml)
    if root.tag != "domainbackup" or root.get("mode", "push") != "pull":
        raise XMLError("not a pull-mode backup")
    server = root.find("server")
    if server is None or server.get("transport", "tcp") != "unix" or not server.get("socket"):
        raise XMLError("the backup has no NBD server on a Unix socket")
    disks = []
    for disk in root.iterfind("./disks/disk"):
        if disk.get("backup", "yes") != "yes":
            continue
        name = disk.get("name")
        if not name:
            raise XMLError("a backup disk without a name")
        scratch = disk.find("scratch")
        scratch_file = None if scratch is None else scratch.get("file")
        disks.append(BackupDisk(
            name=name,
            export=disk.get("exportname") or name,
            bitmap=disk.get("exportbitmap"),
            scratch=Path(scratch_file) if scratch_file else None,
        ))
    return BackupJob(socket=Path(server.get("socket", "")), disks=tuple(disks))


def _parse(text: str) -> ET.Element:
    try:
        return ET.fromstring(text)
    except ET.ParseError as e:
        raise XMLError(str(e)) from None
