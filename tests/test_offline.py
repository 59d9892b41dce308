"""Backups of shut-off domains (offline.py: qemu-storage-daemon), on the real lab.

Every step rebuilds the disk from what the backups export and compares it byte for byte with
what the guest wrote; chains go on across power states both ways.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest

from pullbackd import crash

from .conftest import DISK_SIZE, Daemon, Lab, start_daemon, stop_daemon
from .images import Disk, MiB, assert_image
from .test_chains import (
    Appliance,
    domain_like,
    libvirt_checkpoints,
    qemu_img_compare,
    virsh,
)
from .test_crash import crashed

DOMAIN = "lab3"
HOOK = Path(__file__).resolve().parent.parent / "libvirt-hooks" / "qemu.d" / "pullbackd"


@pytest.fixture
def vda(lab: Lab) -> Iterator[Disk]:
    """lab3's vda, zeroed (through the guest: lab3 runs for it); lab3 is shut off again
    after the test, as the lab fixture keeps it, whatever happened."""
    if "running" not in virsh(lab, "domstate", DOMAIN):
        lab.run("start", DOMAIN)
    disk = Disk(lab, DOMAIN, "vda")
    try:
        yield disk
    finally:
        if "shut off" not in virsh(lab, "domstate", DOMAIN):
            lab.run("stop", DOMAIN)


def image(lab: Lab) -> Path:
    return lab.dir / "disks" / f"{DOMAIN}-vda.qcow2"


def image_bitmaps(lab: Lab) -> str:
    return subprocess.run(["qemu-img", "info", "-U", str(image(lab))], check=True,
                          capture_output=True, text=True).stdout


def test_chains_go_on_across_power_states_both_ways(
        daemon: Daemon, lab: Lab, vda: Disk, tmp_path: Path) -> None:
    app = Appliance(daemon, DOMAIN, "offline", tmp_path)
    vda.write(0, 2 * MiB, 0x41)
    lab.run("stop", DOMAIN)

    full, _ = app.backup("full", disks=["vda"])  # off
    assert full["offline"] and full["disks"][0]["mode"] == "full"
    assert_image(app.image("vda"), vda, tmp_path)
    assert full["checkpoint"] in libvirt_checkpoints(lab, DOMAIN)
    assert full["checkpoint"] in image_bitmaps(lab)
    (tmp_path / "fresh" / "offline").mkdir(parents=True)
    shutil.copy(app.image("vda"), tmp_path / "fresh" / "offline" / "vda.raw")

    lab.run("start", DOMAIN)  # off -> on: an incremental since the offline checkpoint
    vda.mark()
    vda.write(5 * MiB, 64 << 10, 0x42)
    vda.write(40 * MiB - 100, 300, 0x43)
    running, extents = app.backup("incremental", disks=["vda"])
    assert not running["offline"] and running["since"] == full["checkpoint"]
    assert extents == {"vda": vda.dirty_since_mark()}
    assert_image(app.image("vda"), vda, tmp_path)

    vda.mark()  # on -> off: an incremental since the running one's checkpoint
    vda.write(9 * MiB, MiB, 0x44)
    lab.run("stop", DOMAIN)
    off, extents = app.backup("incremental", disks=["vda"])
    assert off["offline"] and off["since"] == running["checkpoint"]
    assert extents == {"vda": vda.dirty_since_mark()}
    assert_image(app.image("vda"), vda, tmp_path)

    # A differential while off covers everything since the full backup.
    diff = app.start("differential", disks=["vda"], since=full["checkpoint"])
    assert diff["offline"] and diff["disks"][0]["since"] == full["checkpoint"]
    # An appliance that kept only the full backup: it plus the differential is the disk.
    fresh = Appliance(daemon, DOMAIN, "offline", tmp_path / "fresh")
    fresh.read(diff)
    assert daemon.ctl.job("Finish", id=diff["id"])["state"] == "completed"
    assert_image(fresh.image("vda"), vda, tmp_path)

    lab.run("start", DOMAIN)  # and once more while running
    vda.mark()
    vda.write(60 * MiB, 64 << 10, 0x45)
    again, extents = app.backup("incremental", disks=["vda"])
    assert extents == {"vda": vda.dirty_since_mark()}
    assert_image(app.image("vda"), vda, tmp_path)
    assert again["since"] == diff["checkpoint"]


def test_the_domain_cannot_start_under_its_backup(
        daemon: Daemon, lab: Lab, vda: Disk, tmp_path: Path) -> None:
    vda.write(MiB, MiB, 0x51)
    lab.run("stop", DOMAIN)
    job = daemon.ctl.job("Start", domain=DOMAIN, disks=["vda"], consumer="guard")
    start = subprocess.run(["virsh", "-q", "-c", lab.uri, "start", DOMAIN], capture_output=True,
                           text=True, timeout=60, check=False)
    assert start.returncode != 0 and 'Failed to get "write" lock' in start.stderr, start.stderr
    # The backup is as it was, and reads the disk.
    app = Appliance(daemon, DOMAIN, "guard", tmp_path)
    app.read(job)
    assert_image(app.image("vda"), vda, tmp_path)
    aborted = daemon.ctl.job("Abort", id=job["id"])
    assert aborted["state"] == "aborted"
    assert job["checkpoint"] not in libvirt_checkpoints(lab, DOMAIN)
    assert job["checkpoint"] not in image_bitmaps(lab)
    lab.run("start", DOMAIN)  # now it may


def test_push_full_and_incremental_while_off(
        daemon: Daemon, lab: Lab, vda: Disk, tmp_path: Path) -> None:
    """Push backups of a shut-off domain: qcow2 files as libvirt's push writes them, the
    full one the disk, the incremental one its changes (on top of the full: the disk)."""
    target = tmp_path / "push"
    target.mkdir()
    vda.write(MiB, MiB, 0x81)
    lab.run("stop", DOMAIN)
    full = daemon.ctl.wait(daemon.ctl.job("Start", domain=DOMAIN, disks=["vda"],
                                          consumer="pushoff", target_dir=str(target))["id"])
    assert full["state"] == "completed" and full["offline"], full
    full_file = Path(full["disks"][0]["target"])
    qemu_img_compare(full_file, vda, tmp_path)

    lab.run("start", DOMAIN)
    vda.mark()
    vda.write(6 * MiB, 128 << 10, 0x82)
    lab.run("stop", DOMAIN)
    incr = daemon.ctl.wait(daemon.ctl.job(
        "Start", domain=DOMAIN, disks=["vda"], consumer="pushoff", mode="incremental",
        target_dir=str(target))["id"])
    assert (incr["state"], incr["offline"], incr["disks"][0]["mode"]) == (
        "completed", True, "incremental"), incr
    incr_file = Path(incr["disks"][0]["target"])
    subprocess.run(["qemu-img", "rebase", "-u", "-f", "qcow2", "-b", str(full_file), "-F",
                    "qcow2", str(incr_file)], check=True, timeout=60)
    qemu_img_compare(incr_file, vda, tmp_path)
    chain = daemon.ctl.call("ListCheckpoints", domain=DOMAIN, consumer="pushoff")
    assert [c["name"] for c in chain["checkpoints"]] == [full["checkpoint"], incr["checkpoint"]]
    assert not list((daemon.exports / ".qemu").glob(f"{incr['id']}.*"))  # its daemon ended


def test_a_restart_of_pullbackd_adopts_an_offline_backup(
        lab: Lab, vda: Disk, tmp_path: Path) -> None:
    vda.write(7 * MiB, MiB, 0x61)
    lab.run("stop", DOMAIN)
    first = start_daemon(tmp_path / "pullbackd", lab.uri)
    job = first.ctl.job("Start", domain=DOMAIN, disks=["vda"], consumer="adopt")
    stop_daemon(first)
    second = start_daemon(tmp_path / "pullbackd", lab.uri)
    try:
        adopted = second.ctl.job("Get", id=job["id"])
        assert adopted["state"] == "ready" and adopted["offline"], adopted
        app = Appliance(second, DOMAIN, "adopt", tmp_path)
        app.read(adopted)
        assert_image(app.image("vda"), vda, tmp_path)
        assert second.ctl.job("Finish", id=job["id"])["state"] == "completed"
    finally:
        stop_daemon(second)


def test_a_killed_storage_daemon_fails_the_job_and_the_chain_holds(
        daemon: Daemon, lab: Lab, vda: Disk, tmp_path: Path) -> None:
    app = Appliance(daemon, DOMAIN, "killed", tmp_path)
    vda.write(0, MiB, 0x71)
    lab.run("stop", DOMAIN)
    full, _ = app.backup("full", disks=["vda"])
    lab.run("start", DOMAIN)
    vda.mark()
    vda.write(3 * MiB, 64 << 10, 0x72)
    lab.run("stop", DOMAIN)
    cut = app.start("incremental", disks=["vda"])
    pid = int((daemon.exports / ".qemu" / f"{cut['id']}.pid").read_text())
    os.kill(pid, signal.SIGKILL)
    failed = daemon.ctl.wait(cut["id"], timeout=30)
    assert failed["state"] == "failed" and "qemu-storage-daemon" in failed["error"], failed
    assert cut["checkpoint"] not in libvirt_checkpoints(lab, DOMAIN)
    assert "in-use" not in image_bitmaps(lab)
    # The next incremental starts from the last good checkpoint, and misses nothing.
    nxt, extents = app.backup("incremental", disks=["vda"])
    assert nxt["since"] == full["checkpoint"]
    assert extents == {"vda": vda.dirty_since_mark()}
    assert_image(app.image("vda"), vda, tmp_path)


def test_an_image_pullbackd_cannot_open_is_refused_up_front(
        daemon: Daemon, lab: Lab, tmp_path: Path) -> None:
    """A shut-off domain whose image is gone: a typed error naming disk and image, and
    nothing recorded, in libvirt or in pullbackd."""
    missing = tmp_path / "gone.qcow2"
    with domain_like(lab, DOMAIN, "ghost", tmp_path, {"vda": (missing, "qcow2")}):
        jobs = daemon.ctl.call("List")["jobs"]
        e = daemon.ctl.error("Start", domain="ghost", disks=["vda"])
        assert (e.short_name, e.parameters) == ("ImageNotReachable", {
            "domain": "ghost", "disk": "vda", "path": str(missing), "reason": "no such file"})
        assert daemon.ctl.call("List")["jobs"] == jobs
        assert libvirt_checkpoints(lab, "ghost") == set()


def test_a_crash_before_libvirt_takes_the_checkpoint_in_leaves_no_bitmap(
        lab: Lab, vda: Disk, tmp_path: Path) -> None:
    """kill -9 (crash point start.served) once the daemon added the checkpoint's bitmap and
    before libvirt knows the checkpoint: at the restart the daemon is stopped, the job failed,
    and the bitmap is out of the image (it would record every write, for nothing)."""
    vda.write(0, MiB, 0x91)
    lab.run("stop", DOMAIN)
    base = tmp_path / "pullbackd"
    d = start_daemon(base, lab.uri, env={crash.ENV: "start.served"})
    with pytest.raises(Exception):  # noqa: B017 (the daemon dies under the call)
        d.ctl.call("Start", domain=DOMAIN, disks=["vda"], consumer="served")
    crashed(d)
    again = start_daemon(base, lab.uri)
    try:
        [job] = again.ctl.call("List")["jobs"]
        assert job["state"] == "failed", job
        assert job["checkpoint"] not in libvirt_checkpoints(lab, DOMAIN)
        assert job["checkpoint"] not in image_bitmaps(lab)
        assert not list((again.exports / ".qemu").glob(f"{job['id']}.*"))
        app = Appliance(again, DOMAIN, "served", tmp_path)
        app.backup("full", disks=["vda"])
        assert_image(app.image("vda"), vda, tmp_path)
    finally:
        stop_daemon(again)


def test_the_hook_refuses_a_start_under_a_backup_naming_the_job(
        daemon: Daemon, lab: Lab, vda: Disk, tmp_path: Path) -> None:
    """libvirt's qemu hook of the package (libvirt/hooks/qemu.d/pullbackd), pointed at this
    daemon's folder: the start is refused with the job's id and what to do; once the backup
    ended, the domain starts."""
    hooks = lab.dir / "etc" / "hooks" / "qemu.d"
    hooks.mkdir(parents=True, exist_ok=True)
    hook = hooks / "pullbackd"
    hook.write_text(HOOK.read_text().replace("/run/pullbackd/exports/.qemu",
                                             str(daemon.exports / ".qemu")))
    hook.chmod(0o755)
    libvirtd = json.loads((lab.dir / "state.json").read_text())["libvirtd_pid"]
    os.kill(libvirtd, signal.SIGHUP)  # libvirt reads qemu.d/ again at a reload
    try:
        lab.run("stop", DOMAIN)
        job = daemon.ctl.job("Start", domain=DOMAIN, disks=["vda"], consumer="hook")
        start = subprocess.run(["virsh", "-q", "-c", lab.uri, "start", DOMAIN],
                               capture_output=True, text=True, timeout=60, check=False)
        assert start.returncode != 0, start
        assert f"(job {job['id']})" in start.stderr, start.stderr
        assert f"pullbackctl backup abort {job['id']}" in start.stderr, start.stderr
        assert daemon.ctl.job("Abort", id=job["id"])["state"] == "aborted"
        lab.run("start", DOMAIN)  # the hook lets it through now
    finally:
        hook.unlink()
        os.kill(libvirtd, signal.SIGHUP)


@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[Path]:
    """A block device (a loop device over a file of DISK_SIZE), detached after."""
    backing = tmp_path / "block.raw"
    with backing.open("wb") as f:
        f.truncate(DISK_SIZE)
    device = subprocess.run(["losetup", "--find", "--show", str(backing)], check=True,
                            capture_output=True, text=True).stdout.strip()
    try:
        yield Path(device)
    finally:
        subprocess.run(["losetup", "--detach", device], check=False, capture_output=True)


def test_a_block_device_is_served_while_off(
        daemon: Daemon, lab: Lab, loop_device: Path, tmp_path: Path) -> None:
    """A raw block device (an LVM volume, say) of a shut-off domain: served by the job's
    daemon as a host device, in full (a raw disk holds no bitmap), and what it serves is
    the disk."""
    def as_block(domain: ET.Element) -> None:
        disk = domain.find("devices/disk")
        assert disk is not None
        disk.set("type", "block")
        source = disk.find("source")
        assert source is not None
        source.attrib.clear()
        source.set("dev", str(loop_device))

    with domain_like(lab, DOMAIN, "blocky", tmp_path, {"vda": (loop_device, "raw")},
                     start=True, edit=as_block):
        vda = Disk(lab, "blocky", "vda")
        vda.write(MiB, 2 * MiB, 0x5d)
        virsh(lab, "destroy", "blocky")
        app = Appliance(daemon, "blocky", "block", tmp_path)
        job = app.start("full")
        [disk] = job["disks"]
        assert job["offline"] and disk["mode"] == "full", job
        assert "raw" in disk["fallback"], disk
        assert job["consistency"] == "crash", job  # destroyed, not shut down
        # No format guards a raw disk: the job's daemon keeps QEMU from writing it (the
        # domain started under its backup, and the backup read a disk being written).
        start = subprocess.run(["virsh", "-q", "-c", lab.uri, "start", "blocky"],
                               capture_output=True, text=True, timeout=60, check=False)
        assert start.returncode != 0 and 'Failed to get "write" lock' in start.stderr, \
            start.stderr
        app.read(job)
        assert daemon.ctl.job("Finish", id=job["id"])["state"] == "completed"
        assert_image(tmp_path / "block" / "vda.raw", vda, tmp_path)
        virsh(lab, "start", "blocky")  # now it may


def test_a_domain_that_never_ran_is_shut_off_consistent(
        daemon: Daemon, lab: Lab, tmp_path: Path) -> None:
    """Its disks are as they were made; one libvirt saw destroyed is as if the power went
    (it said "shut off" for both)."""
    image = tmp_path / "fresh.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), str(DISK_SIZE)],
                   check=True)
    with domain_like(lab, DOMAIN, "fresh", tmp_path, {"vda": (image, "qcow2")}):
        app = Appliance(daemon, "fresh", "fresh", tmp_path)
        never_ran, _ = app.backup("full")
        assert (never_ran["offline"], never_ran["consistency"]) == (True, "shut off")
        virsh(lab, "start", "fresh")
        virsh(lab, "destroy", "fresh")
        destroyed, _ = app.backup("incremental")
        assert (destroyed["offline"], destroyed["consistency"]) == (True, "crash")
