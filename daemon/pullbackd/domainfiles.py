"""A domain's own files at a backup: its definition, its NVRAM, its TPM's state.

Disks are not all a domain needs to come back as it was. Every backup also
captures, as it begins (`Reader.capture`):

    definition.xml       the persistent definition (`virsh dumpxml --inactive`):
                         devices, firmware, MAC addresses. Without secrets
                         (console passwords): it leaves the host with the backup.
    nvram.fd             the UEFI variables (boot entries, Secure Boot keys): the
                         file `<os><nvram>` names (a running domain's live
                         definition names it even where firmware auto-selection
                         left it out of the persistent one), else libvirt's
                         default for a UEFI domain, `<state_dir>/qemu/nvram/<name>_VARS.fd`.
                         None before the domain's first start: libvirt makes it
                         from its template then.
    tpm/...              an emulated TPM's persistent state (its seeds, sealed
                         keys): the files of swtpm's folder `<state_dir>/swtpm/<uuid>/`.

`state_dir` ([libvirt] state_dir) is where pullbackd sees libvirt's
/var/lib/libvirt: the same folder on a host. A path libvirt names under
/var/lib/libvirt is read under `state_dir`.

A file that cannot be read does not fail the backup: its disks are still good.
`DomainFiles.missing` says what is missing and why (the job warns of it).

In the repository, a backup's files are a folder of their own (`save`), written
as `<folder>.partial` and renamed once complete and durable, with a manifest
(`files.json`: each file's size and sha256, and what is missing) written last
inside it; `load` and `verify` check every file against it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import stat
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import anyio

from .durable import fsync_dir, makedirs, write_new
from .errors import PullbackError, RepositoryError
from .virt import Definition, Virt

DEFINITION = "definition.xml"
NVRAM = "nvram.fd"
TPM = "tpm"
MANIFEST = "files.json"
#: Where libvirt keeps its state; read under [libvirt] state_dir.
LIBVIRT_STATE = PurePosixPath("/var/lib/libvirt")
#: No NVRAM or TPM state is near this; a file that is is not what we look for.
LARGEST = 128 << 20
#: Bytes of a file one ReadDomainFile reply carries (base64 makes them 4/3 as many).
CHUNK = 256 << 10


@dataclass(frozen=True)
class DomainFiles:
    #: Name (DEFINITION, NVRAM, "tpm/<path in swtpm's folder>") -> contents.
    files: Mapping[str, bytes] = field(default_factory=dict)
    #: What could not be captured, and why.
    missing: tuple[str, ...] = ()

    @property
    def definition(self) -> str | None:
        data = self.files.get(DEFINITION)
        return data.decode() if data is not None else None

    def listing(self) -> list[dict[str, object]]:
        """Each file's name, size and sha256, for appliances to check what they read."""
        return [{"name": name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
                for name, data in sorted(self.files.items())]

    def tpm(self) -> dict[str, bytes]:
        """The TPM's state: its files by their path in swtpm's folder."""
        prefix = TPM + "/"
        return {n.removeprefix(prefix): d for n, d in self.files.items() if n.startswith(prefix)}

    def to_record(self) -> str:
        return json.dumps({"missing": list(self.missing), "files": {
            name: base64.b64encode(data).decode() for name, data in self.files.items()}})

    @classmethod
    def from_record(cls, text: str) -> DomainFiles:
        record = json.loads(text)
        return cls({name: base64.b64decode(data) for name, data in record["files"].items()},
                   tuple(record["missing"]))


class Reader:
    """Captures domains' files through libvirt and from the host."""

    def __init__(self, virt: Virt, state_dir: Path) -> None:
        self._virt = virt
        self._state_dir = state_dir

    async def capture(self, domain: str, definition: Definition | None = None) -> DomainFiles:
        """The domain's files now, those of `definition` if given (read with the domain's
        plan). Raises nothing: what it cannot get is `missing`."""
        try:
            definition = definition or await self._virt.definition(domain)
        except PullbackError as e:
            return DomainFiles(missing=(f"{DEFINITION}: {e}",))
        return await anyio.to_thread.run_sync(read, definition, self._state_dir)


def read(definition: Definition, state_dir: Path) -> DomainFiles:
    """The files `definition` names, read from the host (blocking)."""
    files = {DEFINITION: definition.inactive.encode()}
    missing = []
    persistent = ET.fromstring(definition.inactive)
    live = ET.fromstring(definition.live) if definition.live else None
    try:
        nvram = nvram_path(persistent, live, state_dir)
    except ValueError as e:
        missing.append(f"{NVRAM}: {e}")
        nvram = None
    if nvram is not None:
        try:
            files[NVRAM] = _read(nvram)
        except FileNotFoundError:
            if _names_nvram(live if live is not None else persistent):
                missing.append(f"{NVRAM}: {nvram} does not exist")
            # Else a UEFI domain that never started: libvirt makes it from its template.
        except OSError as e:
            missing.append(f"{NVRAM}: cannot read {nvram}: {e.strerror or e}")
    tpm = tpm_folder(persistent, state_dir)
    if tpm is not None:
        try:
            files |= {f"{TPM}/{name}": data for name, data in _read_tree(tpm).items()}
        except OSError as e:
            missing.append(f"{TPM}: cannot read {tpm}: {e.strerror or e}")
    return DomainFiles(files, tuple(missing))


def seen(path: str, state_dir: Path) -> Path:
    """Where pullbackd finds a file libvirt names `path`."""
    p = PurePosixPath(path)
    if p.is_relative_to(LIBVIRT_STATE):
        return state_dir / p.relative_to(LIBVIRT_STATE)
    return Path(path)


def _names_nvram(domain: ET.Element) -> bool:
    return domain.find("os/nvram") is not None


def nvram_path(persistent: ET.Element, live: ET.Element | None, state_dir: Path) -> Path | None:
    """The domain's NVRAM file, None if it has none (BIOS). Raises ValueError for an
    NVRAM that is not a file."""
    for domain in (live, persistent):
        element = None if domain is None else domain.find("os/nvram")
        if element is None:
            continue
        if element.get("type", "file") != "file":
            raise ValueError(f"an NVRAM of type {element.get('type')!r} is not a file")
        source = element.find("source")
        path = (source.get("file") if source is not None else element.text) or ""
        if path.strip():
            return seen(path.strip(), state_dir)
    os_ = persistent.find("os")
    loader = persistent.find("os/loader")
    if (os_ is not None and os_.get("firmware") == "efi") or \
            (loader is not None and loader.get("type") == "pflash"
             and loader.get("readonly") == "yes"):
        name = persistent.findtext("name", "")
        return state_dir / "qemu" / "nvram" / f"{name}_VARS.fd"
    return None


def tpm_folder(persistent: ET.Element, state_dir: Path) -> Path | None:
    """swtpm's state folder of an emulated TPM, None if the domain has none."""
    if persistent.find("devices/tpm/backend[@type='emulator']") is None:
        return None
    return swtpm_folder(state_dir, persistent.findtext("uuid", ""))


def swtpm_folder(state_dir: Path, uuid: str) -> Path:
    """Where libvirt's swtpm keeps the TPM state of the domain `uuid`."""
    return state_dir / "swtpm" / uuid


def _read(path: Path) -> bytes:
    """A regular file's contents, whatever links lead to it (libvirt's paths are the
    host administrator's)."""
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise OSError(0, "not a regular file")
        if st.st_size > LARGEST:
            raise OSError(0, f"larger than {LARGEST} bytes")
        return f.read(LARGEST + 1)


def _read_tree(folder: Path) -> dict[str, bytes]:
    """Every regular file under `folder` (but swtpm's lock), by its relative path. A
    folder that does not exist holds nothing: the TPM was never started."""
    if not folder.exists():
        return {}
    found = {}
    for path in sorted(folder.rglob("*")):
        if path.is_symlink() or not path.is_file() or path.name == ".lock":
            continue
        found[path.relative_to(folder).as_posix()] = _read(path)
    return found


# In the repository.


def save(folder: Path, files: DomainFiles) -> None:
    """Store `files` in the new folder `folder`, durably, all or nothing (blocking)."""
    partial = partial_of(folder)
    shutil.rmtree(partial, ignore_errors=True)  # a crash's leftover
    makedirs(partial.parent)  # a new domain's or consumer's folders too, on disk
    partial.mkdir(mode=0o700)
    sums = {}
    for name, data in files.files.items():
        path = inside(partial, name)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_new(path, data)
        sums[name] = hashlib.sha256(data).hexdigest()
    write_new(partial / MANIFEST, json.dumps(
        {"files": sums, "missing": list(files.missing)}, indent=1).encode())
    for sub in sorted({p.parent for p in partial.rglob("*")}, reverse=True):
        fsync_dir(sub)
    os.rename(partial, folder)
    fsync_dir(folder.parent)


def load(folder: Path) -> DomainFiles:
    """The files stored in `folder`; RepositoryError if one is damaged or missing."""
    manifest = _manifest(folder)
    files = {}
    for name, digest in manifest["files"].items():
        data = inside(folder, name).read_bytes()
        if hashlib.sha256(data).hexdigest() != digest:
            raise RepositoryError(str(folder / name), "differs from what was written")
        files[name] = data
    return DomainFiles(files, tuple(manifest["missing"]))


def verify(folder: Path) -> list[str]:
    """What is damaged or missing in `folder` (blocking)."""
    try:
        load(folder)
    except (RepositoryError, OSError) as e:
        return [str(e)]
    return []


def _manifest(folder: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise RepositoryError(str(folder / MANIFEST), f"cannot be read: {e}") from None
    if not isinstance(manifest, dict):
        raise RepositoryError(str(folder / MANIFEST), "is not a manifest")
    return manifest


def partial_of(folder: Path) -> Path:
    return folder.with_name(folder.name + ".partial")


def inside(folder: Path, name: str) -> Path:
    """`folder/name`, for a name of ours (never "..", never absolute)."""
    parts = PurePosixPath(name).parts
    if not parts or any(p in ("", ".", "..") for p in parts) or PurePosixPath(name).is_absolute():
        raise RepositoryError(name, "not a name of a domain file")
    return folder.joinpath(*parts)
