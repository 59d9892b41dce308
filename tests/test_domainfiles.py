"""The domain's own files: its definition, NVRAM and TPM state, backed up with its disks
(domainfiles.py) and brought back with them (rebuild.py).

The lab tests run a UEFI domain (Debian's OVMF) with an emulated TPM (swtpm): the
daemon reads libvirt's state folder of the lab ([libvirt] state_dir), as it reads
/var/lib/libvirt on a host.
"""

from __future__ import annotations

import base64
import hashlib
import pwd
import shutil
import subprocess
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pullbackd import crash, domainfiles
from pullbackd import rebuild as rebuild_module
from pullbackd.domainfiles import DEFINITION, NVRAM, DomainFiles, read, save
from pullbackd.errors import InvalidParameter, RepositoryError
from pullbackd.rebuild import install_tpm, rebuild
from pullbackd.repository import Repository
from pullbackd.virt import Definition

from .conftest import DISK_SIZE, Daemon, Lab, serving, start_daemon, stop_daemon
from .test_chains import domain_like, virsh
from .test_crash import crashed
from .test_lifecycle import pullbackctl

DOMAIN = "uefi1"
MiB = 1 << 20


def uefi_definition(name: str, nvram: str | None = None, tpm: bool = True) -> str:
    os_ = "<os firmware='efi'><type arch='x86_64' machine='pc'>hvm</type>" + (
        f"<nvram template='/usr/share/OVMF/OVMF_VARS_4M.fd'>{nvram}</nvram>" if nvram else ""
    ) + "</os>"
    return (f"<domain type='qemu'><name>{name}</name>"
            "<uuid>0d6f8c1e-5e1b-4d35-9d59-3a1f6f0e6a11</uuid>" + os_ +
            "<devices><disk type='block' device='disk'><driver name='qemu' type='raw'/>"
            "<source dev='/dev/vg/root'/><target dev='vda' bus='virtio'/></disk>"
            "<disk type='file' device='disk'><source file='/srv/data.qcow2'/>"
            "<target dev='vdb' bus='virtio'/></disk>"
            "<disk type='file' device='cdrom'><source file='/srv/install.iso'/>"
            "<target dev='sda' bus='sata'/></disk>"
            "<interface type='network'><mac address='52:54:00:12:34:56'/>"
            "<source network='default'/></interface>"
            + ("<tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>"
               if tpm else "") + "</devices></domain>")


# What a backup reads, and from where.


def test_a_backup_reads_the_nvram_and_tpm_state_libvirt_names(tmp_path: Path) -> None:
    """The NVRAM path libvirt names under /var/lib/libvirt is read under state_dir, and
    swtpm's folder of the domain's UUID; the definition is libvirt's, unchanged."""
    state = tmp_path / "libvirt"
    nvram = state / "qemu" / "nvram" / "vm_VARS.fd"
    nvram.parent.mkdir(parents=True)
    nvram.write_bytes(b"\x01" * 4096)
    tpm = state / "swtpm" / "0d6f8c1e-5e1b-4d35-9d59-3a1f6f0e6a11" / "tpm2"
    tpm.mkdir(parents=True)
    (tpm / "tpm2-00.permall").write_bytes(b"seed")
    (tpm / ".lock").write_bytes(b"")
    xml = uefi_definition("vm", "/var/lib/libvirt/qemu/nvram/vm_VARS.fd")
    files = read(Definition(xml, None), state)
    assert files.missing == ()
    assert files.files == {DEFINITION: xml.encode(), NVRAM: b"\x01" * 4096,
                           "tpm/tpm2/tpm2-00.permall": b"seed"}
    assert files.tpm() == {"tpm2/tpm2-00.permall": b"seed"}
    # Firmware auto-selection: the persistent definition names no NVRAM; libvirt's
    # default path is read all the same.
    assert read(Definition(uefi_definition("vm", tpm=False), None), state).files[NVRAM] == \
        b"\x01" * 4096


