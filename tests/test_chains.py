"""Incremental and differential backups on checkpoint chains, on the real lab.

Each test rebuilds the disk from a full backup plus what the incrementals
export (read through their dirty bitmaps with libnbd), and compares it byte
for byte with what the guest wrote.
"""

from __future__ import annotations

import random
import shutil
import subprocess
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from pullbackd.xml import CHAINS_NS

from .conftest import DISK_SIZE, Daemon, Lab
from .images import (
    GRANULARITY,
    Disk,
    MiB,
    apply_incremental,
    assert_image,
    copy_full,
)

Job = dict[str, Any]


class Appliance:
    """A backup product's side: keeps one image per disk, rebuilt backup by backup."""

    def __init__(self, daemon: Daemon, domain: str, consumer: str, tmp_path: Path) -> None:
        self.daemon, self.domain, self.consumer = daemon, domain, consumer
        self.dir = tmp_path / consumer
        self.dir.mkdir(exist_ok=True)

    def image(self, disk: str) -> Path:
        return self.dir / f"{disk}.raw"

    def start(self, mode: str, **params: Any) -> Job:
        return self.daemon.ctl.job("Start", domain=self.domain, consumer=self.consumer,
                                   mode=mode, **params)

    def read(self, job: Job) -> dict[str, list[tuple[int, int]]]:
        """Copy what the job exports into the images; return each incremental disk's extents."""
        extents = {}
        for disk in job["disks"]:
            if disk["mode"] == "full":
                self.image(disk["name"]).unlink(missing_ok=True)
                copy_full(disk["url"], self.image(disk["name"]))
            else:
                assert disk["bitmap"] == f"qemu:dirty-bitmap:backup-{disk['name']}"
                extents[disk["name"]] = apply_incremental(
                    disk["url"], disk["bitmap"], self.image(disk["name"]))
        return extents

    def backup(self, mode: str, **params: Any) -> tuple[Job, dict[str, list[tuple[int, int]]]]:
        job = self.start(mode, **params)
        extents = self.read(job)
        done = self.daemon.ctl.job("Finish", id=job["id"])
        assert done["state"] == "completed", done
        return job, extents


@pytest.fixture
def disks(lab: Lab) -> tuple[Disk, Disk]:
    return Disk(lab, "lab1", "vda"), Disk(lab, "lab1", "vdb")


def test_full_then_incremental_exports_exactly_the_changes(
        daemon: Daemon, disks: tuple[Disk, Disk], tmp_path: Path) -> None:
    vda, vdb = disks
    app = Appliance(daemon, "lab1", "exact", tmp_path)
    vda.write(0, MiB, 0x11)  # A
    full, _ = app.backup("full")
    assert full["mode"] == "full" and full["consumer"] == "exact"
    assert full["checkpoint"] == f"pullbackd.exact.{full['id']}"
    assert [d["mode"] for d in full["disks"]] == ["full", "full"]

    for d in disks:
        d.mark()
    vda.write(MiB + 4096, 8192, 0x22)  # B: unaligned, inside one 64 KiB block
    vda.write(30 * MiB - 100, 200, 0x23)  # across a block boundary
    vdb.write(DISK_SIZE - GRANULARITY, GRANULARITY, 0x24)  # the last block
    incr, extents = app.backup("incremental")
    assert incr["mode"] == "incremental" and incr["since"] == full["checkpoint"]
    assert [(d["mode"], d["since"]) for d in incr["disks"]] == \
        [("incremental", full["checkpoint"])] * 2
    assert extents == {"vda": vda.dirty_since_mark(), "vdb": vdb.dirty_since_mark()}
    for d in disks:
        assert_image(app.image(d.name), d, tmp_path)

    names = [c["name"] for c in daemon.ctl.call("ListCheckpoints", domain="lab1",
                                                consumer="exact")["checkpoints"]]
    assert names == [full["checkpoint"], incr["checkpoint"]]


