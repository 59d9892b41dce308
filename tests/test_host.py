"""pullbackd as a host runs it: installed from its Debian package under a real systemd
(PID 1), beside Debian's libvirtd, with QEMU as `libvirt-qemu` and pullbackd as its own user.

The host lab (`scripts/lab host`) boots Debian on an overlay of `/`; the tests build the
package (`scripts/package`) and install it there with apt, as an operator would, with the
configuration it ships. They drive it only as an operator and an appliance would:
`systemctl`, `pullbackctl`, `kill`, `nbdcopy`, and compare bytes with `qemu-img compare`.
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
import shutil
import subprocess
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from .conftest import require_marker

pytestmark = pytest.mark.host

ROOT = Path(__file__).resolve().parent.parent
LAB = ROOT / "scripts" / "lab"
#: The host lab's folder, one per checkout (a CI clone's tests may run beside the work tree's);
#: it keeps the prepared layer, so only a checkout's first run installs libvirt-daemon-system.
HOST_DIR = Path("/var/tmp") / f"pullbackd-host-{hashlib.sha1(bytes(ROOT)).hexdigest()[:8]}"
#: Where the package is built, per checkout too: the host sees it through its overlay's lower
#: layer (the machine's `/`). Not in HOST_DIR, which `scripts/lab host up` claims empty.
PACKAGE_DIR = Path("/var/tmp") / f"pullbackd-package-{hashlib.sha1(bytes(ROOT)).hexdigest()[:8]}"
HOST_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
#: Inside the host: the tests' files (on the overlay, a real disk), and lab1's disk.
WORK = Path("/srv/pullbackd-test")
DISK = "/var/lib/libvirt/lab/disks/lab1-vda.qcow2"
SIZE = 256 << 20
#: A drop-in of the tests' own, removed after each use.
TEST_DROP_IN = "/etc/pullbackd/pullbackd.toml.d/50-test.toml"
#: An appliance that reads slowly: nbdcopy into a pipe drained at 1 MiB per argv[1] seconds.
SLOW_READER = ("import sys, time\n"
               "while chunk := sys.stdin.buffer.read(1 << 20):\n"
               "    sys.stdout.buffer.write(chunk)\n"
               "    time.sleep(float(sys.argv[1]))\n")


@dataclass
class Host:
    pid: int  # the host's systemd, PID 1 inside

    def argv(self, *command: str) -> list[str]:
        """A command run inside the host as its root would (what `scripts/lab host run` does)."""
        return ["nsenter", "-t", str(self.pid), "-m", "-p", "-r", "-w", "--", "/usr/bin/env",
                "-i", f"PATH={HOST_PATH}", "HOME=/root", "LANG=C.UTF-8", *command]

    def run(self, *command: str, input: str | None = None, check: bool = True,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(self.argv(*command), input=input, capture_output=True, text=True,
                              timeout=timeout, check=False)
        if check and proc.returncode != 0:
            raise AssertionError(f"in the host: {command} exited {proc.returncode}:\n"
                                 f"{proc.stdout}{proc.stderr}\n{self.journal()}")
        return proc

    def path(self, inside: Path | str) -> Path:
        """A path of the host's, seen from the machine."""
        return Path(f"/proc/{self.pid}/root") / str(inside).lstrip("/")

    def journal(self) -> str:
        # The socket unit's too: systemd says there why it closed or refused the socket.
        proc = subprocess.run(self.argv("journalctl", "-u", "pullbackd", "-u",
                                        "pullbackd.socket", "-n", "40", "--no-pager",
                                        "-o", "short-precise"),
                              capture_output=True, text=True, timeout=30, check=False)
        return f"--- journalctl -u pullbackd -u pullbackd.socket ---\n{proc.stdout}{proc.stderr}"

    def entries(self, *match: str) -> list[dict[str, str]]:
        """pullbackd's journal entries (JSON) that match every FIELD=VALUE of `match`."""
        return [json.loads(line) for line in self.run(
            "journalctl", "-u", "pullbackd", *match, "-o", "json", "--no-pager"
        ).stdout.splitlines()]

    def ctl(self, *args: str, user: str = "root") -> dict[str, Any]:
        """The installed pullbackctl, as `user`."""
        as_user = () if user == "root" else ("runuser", "-u", user, "--")
        reply: dict[str, Any] = json.loads(
            self.run(*as_user, "pullbackctl", "--json", *args).stdout)
        return reply

    def main_pid(self) -> int:
        return int(self.run("systemctl", "show", "-p", "MainPID", "--value",
                            "pullbackd").stdout)

    def write(self, offset: int, length: int, byte: int) -> None:
        """Write through lab1's own block backend, as its guest would (lab-facts.md)."""
        io = f'write -P {byte:#x} {offset} {length}'
        reply = self.run("virsh", "qemu-monitor-command", "lab1", "--hmp",
                         f'qemu-io -d /machine/peripheral/virtio-disk0/virtio-backend "{io}"')
        assert reply.stdout.strip() == "", reply.stdout  # HMP errors come back as text

    def snapshot(self, name: str) -> Path:
        """The disk as it is now (the guest writes nothing meanwhile), raw."""
        path = WORK / name
        self.run("qemu-img", "convert", "-U", "-f", "qcow2", "-O", "raw", DISK, str(path))
        return path

    def same(self, copy: Path | str, reference: Path, fmt: str = "raw") -> None:
        proc = self.run("qemu-img", "compare", "-f", fmt, "-F", "raw", str(copy),
                        str(reference), check=False)
        assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def package() -> Iterator[Path]:
    """pullbackd's Debian package, built from this tree (scripts/package)."""
    require_marker("host", "the host lab", "HOST_FIXTURES")
    shutil.rmtree(PACKAGE_DIR, ignore_errors=True)
    built = subprocess.run([str(ROOT / "scripts" / "package"), str(PACKAGE_DIR)],
                           capture_output=True, text=True, timeout=600, check=False)
    assert built.returncode == 0, f"scripts/package failed:\n{built.stderr}"
    yield Path(built.stdout.strip().splitlines()[-1])
    shutil.rmtree(PACKAGE_DIR, ignore_errors=True)