def test_what_cannot_be_read_is_missing_and_says_why(tmp_path: Path) -> None:
    state = tmp_path / "libvirt"
    gone = tmp_path / "gone_VARS.fd"
    files = read(Definition(uefi_definition("vm", str(gone), tpm=False), None), state)
    assert files.missing == (f"nvram.fd: {gone} does not exist",)
    assert set(files.files) == {DEFINITION}
    folder = tmp_path / "folder_VARS.fd"
    folder.mkdir()
    files = read(Definition(uefi_definition("vm", str(folder), tpm=False), None), state)
    assert len(files.missing) == 1 and "cannot read" in files.missing[0], files.missing
    # A UEFI domain that never started has no NVRAM yet: nothing is missing.
    files = read(Definition(uefi_definition("new", tpm=False), None), state)
    assert (files.missing, set(files.files)) == ((), {DEFINITION})
    bios = "<domain><name>bios</name><os><type>hvm</type></os></domain>"
    assert read(Definition(bios, None), state) == DomainFiles({DEFINITION: bios.encode()})


# In the repository.


def test_stored_files_load_and_damage_is_found(tmp_path: Path) -> None:
    files = DomainFiles({DEFINITION: b"<domain/>", NVRAM: bytes(range(256)) * 100,
                         "tpm/tpm2/tpm2-00.permall": b"seed"}, ("nothing",))
    folder = tmp_path / ".domain" / "pullbackd.default.0123456789ab"
    save(folder, files)
    assert domainfiles.load(folder) == files
    assert domainfiles.verify(folder) == []
    assert not domainfiles.partial_of(folder).exists()
    damaged = bytearray((folder / NVRAM).read_bytes())
    damaged[1000] ^= 0xFF
    (folder / NVRAM).write_bytes(damaged)
    [problem] = domainfiles.verify(folder)
    assert "nvram.fd: differs from what was written" in problem
    with pytest.raises(RepositoryError):
        domainfiles.load(folder)


def test_names_of_files_stay_inside_their_folder(tmp_path: Path) -> None:
    for name in ("../escape", "/etc/passwd", "tpm/../../x", ""):
        with pytest.raises(RepositoryError):
            save(tmp_path / f"f{len(name)}", DomainFiles({name: b"x"}))
    assert not (tmp_path.parent / "escape").exists()


def test_the_files_of_a_backup_that_did_not_complete_go_with_it(tmp_path: Path) -> None:
    """forget_job removes a failed job's files; recover removes a save cut short (and the
    files of a backup no disk lists: tests/test_repository.py); a prune that dropped every
    disk of a backup drops its files."""
    repository = Repository(tmp_path / "repo", tmp_path / "sockets", 1 << 20)
    failed = repository.files_folder("vm", "default", "pullbackd.default.0123456789ab")
    kept = repository.files_folder("vm", "default", "pullbackd.default.ba9876543210")
    save(failed, DomainFiles({DEFINITION: b"<domain/>"}))
    save(kept, DomainFiles({DEFINITION: b"<domain/>"}))
    repository.forget_job("vm", "default", "0123456789ab")
    assert not failed.exists() and kept.exists()
    partial = domainfiles.partial_of(failed)
    partial.mkdir()
    repository.recover()
    assert not partial.exists()
    # A prune dropped the backup at that checkpoint, and no disk keeps one there.
    save(kept, DomainFiles({DEFINITION: b"<domain/>"}))
    repository.drop_files("vm", "default", ["pullbackd.default.ba9876543210"])
    assert not kept.exists()


# Restore.


def test_a_rebuilt_definition_is_a_new_domain_with_the_restored_files(tmp_path: Path) -> None:
    xml = uefi_definition("vm", "/var/lib/libvirt/qemu/nvram/vm_VARS.fd")
    rebuilt = rebuild(xml, "vm-restored", {"vdb": (tmp_path / "vm-restored.vdb.qcow2", "qcow2")},
                      tmp_path / "vm-restored.nvram.fd")
    domain = ET.fromstring(rebuilt.xml)
    assert domain.findtext("name") == "vm-restored"
    assert domain.findtext("uuid") == rebuilt.uuid != "0d6f8c1e-5e1b-4d35-9d59-3a1f6f0e6a11"
    assert domain.find("devices/interface/mac") is None
    disks = {d.find("target").get("dev"): d for d in domain.iterfind("devices/disk")}  # type: ignore[union-attr]
    assert set(disks) == {"vdb", "sda"} and rebuilt.dropped == ("vda",)
    assert disks["vdb"].find("source").get("file") == str(tmp_path / "vm-restored.vdb.qcow2")  # type: ignore[union-attr]
    assert disks["vdb"].find("driver").get("type") == "qcow2"  # type: ignore[union-attr]
    assert disks["sda"].find("source").get("file") == "/srv/install.iso"  # type: ignore[union-attr]
    nvram = domain.find("os/nvram")
    assert nvram is not None and nvram.text == str(tmp_path / "vm-restored.nvram.fd")
    assert nvram.get("template") == "/usr/share/OVMF/OVMF_VARS_4M.fd"