def test_differential_covers_everything_since_its_checkpoint(
        daemon: Daemon, disks: tuple[Disk, Disk], tmp_path: Path) -> None:
    vda, _ = disks
    app = Appliance(daemon, "lab1", "diff", tmp_path)
    full, _ = app.backup("full")
    base = tmp_path / "vda.full.raw"
    shutil.copyfile(app.image("vda"), base)
    vda.mark()
    vda.write(2 * MiB, MiB, 0x31)
    app.backup("incremental")
    vda.write(40 * MiB, 3 * MiB, 0x32)
    diff = app.start("differential", since=full["checkpoint"])
    assert diff["mode"] == "differential" and diff["since"] == full["checkpoint"]
    export = next(d for d in diff["disks"] if d["name"] == "vda")
    assert export["since"] == full["checkpoint"]
    # The full image plus the differential alone rebuild the disk.
    assert apply_incremental(export["url"], export["bitmap"], base) == vda.dirty_since_mark()
    assert_image(base, vda, tmp_path)
    assert daemon.ctl.job("Finish", id=diff["id"])["state"] == "completed"
    chain = daemon.ctl.call("ListCheckpoints", domain="lab1", consumer="diff")["checkpoints"]
    assert chain[-1]["name"] == diff["checkpoint"]


def test_failed_and_aborted_incrementals_lose_nothing(
        daemon: Daemon, disks: tuple[Disk, Disk], tmp_path: Path) -> None:
    vda, vdb = disks
    app = Appliance(daemon, "lab1", "flaky", tmp_path)
    app.backup("full")
    for d in disks:
        d.mark()
    vda.write(5 * MiB, MiB, 0x41)
    aborted = app.start("incremental")
    assert daemon.ctl.job("Abort", id=aborted["id"])["state"] == "aborted"
    vdb.write(7 * MiB, 64 << 10, 0x42)
    failed = app.start("incremental")
    app.read(failed)  # the appliance read it, then found its copy bad
    result = daemon.ctl.job("Finish", id=failed["id"], success=False)
    assert result["state"] == "failed" and "appliance" in result["error"]
    vda.write(9 * MiB, MiB, 0x43)
    # The chain never gained the two checkpoints: this covers all three writes.
    ok, extents = app.backup("incremental")
    assert extents == {"vda": vda.dirty_since_mark(), "vdb": vdb.dirty_since_mark()}
    for d in disks:
        assert_image(app.image(d.name), d, tmp_path)
    chain = [c["name"] for c in daemon.ctl.call("ListCheckpoints", domain="lab1",
                                                consumer="flaky")["checkpoints"]]
    assert aborted["checkpoint"] not in chain and failed["checkpoint"] not in chain
    assert chain[-1] == ok["checkpoint"]


def test_two_consumers_interleave(
        daemon: Daemon, disks: tuple[Disk, Disk], tmp_path: Path) -> None:
    vda, _ = disks
    a = Appliance(daemon, "lab1", "prod-a", tmp_path)
    b = Appliance(daemon, "lab1", "prod-b", tmp_path)
    a.backup("full")
    vda.write(11 * MiB, MiB, 0x51)
    b.backup("full")
    vda.write(12 * MiB, MiB, 0x52)
    _, ea = a.backup("incremental")  # since a's full: both writes
    assert ea["vda"] == [(11 * MiB, 2 * MiB)]
    vda.write(13 * MiB, MiB, 0x53)
    _, eb = b.backup("incremental")  # since b's full: the last two
    assert eb["vda"] == [(12 * MiB, 2 * MiB)]
    vda.write(20 * MiB, MiB, 0x54)
    _, ea = a.backup("incremental")
    assert ea["vda"] == [(13 * MiB, MiB), (20 * MiB, MiB)]
    assert_image(a.image("vda"), vda, tmp_path)
    _, eb = b.backup("incremental")
    assert eb["vda"] == [(20 * MiB, MiB)]
    assert_image(b.image("vda"), vda, tmp_path)

    # Deleting one chain leaves the other working.
    deleted = daemon.ctl.call("DeleteChain", domain="lab1", consumer="prod-b")["deleted"]
    assert len(deleted) == 2  # [chains] keep = 1: its full backup's, and its newest
    assert daemon.ctl.call("ListCheckpoints", domain="lab1", consumer="prod-b") == \
        {"checkpoints": []}
    vda.write(21 * MiB, MiB, 0x55)
    _, ea = a.backup("incremental")
    assert ea["vda"] == [(21 * MiB, MiB)]
    assert_image(a.image("vda"), vda, tmp_path)
    again = b.start("incremental")
    assert again["mode"] == "full"
    assert all(d["fallback"] and "no earlier backup" in d["fallback"] for d in again["disks"])
    daemon.ctl.call("Abort", id=again["id"])


