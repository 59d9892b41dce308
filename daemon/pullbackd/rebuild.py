"""A whole domain back from the repository: its disks, its NVRAM, its TPM's state and
its definition, defined in libvirt under a new name (RestoreDomain).

The new domain is the backed-up one as it was, but for what would make two of them
clash: a new name and UUID, no MAC addresses (libvirt makes new ones), no VM
generation id, none of pullbackd's chains (its disks hold no bitmaps). Its disks
are the restored files, each a plain file of the format asked; disks the backup
does not hold are left out (CD-ROMs keep their media). Its NVRAM is the backup's,
in the restore folder; its TPM state goes where libvirt's swtpm looks for the new
UUID (`<state_dir>/swtpm/<uuid>/`), given to swtpm's user.

All or nothing: what a restore created (files, the TPM's folder) is removed when
it fails before libvirt defined the domain, and libvirt's define is the last step.
"""

from __future__ import annotations

import os
import pwd
import shutil
import uuid as uuids
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import anyio
import structlog

from . import domainfiles, names, stream
from .domainfiles import DomainFiles
from .durable import Moved, create_in, fill, fsync_dir, unlink_same, write_new
from .errors import InvalidParameter, RepositoryError
from .repository import Repository, Unfinished, restorable
from .virt import Virt
from .xml import CHAINS_NS

log = structlog.get_logger()


@dataclass(frozen=True)
class Rebuilt:
    """A definition for a domain restored from a backup."""

    xml: str
    uuid: str
    #: Disks of the definition the backup does not hold: left out.
    dropped: tuple[str, ...]


@dataclass(frozen=True)
class Restored:
    name: str
    uuid: str
    checkpoint: str
    #: Disk target -> its restored file.
    disks: Mapping[str, Path]
    nvram: Path | None
    tpm: Path | None
    dropped: tuple[str, ...]
    #: What the backup itself lacks (DomainFiles.missing).
    missing: tuple[str, ...]


class Rebuilder:
    def __init__(self, repository: Repository, virt: Virt, state_dir: Path, swtpm_user: str,
                 tuning: stream.Tuning, unfinished: Unfinished) -> None:
        """`unfinished`: whether a job is known not to have completed (its backup is none:
        repository.restorable)."""
        self._repository = repository
        self._unfinished = unfinished
        self._virt = virt
        self._state_dir = state_dir
        self._swtpm_user = swtpm_user
        self._tuning = tuning

    async def restore(self, domain: str, consumer: str, at: str | None, name: str,
                      folder: Path, fmt: str) -> Restored:
        """Restore the backup of `domain` at checkpoint `at` (default: the newest complete
        one, repository.restorable) as the new domain `name`, its files in `folder` (which
        exists: the caller checked it may be written). Raises InvalidParameter (the name
        is taken), NoBackup, NoSuchCheckpoint, RepositoryError, LibvirtError."""
        names.component("name", name)
        if await self._virt.exists(name):
            raise InvalidParameter("name", f"a domain {name!r} exists; choose a new name")
        manifests = await anyio.to_thread.run_sync(
            restorable, self._repository, domain, consumer, at, self._unfinished)
        checkpoint = next(iter(manifests.values())).checkpoint
        files = await anyio.to_thread.run_sync(
            self._repository.files_at, domain, consumer, checkpoint)
        if files is None or files.definition is None:
            raise RepositoryError(
                str(self._repository.files_folder(domain, consumer, checkpoint)),
                "this backup holds no definition of the domain (taken before pullbackd "
                "kept them): restore its disks one by one with Restore")
        # What it made: files in the caller's folder (removed only if still what was made:
        # the folder may be a user's), and the TPM's folder in libvirt's.
        made: list[tuple[Path, os.stat_result]] = []
        tpm = None
        try:
            disks = {}
            for disk, manifest in manifests.items():
                disks[disk] = names.restored_disk(folder, name, disk, fmt)
                # A restore that fails removes its file itself; one that exists stays.
                made.append((disks[disk], await self._repository.restore(
                    manifest, disks[disk], fmt, self._tuning)))
            nvram = None
            if domainfiles.NVRAM in files.files:
                nvram = names.restored_nvram(folder, name)
                made.append((nvram, await anyio.to_thread.run_sync(
                    _create, nvram, files.files[domainfiles.NVRAM])))
            rebuilt = rebuild(files.definition, name,
                              {d: (p, fmt) for d, p in disks.items()}, nvram)
            tpm = await anyio.to_thread.run_sync(install_tpm, files, rebuilt.uuid,
                                                 self._state_dir, self._swtpm_user)
            await self._virt.define(rebuilt.xml)
        except BaseException:
            with anyio.CancelScope(shield=True):  # half a domain is no domain
                await anyio.to_thread.run_sync(_remove, made, tpm)
            raise
        log.info("domain restored", domain=domain, name=name, checkpoint=checkpoint,
                 dropped=list(rebuilt.dropped))
        return Restored(name, rebuilt.uuid, checkpoint, disks, nvram, tpm, rebuilt.dropped,
                        files.missing)