def test_a_restored_nvram_is_made_only_in_the_folder_checked(tmp_path: Path) -> None:
    """RestoreDomain's folder may be a user's, who swaps it for a link to root's folder
    once it was checked: the NVRAM was then made there, by name. It is made in the folder
    checked, or not at all; and removed only if it is still the file made."""
    folder = tmp_path / "user's"
    folder.mkdir()
    made = rebuild_module._create(folder / "vm-nvram.fd", b"vars")
    assert (folder / "vm-nvram.fd").read_bytes() == b"vars"
    with pytest.raises(InvalidParameter, match="exists there"):
        rebuild_module._create(folder / "vm-nvram.fd", b"other")

    roots = tmp_path / "root's"
    roots.mkdir()
    folder.rename(tmp_path / "moved")
    folder.symlink_to(roots)
    with pytest.raises(InvalidParameter, match="the folder moved"):
        rebuild_module._create(folder / "vm2-nvram.fd", b"vars")
    # A failed restore's cleaning up: root's file of the same name stays.
    (roots / "vm-nvram.fd").write_bytes(b"root's")
    rebuild_module._remove([(folder / "vm-nvram.fd", made)], None)
    assert [p.name for p in roots.iterdir()] == ["vm-nvram.fd"]
    assert (roots / "vm-nvram.fd").read_bytes() == b"root's"
    rebuild_module._remove([(tmp_path / "moved" / "vm-nvram.fd", made)], None)
    assert list((tmp_path / "moved").iterdir()) == []


def test_a_restored_tpm_state_goes_where_swtpm_looks(tmp_path: Path) -> None:
    files = DomainFiles({"tpm/tpm2/tpm2-00.permall": b"seed"})
    folder = install_tpm(files, "11111111-2222-3333-4444-555555555555", tmp_path, "nobody")
    assert folder == tmp_path / "swtpm" / "11111111-2222-3333-4444-555555555555"
    permall = folder / "tpm2" / "tpm2-00.permall"
    assert permall.read_bytes() == b"seed"
    nobody = pwd.getpwnam("nobody")
    assert folder.stat().st_mode & 0o777 == 0o711  # root's, but swtpm's user goes through
    for path in (permall.parent, permall):  # swtpm runs as that user
        assert (path.stat().st_uid, path.stat().st_gid) == (nobody.pw_uid, nobody.pw_gid)
    with pytest.raises(RepositoryError, match="cannot go there"):  # never over a state
        install_tpm(files, "11111111-2222-3333-4444-555555555555", tmp_path, "nobody")
    with pytest.raises(RepositoryError, match="no user"):
        install_tpm(files, "22222222-2222-3333-4444-555555555555", tmp_path, "no-such-user")
    assert not (tmp_path / "swtpm" / "22222222-2222-3333-4444-555555555555").exists()
    assert install_tpm(DomainFiles({DEFINITION: b""}), "x", tmp_path, "nobody") is None


# The lab: a UEFI domain with a TPM.


def efi_with_tpm(domain: ET.Element) -> None:
    os_ = domain.find("os")
    assert os_ is not None
    os_.set("firmware", "efi")
    features = domain.find("features")
    if features is None:
        features = ET.Element("features")
        domain.insert(list(domain).index(os_) + 1, features)
    if features.find("acpi") is None:  # UEFI needs it
        ET.SubElement(features, "acpi")
    devices = domain.find("devices")
    assert devices is not None
    tpm = ET.SubElement(devices, "tpm", model="tpm-crb")
    ET.SubElement(tpm, "backend", type="emulator", version="2.0")


@pytest.fixture(scope="module")
def daemon(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    with serving(tmp_path_factory.mktemp("pullbackd"), lab.uri,
                 libvirt=f'state_dir = "{lab.dir / "lib"}"') as d:
        yield d


@pytest.fixture
def uefi(lab: Lab, tmp_path: Path) -> Iterator[Path]:
    """A running UEFI domain with a TPM, its vda holding 3 MiB of data; its image."""
    image = tmp_path / "uefi-vda.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), str(DISK_SIZE)],
                   check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P 0x5a {MiB} {3 * MiB}",
                    str(image)], check=True, capture_output=True)
    with domain_like(lab, "lab1", DOMAIN, tmp_path, {"vda": (image, "qcow2")}, start=True,
                     edit=efi_with_tpm):
        yield image


