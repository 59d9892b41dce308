"""The daemon's own lifecycle on the real lab: restarts, libvirt events, libvirtd dying, the CLI."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import nbd
import pytest

from pullbackd.control.client import Client
from pullbackd.sdnotify import Notifier

from .conftest import (
    DISK_SIZE,
    Daemon,
    Lab,
    lab_up,
    settled,
    start_daemon,
    stop_daemon,
    tmpfs,
)
from .images import Disk, MiB, apply_incremental, assert_image, assert_same, copy_full, read_export
from .test_backup import job_files


@pytest.fixture
def daemon_dir(tmp_path: Path) -> Path:
    return tmp_path / "pullbackd"


@pytest.fixture(autouse=True)
def no_stray_libvirt_jobs(lab: Lab) -> Iterator[None]:
    """These tests stop daemons with jobs running; a failed one must not spoil the next."""
    yield
    for domain in ("lab1", "lab2"):
        subprocess.run(["virsh", "-q", "-c", lab.uri, "domjobabort", domain],
                       capture_output=True, timeout=60, check=False)


def wait_for_state(daemon: Daemon, job_id: str, state: str, timeout: float = 30) -> dict[str, str]:
    """Bounded wait for a change the daemon learns of from libvirt, not from us."""
    deadline = time.monotonic() + timeout
    while True:
        job = daemon.ctl.job("Get", id=job_id)
        if job["state"] == state or time.monotonic() > deadline:
            return job
        time.sleep(0.05)


def test_restart_adopts_a_ready_job_and_readers_never_notice(
        lab: Lab, daemon_dir: Path) -> None:
    vda = Disk(lab, "lab1", "vda")
    vda.write(3 * MiB, MiB, 0x5A)
    first = start_daemon(daemon_dir, lab.uri)
    job = first.ctl.job("Start", domain="lab1", disks=["vda"])
    url = job["disks"][0]["url"]
    reader = nbd.NBD()
    reader.connect_uri(url)
    assert reader.pread(MiB, 3 * MiB) == b"\x5a" * MiB
    stop_daemon(first)
    # The session's sockets wait in the service manager's fd store.
    assert {f"{job['id']}.listen", f"{job['id']}.1.client", f"{job['id']}.1.qemu"} <= set(
        first.manager.fdstore)

    # With the daemon gone, a read just waits; a new connection waits in the backlog.
    results: dict[str, bytes] = {}
    waiting = threading.Thread(target=lambda: results.update(
        old=reader.pread(MiB, 3 * MiB), new=read_export(url)))
    waiting.start()
    second = start_daemon(daemon_dir, lab.uri, fdstore=first.manager.fdstore)
    try:
        waiting.join(60)
        assert results["old"] == b"\x5a" * MiB
        assert_same(results["new"], vda.expected)
        assert second.manager.fdstore == {}  # all taken back
        # Each step of recovery gave systemd's start timeout more time, before READY=1.
        told = [m.get("STATUS") for m in second.manager.messages]
        extended = [m for m in second.manager.messages if "EXTEND_TIMEOUT_USEC" in m]
        assert f"recovering: job {job['id']} of lab1 (1 of 1)" in told, told
        assert extended and told.index(extended[0]["STATUS"]) < told.index(
            next(m["STATUS"] for m in second.manager.messages if m.get("READY") == "1"))
        assert int(extended[0]["EXTEND_TIMEOUT_USEC"]) >= 60_000_000
        adopted = second.ctl.job("Get", id=job["id"])
        assert settled(adopted) == settled(job)
        sessions = adopted["appliance"]["sessions"]
        assert [(s["id"], s["ended"] is None, s["bytes_read"]) for s in sessions] == [
            (1, True, 2 * MiB), (2, False, DISK_SIZE)]
        e = second.ctl.error("Start", domain="lab1")
        assert e.short_name == "BackupInProgress" and e.parameters["id"] == job["id"]
        assert reader.pread(MiB, 3 * MiB) == b"\x5a" * MiB
        reader.shutdown()
        assert second.ctl.job("Finish", id=job["id"])["state"] == "completed"
        assert job_files(second, job["id"]) == []
        # Its checkpoint joined the chain: the next incremental starts there.
        chain = second.ctl.call("ListCheckpoints", domain="lab1")["checkpoints"]
        assert chain[-1]["name"] == job["checkpoint"]
        incr = second.ctl.job("Start", domain="lab1", disks=["vda"], mode="incremental")
        assert incr["since"] == job["checkpoint"]
        second.ctl.call("Finish", id=incr["id"])
    finally:
        stop_daemon(second)


def test_a_new_pullbackd_takes_the_chain_from_the_domains_metadata(
        lab: Lab, tmp_path: Path) -> None:
    """What a migration leaves: the domain, with its metadata, and no checkpoint list in
    libvirt; and, on the destination, a pullbackd that never saw the domain."""
    vdb = Disk(lab, "lab4", "vdb")
    vdb.write(0, 2 * MiB, 0x31)
    image = tmp_path / "vdb.raw"
    first = start_daemon(tmp_path / "first", lab.uri)
    try:
        full = first.ctl.job("Start", domain="lab4", disks=["vdb"], consumer="moved")
        copy_full(full["disks"][0]["url"], image)
        first.ctl.call("Finish", id=full["id"])
    finally:
        stop_daemon(first)
    virsh = ["virsh", "-q", "-c", lab.uri]
    metadata = subprocess.run([*virsh, "metadata", "lab4", "--config",
                               "https://pullbackd.org/xmlns/chains/1"], check=True,
                              capture_output=True, text=True, timeout=60).stdout
    assert f'name="{full["checkpoint"]}"' in metadata and 'consumer="moved"' in metadata
    assert "<domain " not in metadata  # the checkpoint, not a copy of the domain per backup
    subprocess.run([*virsh, "checkpoint-delete", "lab4", full["checkpoint"], "--metadata"],
                   check=True, capture_output=True, timeout=60)
    vdb.mark()
    vdb.write(5 * MiB, MiB, 0x32)
    vdb.zero(MiB, 64 * 1024)

    second = start_daemon(tmp_path / "second", lab.uri)
    try:
        incr = second.ctl.job("Start", domain="lab4", disks=["vdb"], consumer="moved",
                              mode="incremental")
        disk = incr["disks"][0]
        assert incr["since"] == full["checkpoint"] and disk["mode"] == "incremental"
        assert apply_incremental(disk["url"], disk["bitmap"], image) == vdb.dirty_since_mark()
        second.ctl.call("Finish", id=incr["id"])
        assert_image(image, vdb, tmp_path)
        chain = second.ctl.call("ListCheckpoints", domain="lab4", consumer="moved")
        assert [c["name"] for c in chain["checkpoints"]] == [full["checkpoint"],
                                                            incr["checkpoint"]]
        assert "took in a checkpoint from the domain's metadata" in second.log_text()
        second.ctl.call("DeleteChain", domain="lab4", consumer="moved")
        # The chain is gone from the domain's metadata too (other consumers' stay).
        left = subprocess.run(
            [*virsh, "metadata", "lab4", "--config", "https://pullbackd.org/xmlns/chains/1"],
            capture_output=True, text=True, timeout=60, check=False)
        assert 'consumer="moved"' not in left.stdout
    finally:
        stop_daemon(second)


def test_job_lost_while_the_daemon_was_down_is_failed_on_restart(
        lab: Lab, daemon_dir: Path) -> None:
    first = start_daemon(daemon_dir, lab.uri)
    job = first.ctl.job("Start", domain="lab1")
    stop_daemon(first)
    subprocess.run(["virsh", "-q", "-c", lab.uri, "domjobabort", "lab1"], check=True,
                   capture_output=True, timeout=60)
    second = start_daemon(daemon_dir, lab.uri)
    try:
        lost = second.ctl.job("Get", id=job["id"])
        assert lost["state"] == "failed" and "restarted" in lost["error"]
        assert job_files(second, job["id"]) == []
        checkpoints = subprocess.run(
            ["virsh", "-q", "-c", lab.uri, "checkpoint-list", "lab1", "--name"],
            check=True, capture_output=True, text=True, timeout=60).stdout.split()
        assert job["checkpoint"] not in checkpoints
        again = second.ctl.job("Start", domain="lab1")
        assert second.ctl.job("Finish", id=again["id"])["state"] == "completed"
    finally:
        stop_daemon(second)


def test_job_ended_behind_our_back_is_failed_from_libvirts_event(
        lab: Lab, daemon: Daemon) -> None:
    job = daemon.ctl.job("Start", domain="lab2")
    subprocess.run(["virsh", "-q", "-c", lab.uri, "domjobabort", "lab2"], check=True,
                   capture_output=True, timeout=60)
    failed = wait_for_state(daemon, job["id"], "failed")
    assert failed["state"] == "failed"
    assert "outside pullbackd" in failed["error"]
    assert job_files(daemon, job["id"]) == []


def test_domain_destroyed_is_failed_from_libvirts_event(lab: Lab, daemon: Daemon) -> None:
    job = daemon.ctl.job("Start", domain="lab2")
    lab.run("stop", "lab2")
    try:
        failed = wait_for_state(daemon, job["id"], "failed")
        assert failed["state"] == "failed"
        assert "the domain stopped" in failed["error"]
    finally:
        lab.run("start", "lab2")


def test_a_paused_domain_keeps_its_backup(lab: Lab, daemon: Daemon) -> None:
    vdb = Disk(lab, "lab2", "vdb")
    vdb.write(2 * MiB, MiB, 0x4D)
    job = daemon.ctl.job("Start", domain="lab2", disks=["vdb"])
    virsh = ["virsh", "-q", "-c", lab.uri]
    subprocess.run([*virsh, "suspend", "lab2"], check=True, capture_output=True, timeout=60)
    try:
        # The export of a paused guest reads as well as any.
        assert_same(read_export(job["disks"][0]["url"]), vdb.expected)
        assert daemon.ctl.job("Get", id=job["id"])["state"] == "ready"
    finally:
        subprocess.run([*virsh, "resume", "lab2"], check=True, capture_output=True, timeout=60)
    # Still ready after the pause and resume events: Finish completes it.
    assert daemon.ctl.job("Finish", id=job["id"])["state"] == "completed"


def test_backup_not_started_by_pullbackd_is_refused_at_once(
        lab: Lab, daemon: Daemon, tmp_path: Path) -> None:
    backup_xml = tmp_path / "backup.xml"
    backup_xml.write_text(
        f"<domainbackup mode='pull'><server transport='unix' socket='{tmp_path}/f.sock'/>"
        f"<disks><disk name='vda' backup='yes' type='file'>"
        f"<scratch file='{tmp_path}/f.qcow2'/></disk>"
        f"<disk name='vdb' backup='no'/></disks></domainbackup>")
    virsh = ["virsh", "-q", "-c", lab.uri]
    subprocess.run([*virsh, "backup-begin", "lab2", str(backup_xml)], check=True,
                   capture_output=True, timeout=60)
    try:
        e = daemon.ctl.error("Start", domain="lab2")
        assert e.short_name == "BackupInProgress" and e.parameters == {"domain": "lab2", "id": ""}
    finally:
        subprocess.run([*virsh, "domjobabort", "lab2"], check=True, capture_output=True,
                       timeout=60)


@pytest.fixture
def own_lab(tmp_path: Path) -> Iterator[Lab]:
    """A lab of its own, for a test that kills its libvirtd."""
    with lab_up(tmp_path / "lab", "--size", str(DISK_SIZE)) as lab:
        yield lab


def test_libvirtd_dying_makes_the_daemon_exit_for_a_restart_and_readers_read_on(
        own_lab: Lab, daemon_dir: Path) -> None:
    vda = Disk(own_lab, "lab1", "vda")
    vda.write(2 * MiB, MiB, 0x3C)
    daemon = start_daemon(daemon_dir, own_lab.uri)
    job = daemon.ctl.job("Start", domain="lab1", disks=["vda"])
    reader = nbd.NBD()
    reader.connect_uri(job["disks"][0]["url"])
    assert reader.pread(MiB, 2 * MiB) == b"\x3c" * MiB
    state = json.loads((own_lab.dir / "state.json").read_text())
    os.kill(state["libvirtd_pid"], 9)
    assert daemon.proc.wait(timeout=60) == 1
    assert "lost the libvirt connection" in daemon.log_text()
    assert not daemon.socket.exists()
    # The reader was not cut off: its sockets wait in the fd store for the next run,
    # as on a stop by SIGTERM.
    daemon.manager.close()
    assert {f"{job['id']}.listen", f"{job['id']}.1.client", f"{job['id']}.1.qemu"} <= set(
        daemon.manager.fdstore)
    own_lab.run("restart-libvirtd")  # what systemd does for libvirtd.service
    second = start_daemon(daemon_dir, own_lab.uri, fdstore=daemon.manager.fdstore)
    try:
        assert reader.pread(MiB, 2 * MiB) == b"\x3c" * MiB
        assert_same(b"".join(reader.pread(4 * MiB, o) for o in range(0, DISK_SIZE, 4 * MiB)),
                    vda.expected)
        reader.shutdown()
        assert second.ctl.job("Finish", id=job["id"])["state"] == "completed"
    finally:
        stop_daemon(second)


def pullbackctl(daemon: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pullbackd.cli", "--socket", str(daemon.socket), *args],
        capture_output=True, text=True, timeout=120, check=False)


def test_pullbackctl(daemon: Daemon) -> None:
    started = pullbackctl(daemon, "--json", "backup", "start", "lab1", "--disk", "vdb")
    assert started.returncode == 0, started.stderr
    job = json.loads(started.stdout)["job"]
    assert [d["name"] for d in job["disks"]] == ["vdb"]
    shown = json.loads(pullbackctl(daemon, "--json", "backup", "show", job["id"]).stdout)
    assert settled(shown["job"]) == settled(job)

    for listing in (["backup", "list"], ["jobs"], ["jobs", "--domain", "lab1", "--state",
                                                   "ready"]):
        table = pullbackctl(daemon, *listing).stdout
        assert table.splitlines()[0].split() == \
            ["ID", "DOMAIN", "CONSUMER", "STATE", "MODE", "CREATED", "DISKS", "DONE"]
        assert any(line.split()[:4] == [job["id"], "lab1", "default", "ready"]
                   for line in table.splitlines())
    assert job["id"] not in pullbackctl(daemon, "jobs", "--domain", "lab2").stdout
    for show in (["backup", "show"], ["show"]):
        shown = pullbackctl(daemon, *show, job["id"]).stdout
        assert job["disks"][0]["url"] in shown and "64.0 MiB" in shown
        assert "sessions    0 open, 0 so far" in shown and "history     starting" in shown

    busy = pullbackctl(daemon, "backup", "start", "lab1")
    assert busy.returncode == 1
    name, params = busy.stderr.splitlines()[0].removeprefix("error: ").split(" ", 1)
    assert name == "org.pullbackd.Backup.BackupInProgress"
    assert json.loads(params) == {"domain": "lab1", "id": job["id"]}

    finished = pullbackctl(daemon, "backup", "finish", job["id"])
    assert finished.returncode == 0 and "completed" in finished.stdout


def test_pullbackctl_without_a_daemon(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pullbackd.cli", "--socket", str(tmp_path / "none.sock"),
         "backup", "list"], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2
    assert "cannot talk to pullbackd" in proc.stderr


def test_watchdog_pings(tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(30)
        notifier = Notifier({"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "20000"})

        async def pings(count: int) -> list[bytes]:
            async with anyio.create_task_group() as tg:
                tg.start_soon(notifier.watchdog)
                got = [await anyio.to_thread.run_sync(sock.recv, 100) for _ in range(count)]
                tg.cancel_scope.cancel()
            return got

        assert anyio.run(pings, 3) == [b"WATCHDOG=1"] * 3
        sock.setblocking(False)
        while True:  # drain pings sent before the cancel landed
            try:
                sock.recv(100)
            except BlockingIOError:
                break
        sock.setblocking(True)
        notifier.ready("up")
        assert sock.recv(100) == b"READY=1\nSTATUS=up"
    # Not ours to ping (another PID), or no socket at all: silent.
    assert notifier.watchdog_enabled
    assert not Notifier({"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "1",
                         "WATCHDOG_PID": "1"}).watchdog_enabled
    Notifier({}).ready("x")


def test_pullbackctl_chains(daemon: Daemon) -> None:
    def ctl(*args: str) -> str:
        proc = pullbackctl(daemon, *args)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    full = json.loads(ctl("--json", "backup", "start", "lab2", "--consumer", "cli"))["job"]
    ctl("backup", "finish", full["id"])
    started = ctl("backup", "start", "lab2", "--mode", "incremental", "--consumer", "cli")
    incr_id = started.split()[1]
    assert ["since", full["checkpoint"]] in [line.split() for line in started.splitlines()]
    assert "incremental" in started
    failed = ctl("--json", "backup", "finish", incr_id, "--failed")
    assert json.loads(failed)["job"]["state"] == "failed"

    table = ctl("checkpoints", "lab2", "--consumer", "cli")
    assert table.splitlines()[0].split() == ["CHECKPOINT", "CONSUMER", "OWNER", "JOB",
                                             "CREATED", "DISKS"]
    assert table.splitlines()[1].split()[2] == "root"
    assert [line.split()[0] for line in table.splitlines()[1:]] == [full["checkpoint"]]
    assert ctl("chain", "delete", "lab2", "--consumer", "cli").split() == [full["checkpoint"]]
    assert json.loads(ctl("--json", "checkpoints", "lab2", "--consumer", "cli")) == \
        {"checkpoints": []}
    bad = pullbackctl(daemon, "backup", "start", "lab2", "--mode", "differential",
                      "--since", "nope", "--consumer", "cli")
    assert bad.returncode == 1 and "NoSuchCheckpoint" in bad.stderr


@pytest.fixture
def lab_with_tiny_scratch(tmp_path: Path) -> Iterator[tuple[Lab, Path]]:
    """lab1 with two disks, started after a 16 MiB tmpfs is mounted for scratch files
    (QEMU opens the scratch files pullbackd makes there: see `tmpfs`)."""
    with tmpfs(tmp_path / "scratch", "16M") as scratch, \
            lab_up(tmp_path / "lab", "--domains", "1", "--disks", "2",
                   "--size", str(DISK_SIZE)) as lab:
        yield lab, scratch


def test_scratch_that_cannot_hold_the_worst_case_is_refused_up_front(
        lab_with_tiny_scratch: tuple[Lab, Path], tmp_path: Path) -> None:
    lab, small_scratch = lab_with_tiny_scratch
    daemon = start_daemon(tmp_path / "pullbackd", lab.uri, scratch=small_scratch,
                          scratch_reserve=4 << 20)
    try:
        jobs_before = daemon.ctl.call("List")
        e = daemon.ctl.error("Start", domain="lab1", consumer="scratchy")
        assert e.short_name == "InsufficientScratch"
        assert e.parameters["dir"] == str(small_scratch)
        assert e.parameters["needed"] == 2 * DISK_SIZE  # both disks rewritten whole
        assert e.parameters["available"] <= 12 << 20  # 16 MiB less the 4 MiB reserve
        # Nothing happened: no job, no checkpoint, the domain free.
        assert daemon.ctl.call("List") == jobs_before
        assert daemon.ctl.call("ListCheckpoints", domain="lab1", consumer="scratchy") == \
            {"checkpoints": []}
        # Told to proceed, it does: the guest is idle, the scratch stays nearly empty.
        job = daemon.ctl.job("Start", domain="lab1", consumer="scratchy",
                             allow_scratch_overcommit=True)
        assert job["state"] == "ready"
        assert daemon.ctl.job("Finish", id=job["id"])["state"] == "completed"
        # A push needs no scratch: not refused.
        target = tmp_path / "push"
        target.mkdir()
        push = daemon.ctl.job("Start", domain="lab1", consumer="scratchy", disks=["vda"],
                              target_dir=str(target))
        assert daemon.ctl.wait(push["id"])["state"] == "completed"
    finally:
        stop_daemon(daemon)


@pytest.fixture
def lab_with_small_scratch(tmp_path: Path) -> Iterator[tuple[Lab, Path]]:
    """A lab of its own, started after a 40 MiB tmpfs is mounted for scratch files:
    QEMU sees it only if it was there first (see `tmpfs`)."""
    with tmpfs(tmp_path / "scratch40", "40M") as scratch, \
            lab_up(tmp_path / "lab", "--size", "64M") as lab:
        yield lab, scratch


def test_scratch_running_out_warns_then_ends_the_backup_cleanly(
        lab_with_small_scratch: tuple[Lab, Path], tmp_path: Path) -> None:
    lab, scratch = lab_with_small_scratch
    vda = Disk(lab, "lab1", "vda")
    vda.write(0, 40 * MiB, 0x3A)  # old data the backup must keep when the guest rewrites it
    daemon = start_daemon(tmp_path / "pullbackd", lab.uri, scratch=scratch,
                          scratch_reserve=12 << 20)
    events: list[dict[str, Any]] = []
    try:
        job = daemon.ctl.job("Start", domain="lab1", disks=["vda"], consumer="rewrite",
                             allow_scratch_overcommit=True)

        def watch() -> None:
            with Client(daemon.socket, timeout=300) as client:
                events.extend(r["event"] for r in client.stream(
                    "org.pullbackd.Backup.Watch", id=job["id"]))

        watcher = threading.Thread(target=watch)
        watcher.start()
        # The guest rewrites the disk a MiB at a time; each rewrite moves old
        # data into the scratch file, until pullbackd ends the backup.
        for mib in range(40):
            vda.write(mib * MiB, MiB, 0x3B)
            if daemon.ctl.job("Get", id=job["id"])["state"] == "failed":
                break
        ended = daemon.ctl.wait(job["id"])
        watcher.join(timeout=120)
        assert ended["state"] == "failed" and "scratch space ran out" in ended["error"]
        kinds = [e["kind"] for e in events]
        assert "warning" in kinds and kinds.index("warning") < len(kinds) - 1
        assert "running low" in next(e["message"] for e in events if e["kind"] == "warning")
        assert events[-1]["job"]["state"] == "failed"
        # Rolled back, files gone, and the guest still running and writing.
        assert daemon.ctl.call("ListCheckpoints", domain="lab1", consumer="rewrite") == \
            {"checkpoints": []}
        assert list(scratch.iterdir()) == []
        vda.write(50 * MiB, MiB, 0x3C)
    finally:
        stop_daemon(daemon)