def test_a_chain_of_twenty(daemon: Daemon, disks: tuple[Disk, Disk], tmp_path: Path) -> None:
    rng = random.Random(20)
    app = Appliance(daemon, "lab1", "long", tmp_path)
    app.backup("full")
    for step in range(20):
        for d in disks:
            d.mark()
        for _ in range(rng.randint(1, 4)):
            d = rng.choice(disks)
            length = rng.choice([512, 4096, 65536, 200_000, MiB])
            d.write(rng.randrange(0, DISK_SIZE - length, 512), length, rng.randrange(256))
        _, extents = app.backup("incremental")
        assert extents == {d.name: d.dirty_since_mark() for d in disks}, f"step {step}"
        for d in disks:
            assert_image(app.image(d.name), d, tmp_path)


def virsh(lab: Lab, *args: str) -> str:
    return subprocess.run(["virsh", "-q", "-c", lab.uri, *args], check=True,
                          capture_output=True, text=True, timeout=60).stdout


def libvirt_checkpoints(lab: Lab, domain: str) -> set[str]:
    return set(virsh(lab, "checkpoint-list", domain, "--name").split())


@contextmanager
def domain_like(lab: Lab, template: str, name: str, folder: Path,
                disks: dict[str, tuple[Path, str]], *, start: bool = False,
                edit: Callable[[ET.Element], None] | None = None,
                transient: bool = False) -> Iterator[None]:
    """A domain `name` defined as `template` is, but for its disks: `disks` alone, each
    target with its image file and format (made by the caller, or not: a missing image is
    what some tests want), and what `edit` changes. Destroyed and undefined, checkpoint
    metadata, NVRAM and TPM state with it, after. `transient`: started without a
    definition (`virsh create`), gone once destroyed."""
    domain = ET.fromstring(virsh(lab, "dumpxml", "--inactive", template))
    domain.find("name").text = name  # type: ignore[union-attr]
    domain.remove(domain.find("uuid"))  # type: ignore[arg-type]
    devices = domain.find("devices")
    assert devices is not None
    for disk in list(devices.iterfind("disk")):
        target = disk.find("target").get("dev", "")  # type: ignore[union-attr]
        if target not in disks:
            devices.remove(disk)
            continue
        path, fmt = disks[target]
        disk.find("source").set("file", str(path))  # type: ignore[union-attr]
        disk.find("driver").set("type", fmt)  # type: ignore[union-attr]
    if edit is not None:
        edit(domain)
    (folder / f"{name}.xml").write_bytes(ET.tostring(domain))
    virsh(lab, "create" if transient else "define", str(folder / f"{name}.xml"))
    try:
        if start and not transient:
            virsh(lab, "start", name)
        yield
    finally:
        subprocess.run(["virsh", "-q", "-c", lab.uri, "destroy", name], check=False,
                       capture_output=True, timeout=60)
        if not transient:
            virsh(lab, "undefine", name, "--checkpoints-metadata", "--nvram")


def new_image(path: Path, fmt: str = "qcow2") -> Path:
    """An empty disk image of DISK_SIZE."""
    subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(path), str(DISK_SIZE)],
                   check=True)
    return path