def nvram_of(lab: Lab, name: str) -> Path:
    return lab.dir / "lib" / "qemu" / "nvram" / f"{name}_VARS.fd"


def tpm_state(lab: Lab, name: str) -> dict[str, bytes]:
    uuid = virsh(lab, "domuuid", name).strip()
    folder = lab.dir / "lib" / "swtpm" / uuid
    return {f"tpm/{p.relative_to(folder).as_posix()}": p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


def settled(path: Path, quiet: float = 3.0, timeout: float = 90.0) -> bytes:
    """The file's contents once it stayed the same for `quiet` seconds (OVMF writes its
    variables as it boots)."""
    deadline = time.monotonic() + timeout
    last, since = None, time.monotonic()
    while time.monotonic() < deadline:
        now = path.read_bytes() if path.exists() else None
        if now != last:
            last, since = now, time.monotonic()
        elif now is not None and time.monotonic() - since >= quiet:
            return now
        time.sleep(0.5)
    raise AssertionError(f"{path} did not settle in {timeout} s")


def read_file(daemon: Daemon, job: str, name: str) -> bytes:
    data, offset = b"", 0
    while offset is not None:
        reply = daemon.ctl.call("ReadDomainFile", id=job, name=name, offset=offset)
        data += base64.b64decode(reply["data"])
        offset = reply["next"]
    return data


def test_a_backup_keeps_the_domains_files_and_restore_brings_the_domain_back(
        daemon: Daemon, lab: Lab, uefi: Path, tmp_path: Path) -> None:
    """A running UEFI domain with a TPM, backed up into the repository: the backup holds
    its definition, its NVRAM as it was when the backup began, and its TPM's state, and
    gives them to appliances through the job. RestoreDomain defines a new domain with
    the restored disk, NVRAM and TPM state, and it starts."""
    for _ in range(5):
        # Read again each time: a completed backup writes its chain into the definition.
        definition = virsh(lab, "dumpxml", "--inactive", DOMAIN)
        nvram = settled(nvram_of(lab, DOMAIN))
        tpm = tpm_state(lab, DOMAIN)
        assert tpm, "swtpm keeps no state for the domain"
        job = daemon.ctl.job("Start", domain=DOMAIN, destination="local")
        job = daemon.ctl.wait(job["id"])
        assert job["state"] == "completed", job
        # Only if the guest did not write its variables meanwhile (OVMF, finding nothing
        # to boot, now and then does) is the NVRAM at backup start known: this.
        if nvram_of(lab, DOMAIN).read_bytes() == nvram:
            break
    else:
        raise AssertionError("the guest wrote its NVRAM during each of 5 backups")

    stored = daemon.repository / DOMAIN / "default" / ".domain" / job["checkpoint"]
    assert (stored / "nvram.fd").read_bytes() == nvram
    assert (stored / "definition.xml").read_text() == definition
    for name, data in tpm.items():
        assert (stored / name).read_bytes() == data, name

    assert daemon.ctl.call("Verify", domain=DOMAIN)["problems"] == []
    listing = daemon.ctl.call("DomainFiles", id=job["id"])
    assert listing["missing"] == []
    expected_files = {"definition.xml": (stored / "definition.xml").read_bytes(),
                      "nvram.fd": nvram} | tpm
    assert {f["name"]: (f["size"], f["sha256"]) for f in listing["files"]} == {
        name: (len(data), hashlib.sha256(data).hexdigest())
        for name, data in expected_files.items()}
    assert read_file(daemon, job["id"], "nvram.fd") == nvram  # 540672 bytes: 3 pieces
    saved = tmp_path / "saved"
    out = pullbackctl(daemon, "backup", "files", job["id"], "--to", str(saved))
    assert out.returncode == 0 and "saved" in out.stdout, out.stderr
    assert {p.relative_to(saved).as_posix(): p.read_bytes()
            for p in saved.rglob("*") if p.is_file()} == expected_files
    e = daemon.ctl.error("ReadDomainFile", id=job["id"], name="../state.db")
    assert e.short_name == "InvalidParameter"

    restore_and_start(daemon, lab, job, uefi, nvram, tpm, tmp_path)

    # Shut off: the backup reads the NVRAM libvirt keeps for the domain's next start.
    virsh(lab, "destroy", DOMAIN)
    offline = daemon.ctl.job("Start", domain=DOMAIN)
    try:
        assert offline["offline"], offline
        assert read_file(daemon, offline["id"], "nvram.fd") == nvram_of(lab, DOMAIN).read_bytes()
    finally:
        daemon.ctl.call("Abort", id=offline["id"])


def restore_and_start(daemon: Daemon, lab: Lab, job: dict[str, Any], image: Path,
                      nvram: bytes, tpm: dict[str, bytes], tmp_path: Path) -> None:
    """RestoreDomain of the job's backup: the disk, NVRAM and TPM state restored are the
    backup's, the new domain starts; a second restore under a taken name is refused."""
    restore = tmp_path / "restore"
    restore.mkdir()
    restored = daemon.ctl.call("RestoreDomain", domain=DOMAIN, name="uefi1-restored",
                               dir=str(restore))
    try:
        assert restored["checkpoint"] == job["checkpoint"]
        assert restored["dropped"] == [] and restored["missing"] == []
        [disk] = restored["disks"]
        expected = tmp_path / "expected.raw"
        subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", str(image), str(expected)],
                       check=True)
        subprocess.run(["qemu-img", "compare", "-q", "-F", "raw", disk["file"],
                        str(expected)], check=True, timeout=120)
        assert Path(restored["nvram"]).read_bytes() == nvram
        assert {f"tpm/{p.relative_to(restored['tpm']).as_posix()}": p.read_bytes()
                for p in Path(restored["tpm"]).rglob("*") if p.is_file()} == tpm
        definition = ET.fromstring(virsh(lab, "dumpxml", "--inactive", "uefi1-restored"))
        assert definition.findtext("uuid") == restored["uuid"] != virsh(
            lab, "domuuid", DOMAIN).strip()
        assert definition.findtext("os/nvram") == restored["nvram"]
        metadata = definition.find("metadata")
        assert metadata is None or len(metadata) == 0  # the original's chains are not its
        started = subprocess.run(["virsh", "-c", lab.uri, "start", "uefi1-restored"],
                                 capture_output=True, text=True, check=False)
        assert started.returncode == 0, started.stderr
        assert virsh(lab, "domstate", "uefi1-restored").strip() == "running"
        # The restored swtpm took the backup's state, rather than making a new TPM.
        assert tpm_state(lab, "uefi1-restored") == tpm
    finally:
        subprocess.run(["virsh", "-q", "-c", lab.uri, "destroy", "uefi1-restored"],
                       check=False, capture_output=True)
        subprocess.run(["virsh", "-q", "-c", lab.uri, "undefine", "uefi1-restored", "--nvram"],
                       check=False, capture_output=True)
    # A name that is taken is refused before anything is written.
    before = sorted(restore.iterdir())
    e = daemon.ctl.error("RestoreDomain", domain=DOMAIN, name=DOMAIN, dir=str(restore))
    assert (e.short_name, e.parameters) == ("InvalidParameter", {"parameter": "name"}), e
    assert sorted(restore.iterdir()) == before


def test_a_crash_between_the_files_and_the_disks_leaves_neither(
        lab: Lab, tmp_path: Path) -> None:
    """kill -9 once a streamed backup's domain files are stored (crash point
    commit.files), before its disks are committed: after the restart the job failed and
    the repository holds nothing of it."""
    base = tmp_path / "d"
    d = start_daemon(base, lab.uri, env={crash.ENV: "commit.files"})
    job = d.ctl.job("Start", domain="lab1", disks=["vda"], destination="local")
    crashed(d)
    d = start_daemon(base, lab.uri)
    try:
        job = d.ctl.wait(job["id"])
        assert job["state"] == "failed", job
        folder = d.repository / "lab1" / "default"
        assert not list(folder.glob(f".domain/*{job['id']}*")), list(folder.rglob("*"))
        assert not [m for m in folder.glob("*/*.json") if job["id"] in m.read_text()]
    finally:
        stop_daemon(d)
    shutil.rmtree(base, ignore_errors=True)
