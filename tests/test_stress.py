"""The stress driver (scripts/stress, bench/stress.py) on labs of its own.

A short run with a fixed seed, with faults the schedule forces (kill -9 and SIGTERM of
pullbackd among them), must find no wrong byte, no chain violation, no leak and no error; and
the driver's checks must see what is wrong when it is, or that run would prove nothing.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from bench import stress

from pullbackd.qemu_nbd import Server

from .conftest import DISK_SIZE, Lab, lab_up

CYCLES = 12


@pytest.fixture
def own_lab(tmp_path: Path) -> Iterator[Lab]:
    """Two domains with two 64 MiB disks each, fresh: the driver zeroes them and needs no
    checkpoint of pullbackd's there."""
    with lab_up(tmp_path / "lab", "--domains", "2", "--disks", "2",
                "--size", str(DISK_SIZE)) as lab:
        yield lab


def test_a_short_run_with_forced_faults_finds_nothing_wrong(
        own_lab: Lab, tmp_path: Path) -> None:
    report_file = tmp_path / "report.json"
    code = stress.main([
        "--lab", str(own_lab.dir), "--dir", str(tmp_path / "stress"),
        # This seed's twelve cycles draw eight faults: kill -9 between cycles, inside Start
        # (pull and local), inside Finish and while pullbackd streams; SIGTERM inside the
        # read; Abort; Finish(success: false). Where exactly each lands is up to the timing.
        "--cycles", str(CYCLES), "--seed", "46", "--consumers", "2", "--fault-rate", "0.5",
        "--faults", "kill9,sigterm,abort,fail", "--report", str(report_file)])
    report = json.loads(report_file.read_text())
    # It did what it is for: cycles, backups read and checked, the faults asked for.
    assert report["cycles"] == CYCLES
    assert report["backups"]["started"] >= CYCLES - 2
    assert report["backups"]["completed"] >= 4, report["backups"]
    assert report["compared_images"] >= report["backups"]["completed"]
    for kind in ("kill9", "sigterm", "abort", "fail"):
        assert report["faults"][kind]["count"] >= 1, kind
    assert report["restarts"]["kill9"] >= 1 and report["restarts"]["sigterm"] >= 1
    # And found nothing wrong.
    assert report["wrong_bytes"] == 0, report["wrong_images"]
    assert report["violations"] == []
    assert report["leaks"] == []
    assert report["errors"] == []
    assert report["ok"] and code == 0


def test_the_checks_see_what_is_planted(own_lab: Lab, tmp_path: Path) -> None:
    """Leftovers of every kind, and a chain that lost a backup the driver saw complete."""
    lab = stress.discover(own_lab.dir)
    args = stress.build_parser().parse_args(["--dir", str(tmp_path / "stress"),
                                             "--consumers", "1"])
    run = stress.Stress(args, lab, tmp_path / "stress")
    run.daemon.start()
    planted: Server | None = None
    try:
        job = run.ctl.job("Start", domain="lab1", consumer="c1")
        image = tmp_path / "vda.raw"
        stress.nbdcopy(next(d["url"] for d in job["disks"] if d["name"] == "vda"), image)
        assert stress.count_wrong(image, bytes(DISK_SIZE)) == (0, None)
        assert run.ctl.job("Finish", id=job["id"])["state"] == "completed"
        run.check("a clean state")
        assert run.leaks == {} and run.violations == {}

        folder = run.daemon.repository / "lab1" / "c1" / "vda"
        folder.mkdir(parents=True)
        (folder / "0001.qcow2.partial").write_bytes(b"")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(folder / "x.qcow2"),
                        "1M"], check=True)
        planted = Server(folder / "x.qcow2", "qcow2", folder / "x.sock")
        planted.start()
        (run.daemon.scratch / "0123456789ab.vda.qcow2").write_bytes(b"")
        subprocess.run(["virsh", "-q", "-c", lab.uri, "checkpoint-create-as", "lab2",
                        "pullbackd.c1.0123456789ab"], check=True, capture_output=True)
        # The driver saw a backup complete that the chain does not hold.
        run.confirmed.setdefault(("lab1", "c1"), []).append(
            ("pullbackd.c1.ba9876543210", "ba9876543210", ("vda", "vdb")))
        run.check("what was planted")
        assert {kind for kind, _ in run.leaks} == {
            "qemu-nbd", "repository-file", "job-file", "libvirt-checkpoint"}
        assert {kind for kind, _ in run.violations} == {"head-missing", "completed-job-changed"}

        wrong = tmp_path / "wrong.raw"
        wrong.write_bytes(b"\1" * 10 + bytes(DISK_SIZE - 10))
        assert stress.count_wrong(wrong, bytes(DISK_SIZE)) == (10, 0)
        wrong.write_bytes(bytes(DISK_SIZE - 1))
        assert stress.count_wrong(wrong, bytes(DISK_SIZE)) == (1, DISK_SIZE - 1)
    finally:
        if planted is not None:
            planted.stop()
        run.stop()
        run.close()


