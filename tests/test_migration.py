"""The migration gate, on two libvirt instances of the lab (two hosts in one machine)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nbd
import pytest

from pullbackd import api
from pullbackd.control.client import Client, VarlinkError

from .conftest import DISK_SIZE, Daemon, Lab, lab_up, serving
from .images import Disk, MiB, apply_incremental, assert_image, assert_same, connect, read_export

#: [migration] grace: seconds, a fraction of one, so that the tests need not wait whole ones.
GRACE_SECONDS = 0.5
GRACE = f"[migration]\ngrace = {GRACE_SECONDS}\n"


def virsh(lab: Lab, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["virsh", "-q", "-c", lab.uri, *args], capture_output=True,
                          text=True, timeout=120, check=check)


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, tuple[Lab, Daemon]]]:
    """Two libvirt instances with a pullbackd each; lab1 (two disks) runs on "a"."""
    with lab_up(tmp_path_factory.mktemp("host-a"), "--domains", "1", "--disks", "2",
                "--size", str(DISK_SIZE)) as a, \
            lab_up(tmp_path_factory.mktemp("host-b"), "--domains", "1") as b:
        virsh(b, "destroy", "lab1")
        virsh(b, "undefine", "lab1")
        with serving(tmp_path_factory.mktemp("pullbackd-a"), a.uri, extra_config=GRACE) as da, \
                serving(tmp_path_factory.mktemp("pullbackd-b"), b.uri, extra_config=GRACE) as db:
            yield {"a": (a, da), "b": (b, db)}


def where(hosts: dict[str, tuple[Lab, Daemon]]) -> tuple[tuple[Lab, Daemon], tuple[Lab, Daemon]]:
    """(the host lab1 runs on, the other one)."""
    a, b = hosts["a"], hosts["b"]
    here = virsh(a[0], "domstate", "lab1", check=False).stdout.strip() == "running"
    return (a, b) if here else (b, a)


def destination(lab: Lab) -> str:
    return f"qemu+unix:///system?socket={lab.dir}/sock/libvirt-sock"


class Migration(threading.Thread):
    """Migrate(...) with `more`, its steps collected as they come."""

    def __init__(self, daemon: Daemon, **params: Any) -> None:
        super().__init__(daemon=True)
        self.socket, self.params = daemon.socket, params
        self.steps: list[dict[str, Any]] = []
        self.error: VarlinkError | None = None
        self.first = threading.Event()
        self.start()

    def run(self) -> None:
        try:
            with Client(self.socket, timeout=300) as client:
                for reply in client.stream(f"{api.INTERFACE}.Migrate", **self.params):
                    self.steps.append(reply["step"])
                    self.first.set()
        except VarlinkError as e:
            self.error = e
        finally:
            self.first.set()

    def states(self) -> list[str]:
        return [s["state"] for s in self.steps]


def test_the_gate_waits_for_the_reader_and_the_chain_follows_the_domain(
        hosts: dict[str, tuple[Lab, Daemon]], tmp_path: Path) -> None:
    (lab, here), (lab_there, there) = where(hosts)
    vda, vdb = Disk(lab, "lab1", "vda"), Disk(lab, "lab1", "vdb")
    vda.write(0, 2 * MiB, 0x41)
    vdb.write(3 * MiB, MiB, 0x42)
    job = here.ctl.job("Start", domain="lab1")
    urls = {d["name"]: d["url"] for d in job["disks"]}
    reader = connect(urls["vda"])
    first_half = reader.pread(DISK_SIZE // 2, 0)  # mid-stream when the migration is asked

    migration = Migration(here, domain="lab1", destination=destination(lab_there), unsafe=True)
    assert migration.first.wait(60)
    assert migration.steps == [{"state": "draining", "jobs": [job["id"]], "sessions": 1,
                                "message": None}]
    assert here.ctl.error("Start", domain="lab1").short_name == "MigrationPending"
    time.sleep(2 * GRACE_SECONDS)  # past the grace: an open session holds the gate all the same
    assert migration.states() == ["draining"]
    # The appliance reads on: the rest of vda, and vdb in a new session.
    image = tmp_path / "vda.raw"
    image.write_bytes(first_half + reader.pread(DISK_SIZE // 2, DISK_SIZE // 2))
    vdb_read = read_export(urls["vdb"])
    assert migration.states() == ["draining"]
    # Finish within the grace after the last session closes (the gate would end the job).
    reader.shutdown()
    assert here.ctl.job("Finish", id=job["id"])["state"] == "completed"
    assert_same(image.read_bytes(), vda.expected)
    assert_same(vdb_read, vdb.expected)
    migration.join(300)
    assert migration.error is None and migration.states() == [
        "draining", "migrating", "completed"]
    assert virsh(lab_there, "domstate", "lab1").stdout.strip() == "running"

    # Where it landed, a pullbackd that never saw it goes on with its chain.
    vda.lab = lab_there
    vda.mark()
    vda.write(5 * MiB, MiB, 0x43)
    incr = there.ctl.job("Start", domain="lab1", disks=["vda"], mode="incremental")
    disk = incr["disks"][0]
    assert incr["since"] == job["checkpoint"] and disk["mode"] == "incremental"
    assert apply_incremental(disk["url"], disk["bitmap"], image) == vda.dirty_since_mark()
    there.ctl.call("Finish", id=incr["id"])
    assert_image(image, vda, tmp_path)


def test_a_migration_that_would_cut_a_reader_is_blocked_unless_forced(
        hosts: dict[str, tuple[Lab, Daemon]]) -> None:
    (_, here), (lab_there, _) = where(hosts)
    job = here.ctl.job("Start", domain="lab1", disks=["vda"])
    reader = connect(job["disks"][0]["url"])
    blocked = Migration(here, domain="lab1", destination=destination(lab_there), unsafe=True,
                        drain_timeout=1)
    blocked.join(120)
    assert blocked.states() == ["draining"] and blocked.error is not None
    assert blocked.error.short_name == "MigrationBlocked"
    assert blocked.error.parameters == {"domain": "lab1", "jobs": [job["id"]], "sessions": 1}
    # Nothing was touched: the backup runs and the appliance reads.
    assert here.ctl.job("Get", id=job["id"])["state"] == "ready"
    reader.pread(MiB, 0)

    forced = Migration(here, domain="lab1", destination=destination(lab_there), unsafe=True,
                       drain_timeout=1, force=True)
    forced.join(300)
    assert forced.error is None and forced.states() == ["draining", "migrating", "completed"]
    aborted = here.ctl.job("Get", id=job["id"])
    assert aborted["state"] == "aborted"
    with pytest.raises(nbd.Error):
        reader.pread(MiB, 0)
    assert virsh(lab_there, "domstate", "lab1").stdout.strip() == "running"
    assert job["checkpoint"] not in [c["name"] for c in here.ctl.call(
        "ListCheckpoints", domain="lab1")["checkpoints"]]


def test_a_backup_nobody_reads_is_ended_after_the_grace(
        hosts: dict[str, tuple[Lab, Daemon]]) -> None:
    (_, here), (lab_there, _) = where(hosts)
    job = here.ctl.job("Start", domain="lab1", disks=["vdb"])
    migration = Migration(here, domain="lab1", destination=destination(lab_there), unsafe=True)
    migration.join(300)
    assert migration.error is None and migration.states() == [
        "draining", "migrating", "completed"]
    ended = here.ctl.job("Get", id=job["id"])
    assert ended["state"] == "failed" and "migration" in ended["error"]
    assert job["checkpoint"] not in [c["name"] for c in here.ctl.call(
        "ListCheckpoints", domain="lab1")["checkpoints"]]


def test_a_migration_outside_pullbackd_is_refused_and_the_reader_reads_on(
        hosts: dict[str, tuple[Lab, Daemon]]) -> None:
    (lab, here), (lab_there, _) = where(hosts)
    vda = Disk(lab, "lab1", "vda")
    vda.write(7 * MiB, MiB, 0x44)
    job = here.ctl.job("Start", domain="lab1", disks=["vda"])
    reader = connect(job["disks"][0]["url"])
    refused = virsh(lab, "migrate", "--live", "--p2p", "--persistent", "--undefinesource",
                    "--unsafe", "lab1", destination(lab_there), check=False)
    assert refused.returncode != 0
    assert virsh(lab, "domstate", "lab1").stdout.strip() == "running"
    whole = b"".join(reader.pread(8 * MiB, o) for o in range(0, DISK_SIZE, 8 * MiB))
    assert_same(whole, vda.expected)
    reader.shutdown()
    assert here.ctl.job("Finish", id=job["id"])["state"] == "completed"


def test_pullbackctl_migrate(hosts: dict[str, tuple[Lab, Daemon]]) -> None:
    (_, here), (lab_there, _) = where(hosts)
    proc = subprocess.run(
        [sys.executable, "-m", "pullbackd.cli", "--socket", str(here.socket), "migrate", "lab1",
         destination(lab_there), "--unsafe", "--drain-timeout", "5"],
        capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines() == ["draining: no backups running", "migrating", "completed"]
    assert virsh(lab_there, "domstate", "lab1").stdout.strip() == "running"
    again = subprocess.run(
        [sys.executable, "-m", "pullbackd.cli", "--socket", str(here.socket), "migrate", "lab1",
         destination(lab_there)], capture_output=True, text=True, timeout=300, check=False)
    assert again.returncode == 1 and "NoSuchDomain" in again.stderr  # it left this host


def test_a_migration_copying_the_storage_keeps_the_next_backup_exact(
        hosts: dict[str, tuple[Lab, Daemon]], tmp_path_factory: pytest.TempPathFactory,
        tmp_path: Path) -> None:
    """Last in this module: lab1 ends on a third host that has disks of its own."""
    (lab, here), _ = where(hosts)
    disks = hosts["a"][0].dir / "disks"  # where lab1's disk files are, whichever host runs it
    with lab_up(tmp_path_factory.mktemp("host-c"), "--domains", "1", "--own", str(disks)) as c, \
            serving(tmp_path_factory.mktemp("pullbackd-c"), c.uri) as far:
        virsh(c, "destroy", "lab1")
        virsh(c, "undefine", "lab1")
        for name in ("vda", "vdb"):  # what libvirt copies into, at the same paths
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2",
                            str(c.dir / "own" / "0" / f"lab1-{name}.qcow2"), str(DISK_SIZE)],
                           check=True)
        vda = Disk(lab, "lab1", "vda")
        vda.write(MiB, 2 * MiB, 0x51)
        full = here.ctl.job("Start", domain="lab1", disks=["vda"], consumer="far")
        image = tmp_path / "vda.raw"
        image.write_bytes(read_export(full["disks"][0]["url"]))
        here.ctl.call("Finish", id=full["id"])
        vda.write(20 * MiB, MiB, 0x52)

        moved = Migration(here, domain="lab1", destination=destination(c), copy_storage=True)
        moved.join(300)
        assert moved.error is None and moved.states() == ["draining", "migrating", "completed"]
        vda.lab = c
        vda.write(40 * MiB, MiB, 0x53)
        nxt = far.ctl.job("Start", domain="lab1", disks=["vda"], consumer="far",
                          mode="incremental")
        disk = nxt["disks"][0]
        # libvirt copies the bitmaps along with the disks; the chain came in the metadata.
        assert disk["mode"] == "incremental" and nxt["since"] == full["checkpoint"], disk
        assert apply_incremental(disk["url"], disk["bitmap"], image) == [
            (20 * MiB, MiB), (40 * MiB, MiB)]
        far.ctl.call("Finish", id=nxt["id"])
        assert_image(image, vda, tmp_path)
