"""pullbackd's own NBD endpoints on the real lab: the relay, sessions, their limits."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import nbd
import pytest

from pullbackd import api
from pullbackd.control.client import Client
from pullbackd.control.codec import encode
from pullbackd.exports import KEEP_SESSIONS

from .conftest import DISK_SIZE, Daemon, Lab, serving, start_daemon, stop_daemon
from .images import CHUNK, Disk, MiB, assert_same, connect, read_export
from .test_backup import job_files

LIMITS = """
connections = 2
drain_timeout = 1.0
"""
#: [exports] idle_timeout and max_lifetime of the daemons that expire jobs: seconds, but
#: fractions of one, so that the tests need not wait whole seconds. From a job's creation
#: to its first session (Start, then connect) took 0.045 to 0.075 s on the lab.
IDLE = 0.5
LIFETIME = 1.0


@pytest.fixture(scope="module")
def daemon(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    with serving(tmp_path_factory.mktemp("pullbackd"), lab.uri, exports=LIMITS) as d:
        yield d


def checkpoints(lab: Lab, domain: str) -> list[str]:
    return subprocess.run(["virsh", "-q", "-c", lab.uri, "checkpoint-list", domain, "--name"],
                          check=True, capture_output=True, text=True, timeout=60).stdout.split()


def events_until_end(daemon: Daemon, job_id: str, timeout: float = 60) -> list[dict[str, Any]]:
    with Client(daemon.socket, timeout=timeout) as client:
        return [r["event"] for r in client.stream(f"{api.INTERFACE}.Watch", id=job_id)]


def seconds_between(earlier: str, later: str) -> float:
    """Between two of the daemon's timestamps (UTC, to the millisecond)."""
    return (datetime.fromisoformat(later) - datetime.fromisoformat(earlier)).total_seconds()


def test_sessions_are_counted_as_the_appliance_reads(
        lab: Lab, daemon: Daemon) -> None:
    vda, vdb = Disk(lab, "lab1", "vda"), Disk(lab, "lab1", "vdb")
    vda.write(2 * MiB, 3 * MiB, 0x61)
    vdb.write(40 * MiB, MiB, 0x62)
    job = daemon.ctl.job("Start", domain="lab1")
    assert job["appliance"] == {"active": 0, "total": 0, "bytes_read": 0,
                                "idle_since": job["appliance"]["idle_since"], "sessions": []}
    urls = {d["name"]: d["url"] for d in job["disks"]}
    assert all(Path(u.partition("socket=")[2]).parent == daemon.exports for u in urls.values())

    a = connect(urls["vda"], "base:allocation")
    b = connect(urls["vdb"], "base:allocation")
    assert_same(a.pread(4 * MiB, 0) + a.pread(4 * MiB, 4 * MiB), vda.expected[:8 * MiB])
    assert_same(b.pread(MiB, 40 * MiB), vdb.expected[40 * MiB:41 * MiB])
    seen = daemon.ctl.job("Get", id=job["id"])["appliance"]
    assert seen["active"] == 2 and seen["total"] == 2 and seen["idle_since"] is None
    assert seen["bytes_read"] == 9 * MiB
    first, second = seen["sessions"]
    assert (first["id"], first["disk"], first["bytes_read"], first["ended"]) == (
        1, "vda", 8 * MiB, None)
    assert (second["id"], second["disk"], second["bytes_read"]) == (2, "vdb", MiB)
    assert first["peer"] == f"pid {os.getpid()} uid {os.getuid()} gid {os.getgid()}"

    a.shutdown()
    b.shutdown()
    assert_same(read_export(urls["vda"]), vda.expected)  # a third session, the whole disk
    done = daemon.ctl.job("Finish", id=job["id"])
    assert done["state"] == "completed"
    assert done["appliance"]["active"] == 0 and done["appliance"]["total"] == 3
    assert done["appliance"]["bytes_read"] == 9 * MiB + DISK_SIZE
    assert all(s["ended"] for s in done["appliance"]["sessions"])
    assert daemon.ctl.job("Get", id=job["id"]) == done
    assert job_files(daemon, job["id"]) == []


