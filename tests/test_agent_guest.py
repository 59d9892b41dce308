"""The lab's agent guest (`scripts/lab up --agent-guests 1`): a tiny Linux under TCG whose
qemu-guest-agent answers, runs commands, and freezes its ext4 data disk for real.

The freeze test is the one a filesystem-freezing backup relies on: bytes written in the guest
without a sync live in its page cache, invisible on the host, until guest-fsfreeze-freeze
flushes them; after it, a copy of the disk image taken from the host (qemu-img convert -U,
then debugfs, no mount) holds them.
"""

from __future__ import annotations

import base64
import json
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import libvirt
import libvirt_qemu
import pytest

from .conftest import DISK_SIZE, lab_up

#: The fixture below brings up a lab of its own; conftest's lab_up requires the mark.
pytestmark = pytest.mark.lab

#: What a freeze before a backup needs from the agent; guest-sync-delimited is libvirt's.
NEEDED = ("guest-ping", "guest-sync-delimited", "guest-exec", "guest-exec-status",
          "guest-fsfreeze-freeze", "guest-fsfreeze-freeze-list", "guest-fsfreeze-thaw",
          "guest-fsfreeze-status")
EXEC_TIMEOUT = 30.0
AGENT_TIMEOUT = 10  # seconds, libvirt's wait for one reply


@dataclass
class Guest:
    dom: Any  # libvirt.virDomain
    disk: Path  # vda, the qcow2 on the host

    def agent(self, command: str, **arguments: Any) -> Any:
        """One agent command through libvirt (virsh qemu-agent-command); its `return`."""
        request = {"execute": command, **({"arguments": arguments} if arguments else {})}
        reply = libvirt_qemu.qemuAgentCommand(self.dom, json.dumps(request), AGENT_TIMEOUT, 0)
        return json.loads(reply)["return"]

    def run(self, *argv: str) -> tuple[int, bytes]:
        """argv in the guest through guest-exec: its exit code and its stdout."""
        pid = self.agent("guest-exec", path=argv[0], arg=list(argv[1:]),
                         **{"capture-output": True})["pid"]
        deadline = time.monotonic() + EXEC_TIMEOUT
        while not (status := self.agent("guest-exec-status", pid=pid))["exited"]:
            assert time.monotonic() < deadline, f"{argv} still runs after {EXEC_TIMEOUT} s"
            time.sleep(0.05)
        return status["exitcode"], base64.b64decode(status.get("out-data", ""))

    def host_view(self, path: str, scratch: Path) -> bytes:
        """The file at `path` of vda's file system as the host sees the image now: a raw
        copy (-U: QEMU holds the image's lock), read by debugfs; b"" if it is not there."""
        raw = scratch / "vda.raw"
        subprocess.run(["qemu-img", "convert", "-U", "-f", "qcow2", "-O", "raw",
                        str(self.disk), str(raw)], check=True)
        try:
            proc = subprocess.run(["debugfs", "-R", f"cat {path}", str(raw)],
                                  capture_output=True, check=True)
        finally:
            raw.unlink()
        return proc.stdout


@pytest.fixture(scope="module")
def guest(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Guest]:
    """guest1 up, its agent answering (`up` waits for guest-ping); lab1 beside it."""
    with lab_up(tmp_path_factory.mktemp("agent-lab"), "--domains", "1", "--size",
                str(DISK_SIZE), "--agent-guests", "1") as lab:
        conn = libvirt.open(lab.uri)
        try:
            yield Guest(conn.lookupByName("guest1"), lab.dir / "disks" / "guest1-vda.qcow2")
        finally:
            conn.close()


@pytest.fixture
def thawed(guest: Guest) -> Iterator[Guest]:
    """The guest, thawed again after the test whatever it did (a frozen /data would make
    every later guest-exec fail)."""
    yield guest
    if guest.agent("guest-fsfreeze-status") != "thawed":
        guest.agent("guest-fsfreeze-thaw")


def test_the_agent_answers_guest_ping(guest: Guest) -> None:
    assert guest.agent("guest-ping") == {}


def test_the_agent_allows_what_a_freeze_needs(guest: Guest) -> None:
    info = guest.agent("guest-info")
    enabled = {c["name"] for c in info["supported_commands"] if c["enabled"]}
    assert set(NEEDED) <= enabled, sorted(set(NEEDED) - enabled)


def test_guest_exec_writes_into_data_and_reads_it_back(guest: Guest) -> None:
    assert guest.run("/bin/sh", "-c", "echo hello > /data/f") == (0, b"")
    assert guest.run("/bin/cat", "/data/f") == (0, b"hello\n")
    assert guest.run("/bin/sh", "-c", "grep ' /data ' /proc/mounts")[1].split()[:3] == [
        b"/dev/vda", b"/data", b"ext4"]


def test_a_freeze_puts_unsynced_data_into_the_image(thawed: Guest, tmp_path: Path) -> None:
    # A new file with new bytes: a rewrite of an older file could have been written back
    # already (ext4 flushes a truncated-then-rewritten file at close).
    name, token = f"frozen-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex.encode()
    assert thawed.run("/bin/sh", "-c", f"printf %s {token.decode()} > /data/{name}") == (0, b"")
    # Not synced: in the guest's page cache, not in the image (writeback waits ~30 s, and
    # the journal's commits do not write the directory block in place). Without this the
    # check below would not show that the freeze is what wrote it.
    assert thawed.host_view(f"/{name}", tmp_path) == b""

    assert thawed.agent("guest-fsfreeze-freeze") == 1  # /data: the one real file system
    assert thawed.agent("guest-fsfreeze-status") == "frozen"
    assert thawed.host_view(f"/{name}", tmp_path) == token


def test_thaw_returns_the_guest_to_thawed(thawed: Guest) -> None:
    assert thawed.agent("guest-fsfreeze-freeze") == 1
    assert thawed.agent("guest-fsfreeze-status") == "frozen"
    with pytest.raises(libvirt.libvirtError, match="frozen"):  # the agent refuses while frozen
        thawed.run("/bin/sh", "-c", "echo no > /data/refused")
    assert thawed.agent("guest-fsfreeze-thaw") == 1
    assert thawed.agent("guest-fsfreeze-status") == "thawed"
    assert thawed.run("/bin/sh", "-c", "echo again > /data/after-thaw && cat /data/after-thaw"
                      ) == (0, b"again\n")
