"""libvirt XML: pure builders and parsers, no libvirt calls.

Builders use ElementTree, never string formatting, so a path or name can never
inject markup. Parsers read back what libvirt actually chose (export names,
sockets, scratch files) instead of assuming what we asked for.
References: https://libvirt.org/formatbackup.html, https://libvirt.org/formatdomain.html
"""

from __future__ import annotations

import functools
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field, replace
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
    #: The layers its definition names under the image (`<backingStore>`), the image's own
    #: backing file first: each one's source and format. None: it names none, and libvirt
    #: reads them from the image's header when it starts the domain; (): an explicit
    #: `<backingStore/>`, no layer at all.
    backing: tuple[tuple[str, str | None], ...] | None = None

    @property
    def backupable(self) -> bool:
        """Whether a backup can include it: a writable disk, not removable media."""
        return self.device in ("disk", "lun") and not self.readonly

    @property
    def no_bitmap(self) -> str | None:
        """Why it cannot hold a dirty bitmap (only qcow2 images can), if it cannot."""
        if self.format == "qcow2":
            return None
        return (f"a {self.format or 'raw'} disk cannot hold a dirty bitmap (only qcow2 can): "
                "it is backed up in full every time")


@dataclass(frozen=True)
class BackupDisk:
    """One disk of a running backup job, as libvirt reports it."""

    name: str
    export: str | None
    bitmap: str | None
    scratch: Path | None
    target: Path | None = None
    #: An incremental disk: the checkpoint it starts from.
    since: str | None = None


@dataclass(frozen=True)
class BackupJob:
    """A running backup, as libvirt reports it: pull (an NBD socket) or push (targets)."""

    socket: Path | None
    disks: tuple[BackupDisk, ...]


@dataclass(frozen=True)
class BackupRequest:
    """What to ask libvirt for.

    Pull mode (`socket` set): one NBD socket, and per disk a scratch file in
    `files`. Push mode (`socket` None): per disk the qcow2 target in `files`.
    """

    socket: Path | None
    #: disk target -> scratch file (pull) or target file (push), for each disk to back up.
    files: dict[str, Path]
    #: disk target -> the checkpoint to back up changes since; other disks are full.
    since: dict[str, str] = field(default_factory=dict)
    #: disks of the domain that are not to be backed up.
    skip: tuple[str, ...] = ()
    #: Pull: disk target -> the NBD export name QEMU serves it under (default: the target).
    exports: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class CheckpointInfo:
    """A checkpoint as libvirt describes it."""

    name: str
    parent: str | None
    #: disks with a bitmap in this checkpoint.
    disks: tuple[str, ...]
    #: When libvirt created it, seconds since the epoch (None if it does not say).
    created: int | None = None


@dataclass(frozen=True)
class Live:
    """What a backup of a running domain reads in its live XML, parsed once."""

    disks: list[DomainDisk]
    #: Its guest agent's channel is connected.
    agent_connected: bool


def parse_live(domain_xml: str) -> Live:
    root = _parse(domain_xml)
    return Live(_disks(root), any(
        t.get("name") == "org.qemu.guest_agent.0" and t.get("state") == "connected"
        for t in root.iterfind("./devices/channel/target")))


def parse_disks(domain_xml: str) -> list[DomainDisk]:
    return _disks(_parse(domain_xml))


def _disks(root: ET.Element) -> list[DomainDisk]:
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
            backing=_backing(disk.find("backingStore")),
        ))
    return disks


def _backing(store: ET.Element | None) -> tuple[tuple[str, str | None], ...] | None:
    """The layers a `<backingStore>` names, down to the empty one that ends them."""
    if store is None:
        return None
    layers: list[tuple[str, str | None]] = []
    while store is not None and (source := store.find("source")) is not None:
        fmt = store.find("format")
        layers.append((source.get("file") or source.get("dev") or source.get("name") or "",
                       None if fmt is None else fmt.get("type")))
        store = store.find("backingStore")
    return tuple(layers)


