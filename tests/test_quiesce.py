"""Consistent backups through the guest agent (quiesce.py), on the lab's agent guest: a file
written in the guest without a sync is in the backup; the guest is thawed right after the
backup began, and after a crash while it was frozen; without an agent, "required" changes
nothing and "auto" warns."""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

from pullbackd import crash

from .conftest import DISK_SIZE, Lab, lab_up, start_daemon, stop_daemon
from .test_agent_guest import Guest
from .test_crash import crashed

pytestmark = pytest.mark.lab


@pytest.fixture(scope="module")
def agent_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Lab, Guest]]:
    """lab1 (no agent) and guest1 (an agent, ext4 on vda)."""
    with lab_up(tmp_path_factory.mktemp("quiesce-lab"), "--domains", "1", "--size",
                str(DISK_SIZE), "--agent-guests", "1") as lab:
        conn = libvirt.open(lab.uri)
        try:
            yield lab, Guest(conn.lookupByName("guest1"), lab.dir / "disks" / "guest1-vda.qcow2")
        finally:
            conn.close()


@pytest.fixture
def guest(agent_lab: tuple[Lab, Guest]) -> Iterator[Guest]:
    """The guest, thawed after the test whatever happened."""
    yield agent_lab[1]
    if agent_lab[1].agent("guest-fsfreeze-status") != "thawed":
        agent_lab[1].agent("guest-fsfreeze-thaw")


def backed_up_file(url: str, path: str, tmp_path: Path) -> bytes:
    """The file `path` of the ext4 filesystem in the backup at `url` (nbdcopy, debugfs)."""
    raw = tmp_path / "backup.raw"
    subprocess.run(["nbdcopy", url, str(raw)], check=True, timeout=120)
    return subprocess.run(["debugfs", "-R", f"cat {path}", str(raw)], capture_output=True,
                          check=True).stdout


def test_a_file_not_yet_synced_is_in_a_quiesced_backup(
        agent_lab: tuple[Lab, Guest], guest: Guest, tmp_path: Path) -> None:
    lab = agent_lab[0]
    name, token = f"q-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    assert guest.run("/bin/sh", "-c", f"printf %s {token} > /data/{name}") == (0, b"")
    assert guest.host_view(f"/{name}", tmp_path) == b""  # in the page cache only
    d = start_daemon(tmp_path / "pullbackd", lab.uri)
    try:
        job = d.ctl.job("Start", domain="guest1", quiesce="required")
        assert (job["quiesce"], job["consistency"]) == ("required", "filesystem"), job
        assert 0 < job["frozen"] < 30, job
        assert guest.agent("guest-fsfreeze-status") == "thawed"
        assert backed_up_file(job["disks"][0]["url"], f"/{name}", tmp_path) == token.encode()
        assert d.ctl.job("Finish", id=job["id"])["state"] == "completed"
        log = d.log_text()
        assert "froze the guest's filesystems" in log
    finally:
        stop_daemon(d)


def test_a_crash_while_frozen_is_thawed_at_the_restart(
        agent_lab: tuple[Lab, Guest], guest: Guest, tmp_path: Path) -> None:
    lab = agent_lab[0]
    base = tmp_path / "pullbackd"
    d = start_daemon(base, lab.uri, env={crash.ENV: "start.frozen"})
    with pytest.raises(Exception):  # noqa: B017 (the daemon dies under the call)
        d.ctl.call("Start", domain="guest1")
    crashed(d)
    assert guest.agent("guest-fsfreeze-status") == "frozen"  # what a crash leaves
    again = start_daemon(base, lab.uri)
    try:
        assert guest.agent("guest-fsfreeze-status") == "thawed"
        [job] = again.ctl.call("List")["jobs"]
        assert job["state"] == "failed", job
        # And the next backup works, frozen and thawed again.
        nxt = again.ctl.job("Start", domain="guest1")
        assert nxt["consistency"] == "filesystem"
        assert again.ctl.job("Abort", id=nxt["id"])["state"] == "aborted"
    finally:
        stop_daemon(again)