@pytest.fixture(scope="module")
def host(package: Path) -> Iterator[Host]:
    """The host lab with lab1 (one 256 MiB disk), pullbackd installed from its package (which
    starts it)."""
    require_marker("host", "the host lab", "HOST_FIXTURES")
    lab = [str(LAB), "host", "--dir", str(HOST_DIR)]
    try:
        # The first run in a checkout prepares the layer (apt): a minute at most, with a network.
        up = subprocess.run([*lab, "up", "--domains", "1", "--disks", "1", "--size", str(SIZE)],
                            capture_output=True, text=True, timeout=1200, check=False)
        assert up.returncode == 0, f"scripts/lab host up failed:\n{up.stderr}"
        env = dict(line.split("=", 1) for line in up.stdout.split())
        h = Host(int(env["HOST_PID"]))
        install(h, package)
        yield h
        h.run("systemctl", "stop", "pullbackd")
        assert h.run("systemctl", "is-failed", "pullbackd", check=False).stdout.strip() \
            == "inactive", h.journal()
    finally:
        down = subprocess.run([*lab, "down"], capture_output=True, text=True, timeout=120,
                              check=False)
        assert down.returncode == 0, f"scripts/lab host down failed:\n{down.stderr}"


def install(h: Host, package: Path, fresh: bool = True) -> None:
    """What an operator does: apt-get install the package (its dependencies are in the host
    lab's layer: no download)."""
    if fresh:
        # What the machine has at these paths shows through the overlay's lower layer
        # (removed here, in the host's upper layer alone).
        h.run("rm", "-rf", "/var/lib/pullbackd", "/etc/pullbackd", "/run/pullbackd")
        h.run("mkdir", "-p", str(WORK))
    h.run("apt-get", "install", "-y", "-q", "--no-install-recommends", str(package),
          timeout=300)


def start_backup(h: Host) -> tuple[str, str]:
    h.run("systemctl", "start", "pullbackd")  # started already, unless the test runs alone
    job = h.ctl("backup", "start", "lab1")["job"]
    assert job["state"] == "ready", job
    return job["id"], job["disks"][0]["url"]


def finish(h: Host, job_id: str) -> None:
    assert h.ctl("backup", "finish", job_id)["job"]["state"] == "completed"