def backup(request: BackupRequest) -> str:
    root = ET.Element("domainbackup", mode="push" if request.socket is None else "pull")
    if request.socket is not None:
        ET.SubElement(root, "server", transport="unix", socket=str(request.socket))
    disks = ET.SubElement(root, "disks")
    for name, path in request.files.items():
        disk = ET.SubElement(disks, "disk", name=name, backup="yes", type="file")
        if name in request.since:
            disk.set("backupmode", "incremental")
            disk.set("incremental", request.since[name])
        else:
            disk.set("backupmode", "full")
        if request.socket is None:
            ET.SubElement(disk, "target", file=str(path))
            ET.SubElement(disk, "driver", type="qcow2")
        else:
            if name in request.exports:
                disk.set("exportname", request.exports[name])
            ET.SubElement(disk, "scratch", file=str(path))
            ET.SubElement(disk, "driver", type="qcow2")
    # Every disk is named: libvirt backs up unlisted disks too when it can.
    for name in request.skip:
        ET.SubElement(disks, "disk", name=name, backup="no")
    return ET.tostring(root, encoding="unicode")


def checkpoint(name: str, bitmaps: list[str], skip: tuple[str, ...]) -> str:
    """A new checkpoint: a bitmap on each of `bitmaps`, none on the disks in `skip`."""
    root = ET.Element("domaincheckpoint")
    ET.SubElement(root, "name").text = name
    disks = ET.SubElement(root, "disks")
    for disk in bitmaps:
        ET.SubElement(disks, "disk", name=disk, checkpoint="bitmap")
    for disk in skip:
        ET.SubElement(disks, "disk", name=disk, checkpoint="no")
    return ET.tostring(root, encoding="unicode")


def made_checkpoint(name: str, parent: str | None, created: int, bitmaps: list[str],
                    skip: tuple[str, ...]) -> str:
    """A checkpoint pullbackd made itself (a shut-off domain's, offline.py), for libvirt to
    take in by redefinition: a bitmap named after it on each of `bitmaps` (they exist
    already), none on `skip`; `created` in seconds since the epoch."""
    root = ET.Element("domaincheckpoint")
    ET.SubElement(root, "name").text = name
    if parent is not None:
        ET.SubElement(ET.SubElement(root, "parent"), "name").text = parent
    ET.SubElement(root, "creationTime").text = str(created)
    disks = ET.SubElement(root, "disks")
    for disk in bitmaps:
        ET.SubElement(disks, "disk", name=disk, checkpoint="bitmap", bitmap=name)
    for disk in skip:
        ET.SubElement(disks, "disk", name=disk, checkpoint="no")
    return ET.tostring(root, encoding="unicode")


def parse_checkpoint(checkpoint_xml: str) -> CheckpointInfo:
    root = _parse(checkpoint_xml)
    name = root.findtext("name")
    if root.tag != "domaincheckpoint" or not name:
        raise XMLError("not a checkpoint")
    return CheckpointInfo(
        name=name,
        parent=root.findtext("parent/name"),
        disks=tuple(d.get("name", "") for d in root.iterfind("disks/disk")
                    if d.get("checkpoint", "bitmap") == "bitmap"),
        created=int(text) if (text := root.findtext("creationTime", "")).isdigit() else None,
    )


def uuid_of(domain_xml: str) -> str | None:
    """A domain's UUID, from its definition."""
    return _parse(domain_xml).findtext("uuid")


def checkpoint_domain_uuid(checkpoint_xml: str) -> str | None:
    """The UUID of the domain a checkpoint's XML was taken from, if it carries the domain's
    definition (libvirt's does; the metadata's copies do not)."""
    return _parse(checkpoint_xml).findtext("domain/uuid")


#: The namespace of the chains pullbackd keeps in a domain's own <metadata>.
CHAINS_NS = "https://pullbackd.org/xmlns/chains/1"


@dataclass(frozen=True)
class ChainEntry:
    """A confirmed checkpoint as the domain's metadata carries it."""

    name: str
    consumer: str
    job: str
    created: str
    disks: tuple[str, ...]
    #: libvirt's checkpoint XML without the domain definition (enough to redefine it).
    xml: str | None
    #: Disks its backup copied in full (where differentials start).
    full: tuple[str, ...] = ()