def test_a_freeze_that_froze_nothing_is_no_freeze(
        agent_lab: tuple[Lab, Guest], guest: Guest, tmp_path: Path) -> None:
    """The agent skips a mountpoint it does not find and says it froze 0 filesystems, no
    error: such a backup was recorded as filesystem-consistent."""
    lab = agent_lab[0]
    d = start_daemon(tmp_path / "pullbackd", lab.uri)
    try:
        e = d.ctl.error("Start", domain="guest1", quiesce="required", mountpoints=["/nowhere"])
        assert e.short_name == "QuiesceFailed", e
        assert "it froze 0 filesystems, not the 1 asked" in e.parameters["reason"]
        assert guest.agent("guest-fsfreeze-status") == "thawed"
        job = d.ctl.job("Start", domain="guest1", mountpoints=["/nowhere"])
        assert (job["consistency"], job["frozen"]) == ("crash", None), job
        assert guest.agent("guest-fsfreeze-status") == "thawed"
        assert d.ctl.job("Abort", id=job["id"])["state"] == "aborted"
    finally:
        stop_daemon(d)


def test_a_freeze_the_agent_does_not_answer_holds_no_start(
        agent_lab: tuple[Lab, Guest], guest: Guest, tmp_path: Path) -> None:
    """A freeze held up in the guest: its data disk throttled to 16 KiB/s under 16 MiB it
    has not written yet, which the freeze writes first. libvirt would wait for the agent
    for ever, and the Start with it; it goes on crash-consistent once `agent_timeout`
    passed, and once the freeze ends (the throttle lifted) pullbackd thaws the guest,
    nobody asking."""
    lab = agent_lab[0]
    assert guest.run("/bin/sh", "-c", "dd if=/dev/urandom of=/data/held bs=1M count=16 "
                                      "2>/dev/null") == (0, b"")
    throttle = {"total_bytes_sec": 16 << 10}
    guest.dom.setBlockIoTune("vda", throttle, libvirt.VIR_DOMAIN_AFFECT_LIVE)
    d = start_daemon(tmp_path / "pullbackd", lab.uri, extra_config="[jobs]\nagent_timeout = 3\n")
    try:
        job = d.ctl.job("Start", domain="guest1")  # the client waits 120 s; the freeze 1000
        assert (job["consistency"], job["frozen"]) == ("crash", None), job
        assert "Guest agent is not responding" in d.log_text()
        guest.dom.setBlockIoTune("vda", {"total_bytes_sec": 0}, libvirt.VIR_DOMAIN_AFFECT_LIVE)
        deadline = time.monotonic() + 60
        while "the guest agent answered again" not in d.log_text():
            assert time.monotonic() < deadline, d.log_text()
            time.sleep(0.5)
        assert guest.agent("guest-fsfreeze-status") == "thawed"
        assert d.ctl.job("Abort", id=job["id"])["state"] == "aborted"
    finally:
        guest.dom.setBlockIoTune("vda", {"total_bytes_sec": 0}, libvirt.VIR_DOMAIN_AFFECT_LIVE)
        stop_daemon(d)


def test_without_an_agent(agent_lab: tuple[Lab, Guest], tmp_path: Path) -> None:
    """lab1 has no agent: "required" is refused and nothing is recorded; "auto" warns and
    goes on crash-consistent."""
    lab = agent_lab[0]
    d = start_daemon(tmp_path / "pullbackd", lab.uri)
    try:
        e = d.ctl.error("Start", domain="lab1", quiesce="required")
        assert (e.short_name, e.parameters) == (
            "QuiesceFailed", {"domain": "lab1", "reason": "no guest agent is connected"})
        assert d.ctl.call("List")["jobs"] == []
        job = d.ctl.job("Start", domain="lab1")
        assert (job["quiesce"], job["consistency"], job["frozen"]) == ("auto", "crash", None)
        assert "no guest agent is connected; the backup is crash-consistent" in d.log_text()
        assert d.ctl.job("Abort", id=job["id"])["state"] == "aborted"
    finally:
        stop_daemon(d)