def test_one_connection_over_the_limit_is_refused_with_a_reason(
        lab: Lab, daemon: Daemon) -> None:
    vda = Disk(lab, "lab1", "vda")
    vda.write(0, MiB, 0x5C)
    job = daemon.ctl.job("Start", domain="lab1", disks=["vda"])
    url = job["disks"][0]["url"]
    held = [connect(url), connect(url)]
    # NBD_REP_ERR_POLICY: libnbd says so, and keeps our reason for its debug log.
    with pytest.raises(nbd.Error, match="server policy prevents"):
        connect(url)
    assert "nbd connection refused" in daemon.log_text()
    assert "this backup already has 2 connections, the limit" in daemon.log_text()
    # The two open sessions are untouched, and a closed one frees its place.
    for h in held:
        assert_same(h.pread(MiB, 0), vda.expected[:MiB])
    held.pop().shutdown()
    third = connect(url)
    assert_same(third.pread(2 * MiB, 0), vda.expected[:2 * MiB])
    appliance = daemon.ctl.job("Get", id=job["id"])["appliance"]
    assert appliance["total"] == 3 and appliance["active"] == 2  # the refused one is no session
    third.shutdown()
    held[0].shutdown()
    daemon.ctl.call("Finish", id=job["id"])


def test_finish_waits_for_sessions_then_says_they_are_active(
        lab: Lab, daemon: Daemon) -> None:
    vda = Disk(lab, "lab1", "vda")
    vda.write(0, MiB, 0x33)
    job = daemon.ctl.job("Start", domain="lab1", disks=["vda"])
    reader = connect(job["disks"][0]["url"])
    e = daemon.ctl.error("Finish", id=job["id"])
    assert e.short_name == "SessionsActive"
    assert e.parameters == {"id": job["id"], "sessions": 1, "waited": 1.0}
    # Nothing was cut: the job runs on and the appliance keeps reading.
    assert daemon.ctl.job("Get", id=job["id"])["state"] == "ready"
    assert_same(reader.pread(MiB, 0), vda.expected[:MiB])

    # A session that closes while Finish waits lets it through.
    closer = threading.Timer(0.3, reader.shutdown)
    closer.start()
    assert daemon.ctl.job("Finish", id=job["id"])["state"] == "completed"
    closer.join()


def test_abort_cuts_the_sessions_at_once(lab: Lab, daemon: Daemon) -> None:
    job = daemon.ctl.job("Start", domain="lab1", disks=["vda"])
    reader = connect(job["disks"][0]["url"])
    reader.pread(MiB, 0)
    started = time.monotonic()
    aborted = daemon.ctl.job("Abort", id=job["id"])
    assert aborted["state"] == "aborted" and aborted["appliance"]["active"] == 0
    assert time.monotonic() - started < 10  # no drain: Abort does not wait for readers
    with pytest.raises(nbd.Error):
        reader.pread(MiB, 0)
    assert job["checkpoint"] not in checkpoints(lab, "lab1")


def test_a_job_nobody_uses_expires_and_its_checkpoint_is_rolled_back(
        lab: Lab, tmp_path: Path) -> None:
    d = start_daemon(tmp_path / "pullbackd", lab.uri, exports=f"idle_timeout = {IDLE}")
    try:
        job = d.ctl.job("Start", domain="lab2", disks=["vda"])
        assert job["checkpoint"] in checkpoints(lab, "lab2")
        # A session holds it off, however long it stays open.
        reader = connect(job["disks"][0]["url"])
        time.sleep(3 * IDLE)
        assert d.ctl.job("Get", id=job["id"])["state"] == "ready"

        with Client(d.socket, timeout=60) as client:
            watch = (r["event"] for r in client.stream(f"{api.INTERFACE}.Watch", id=job["id"]))
            events = [next(watch)]  # watching from here on, before the session closes
            reader.shutdown()
            events += watch
        end = events[-1]["job"]
        assert end["state"] == "expired" and "idle_timeout" in end["error"]
        assert [e["job"]["state"] for e in events if e["kind"] == "state"] == [
            "ready", "expired"]
        # Its clock ran from the end of the last session.
        [session] = end["appliance"]["sessions"]
        assert seconds_between(session["ended"], end["ended"]) >= IDLE - 0.01, end
        assert job["checkpoint"] not in checkpoints(lab, "lab2")
        assert job["checkpoint"] not in [
            c["name"] for c in d.ctl.call("ListCheckpoints", domain="lab2")["checkpoints"]]
        assert job_files(d, job["id"]) == []
    finally:
        stop_daemon(d)