def chains(entries: list[ChainEntry]) -> str:
    """The <chains> element for the domain's metadata."""
    root = ET.Element("chains")
    for e in entries:
        item = ET.SubElement(root, "checkpoint", name=e.name, consumer=e.consumer, job=e.job,
                             created=e.created, disks=",".join(e.disks))
        if e.full:
            item.set("full", ",".join(e.full))
        if e.xml is not None:
            item.append(_parse(e.xml))
    return ET.tostring(root, encoding="unicode")


def parse_chains(text: str) -> list[ChainEntry]:
    root = _parse(text)
    entries = []
    for item in root.iterfind("checkpoint"):
        inner = item.find("domaincheckpoint")
        entries.append(ChainEntry(
            name=item.get("name", ""), consumer=item.get("consumer", ""),
            job=item.get("job", ""), created=item.get("created", ""),
            disks=tuple(d for d in item.get("disks", "").split(",") if d),
            xml=None if inner is None else ET.tostring(inner, encoding="unicode"),
            full=tuple(d for d in item.get("full", "").split(",") if d)))
    if any(not e.name or not e.consumer for e in entries):
        raise XMLError("a chain entry without a name or consumer")
    return entries


def same_chains(found: list[ChainEntry], entries: list[ChainEntry]) -> bool:
    """Whether the chains a domain's metadata carries (`found`, from `parse_chains`) are
    `entries`, however libvirt laid out the XML it keeps (indented, attributes in
    another order)."""
    return [_comparable(e) for e in found] == [_comparable(e) for e in entries]


def _comparable(entry: ChainEntry) -> ChainEntry:
    if entry.xml is None:
        return entry
    return replace(entry, xml=ET.canonicalize(entry.xml, strip_text=True))


@functools.lru_cache(maxsize=1024)
def without_domain(checkpoint_xml: str) -> str:
    """The checkpoint without the copy of the domain's definition libvirt puts in it:
    redefining does without, and the domain's metadata should not carry one per backup.
    Remembered: each backup writes the domain's chains into its metadata again."""
    root = _parse(checkpoint_xml)
    for domain in root.findall("domain"):
        root.remove(domain)
    return ET.tostring(root, encoding="unicode")


def without_parent(checkpoint_xml: str) -> str:
    """The checkpoint with no parent: for redefining it when its parent is gone.

    Each checkpoint's bitmap records on its own from its creation on, so the
    parent link says nothing about what a backup since it covers.
    """
    root = _parse(checkpoint_xml)
    for parent in root.findall("parent"):
        root.remove(parent)
    return ET.tostring(root, encoding="unicode")


def parse_backup(backup_xml: str) -> BackupJob:
    root = _parse(backup_xml)
    if root.tag != "domainbackup":
        raise XMLError("not a backup")
    socket = None
    if root.get("mode", "push") == "pull":
        server = root.find("server")
        if server is None or server.get("transport", "tcp") != "unix" or not server.get("socket"):
            raise XMLError("the backup has no NBD server on a Unix socket")
        socket = Path(server.get("socket", ""))
    disks = []
    for disk in root.iterfind("./disks/disk"):
        if disk.get("backup", "yes") != "yes":
            continue
        name = disk.get("name")
        if not name:
            raise XMLError("a backup disk without a name")
        disks.append(BackupDisk(
            name=name,
            export=(disk.get("exportname") or name) if socket else None,
            bitmap=disk.get("exportbitmap"),
            scratch=_file(disk, "scratch"),
            target=_file(disk, "target"),
            since=disk.get("incremental") if disk.get("backupmode") == "incremental" else None,
        ))
    return BackupJob(socket=socket, disks=tuple(disks))


def _file(disk: ET.Element, tag: str) -> Path | None:
    element = disk.find(tag)
    path = None if element is None else element.get("file")
    return Path(path) if path else None


def _parse(text: str) -> ET.Element:
    try:
        return ET.fromstring(text)
    except ET.ParseError as e:
        raise XMLError(str(e)) from None