def rebuild(definition: str, name: str, disks: Mapping[str, tuple[Path, str]],
            nvram: Path | None) -> Rebuilt:
    """The backup's `definition` as a new domain `name`: a new UUID, no MAC addresses
    (libvirt makes them), each disk of `disks` (target -> restored file, format) a
    plain file, other disks left out (CD-ROMs and floppies keep their media), the
    NVRAM `nvram`."""
    domain = ET.fromstring(definition)
    _set(domain, "name", name)
    uuid = str(uuids.uuid4())
    _set(domain, "uuid", uuid)
    for element in domain.findall("genid"):  # a clone must not claim the original's
        domain.remove(element)
    metadata = domain.find("metadata")
    if metadata is not None:
        # The original's chains: the new domain's disks hold no bitmap of theirs.
        for element in metadata.findall(f"{{{CHAINS_NS}}}chains"):
            metadata.remove(element)
    dropped = []
    devices = domain.find("devices")
    if devices is not None:
        for interface in devices.findall("interface"):
            for mac in interface.findall("mac"):
                interface.remove(mac)
        for disk in devices.findall("disk"):
            target = disk.find("target")
            dev = target.get("dev", "") if target is not None else ""
            if dev in disks:
                _as_file(disk, *disks[dev])
            elif disk.get("device") not in ("cdrom", "floppy"):
                devices.remove(disk)
                dropped.append(dev)
    if nvram is not None:
        os_ = domain.find("os")
        if os_ is None:
            raise RepositoryError(domainfiles.DEFINITION, "has an NVRAM but no <os>")
        found = os_.find("nvram")
        element = ET.SubElement(os_, "nvram") if found is None else found
        for child in list(element):
            element.remove(child)
        element.attrib.pop("type", None)
        element.text = str(nvram)
    return Rebuilt(ET.tostring(domain, encoding="unicode"), uuid, tuple(dropped))


def _set(parent: ET.Element, tag: str, text: str) -> None:
    element = parent.find(tag)
    if element is None:
        element = ET.SubElement(parent, tag)
    element.text = text


def _as_file(disk: ET.Element, path: Path, fmt: str) -> None:
    disk.set("type", "file")
    for child in list(disk):
        if child.tag in ("source", "backingStore", "auth", "reservations"):
            disk.remove(child)
    disk.insert(0, ET.Element("source", file=str(path)))
    driver = disk.find("driver")
    if driver is None:
        driver = ET.SubElement(disk, "driver", name="qemu")
    driver.set("type", fmt)


def install_tpm(files: DomainFiles, uuid: str, state_dir: Path, swtpm_user: str
                ) -> Path | None:
    """Put the backup's TPM state where libvirt's swtpm looks for the domain `uuid`, owned
    by swtpm's user (libvirt does not give it the files it finds there); None if it has
    none (blocking). Raises RepositoryError if it cannot."""
    tpm = files.tpm()
    if not tpm:
        return None
    folder = domainfiles.swtpm_folder(state_dir, uuid)
    try:
        owner = pwd.getpwnam(swtpm_user)
    except KeyError:
        raise RepositoryError(str(folder), f"the TPM's state cannot go there: no user "
                                           f"{swtpm_user!r} ([libvirt] swtpm_user)") from None
    try:
        folder.parent.mkdir(parents=True, exist_ok=True, mode=0o711)  # as libvirt makes it
        folder.mkdir()
        folder.chmod(0o711)  # whatever our umask: swtpm's user passes through
    except OSError as e:
        raise RepositoryError(str(folder), f"the TPM's state cannot go there: "
                                           f"{e.strerror or e}") from None
    try:
        for name, data in tpm.items():
            path = domainfiles.inside(folder, name)
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            write_new(path, data)
        tree = [*folder.rglob("*")]
        for path in tree:
            os.chown(path, owner.pw_uid, owner.pw_gid, follow_symlinks=False)
        # On disk before the domain that reads them is defined: each folder's entries.
        for path in [folder.parent, folder, *(p for p in tree if p.is_dir())]:
            fsync_dir(path)
    except OSError as e:
        shutil.rmtree(folder, ignore_errors=True)
        raise RepositoryError(str(folder), f"the TPM's state cannot go there: "
                                           f"{e.strerror or e}") from None
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return folder


def _create(path: Path, data: bytes) -> os.stat_result:
    """A new file at `path`, in the folder the caller checked, holding `data`, on disk."""
    try:
        fd = create_in(path.parent, path.name)
    except FileExistsError:
        raise InvalidParameter("dir", f"{path.name} exists there; restore never overwrites "
                                      "a file") from None
    except Moved:
        raise InvalidParameter("dir", "the folder moved as the restore went on (a link on "
                                      "its way); restore again") from None
    except OSError as e:
        raise InvalidParameter("dir", f"{path.name} cannot be created there: "
                                      f"{e.strerror}") from None
    try:
        fill(fd, path, data, sync=True)
        return os.fstat(fd)
    finally:
        os.close(fd)


def _remove(made: list[tuple[Path, os.stat_result]], tpm: Path | None) -> None:
    for path, identity in made:
        unlink_same(path, identity)
    if tpm is not None:
        shutil.rmtree(tpm, ignore_errors=True)