def slow_read(h: Host, url: str, out: Path, pace: float = 0.015) -> subprocess.Popen[str]:
    """An appliance reading the export into `out` at 1 MiB per `pace` seconds (by default
    about 64 MiB/s); returns once 32 MiB are there."""
    reader = subprocess.Popen(
        h.argv("bash", "-o", "pipefail", "-c", f"nbdcopy {shlex.quote(url)} - | python3 -c "
               f"{shlex.quote(SLOW_READER)} {pace} > {out}"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not (h.path(out).exists() and h.path(out).stat().st_size >= 32 << 20):
        if reader.poll() is not None or time.monotonic() > deadline:
            reader.kill()
            raise AssertionError(f"the slow read: {reader.communicate()}")
        time.sleep(0.02)
    return reader


def test_the_package_installs_and_starts(host: Host) -> None:
    """apt-get install gives the programs, the units (enabled and started), the user, the
    conffile, the manual pages and the completion; pullbackd runs as its own user."""
    for program in ("pullbackd", "pullbackctl"):
        assert host.run("sh", "-c", f"command -v {program}").stdout.strip() == \
            f"/usr/bin/{program}"
    for unit in ("pullbackd.service", "pullbackd.socket"):
        assert host.run("systemctl", "is-enabled", unit).stdout.strip() == "enabled"
        assert host.run("systemctl", "is-active", unit).stdout.strip() == "active"
    groups = host.run("id", "-nG", "pullbackd").stdout.split()
    assert {"pullbackd", "libvirt", "libvirt-qemu"} <= set(groups), groups
    assert host.run("ps", "-o", "user=", "-p", str(host.main_pid())).stdout.strip() \
        == "pullbackd"
    conffiles = host.run("dpkg-query", "-W", "-f", "${Conffiles}", "pullbackd").stdout
    assert "/etc/pullbackd/pullbackd.toml " in conffiles, conffiles
    assert host.path("/etc/pullbackd/pullbackd.toml.d").is_dir()
    for page in ("man8/pullbackd.8.gz", "man1/pullbackctl.1.gz", "man5/pullbackd.toml.5.gz"):
        assert host.path(f"/usr/share/man/{page}").stat().st_size > 1000, page
    assert host.path("/usr/share/bash-completion/completions/pullbackctl").stat().st_size
    # libvirt's hook that names the job when a start of a domain backed up shut off is refused
    assert host.path("/etc/libvirt/hooks/qemu.d/pullbackd").stat().st_mode & 0o111
    # The control socket is the socket unit's: root's, for the group pullbackd.
    assert host.run("stat", "-c", "%a %U %G", "/run/pullbackd/control.sock").stdout.split() \
        == ["660", "root", "pullbackd"]


def test_the_unit_is_hardened(host: Host) -> None:
    """`systemd-analyze security` rates the unit at most 2.0 (the README lists each setting
    not at its safest, and why)."""
    report = host.run("systemd-analyze", "security", "--no-pager", "pullbackd.service").stdout
    score = re.search(r"Overall exposure level for pullbackd.service: ([0-9.]+)", report)
    assert score is not None, report
    print(report)
    assert float(score.group(1)) <= 2.0, report


def test_start_returns_once_the_socket_answers(host: Host) -> None:
    assert host.run("systemctl", "show", "-p", "Type", "--value", "pullbackd").stdout.strip() \
        == "notify"
    host.run("systemctl", "stop", "pullbackd")
    host.run("systemctl", "start", "pullbackd")
    # Right after start returns: no wait, no retry.
    assert host.ctl("jobs") == {"jobs": []}
    assert host.run("systemctl", "is-active", "pullbackd").stdout.strip() == "active"


def test_calls_wait_while_pullbackd_restarts(host: Host) -> None:
    """The socket is systemd's (pullbackd.socket): a call made while pullbackd is stopped
    starts it, and calls made during a restart wait for the new run; none fails."""
    host.run("systemctl", "stop", "pullbackd")
    assert host.ctl("jobs") == {"jobs": []}  # the call itself started pullbackd
    assert host.run("systemctl", "is-active", "pullbackd").stdout.strip() == "active"
    old_pid = host.main_pid()
    loop = ("for i in $(seq 40); do pullbackctl --json jobs >/dev/null || "
            "{ echo \"call $i failed\"; exit 1; }; done")
    calls = subprocess.Popen(host.argv("sh", "-c", loop), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    time.sleep(0.3)
    host.run("systemctl", "restart", "pullbackd")
    output, _ = calls.communicate(timeout=120)
    assert calls.returncode == 0, output + host.journal()
    assert host.main_pid() != old_pid


def test_pull_backup_as_libvirt_qemu(host: Host) -> None:
    """A full pull backup of lab1, QEMU running as libvirt-qemu: its scratch file is under
    pullbackd's state folder, which QEMU must be able to reach (issue 16)."""
    assert host.run("pgrep", "-u", "libvirt-qemu", "qemu-system", check=False).returncode == 0
    stripe = SIZE // 8  # all of it data: every byte an appliance reads crosses the relay
    for i in range(8):
        host.write(i * stripe, stripe, 0x11 * (i + 1))
    before = host.snapshot("before.raw")
    job_id, url = start_backup(host)
    host.write(0, 1 << 20, 0x77)  # after the backup began: into the scratch file, not the export
    copy = WORK / "full.raw"
    host.run("nbdcopy", url, str(copy))
    host.same(copy, before)
    finish(host, job_id)
    # The job's story, told by the journal alone: its entries carry its id as a field.
    story = host.entries(f"PULLBACKD_JOB={job_id}")
    told = [entry["MESSAGE"].split(" job=")[0] for entry in story]
    assert "backup started" in told and "backup ended" in told, told
    assert any(t.startswith("nbd session opened") for t in told), told
    ended = story[told.index("backup ended")]
    assert (ended["PULLBACKD_DOMAIN"], ended["PULLBACKD_STATE"], ended["PRIORITY"]) == (
        "lab1", "completed", "6")
    # Every line of the job's story names its domain and consumer too.
    assert all((e["PULLBACKD_DOMAIN"], e["PULLBACKD_CONSUMER"]) == ("lab1", "default")
               for e in story), [e["MESSAGE"] for e in story]
    # The state folder lets QEMU through to the scratch folder, and no one list it.
    assert host.run("stat", "-c", "%a %U", "/var/lib/pullbackd", "/var/lib/pullbackd/scratch"
                    ).stdout.split("\n")[:2] == ["711 pullbackd", "711 pullbackd"]


def test_push_and_local_backups_as_pullbackd(host: Host) -> None:
    """The other paths, pullbackd not root and QEMU libvirt-qemu: a push backup QEMU writes
    into the default [push] dir, and a copy pullbackd makes into its repository."""
    for i in range(4):
        host.write(i * (SIZE // 4), 1 << 20, 0x21 + i)
    reference = host.snapshot("paths-ref.raw")
    push = host.ctl("backup", "start", "lab1", "--target-dir", "/var/lib/pullbackd/push",
                    "--wait")["job"]
    assert push["state"] == "completed", push
    host.same(f"/var/lib/pullbackd/push/{push['id']}.vda.qcow2", reference, fmt="qcow2")
    local = host.ctl("backup", "start", "lab1", "--destination", "local", "--wait")["job"]
    assert local["state"] == "completed", local
    stored = sorted(host.path("/var/lib/pullbackd/repository/lab1/default/vda").glob("*.qcow2"))
    assert stored, local
    host.same(f"/var/lib/pullbackd/repository/lab1/default/vda/{stored[-1].name}", reference,
              fmt="qcow2")


def test_a_uefi_domains_nvram_and_tpm_state_are_read_past_their_owners(host: Host) -> None:
    """Debian's libvirt keeps a UEFI domain's NVRAM for QEMU's user and its TPM state for
    swtpm's, 0600: the unit's one capability (CAP_DAC_READ_SEARCH) lets pullbackd, not
    root, read both as the backup begins, byte for byte what libvirt keeps."""
    xml = host.run("virsh", "dumpxml", "--inactive", "lab1").stdout
    xml = re.sub(r"<uuid>.*?</uuid>", "", xml.replace("<name>lab1</name>", "<name>efi</name>"))
    xml = xml.replace("<os>", "<os firmware='efi'>").replace(
        "<devices>", "<devices><tpm model='tpm-crb'><backend type='emulator' version='2.0'/>"
                     "</tpm>")
    if "<acpi/>" not in xml:  # UEFI needs it
        xml = xml.replace("</os>", "</os><features><acpi/></features>", 1)
    disk = WORK / "efi.qcow2"
    xml = xml.replace(DISK, str(disk))
    host.run("qemu-img", "create", "-q", "-f", "qcow2", str(disk), "64M")
    host.run("chown", "libvirt-qemu:libvirt-qemu", str(disk))
    host.run("sh", "-c", f"cat > {WORK}/efi.xml", input=xml)
    host.run("virsh", "define", f"{WORK}/efi.xml")
    try:
        host.run("virsh", "start", "efi")
        nvram = host.path("/var/lib/libvirt/qemu/nvram/efi_VARS.fd")
        uuid = host.run("virsh", "domuuid", "efi").stdout.strip()
        permall = host.path(f"/var/lib/libvirt/swtpm/{uuid}/tpm2/tpm2-00.permall")
        # Until OVMF wrote its variables at boot: the same for 3 s.
        deadline, seen, since = time.monotonic() + 90, b"", time.monotonic()
        while time.monotonic() < deadline and time.monotonic() - since < 3:
            now = nvram.read_bytes() if nvram.exists() and permall.exists() else b""
            seen, since = (seen, since) if now == seen and now else (now, time.monotonic())
            time.sleep(0.5)
        assert nvram.stat().st_mode & 0o077 == 0 and permall.stat().st_mode & 0o077 == 0
        job = host.ctl("backup", "start", "efi", "--quiesce", "off")["job"]
        try:
            saved = WORK / f"files-{job['id']}"
            reply = host.ctl("backup", "files", job["id"], "--to", str(saved))
            assert reply["missing"] == [], reply
            # What the guest's firmware keeps is still what it was as the backup began.
            assert host.path(saved / "nvram.fd").read_bytes() == nvram.read_bytes()
            assert host.path(saved / "tpm/tpm2/tpm2-00.permall").read_bytes() == \
                permall.read_bytes()
        finally:
            host.ctl("backup", "abort", job["id"])
    finally:
        host.run("virsh", "destroy", "efi", check=False)
        host.run("virsh", "undefine", "efi", "--nvram", "--checkpoints-metadata")


def test_a_shut_off_domain_is_served_by_its_root_unit(host: Host) -> None:
    """Debian's libvirt gives a shut-off domain's images back to root, and its pools make
    them 0600: pullbackd's user can neither read nor write them (the service reads past
    permissions, and writes nothing). It has systemd run the job's qemu-storage-daemon as
    root (pullbackd-storage@JOB.service, which polkit lets it start), learns the images'
    bitmaps from it, and takes a deleted chain's bitmaps out through another: a full and
    an incremental while off are the disk, byte for byte, and the deleted chain leaves no
    bitmap in the image (it would record every write of the guest for nothing)."""
    host.run("chmod", "0600", DISK)
    try:
        host.write(0, 1 << 20, 0x5b)
        host.write(SIZE - (1 << 20), 1 << 20, 0x5c)
        shut_off(host)
        assert host.run("stat", "-c", "%U %a", DISK).stdout.strip() == "root 600"
        assert host.run("runuser", "-u", "pullbackd", "--", "test", "-r", DISK,
                        check=False).returncode != 0  # not pullbackd's to open
        full = offline_backup(host, "offline-full.raw")
        assert full["disks"][0]["mode"] == "full"
        host.run("virsh", "start", "lab1")
        host.write(8 << 20, 64 << 10, 0x5d)
        shut_off(host)
        incremental = offline_backup(host, "offline-incr.raw", "--mode", "incremental")
        assert (incremental["since"], incremental["disks"][0]["mode"]) == (
            full["checkpoint"], "incremental"), incremental
        host.ctl("chain", "delete", "lab1", "--consumer", "offline")
        info = json.loads(host.run("qemu-img", "info", "-U", "--output=json", DISK).stdout)
        left = [b["name"] for b in info["format-specific"]["data"].get("bitmaps", [])]
        assert not [b for b in left if ".offline." in b], left
        assert ".offline." not in host.run("virsh", "checkpoint-list", "lab1", "--name").stdout
    finally:
        host.run("virsh", "start", "lab1", check=False)
        host.run("chmod", "0644", DISK)


def test_a_shut_off_domains_block_disk_is_served_by_its_root_unit(host: Host) -> None:
    """A shut-off domain whose disk is a block device (an LVM volume, say: here a loop
    device), never started: the root unit opens the device, as libvirt names it, and the
    full backup is the device, byte for byte."""
    backing = WORK / "block.raw"
    host.run("truncate", "-s", "64M", str(backing))
    device = host.run("losetup", "--find", "--show", str(backing)).stdout.strip()
    root = ET.fromstring(host.run("virsh", "dumpxml", "--inactive", "lab1").stdout)
    for element in root.findall("uuid"):
        root.remove(element)
    name = root.find("name")
    assert name is not None
    name.text = "blocky"
    disk = root.find("devices/disk")
    assert disk is not None
    disk.set("type", "block")
    for child, attributes in (("driver", {"name": "qemu", "type": "raw"}),
                              ("source", {"dev": device})):
        found = disk.find(child)
        assert found is not None
        found.attrib.clear()
        found.attrib.update(attributes)
    host.run("sh", "-c", f"cat > {WORK}/blocky.xml", input=ET.tostring(root, encoding="unicode"))
    host.run("virsh", "define", f"{WORK}/blocky.xml")
    try:
        host.run("qemu-io", "-f", "raw", "-c", "write -q -P 0x6b 1M 3M", "-c",
                 "write -q -P 0x6c 60M 4M", device)
        job = host.ctl("backup", "start", "blocky")["job"]
        try:
            assert job["offline"] and job["state"] == "ready", job
            host.run("nbdcopy", job["disks"][0]["url"], str(WORK / "blocky.raw"))
            host.same(WORK / "blocky.raw", Path(device))
        finally:
            finish(host, job["id"])
    finally:
        host.run("virsh", "undefine", "blocky", "--checkpoints-metadata", check=False)
        host.run("losetup", "--detach", device, check=False)


def shut_off(host: Host) -> None:
    """lab1 shut off, what its guest wrote in its image."""
    host.run("virsh", "qemu-monitor-command", "lab1", "--hmp",
             'qemu-io -d /machine/peripheral/virtio-disk0/virtio-backend "flush"')
    host.run("virsh", "destroy", "lab1")


def offline_backup(host: Host, name: str, *options: str) -> dict[str, Any]:
    """A backup of the shut-off lab1 by the consumer `offline`, read whole by nbdcopy and
    compared with the disk; its job, finished."""
    reference = host.snapshot(f"ref-{name}")
    job: dict[str, Any] = host.ctl("backup", "start", "lab1", "--consumer", "offline",
                                   *options)["job"]
    unit = f"pullbackd-storage@{job['id']}.service"
    assert job["offline"] and job["state"] == "ready", job
    assert host.run("systemctl", "is-active", unit).stdout.strip() == "active"
    host.run("nbdcopy", job["disks"][0]["url"], str(WORK / name))
    host.same(WORK / name, reference)
    finish(host, job["id"])
    assert host.run("systemctl", "is-active", unit, check=False).stdout.strip() != "active"
    return job


def test_the_root_unit_serves_nothing_it_is_not_for(host: Host) -> None:
    """The attacker is pullbackd's own user (a daemon gone bad): it may start
    pullbackd-storage@ units, and no other unit; a unit asked for a running domain, or for
    a disk the domain does not have, opens nothing and fails. Anyone else may start none."""
    qemu = Path("/run/pullbackd/exports/.qemu")
    job = "a0a0a0a0a0a0"
    unit = f"pullbackd-storage@{job}.service"
    for spec in ({"domain": "lab1", "disks": [{"disk": "vda", "bitmap": True}]},  # it runs
                 {"domain": "lab1", "disks": [{"disk": "../../etc/shadow"}]},
                 {"domain": "nosuch", "disks": [{"disk": "vda"}]}):
        host.run("rm", "-f", *(f"{qemu}/{job}.{s}" for s in ("spec", "log", "pid")))
        host.run("runuser", "-u", "pullbackd", "--", "sh", "-c",
                 f"cat > {qemu}/{job}.spec", input=json.dumps(spec))
        host.run("runuser", "-u", "pullbackd", "--", "systemctl", "start", unit, check=False)
        deadline = time.monotonic() + 30
        while host.run("systemctl", "is-active", unit, check=False).stdout.strip() in \
                ("active", "activating") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert host.run("systemctl", "is-failed", unit, check=False).stdout.strip() == \
            "failed", spec
        assert "refused" in host.path(f"{qemu}/{job}.log").read_text(), spec
        assert not host.path(f"{qemu}/{job}.pid").exists()
        assert not host.path(f"{qemu}/{job}.sock").exists()
        host.run("systemctl", "reset-failed", unit)
    assert host.run("virsh", "domstate", "lab1").stdout.strip() == "running"
    for user, what in (("pullbackd", "ssh.service"), ("pullbackd", "pullbackd-storage@x.service"),
                       ("nobody", unit)):
        refused = host.run("runuser", "-u", user, "--", "systemctl", "start", what, check=False)
        assert refused.returncode != 0 and "authentication" in refused.stderr.lower(), \
            (user, what, refused.stderr)
    host.run("rm", "-f", *(f"{qemu}/{job}.{s}" for s in ("spec", "log", "pid")))


def test_reload_applies_what_it_can_and_names_the_rest(host: Host) -> None:
    """`systemctl reload`: [roles] change live (a member of the group pullbackd loses the right
    to start backups), a key that needs a restart is named, a drop-in that does not load
    changes nothing; the daemon is the same process throughout."""
    if host.run("id", "appliance", check=False).returncode != 0:
        host.run("useradd", "--system", "--groups", "pullbackd", "appliance")
    host.run("systemctl", "start", "pullbackd")
    pid = host.main_pid()
    # The packaged default role, backup: the appliance may start and abort (on a chain of
    # its own: root's "default" of lab1 is root's).
    job = host.ctl("backup", "start", "lab1", "--consumer", "appliance", user="appliance")["job"]
    host.ctl("backup", "abort", job["id"], user="appliance")
    try:
        host.run("sh", "-c", f"cat > {TEST_DROP_IN}",
                 input='[roles]\ndefault = "look"\n[stream]\nrequest_size = 1048576\n')
        reloaded = reload(host, "reloaded")
        assert "roles.default" in json.loads(reloaded["PULLBACKD_APPLIED"]), reloaded
        assert json.loads(reloaded["PULLBACKD_RESTART_NEEDED"]) == ["stream.request_size"]
        refused = host.run("runuser", "-u", "appliance", "--", "pullbackctl", "backup",
                           "start", "lab1", check=False)
        assert refused.returncode != 0 and "role (look) does not allow Start" in refused.stderr, \
            refused
        assert host.ctl("jobs", user="appliance")["jobs"] is not None  # look still may
        host.run("sh", "-c", f"cat > {TEST_DROP_IN}", input='[roles]\ndefault = "everything"\n')
        failed = reload(host, "reload failed")
        assert "roles.default" in failed["PULLBACKD_ERROR"], failed
        refused = host.run("runuser", "-u", "appliance", "--", "pullbackctl", "backup",
                           "start", "lab1", check=False)
        assert "role (look) does not allow Start" in refused.stderr, refused
        assert host.main_pid() == pid
    finally:
        host.run("rm", "-f", TEST_DROP_IN)
        reload(host, "reloaded")
    job = host.ctl("backup", "start", "lab1", "--consumer", "appliance", user="appliance")["job"]
    host.ctl("backup", "abort", job["id"], user="appliance")


def reload(host: Host, message: str) -> dict[str, str]:
    """`systemctl reload pullbackd`, then the journal entry that tells how it went."""
    cursor = host.run("journalctl", "-u", "pullbackd", "-n", "0", "--show-cursor",
                      "--no-pager").stdout.split("cursor: ")[-1].strip()
    host.run("systemctl", "reload", "pullbackd")
    deadline = time.monotonic() + 30
    while True:
        after = host.entries(f"--after-cursor={cursor}")
        found = [e for e in after if e["MESSAGE"].startswith(message)]
        if found:
            return found[-1]
        assert time.monotonic() < deadline, [e["MESSAGE"] for e in after]
        time.sleep(0.1)


@pytest.mark.parametrize("how", ["systemctl", "upgrade"])
def test_restart_while_an_appliance_reads(host: Host, package: Path, how: str) -> None:
    """`systemctl restart`, or the restart of an upgrade (`apt-get install --reinstall`: the
    service restarts, the socket does not), mid-read: the session goes through systemd's fd
    store and back."""
    reference = host.snapshot("restart-ref.raw")
    job_id, url = start_backup(host)
    old_pid = host.main_pid()
    out = WORK / f"slow-{how}.raw"
    # apt takes seconds more than systemctl: a slower appliance is still reading by then.
    reader = slow_read(host, url, out, pace=0.015 if how == "systemctl" else 0.06)
    restart = ["systemctl", "restart", "pullbackd"] if how == "systemctl" else [
        "apt-get", "install", "-y", "-q", "--reinstall", str(package)]
    try:
        began = time.monotonic()
        host.run(*restart, timeout=300)
        took = time.monotonic() - began
        assert host.path(out).stat().st_size < SIZE, "the read ended before the restart"
        assert reader.poll() is None, "the read ended during the restart"
        stdout, stderr = reader.communicate(timeout=60)
    finally:
        if reader.poll() is None:
            reader.kill()
            reader.wait()
    assert reader.returncode == 0, stdout + stderr + host.journal()
    host.same(out, reference)
    assert host.main_pid() != old_pid
    job = host.ctl("show", job_id)["job"]
    assert job["state"] == "ready", job
    assert job["appliance"]["total"] == 1, job["appliance"]  # one session, never cut
    assert job["appliance"]["bytes_read"] == SIZE, job["appliance"]
    print(f"{shlex.join(restart)} took {took:.2f} s")
    finish(host, job_id)


def test_kill_9_then_systemd_restarts_and_adopts(host: Host) -> None:
    """kill -9 mid-read: Restart=on-failure brings pullbackd back, it adopts the job, and the
    appliance's new read of the same URI is identical."""
    reference = host.snapshot("kill-ref.raw")
    job_id, url = start_backup(host)
    old_pid = host.main_pid()
    reader = slow_read(host, url, WORK / "cut.raw")
    try:
        host.run("kill", "-9", str(old_pid))
        _, said = reader.communicate(timeout=60)
    finally:
        if reader.poll() is None:
            reader.kill()
            reader.wait()
    # A crash cuts the sessions (nothing was handed to systemd); the appliance reads again.
    assert reader.returncode != 0, "the read went on through a kill -9"
    print(f"the appliance, cut: {said.strip()}")
    deadline = time.monotonic() + 30
    while True:  # Restart=on-failure (RestartSec 100 ms), then READY=1
        state = host.run("systemctl", "show", "-p", "ActiveState,SubState,MainPID",
                         "pullbackd").stdout.split()
        if f"MainPID={old_pid}" not in state and "SubState=running" in state:
            break
        assert time.monotonic() < deadline, state
        time.sleep(0.1)
    assert host.run("systemctl", "show", "-p", "NRestarts", "--value",
                    "pullbackd").stdout.strip() != "0"
    job = host.ctl("show", job_id)["job"]
    assert job["state"] == "ready", job
    assert job["disks"][0]["url"] == url
    copy = WORK / "after-kill.raw"
    host.run("nbdcopy", url, str(copy))
    host.same(copy, reference)
    finish(host, job_id)


def test_stop_then_start_adopts_the_ready_job(host: Host) -> None:
    """`systemctl stop` with a ready job, then `start`: the job is adopted, and reads the same."""
    reference = host.snapshot("stop-ref.raw")
    job_id, url = start_backup(host)
    host.run("systemctl", "stop", "pullbackd")
    assert host.run("systemctl", "is-active", "pullbackd", check=False).stdout.strip() \
        == "inactive"
    host.run("systemctl", "start", "pullbackd")
    job = host.ctl("show", job_id)["job"]
    assert (job["state"], job["disks"][0]["url"]) == ("ready", url), job
    copy = WORK / "after-stop.raw"
    host.run("nbdcopy", url, str(copy))
    host.same(copy, reference)
    finish(host, job_id)


def wait_running(host: Host, old_pid: int, seconds: float = 60) -> None:
    """Until systemd runs pullbackd again, in a process other than `old_pid`."""
    deadline = time.monotonic() + seconds
    while True:
        state = host.run("systemctl", "show", "-p", "ActiveState,SubState,MainPID",
                         "pullbackd").stdout.split()
        if f"MainPID={old_pid}" not in state and "SubState=running" in state:
            return
        assert time.monotonic() < deadline, f"{state}\n{host.journal()}"
        time.sleep(0.1)


def test_a_restart_of_libvirtd_is_survived(host: Host) -> None:
    """`systemctl restart libvirtd` during a ready backup: pullbackd exits for a restart,
    systemd starts it again, and the job is adopted (libvirt kept it) or ended honestly with
    nothing of it left."""
    reference = host.snapshot("libvirtd-ref.raw")
    job_id, url = start_backup(host)
    old_pid = host.main_pid()
    host.run("systemctl", "restart", "libvirtd")
    wait_running(host, old_pid)
    job = host.ctl("show", job_id)["job"]
    if job["state"] == "ready":
        copy = WORK / "after-libvirtd.raw"
        host.run("nbdcopy", url, str(copy))
        host.same(copy, reference)
        finish(host, job_id)
    else:
        assert job["state"] == "failed" and job["error"], job
        assert host.run("virsh", "domjobinfo", "lab1").stdout.split()[:3] == \
            ["Job", "type:", "None"]
        assert job["checkpoint"] not in host.run("virsh", "checkpoint-list", "lab1",
                                                 "--name").stdout
        assert not list(host.path("/var/lib/pullbackd/scratch").glob(f"{job_id}.*"))
    print(f"after libvirtd's restart the job was {job['state']}")
    # And the next backup works.
    job_id, url = start_backup(host)
    copy = WORK / "next.raw"
    host.run("nbdcopy", url, str(copy))
    host.same(copy, host.snapshot("next-ref.raw"))
    finish(host, job_id)


def test_a_hung_pullbackd_is_restarted_by_the_watchdog(host: Host) -> None:
    """SIGSTOP: the watchdog pings stop, systemd restarts pullbackd. (The test shortens
    WatchdogSec, and the wait for the hung process's abort, by a drop-in.)"""
    drop_in = "/etc/systemd/system/pullbackd.service.d/watchdog.conf"
    host.run("mkdir", "-p", "/etc/systemd/system/pullbackd.service.d")
    host.run("sh", "-c", f"cat > {drop_in}", input="[Service]\nWatchdogSec=2\n"
                                                     "TimeoutAbortSec=2\n")
    try:
        host.run("systemctl", "daemon-reload")
        host.run("systemctl", "restart", "pullbackd")
        old_pid = host.main_pid()
        time.sleep(3)  # pings keep it alive past WatchdogSec
        assert host.main_pid() == old_pid, host.journal()
        host.run("kill", "-STOP", str(old_pid))
        wait_running(host, old_pid, seconds=30)
        assert "Watchdog timeout" in host.run("journalctl", "-u", "pullbackd", "--no-pager",
                                              "-n", "50").stdout
        assert host.ctl("jobs")["jobs"] is not None
    finally:
        host.run("rm", "-f", drop_in)
        host.run("systemctl", "daemon-reload")
        host.run("systemctl", "restart", "pullbackd")


def test_purge_keeps_the_backups(host: Host, package: Path) -> None:
    """apt-get purge removes what the package and pullbackd made for themselves, and keeps the
    repository's backups (they go only when asked); installing again works."""
    assert list(host.path("/var/lib/pullbackd/repository").rglob("*.qcow2")), \
        "no backup in the repository to keep (test_push_and_local_backups_as_pullbackd)"
    host.run("apt-get", "purge", "-y", "-q", "pullbackd", timeout=300)
    for unit in ("pullbackd.service", "pullbackd.socket"):
        assert host.run("systemctl", "is-active", unit, check=False).stdout.strip() \
            == "inactive"
    assert host.run("pgrep", "-u", "pullbackd", check=False).returncode == 1
    for gone in ("/etc/pullbackd", "/usr/bin/pullbackd", "/var/lib/pullbackd/state.db",
                 "/var/lib/pullbackd/scratch", "/run/pullbackd",
                 "/lib/systemd/system/pullbackd.service"):
        assert not host.path(gone).exists(), gone
    kept = sorted(host.path("/var/lib/pullbackd/repository").rglob("*.qcow2"))
    assert kept
    # Installed again over the kept repository: it serves, and asked to, purge takes all.
    install(host, package, fresh=False)
    assert host.ctl("jobs")["jobs"] == []
    assert sorted(host.path("/var/lib/pullbackd/repository").rglob("*.qcow2")) == kept
    host.run("env", "PULLBACKD_PURGE_BACKUPS=yes", "apt-get", "purge", "-y", "-q", "pullbackd",
             timeout=300)
    assert not host.path("/var/lib/pullbackd").exists()
    install(host, package, fresh=False)  # for the module's end: stop pullbackd