def lab_processes(lab: Lab) -> list[int]:
    """Processes whose command line names the lab's folder (libvirtd, its supervisors)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and stress.alive(int(entry.name)) and \
                any(str(lab.dir) in arg for arg in stress.cmdline(int(entry.name))):
            found.append(int(entry.name))
    return found


@pytest.mark.lab  # brings up a lab of its own, in its body
def test_lab_restarts_a_killed_libvirtd_and_it_takes_the_domains_back(
        tmp_path: Path) -> None:
    with lab_up(tmp_path / "lab", "--size", "16M") as lab:
        state = json.loads((lab.dir / "state.json").read_text())
        qemu = int((lab.dir / "run" / "libvirt" / "qemu" / "lab1.pid").read_text())
        os.kill(state["libvirtd_pid"], signal.SIGKILL)
        assert stress.wait_gone(state["libvirtd_pid"], 10)
        out = lab.run("restart-libvirtd")
        assert "LIBVIRT_URI=" in out
        restarted = json.loads((lab.dir / "state.json").read_text())
        assert restarted["libvirtd_pid"] != state["libvirtd_pid"]
        assert restarted["mount_ns"] == state["mount_ns"]  # the domain's QEMU's namespace
        virsh = ["virsh", "-q", "-c", lab.uri]
        listed = subprocess.run([*virsh, "list", "--name"], check=True, capture_output=True,
                                text=True).stdout.split()
        assert listed == ["lab1"]
        assert int((lab.dir / "run" / "libvirt" / "qemu" / "lab1.pid").read_text()) == qemu
        lab.write("lab1", "vda", 0, 65536, 0x5A)  # through the same QEMU, to the new libvirtd
        # A libvirtd that runs is stopped first; domains started after a restart work too.
        lab.run("restart-libvirtd")
        lab.run("stop", "lab1")
        lab.run("start", "lab1")
        lab.write("lab1", "vda", 65536, 65536, 0x5B)
        lab.run("down")
        deadline = time.monotonic() + 10
        while lab_processes(lab) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert lab_processes(lab) == []
        assert not stress.alive(qemu)


def test_fault_schedule_is_the_seeds(tmp_path: Path) -> None:
    """The same seed draws the same cycles, and each fault asked for comes at least once."""
    lab = stress.Lab(tmp_path, "test:///default", ["lab1", "lab2"], ["vda", "vdb"], DISK_SIZE)

    def plans(seed: int) -> list[str]:
        args = stress.build_parser().parse_args([
            "--seed", str(seed), "--cycles", str(CYCLES), "--consumers", "2",
            "--faults", "kill9,sigterm"])
        run = stress.Stress(args, lab, tmp_path / "stress")  # connects to nothing yet
        try:
            schedule = run.schedule()
            return [run.draw(n, schedule.get(n)).describe() for n in range(1, CYCLES + 1)]
        finally:
            run.close()

    first = plans(13)
    assert first == plans(13)
    assert first != plans(14)
    for kind in ("kill9", "sigterm"):
        assert any(f"[{kind} @" in plan for plan in first), first