def test_a_chain_keeps_what_incrementals_and_differentials_need(
        daemon: Daemon, lab: Lab, disks: tuple[Disk, Disk], tmp_path: Path) -> None:
    """[chains] keep = 1 (the default): per disk, the newest checkpoint and the one of
    its newest full backup stay; older ones leave the chain and libvirt."""
    vda, vdb = disks
    app = Appliance(daemon, "lab1", "trim", tmp_path)

    def chain() -> list[str]:
        return [c["name"] for c in daemon.ctl.call("ListCheckpoints", domain="lab1",
                                                   consumer="trim")["checkpoints"]]

    def in_libvirt() -> list[str]:
        return sorted(n for n in libvirt_checkpoints(lab, "lab1")
                      if n.startswith("pullbackd.trim."))

    full, _ = app.backup("full")
    base = tmp_path / "vda.full.raw"
    shutil.copyfile(app.image("vda"), base)
    vda.mark()
    vda.write(3 * MiB, MiB, 0x61)
    first, _ = app.backup("incremental")
    vdb.write(4 * MiB, MiB, 0x62)
    only_vdb, _ = app.backup("incremental", disks=["vdb"])
    # vda's newest is still `first`: it stays while only_vdb has no bitmap of vda.
    assert chain() == [full["checkpoint"], first["checkpoint"], only_vdb["checkpoint"]]
    vda.write(6 * MiB, MiB, 0x63)
    last, extents = app.backup("incremental")
    assert extents["vda"] == [(6 * MiB, MiB)]
    assert chain() == [full["checkpoint"], last["checkpoint"]]
    assert in_libvirt() == sorted(chain())
    for d in disks:
        assert_image(app.image(d.name), d, tmp_path)
    # A differential since the full backup still covers everything since.
    vda.write(8 * MiB, MiB, 0x64)
    diff = app.start("differential", since=full["checkpoint"], disks=["vda"])
    [export] = diff["disks"]
    assert apply_incremental(export["url"], export["bitmap"], base) == vda.dirty_since_mark()
    assert_image(base, vda, tmp_path)
    daemon.ctl.call("Abort", id=diff["id"])
    assert "trimmed a chain to [chains] keep" in daemon.log_text()


def test_bad_chain_requests_change_nothing(daemon: Daemon, lab: Lab, tmp_path: Path) -> None:
    app = Appliance(daemon, "lab1", "strict", tmp_path)
    other = Appliance(daemon, "lab1", "other", tmp_path)
    full, _ = app.backup("full")
    theirs, _ = other.backup("full")
    before = daemon.ctl.call("ListCheckpoints", domain="lab1")
    jobs_before = len(daemon.ctl.call("List")["jobs"])

    e = daemon.ctl.error("Start", domain="lab1", consumer="strict", mode="differential",
                         since=theirs["checkpoint"])
    assert e.short_name == "NoSuchCheckpoint"
    assert e.parameters == {"domain": "lab1", "consumer": "strict",
                            "checkpoint": theirs["checkpoint"]}
    assert daemon.ctl.error("Start", domain="lab1", consumer="strict", mode="differential",
                            since="pullbackd.strict.nope").short_name == "NoSuchCheckpoint"
    for params, parameter in [
        ({"mode": "differential"}, "since"),
        ({"mode": "incremental", "since": full["checkpoint"]}, "since"),
        ({"consumer": "Has Caps"}, "consumer"),
        ({"consumer": "x" * 33}, "consumer"),
        ({"consumer": ""}, "consumer"),
        ({"mode": "sideways"}, "mode"),
    ]:
        e = daemon.ctl.error("Start", domain="lab1", **params)
        assert (e.name, e.parameters) == ("org.varlink.service.InvalidParameter",
                                          {"parameter": parameter}), params
    for target_dir, reason in [(str(tmp_path / "missing"), "no such folder"),
                               ("relative/dir", "not an absolute path")]:
        e = daemon.ctl.error("Start", domain="lab1", target_dir=target_dir)
        assert e.short_name == "TargetNotWritable"
        assert e.parameters == {"target_dir": target_dir, "reason": reason}
    assert daemon.ctl.error("ListCheckpoints", domain="lab1", consumer="A").name == \
        "org.varlink.service.InvalidParameter"
    assert daemon.ctl.error("DeleteChain", domain="lab1", consumer="../x").name == \
        "org.varlink.service.InvalidParameter"

    assert daemon.ctl.call("ListCheckpoints", domain="lab1") == before
    assert len(daemon.ctl.call("List")["jobs"]) == jobs_before


