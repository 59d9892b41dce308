"""Full pull-mode backups on the real lab, read back byte for byte."""

from __future__ import annotations

import subprocess
from pathlib import Path

import libvirt
import nbd
import pytest

from .conftest import DISK_SIZE, Daemon, Lab, settled
from .images import Disk, MiB, assert_same, read_export


def job_files(daemon: Daemon, job_id: str) -> list[Path]:
    return [*daemon.exports.glob(f"{job_id}*"), *daemon.exports.glob(f".qemu/{job_id}*"),
            *daemon.scratch.glob(f"{job_id}*")]


def libvirt_job_type(lab: Lab, domain: str) -> int:
    conn = libvirt.open(lab.uri)
    try:
        return int(conn.lookupByName(domain).jobStats()["type"])
    finally:
        conn.close()


def test_full_backup_is_the_disk_at_start_time(lab: Lab, daemon: Daemon, tmp_path: Path) -> None:
    vda, vdb = Disk(lab, "lab1", "vda"), Disk(lab, "lab1", "vdb")
    vda.write(0, MiB, 0x55)
    vda.write(10 * MiB + 4096, 3 * MiB, 0xA1)
    vda.write(DISK_SIZE - 64 * 1024, 64 * 1024, 0xFF)  # the very end
    vdb.write(5 * MiB, 512 * 1024, 0x3C)

    job = daemon.ctl.job("Start", domain="lab1")
    assert job["state"] == "ready" and job["mode"] == "full" and job["domain"] == "lab1"
    assert [d["name"] for d in job["disks"]] == ["vda", "vdb"]
    for d in job["disks"]:
        assert d["size"] == DISK_SIZE and d["mode"] == "full" and d["bitmap"] is None
        assert d["url"].startswith("nbd+unix:///")
    assert settled(daemon.ctl.job("Get", id=job["id"])) == settled(job)

    # Written after the backup started: must not be in the export.
    lab.write("lab1", "vda", 0, 2 * MiB, 0x77)
    lab.write("lab1", "vdb", 20 * MiB, MiB, 0x77)

    urls = {d["name"]: d["url"] for d in job["disks"]}
    assert_same(read_export(urls["vda"]), vda.expected)
    assert_same(read_export(urls["vdb"]), vdb.expected)

    # Any NBD client: nbdcopy out, qemu-img compare against the expected image.
    expected = tmp_path / "vda.expected.raw"
    expected.write_bytes(vda.expected)
    copy = tmp_path / "vda.copy.raw"
    subprocess.run(["nbdcopy", urls["vda"], str(copy)], check=True, timeout=120)
    subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(expected), str(copy)],
                   check=True, timeout=120, stdout=subprocess.DEVNULL)
    assert copy.read_bytes() == vda.expected

    assert job_files(daemon, job["id"]), "a running job has its socket and scratch files"
    done = daemon.ctl.job("Finish", id=job["id"])
    assert done["state"] == "completed" and done["ended"] and done["error"] is None
    assert libvirt_job_type(lab, "lab1") == libvirt.VIR_DOMAIN_JOB_NONE
    assert job_files(daemon, job["id"]) == []
    assert daemon.ctl.job("Get", id=job["id"])["state"] == "completed"


def test_one_disk_of_two(lab: Lab, daemon: Daemon) -> None:
    vdb = Disk(lab, "lab2", "vdb")
    vdb.write(MiB, MiB, 0x42)
    job = daemon.ctl.job("Start", domain="lab2", disks=["vdb"])
    assert [d["name"] for d in job["disks"]] == ["vdb"]
    assert_same(read_export(job["disks"][0]["url"]), vdb.expected)
    assert daemon.ctl.job("Finish", id=job["id"])["state"] == "completed"


def test_abort_cuts_readers_off_and_cleans_up(lab: Lab, daemon: Daemon) -> None:
    job = daemon.ctl.job("Start", domain="lab1")
    h = nbd.NBD()
    h.connect_uri(job["disks"][0]["url"])
    h.pread(4096, 0)
    aborted = daemon.ctl.job("Abort", id=job["id"])
    assert aborted["state"] == "aborted" and aborted["ended"]
    with pytest.raises(nbd.Error):
        h.pread(4096, 0)
    del h
    assert libvirt_job_type(lab, "lab1") == libvirt.VIR_DOMAIN_JOB_NONE
    assert job_files(daemon, job["id"]) == []


def test_domain_stopped_mid_backup_fails_the_job(lab: Lab, daemon: Daemon) -> None:
    job = daemon.ctl.job("Start", domain="lab2")
    lab.run("stop", "lab2")
    try:
        # Whether libvirt's lifecycle event or Finish reaches the job first,
        # a backup whose exports vanished under the appliance is not completed.
        ended = daemon.ctl.job("Finish", id=job["id"])
        assert ended["state"] == "failed", ended
        assert "the domain stopped" in ended["error"], ended["error"]
        assert daemon.ctl.job("Get", id=job["id"]) == ended
        assert job_files(daemon, job["id"]) == []
    finally:
        lab.run("start", "lab2")
    again = daemon.ctl.job("Start", domain="lab2")
    assert daemon.ctl.job("Finish", id=again["id"])["state"] == "completed"