def test_watch_tells_of_sessions_opening_and_closing(lab: Lab, daemon: Daemon) -> None:
    vda = Disk(lab, "lab1", "vda")
    vda.write(MiB, MiB, 0x5D)
    job = daemon.ctl.job("Start", domain="lab1", disks=["vda"])
    url = job["disks"][0]["url"]
    events: list[dict[str, Any]] = []
    watching = threading.Event()

    def watch() -> None:
        with Client(daemon.socket, timeout=60) as client:
            for reply in client.stream(f"{api.INTERFACE}.Watch", id=job["id"]):
                events.append(reply["event"])
                watching.set()

    watcher = threading.Thread(target=watch)
    watcher.start()
    assert watching.wait(30)
    h = connect(url)
    assert_same(h.pread(CHUNK, 0), vda.expected[:CHUNK])
    h.shutdown()
    deadline = time.monotonic() + 30
    while len(events) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    daemon.ctl.call("Finish", id=job["id"])
    watcher.join(30)
    kinds = [(e["kind"], e["session"] and e["session"]["ended"] is not None) for e in events]
    assert kinds == [("state", None), ("session", False), ("session", True), ("state", None)]
    assert events[2]["session"]["bytes_read"] == CHUNK
    assert events[2]["session"]["disk"] == "vda"


def test_max_lifetime_ends_a_job_even_while_it_is_read(lab: Lab, tmp_path: Path) -> None:
    d = start_daemon(tmp_path / "pullbackd", lab.uri,
                     exports=f"max_lifetime = {LIFETIME}")
    try:
        job = d.ctl.job("Start", domain="lab2", disks=["vdb"])
        reader = connect(job["disks"][0]["url"])
        end = events_until_end(d, job["id"])[-1]["job"]
        assert end["state"] == "expired" and "max_lifetime" in end["error"]
        assert end["appliance"]["total"] == 1  # the reader's session was open all along
        assert seconds_between(end["created"], end["ended"]) >= LIFETIME - 0.01, end
        with pytest.raises(nbd.Error):
            reader.pread(MiB, 0)
        assert job["checkpoint"] not in checkpoints(lab, "lab2")
    finally:
        stop_daemon(d)


def test_a_job_lists_its_last_sessions_and_counts_them_all(lab: Lab, tmp_path: Path) -> None:
    """Appliances connecting and closing hundreds of times: the record (and List's reply)
    stays small, the totals stay exact, across a restart too."""
    base = tmp_path / "pullbackd"
    first = start_daemon(base, lab.uri)
    job = first.ctl.job("Start", domain="lab2", disks=["vda"], consumer="chatty")
    [disk] = job["disks"]
    cycles = 3 * KEEP_SESSIONS
    for _ in range(cycles):
        h = connect(disk["url"])
        h.pread(4096, 0)
        h.shutdown()
    expected = read_export(disk["url"])  # one more, reading everything
    cycles += 1

    def appliance(d: Daemon) -> dict[str, Any]:
        deadline = time.monotonic() + 30
        while (a := d.ctl.job("Get", id=job["id"])["appliance"])["active"] and \
                time.monotonic() < deadline:
            time.sleep(0.05)
        return a  # type: ignore[no-any-return]

    seen = appliance(first)
    assert seen["total"] == cycles and len(seen["sessions"]) == KEEP_SESSIONS
    assert seen["bytes_read"] == (cycles - 1) * 4096 + DISK_SIZE
    assert [s["id"] for s in seen["sessions"]] == list(range(cycles - KEEP_SESSIONS + 1,
                                                             cycles + 1))
    assert len(encode({"parameters": first.ctl.call("List")})) < 64 * 1024
    stop_daemon(first)
    second = start_daemon(base, lab.uri, fdstore=first.manager.fdstore)
    try:
        now_seen = appliance(second)
        assert {k: v for k, v in now_seen.items() if k != "idle_since"} == \
            {k: v for k, v in seen.items() if k != "idle_since"}
        again = connect(disk["url"])
        assert_same(b"".join(again.pread(CHUNK, o) for o in range(0, DISK_SIZE, CHUNK)),
                    expected)
        again.shutdown()
        after = appliance(second)
        assert (after["total"], after["bytes_read"]) == (cycles + 1,
                                                         seen["bytes_read"] + DISK_SIZE)
        second.ctl.call("Abort", id=job["id"])
    finally:
        stop_daemon(second)