@pytest.fixture
def read_only_dir(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "ro"
    path.mkdir()
    subprocess.run(["mount", "--bind", str(path), str(path)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(path)], check=True)
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def test_push_to_a_read_only_folder_is_refused(daemon: Daemon, read_only_dir: Path) -> None:
    e = daemon.ctl.error("Start", domain="lab1", target_dir=str(read_only_dir))
    assert e.short_name == "TargetNotWritable"
    assert e.parameters == {"target_dir": str(read_only_dir),
                            "reason": "not writable by pullbackd's user (root)"}


def test_lost_checkpoint_metadata_is_redefined(
        daemon: Daemon, lab: Lab, disks: tuple[Disk, Disk], tmp_path: Path) -> None:
    vda, _ = disks
    app = Appliance(daemon, "lab1", "amnesia", tmp_path)
    full, _ = app.backup("full")
    vda.mark()
    vda.write(17 * MiB, MiB, 0x61)
    # Someone drops libvirt's metadata; the bitmaps stay in the images, recording.
    virsh(lab, "checkpoint-delete", "lab1", full["checkpoint"], "--metadata")
    assert full["checkpoint"] not in libvirt_checkpoints(lab, "lab1")
    vda.write(18 * MiB, MiB, 0x62)
    incr, extents = app.backup("incremental")
    assert incr["mode"] == "incremental"
    assert [d["mode"] for d in incr["disks"]] == ["incremental", "incremental"]
    assert extents["vda"] == vda.dirty_since_mark()
    for d in disks:
        assert_image(app.image(d.name), d, tmp_path)
    assert {full["checkpoint"], incr["checkpoint"]} <= libvirt_checkpoints(lab, "lab1")


def test_removed_bitmap_makes_that_disk_alone_full(
        daemon: Daemon, lab: Lab, tmp_path: Path) -> None:
    vda, vdb = Disk(lab, "lab4", "vda"), Disk(lab, "lab4", "vdb")
    app = Appliance(daemon, "lab4", "broken", tmp_path)
    full, _ = app.backup("full")
    for d in (vda, vdb):
        d.mark()
    vda.write(3 * MiB, MiB, 0x71)
    vdb.write(4 * MiB, MiB, 0x72)
    lab.run("stop", "lab4")
    subprocess.run(["qemu-img", "bitmap", "--remove", str(lab.dir / "disks" / "lab4-vdb.qcow2"),
                    full["checkpoint"]], check=True, timeout=60)
    lab.run("start", "lab4")
    incr, extents = app.backup("incremental")
    modes = {d["name"]: (d["mode"], d["fallback"]) for d in incr["disks"]}
    assert modes["vda"] == ("incremental", None)
    assert modes["vdb"][0] == "full" and full["checkpoint"] in modes["vdb"][1]
    assert incr["mode"] == "incremental"
    assert extents == {"vda": vda.dirty_since_mark()}
    for d in (vda, vdb):
        assert_image(app.image(d.name), d, tmp_path)
    # vdb's chain restarted with that backup: the next one is incremental on both.
    for d in (vda, vdb):
        d.mark()
    vdb.write(5 * MiB, MiB, 0x73)
    again, extents = app.backup("incremental")
    assert [d["mode"] for d in again["disks"]] == ["incremental", "incremental"]
    assert extents == {"vda": [], "vdb": vdb.dirty_since_mark()}
    for d in (vda, vdb):
        assert_image(app.image(d.name), d, tmp_path)


def test_checkpoint_of_a_backup_cut_short_is_deleted_while_the_domain_is_off(
        daemon: Daemon, lab: Lab, tmp_path: Path) -> None:
    """libvirt deletes no checkpoint of a shut-off domain: pullbackd takes its bitmap out of
    the image, then libvirt's metadata, at once; the chain goes on exactly."""
    vda = Disk(lab, "lab4", "vda")
    app = Appliance(daemon, "lab4", "cut", tmp_path)
    app.backup("full", disks=["vda"])
    vda.mark()
    vda.write(8 * MiB, MiB, 0x81)
    cut = app.start("incremental", disks=["vda"])
    lab.run("stop", "lab4")
    assert daemon.ctl.job("Finish", id=cut["id"])["state"] == "failed"
    assert cut["checkpoint"] not in libvirt_checkpoints(lab, "lab4")
    info = subprocess.run(["qemu-img", "info", "-U", str(lab.dir / "disks" / "lab4-vda.qcow2")],
                          check=True, capture_output=True, text=True).stdout
    assert cut["checkpoint"] not in info and "pullbackd.cut." in info, info
    lab.run("start", "lab4")
    assert cut["checkpoint"] not in [c["name"] for c in daemon.ctl.call(
        "ListCheckpoints", domain="lab4", consumer="cut")["checkpoints"]]
    vda.write(9 * MiB, MiB, 0x82)
    _, extents = app.backup("incremental", disks=["vda"])
    assert extents == {"vda": vda.dirty_since_mark()}
    assert_image(app.image("vda"), vda, tmp_path)


def qemu_img_compare(image: Path, disk: Disk, tmp_path: Path) -> None:
    expected = tmp_path / f"{disk.domain}-{disk.name}.expected.raw"
    expected.write_bytes(disk.expected)
    subprocess.run(["qemu-img", "compare", "-q", "-F", "raw", str(image), str(expected)],
                   check=True, timeout=300)


def test_push_full_and_incremental_into_qcow2(
        daemon: Daemon, disks: tuple[Disk, Disk], tmp_path: Path) -> None:
    vda, _ = disks
    target = tmp_path / "push"
    target.mkdir()
    vda.write(MiB, MiB, 0x91)
    full = daemon.ctl.job("Start", domain="lab1", disks=["vda"], consumer="pusher",
                          target_dir=str(target))
    assert full["state"] in ("running", "completed") and full["target_dir"] == str(target)
    full = daemon.ctl.wait(full["id"])
    assert full["state"] == "completed", full
    full_file = Path(full["disks"][0]["target"])
    qemu_img_compare(full_file, vda, tmp_path)

    vda.mark()
    vda.write(6 * MiB, 128 << 10, 0x92)
    incr = daemon.ctl.wait(daemon.ctl.job(
        "Start", domain="lab1", disks=["vda"], consumer="pusher", mode="incremental",
        target_dir=str(target))["id"])
    assert incr["state"] == "completed" and incr["disks"][0]["mode"] == "incremental"
    incr_file = Path(incr["disks"][0]["target"])
    # The incremental qcow2 holds the changed blocks; on top of the full one it is the disk.
    subprocess.run(["qemu-img", "rebase", "-u", "-f", "qcow2", "-b", str(full_file), "-F",
                    "qcow2", str(incr_file)], check=True, timeout=60)
    qemu_img_compare(incr_file, vda, tmp_path)
    chain = daemon.ctl.call("ListCheckpoints", domain="lab1", consumer="pusher")["checkpoints"]
    assert [c["name"] for c in chain] == [full["checkpoint"], incr["checkpoint"]]


@pytest.fixture
def raw_domain(lab: Lab, tmp_path: Path) -> Iterator[tuple[Disk, Disk]]:
    """A domain like lab1 but that its vdb is a raw file ("rawlab"), for the test's length:
    its vda (qcow2) and vdb (raw)."""
    disks = {"vda": (new_image(tmp_path / "rawlab-vda.qcow2"), "qcow2"),
             "vdb": (new_image(tmp_path / "rawlab-vdb.raw", "raw"), "raw")}
    with domain_like(lab, "lab1", "rawlab", tmp_path, disks, start=True):
        yield Disk(lab, "rawlab", "vda"), Disk(lab, "rawlab", "vdb")


def test_a_raw_disk_is_backed_up_in_full_every_time(
        daemon: Daemon, lab: Lab, raw_domain: tuple[Disk, Disk], tmp_path: Path) -> None:
    """A raw disk cannot hold a dirty bitmap: it takes no part in the checkpoint, each backup
    of it is full and says why, and the qcow2 disk beside it goes on incrementally."""
    vda, vdb = raw_domain
    app = Appliance(daemon, "rawlab", "raw", tmp_path)
    vda.write(0, MiB, 0x31)
    vdb.write(2 * MiB, MiB, 0x32)
    full, _ = app.backup("full")
    assert [(d["name"], d["mode"]) for d in full["disks"]] == [("vda", "full"), ("vdb", "full")]
    assert "cannot hold a dirty bitmap" in full["disks"][1]["fallback"], full["disks"][1]
    checkpoint = virsh(lab, "checkpoint-dumpxml", "rawlab", full["checkpoint"])
    assert "name='vdb' checkpoint='no'" in checkpoint.replace('"', "'"), checkpoint

    for d in raw_domain:
        d.mark()
    vda.write(5 * MiB, 64 << 10, 0x33)
    vdb.write(7 * MiB, 64 << 10, 0x34)
    incr, extents = app.backup("incremental")
    assert [(d["name"], d["mode"]) for d in incr["disks"]] == [
        ("vda", "incremental"), ("vdb", "full")]
    assert "cannot hold a dirty bitmap" in incr["disks"][1]["fallback"]
    assert extents == {"vda": vda.dirty_since_mark()}
    for d in raw_domain:
        assert_image(app.image(d.name), d, tmp_path)


@pytest.fixture
def own_domain(lab: Lab, tmp_path: Path) -> Iterator[Disk]:
    """A domain of the test's own like lab1 with vda alone ("ownlab"), running; its vda."""
    disks = {"vda": (new_image(tmp_path / "ownlab-vda.qcow2"), "qcow2")}
    with domain_like(lab, "lab1", "ownlab", tmp_path, disks, start=True):
        yield Disk(lab, "ownlab", "vda")


def test_an_external_snapshot_between_two_backups_loses_nothing(
        daemon: Daemon, lab: Lab, own_domain: Disk, tmp_path: Path) -> None:
    """virsh snapshot-create-as --disk-only puts an overlay on the disk: libvirt carries the
    checkpoint's bitmap into it, and the next incremental is exact."""
    vda = own_domain
    app = Appliance(daemon, "ownlab", "snap", tmp_path)
    vda.write(0, MiB, 0x61)
    full, _ = app.backup("full")
    vda.mark()
    vda.write(2 * MiB, 64 << 10, 0x62)  # before the overlay: in the base image
    overlay = tmp_path / "ownlab-vda.s1.qcow2"
    virsh(lab, "snapshot-create-as", "ownlab", "s1", "--disk-only", "--no-metadata",
          "--diskspec", f"vda,file={overlay}")
    vda.write(6 * MiB, 64 << 10, 0x63)  # after: in the overlay
    incr, extents = app.backup("incremental")
    [disk] = incr["disks"]
    assert (disk["mode"], disk["since"]) == ("incremental", full["checkpoint"]), disk
    assert extents == {"vda": vda.dirty_since_mark()}
    assert_image(app.image("vda"), vda, tmp_path)


def test_an_overlay_while_off_is_backed_up_in_full_and_its_chain_goes_on(
        daemon: Daemon, lab: Lab, own_domain: Disk, tmp_path: Path) -> None:
    """A disk with a backing file while its domain is off: pullbackd serves it through its
    chain, in full (its checkpoints' bitmaps may be spread over the layers), says why, and
    puts the new checkpoint's bitmap in the top layer; the incremental while running since
    that checkpoint is exact."""
    vda = own_domain
    app = Appliance(daemon, "ownlab", "layers", tmp_path)
    vda.write(0, MiB, 0x71)
    app.backup("full")
    vda.write(2 * MiB, 64 << 10, 0x72)  # in the base image
    virsh(lab, "snapshot-create-as", "ownlab", "s1", "--disk-only", "--no-metadata",
          "--diskspec", f"vda,file={tmp_path / 'ownlab-vda.s1.qcow2'}")
    vda.write(6 * MiB, 64 << 10, 0x73)  # in the overlay
    virsh(lab, "destroy", "ownlab")
    off, _ = app.backup("incremental")
    [disk] = off["disks"]
    assert off["offline"] and disk["mode"] == "full", off
    assert "backing file" in disk["fallback"], disk
    assert_image(app.image("vda"), vda, tmp_path)
    virsh(lab, "start", "ownlab")
    vda.mark()
    vda.write(9 * MiB, 64 << 10, 0x74)
    running, extents = app.backup("incremental")
    [disk] = running["disks"]
    assert (disk["mode"], disk["since"]) == ("incremental", off["checkpoint"]), disk
    assert extents == {"vda": vda.dirty_since_mark()}
    assert_image(app.image("vda"), vda, tmp_path)


def test_a_transient_domain_has_chains_too(daemon: Daemon, lab: Lab, tmp_path: Path) -> None:
    """A domain started without a definition (`virsh create`): libvirt has no persistent
    definition to keep its chains' metadata in, and the chain goes into its running
    state's; its incrementals are incrementals."""
    images = {"vda": (new_image(tmp_path / "passing.qcow2"), "qcow2")}
    with domain_like(lab, "lab1", "passing", tmp_path, images, transient=True):
        disk = Disk(lab, "passing", "vda")
        disk.write(MiB, MiB, 0x51)
        app = Appliance(daemon, "passing", "nightly", tmp_path)
        full, _ = app.backup("full")
        disk.mark()
        disk.write(5 * MiB, 64 << 10, 0x52)
        incremental, extents = app.backup("incremental")
        [export] = incremental["disks"]
        assert (export["mode"], export["since"]) == ("incremental", full["checkpoint"])
        assert extents == {"vda": disk.dirty_since_mark()}
        assert_image(app.image("vda"), disk, tmp_path)
        metadata = virsh(lab, "metadata", "passing", "--live", CHAINS_NS)
        assert incremental["checkpoint"] in metadata
        assert "cannot write the chains" not in daemon.log_text()


def test_a_new_domain_of_a_former_ones_name_starts_a_chain_of_its_own(
        daemon: Daemon, lab: Lab, tmp_path: Path) -> None:
    """A domain undefined, and another defined with its name: the former's checkpoints are
    not the new one's to be redefined (libvirt refuses them: another UUID). Its first
    backup is full, for every consumer, and the former's chain is forgotten."""
    first = {"vda": (new_image(tmp_path / "first.qcow2"), "qcow2")}
    with domain_like(lab, "lab1", "reborn", tmp_path, first, start=True):
        old, _ = Appliance(daemon, "reborn", "nightly", tmp_path).backup("full")
    second = {"vda": (new_image(tmp_path / "second.qcow2"), "qcow2")}
    with domain_like(lab, "lab1", "reborn", tmp_path, second, start=True):
        disk = Disk(lab, "reborn", "vda")
        disk.write(MiB, MiB, 0x7a)
        (tmp_path / "second").mkdir()
        app = Appliance(daemon, "reborn", "nightly", tmp_path / "second")
        job, _ = app.backup("incremental")
        assert job["mode"] == "full" and job["since"] is None, job
        assert_image(app.image("vda"), disk, tmp_path)
        names = [c["name"] for c in daemon.ctl.call("ListCheckpoints", domain="reborn")[
            "checkpoints"]]
        assert names == [job["checkpoint"]] and old["checkpoint"] not in names
