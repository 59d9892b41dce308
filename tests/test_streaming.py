"""Backups pullbackd streams itself: into the local repository, or to an appliance's NBD server.

Every test rebuilds disks from what was stored and compares them, byte for
byte, with what the guest wrote at the time of each backup.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import libvirt
import pytest

from pullbackd import api
from pullbackd.control import idl
from pullbackd.control.client import Client, VarlinkError

from .conftest import ANY_DESTINATION, DISK_SIZE, Daemon, Lab, start_daemon, stop_daemon, tmpfs
from .images import Disk, MiB
from .test_stream import nbdkit, qemu_nbd

Job = dict[str, Any]
#: The error of a job whose domain stopped under it (`scripts/lab stop`: virsh destroy),
#: whichever pullbackd heard first: libvirt's lifecycle event (with the reason), libvirt's
#: end of the backup job, or the copy failing as QEMU went away.
DOMAIN_STOPPED = re.compile(r"the domain stopped (\(destroyed\) )?during the backup")


def expected_file(disk: Disk, path: Path) -> Path:
    path.write_bytes(disk.expected)
    return path


def qemu_img_compare(image: Path, fmt: str, expected: Path) -> None:
    subprocess.run(["qemu-img", "compare", "-q", "-f", fmt, "-F", "raw", str(image),
                    str(expected)], check=True, timeout=300)


def chain(daemon: Daemon, domain: str, consumer: str) -> list[str]:
    return [c["name"] for c in daemon.ctl.call("ListCheckpoints", domain=domain,
                                               consumer=consumer)["checkpoints"]]


def test_full_and_five_incrementals_into_the_repository(
        lab: Lab, daemon: Daemon, tmp_path: Path) -> None:
    vda = Disk(lab, "lab2", "vda")
    points: list[tuple[str, Path]] = []
    for step in range(6):
        vda.write(step * 7 * MiB + 4096, (step + 1) * 192 * 1024, 0x30 + step)
        if step:
            vda.zero((step - 1) * 7 * MiB + 4096, 64 * 1024)  # dirty zeroes reach the overlay
        mode = "full" if step == 0 else "incremental"
        job = daemon.ctl.job("Start", domain="lab2", disks=["vda"], consumer="repo",
                             mode=mode, destination="local")
        assert job["state"] == "running" and job["destination"] == "local"
        done = daemon.ctl.wait(job["id"])
        assert done["state"] == "completed", done
        assert done["mode"] == mode
        progress = done["progress"]
        assert progress["done"] == progress["total"] > 0 and progress["eta"] in (0, None)
        points.append((job["checkpoint"], expected_file(vda, tmp_path / f"at-{step}.raw")))
    # [chains] keep = 1: the full backup's checkpoint and the newest; the repository
    # keeps every backup.
    assert chain(daemon, "lab2", "repo") == [points[0][0], points[-1][0]]

    # Every point of the chain restores to the disk as it was then.
    for step, (checkpoint, expected) in enumerate(points):
        fmt = "qcow2" if step % 2 else "raw"
        to = tmp_path / f"restored-{step}.{fmt}"
        reply = daemon.ctl.call("Restore", domain="lab2", disk="vda", consumer="repo",
                                at=checkpoint, to=str(to), format=fmt)
        assert reply == {"file": str(to), "checkpoint": checkpoint}
        qemu_img_compare(to, fmt, expected)
    latest = tmp_path / "latest.raw"
    daemon.ctl.call("Restore", domain="lab2", disk="vda", consumer="repo", to=str(latest))
    qemu_img_compare(latest, "raw", points[-1][1])

    assert daemon.ctl.call("Verify", domain="lab2", consumer="repo") == \
        {"checked": 6, "problems": []}
    manifest = json.loads((daemon.repository / "lab2" / "repo" / "vda" / "0002.json").read_text())
    assert manifest["checkpoint"] == points[1][0] and manifest["backing"] == "0001.qcow2"
    assert manifest["bytes"] == sum(length for _, length, _ in manifest["regions"]) > 0


def test_a_disk_grown_between_two_backups_is_backed_up_at_its_new_size(
        lab: Lab, daemon: Daemon, tmp_path: Path) -> None:
    """The grown part is in the backup: its scratch file, made by pullbackd, is of the
    disk's size now (libvirt 9.0 can die when QEMU refuses one of another size)."""
    vdb = Disk(lab, "lab2", "vdb")
    vdb.write(MiB, 256 * 1024, 0x61)
    start = {"domain": "lab2", "disks": ["vdb"], "consumer": "resized", "destination": "local"}
    full = daemon.ctl.wait(daemon.ctl.job("Start", mode="full", **start)["id"])
    assert full["state"] == "completed", full
    conn = libvirt.open(lab.uri)
    try:
        dom = conn.lookupByName("lab2")
        dom.blockResize("vdb", 2 * DISK_SIZE, libvirt.VIR_DOMAIN_BLOCK_RESIZE_BYTES)
        try:
            vdb.write(2 * MiB, 64 * 1024, 0x62)
            lab.write("lab2", "vdb", DISK_SIZE + MiB, 128 * 1024, 0x63)  # in the grown part
            grown = bytes(vdb.expected) + bytes(MiB) + b"\x63" * 128 * 1024 + \
                bytes(DISK_SIZE - MiB - 128 * 1024)
            job = daemon.ctl.wait(daemon.ctl.job("Start", mode="incremental", **start)["id"])
            assert job["state"] == "completed", job
            assert job["mode"] == "incremental" and job["since"] == full["checkpoint"]
            assert [d["size"] for d in job["disks"]] == [2 * DISK_SIZE]
            restored = tmp_path / "restored.raw"
            daemon.ctl.call("Restore", domain="lab2", disk="vdb", consumer="resized",
                            to=str(restored))
            (tmp_path / "grown.raw").write_bytes(grown)
            qemu_img_compare(restored, "raw", tmp_path / "grown.raw")
        finally:
            dom.blockResize("vdb", DISK_SIZE, libvirt.VIR_DOMAIN_BLOCK_RESIZE_BYTES)
    finally:
        conn.close()


def test_verify_finds_damage(lab: Lab, daemon: Daemon, tmp_path: Path) -> None:
    vda = Disk(lab, "lab2", "vda")
    vda.write(MiB, MiB, 0x44)
    job = daemon.ctl.wait(daemon.ctl.job("Start", domain="lab2", disks=["vda"],
                                         consumer="damaged", destination="local")["id"])
    assert job["state"] == "completed"
    stored = daemon.repository / "lab2" / "damaged" / "vda" / "0001.qcow2"
    # Flip the data of the written region through qemu-io, as bit rot would.
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P 0x45 {MiB} 4096", str(stored)],
                   check=True, capture_output=True, timeout=60)
    reply = daemon.ctl.call("Verify", domain="lab2", consumer="damaged")
    assert reply["checked"] == 1 and len(reply["problems"]) == 1
    assert "0001.qcow2" in reply["problems"][0]


def test_bad_restore_requests(daemon: Daemon, tmp_path: Path) -> None:
    e = daemon.ctl.error("Restore", domain="lab2", disk="vda", consumer="nobody",
                         to=str(tmp_path / "x.raw"))
    assert (e.short_name, e.parameters) == (
        "NoBackup", {"domain": "lab2", "consumer": "nobody", "disk": "vda"})
    existing = tmp_path / "exists.raw"
    existing.write_bytes(b"keep me")
    e = daemon.ctl.error("Restore", domain="lab2", disk="vda", to=str(existing))
    assert (e.name, e.parameters) == ("org.varlink.service.InvalidParameter",
                                      {"parameter": "to"})
    assert existing.read_bytes() == b"keep me"


def test_streaming_to_an_appliances_nbd_server(lab: Lab, daemon: Daemon, tmp_path: Path) -> None:
    vda, vdb = Disk(lab, "lab2", "vda"), Disk(lab, "lab2", "vdb")
    vda.write(0, 2 * MiB, 0x61)
    vdb.write(9 * MiB, MiB, 0x62)
    images = {d: tmp_path / f"{d}.full.qcow2" for d in ("vda", "vdb")}
    for image in images.values():
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), str(DISK_SIZE)],
                       check=True)
    # One appliance NBD server per disk; {disk} picks the export... here the socket.
    with qemu_nbd(images["vda"]), qemu_nbd(images["vdb"]):
        job = daemon.ctl.job("Start", domain="lab2", consumer="appliance",
                             destination=f"nbd+unix:///?socket={tmp_path}/{{disk}}.full.sock")
        done = daemon.ctl.wait(job["id"])
    assert done["state"] == "completed", done
    qemu_img_compare(images["vda"], "qcow2", expected_file(vda, tmp_path / "vda.raw"))
    qemu_img_compare(images["vdb"], "qcow2", expected_file(vdb, tmp_path / "vdb.raw"))


@pytest.fixture
def free_domain(lab: Lab, daemon: Daemon) -> Iterator[Disk]:
    disk = Disk(lab, "lab2", "vda")
    disk.write(0, 48 * MiB, 0x42)
    yield disk


#: An appliance's NBD server that takes half a second per write: a copy into it of even a
#: few MiB outlasts what a test does to it meanwhile (on a loaded machine too).
SLOW = "wdelay=500ms"


def assert_failed_and_rolled_back(daemon: Daemon, job: Job, consumer: str) -> Job:
    ended = daemon.ctl.wait(job["id"])
    assert ended["state"] == "failed" and ended["error"], ended
    assert job["checkpoint"] not in chain(daemon, "lab2", consumer)
    for manifest in (daemon.repository / "lab2" / consumer).rglob("*.json"):
        assert job["id"] not in manifest.read_text()
    assert not list(daemon.repository.rglob("*.partial"))
    return ended


def test_unreachable_destination(daemon: Daemon, free_domain: Disk, tmp_path: Path) -> None:
    job = daemon.ctl.job("Start", domain="lab2", disks=["vda"], consumer="faults",
                         destination=f"nbd+unix:///?socket={tmp_path}/nobody.sock")
    ended = assert_failed_and_rolled_back(daemon, job, "faults")
    assert "nobody.sock" in ended["error"]


def test_destination_smaller_than_the_disk(
        daemon: Daemon, free_domain: Disk, tmp_path: Path) -> None:
    with nbdkit(tmp_path, "memory", "1M") as url:
        job = daemon.ctl.job("Start", domain="lab2", disks=["vda"], consumer="faults",
                             destination=url)
        assert_failed_and_rolled_back(daemon, job, "faults")


def test_appliance_server_gone_mid_stream(
        daemon: Daemon, free_domain: Disk, tmp_path: Path) -> None:
    with nbdkit(tmp_path, "--filter=delay", "memory", str(DISK_SIZE), SLOW) as url:
        job = daemon.ctl.job("Start", domain="lab2", disks=["vda"], consumer="faults",
                             destination=url)
        assert daemon.ctl.job("Get", id=job["id"])["state"] == "running"
    assert_failed_and_rolled_back(daemon, job, "faults")


def test_domain_shut_down_mid_stream(
        lab: Lab, daemon: Daemon, free_domain: Disk, tmp_path: Path) -> None:
    with nbdkit(tmp_path, "--filter=delay", "memory", str(DISK_SIZE), SLOW) as url:
        job = daemon.ctl.job("Start", domain="lab2", disks=["vda"], consumer="faults",
                             destination=url)
        lab.run("stop", "lab2")
        try:
            failed = assert_failed_and_rolled_back(daemon, job, "faults")
        finally:
            lab.run("start", "lab2")
    assert DOMAIN_STOPPED.match(failed["error"]), failed["error"]


def test_domain_destroyed_mid_stream_then_the_next_backup_rebuilds_exactly(
        lab: Lab, daemon: Daemon, tmp_path: Path) -> None:
    vda = Disk(lab, "lab2", "vda")
    vda.write(0, 4 * MiB, 0x21)
    full = daemon.ctl.job("Start", domain="lab2", disks=["vda"], consumer="destroyed",
                          destination="local")
    assert daemon.ctl.wait(full["id"])["state"] == "completed"
    vda.write(8 * MiB, 40 * MiB, 0x22)
    with nbdkit(tmp_path, "--filter=delay", "memory", str(DISK_SIZE), SLOW) as url:
        cut = daemon.ctl.job("Start", domain="lab2", disks=["vda"], consumer="destroyed",
                             mode="incremental", destination=url)
        lab.run("stop", "lab2")  # virsh destroy
        try:
            failed = assert_failed_and_rolled_back(daemon, cut, "destroyed")
        finally:
            lab.run("start", "lab2")
    assert DOMAIN_STOPPED.match(failed["error"]), failed["error"]
    assert chain(daemon, "lab2", "destroyed") == [full["checkpoint"]]
    # QEMU died with the bitmap in use: the next backup may have to be full, but
    # whatever it is, it holds the disk exactly.
    vda.write(50 * MiB, MiB, 0x23)
    nxt = daemon.ctl.job("Start", domain="lab2", disks=["vda"], consumer="destroyed",
                         mode="incremental", destination="local")
    assert daemon.ctl.wait(nxt["id"])["state"] == "completed"
    restored = tmp_path / "restored.raw"
    daemon.ctl.call("Restore", domain="lab2", disk="vda", consumer="destroyed",
                    to=str(restored))
    qemu_img_compare(restored, "raw", expected_file(vda, tmp_path / "expected.raw"))


def test_abort_mid_stream_leaves_nothing(
        daemon: Daemon, free_domain: Disk, tmp_path: Path) -> None:
    with nbdkit(tmp_path, "--filter=delay", "memory", str(DISK_SIZE), SLOW) as url:
        job = daemon.ctl.job("Start", domain="lab2", disks=["vda"], consumer="faults",
                             destination=url)
        # pullbackd's own copy ends the job by itself; an appliance cannot finish it.
        e = daemon.ctl.error("Finish", id=job["id"])
        assert (e.short_name, e.parameters) == ("JobNotReady", {"id": job["id"],
                                                                "state": "running"})
        aborted = daemon.ctl.job("Abort", id=job["id"])
    assert aborted["state"] == "aborted"
    assert job["checkpoint"] not in chain(daemon, "lab2", "faults")


@pytest.fixture
def small_repository(tmp_path: Path) -> Iterator[Path]:
    with tmpfs(tmp_path / "small", "8M") as path:
        yield path


def test_repository_disk_full(lab: Lab, small_repository: Path, tmp_path: Path) -> None:
    vda = Disk(lab, "lab4", "vda")
    vda.write(0, 32 * MiB, 0x77)  # 32 MiB of data into an 8 MiB file system
    daemon = start_daemon(tmp_path / "pullbackd", lab.uri, repository=small_repository)
    try:
        job = daemon.ctl.job("Start", domain="lab4", disks=["vda"], consumer="full-disk",
                             destination="local")
        ended = daemon.ctl.wait(job["id"])
        assert ended["state"] == "failed", ended
        assert daemon.ctl.call("ListCheckpoints", domain="lab4",
                               consumer="full-disk") == {"checkpoints": []}
        # Nothing half-written looks like a backup: no file, no manifest.
        assert list(small_repository.rglob("*.qcow2*")) == []
        assert list(small_repository.rglob("*.json")) == []
        # The chain stays usable: once the data fits, the same consumer backs up.
        vda.zero(0, 32 * MiB)
        vda.write(5 * MiB, MiB, 0x78)
        job = daemon.ctl.job("Start", domain="lab4", disks=["vda"], consumer="full-disk",
                             mode="incremental", destination="local")
        assert job["mode"] == "full"  # nothing to start from: the failed one left no base
        assert daemon.ctl.wait(job["id"])["state"] == "completed"
        restored = tmp_path / "restored.raw"
        daemon.ctl.call("Restore", domain="lab4", disk="vda", consumer="full-disk",
                        to=str(restored))
        qemu_img_compare(restored, "raw", expected_file(vda, tmp_path / "expected.raw"))
        assert daemon.ctl.call("Verify", domain="lab4") == {"checked": 1, "problems": []}
    finally:
        stop_daemon(daemon)


def test_prune_keeps_every_kept_point_restorable(
        lab: Lab, daemon: Daemon, tmp_path: Path) -> None:
    vda = Disk(lab, "lab2", "vda")
    points: list[tuple[str, Path]] = []

    def backup(step: int) -> None:
        vda.write(step * 5 * MiB, MiB + step * 4096, 0x50 + step)
        job = daemon.ctl.job("Start", domain="lab2", disks=["vda"], consumer="prune",
                             mode="incremental", destination="local")
        assert daemon.ctl.wait(job["id"])["state"] == "completed"
        points.append((job["checkpoint"], expected_file(vda, tmp_path / f"p{step}.raw")))

    for step in range(5):
        backup(step)
    e = daemon.ctl.error("Prune", domain="lab2", consumer="prune", keep=0)
    assert e.parameters == {"parameter": "keep"}

    dropped = daemon.ctl.call("Prune", domain="lab2", consumer="prune", keep=2)["dropped"]
    assert dropped == [c for c, _ in points[:3]]
    folder = daemon.repository / "lab2" / "prune" / "vda"
    assert sorted(p.name for p in folder.iterdir()) == \
        ["0004.json", "0004.qcow2", "0005.json", "0005.qcow2"]
    info = subprocess.run(["qemu-img", "info", "--output=json", str(folder / "0004.qcow2")],
                          check=True, capture_output=True, text=True).stdout
    assert "backing-filename" not in info  # the oldest kept point now stands alone
    for checkpoint, expected in points[3:]:
        to = tmp_path / f"{checkpoint}.raw"
        daemon.ctl.call("Restore", domain="lab2", disk="vda", consumer="prune",
                        at=checkpoint, to=str(to))
        qemu_img_compare(to, "raw", expected)
    for checkpoint, _ in points[:3]:
        assert daemon.ctl.error("Restore", domain="lab2", disk="vda", consumer="prune",
                                at=checkpoint, to=str(tmp_path / "gone.raw")
                                ).short_name == "NoSuchCheckpoint"
    assert daemon.ctl.call("Verify", domain="lab2", consumer="prune") == \
        {"checked": 2, "problems": []}

    backup(5)  # the chain goes on from the kept points
    latest = tmp_path / "latest.raw"
    daemon.ctl.call("Restore", domain="lab2", disk="vda", consumer="prune", to=str(latest))
    qemu_img_compare(latest, "raw", points[-1][1])


def test_pullbackctl_repository_commands(lab: Lab, daemon: Daemon, tmp_path: Path) -> None:
    def ctl(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "pullbackd.cli", "--socket",
                               str(daemon.socket), *args], capture_output=True, text=True,
                              timeout=120, check=False)

    vda = Disk(lab, "lab2", "vda")
    vda.write(3 * MiB, MiB, 0x91)
    for _ in range(2):
        started = ctl("--json", "backup", "start", "lab2", "--disk", "vda", "--consumer",
                      "cli-repo", "--mode", "incremental", "--destination", "local")
        assert started.returncode == 0, started.stderr
        job = json.loads(started.stdout)["job"]
        assert daemon.ctl.wait(job["id"])["state"] == "completed"
    shown = ctl("backup", "show", job["id"]).stdout
    assert "destination local" in " ".join(shown.split())
    assert "progress" in shown
    assert ctl("verify", "lab2", "--consumer", "cli-repo").stdout.strip() == \
        "2 backups checked, 0 problems"
    assert ctl("repo", "prune", "lab2", "--consumer", "cli-repo", "--keep", "1").returncode == 0
    to = tmp_path / "restored.qcow2"
    restored = ctl("restore", "lab2", "--disk", "vda", "--consumer", "cli-repo", "--to", str(to),
                   "--format", "qcow2")
    assert restored.stdout.strip() == f"restored {to} as of {job['checkpoint']}"
    qemu_img_compare(to, "qcow2", expected_file(vda, tmp_path / "expected.raw"))


def test_watch_follows_a_streamed_job_to_its_end(
        daemon: Daemon, free_domain: Disk, tmp_path: Path) -> None:
    # Every write takes a second: the copy lasts a few, and progress shows.
    with nbdkit(tmp_path, "--filter=delay", "memory", str(DISK_SIZE), "wdelay=1") as url:
        job = daemon.ctl.job("Start", domain="lab2", disks=["vda"], consumer="watched",
                             destination=url)
        with Client(daemon.socket, timeout=120) as client:
            events = [r["event"] for r in client.stream(f"{api.INTERFACE}.Watch",
                                                        id=job["id"])]
    iface = api.interface(api.INTERFACE)
    for e in events:
        idl.check_fields(iface, iface.types["Event"], e)  # type: ignore[arg-type]
    kinds = [e["kind"] for e in events]
    assert kinds[0] == "state" and events[0]["job"]["state"] == "running"
    assert "progress" in kinds
    done = [e["job"]["progress"]["done"] for e in events if e["kind"] == "progress"]
    assert done == sorted(done)
    assert kinds[-1] == "state" and events[-1]["job"]["state"] == "completed"
    final = events[-1]["job"]["progress"]
    # 48 MiB of data, and the holes as zero writes: an appliance's server may not be zero.
    assert final["done"] == final["total"] == DISK_SIZE


def test_watch_edge_cases(daemon: Daemon) -> None:
    job = daemon.ctl.call("List")["jobs"][0]
    with Client(daemon.socket, timeout=60) as client:
        # An ended job: one event, and the stream ends.
        assert [r["event"]["job"]["id"] for r in client.stream(
            f"{api.INTERFACE}.Watch", id=job["id"])] == [job["id"]]
        with pytest.raises(VarlinkError) as e:
            client.call(f"{api.INTERFACE}.Watch", id=job["id"])  # without `more`
        assert e.value.name == "org.varlink.service.ExpectedMore"
        with pytest.raises(VarlinkError) as e:
            list(client.stream(f"{api.INTERFACE}.Watch", id="nope"))
        assert e.value.short_name == "NoSuchJob"


def test_pullbackctl_wait(daemon: Daemon, free_domain: Disk, tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pullbackd.cli", "--socket", str(daemon.socket), "backup",
         "start", "lab2", "--disk", "vda", "--consumer", "waiting", "--destination", "local",
         "--wait"], capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "completed" in proc.stdout and "progress" in proc.stdout


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA and a server certificate for localhost, the way nbdkit and libnbd name them."""
    d = tmp_path_factory.mktemp("pki")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=d)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
            "/CN=pullbackd test CA", "-keyout", "ca-key.pem", "-out", "ca-cert.pem")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost",
            "-keyout", "server-key.pem", "-out", "server.csr")
    (d / "ext.cnf").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n"
                               "extendedKeyUsage=serverAuth\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca-cert.pem", "-CAkey", "ca-key.pem",
            "-CAcreateserial", "-days", "2", "-extfile", "ext.cnf", "-out", "server-cert.pem")
    (d / "server-key.pem").chmod(0o600)
    return d


def test_tls_destination(lab: Lab, pki: Path, tmp_path: Path) -> None:
    vda = Disk(lab, "lab4", "vda")
    vda.write(2 * MiB, 3 * MiB, 0xE1)
    target = tmp_path / "appliance.raw"
    target.write_bytes(b"")
    subprocess.run(["truncate", "-s", str(DISK_SIZE), str(target)], check=True)
    client_pki = tmp_path / "client-pki"
    client_pki.mkdir()
    (client_pki / "ca-cert.pem").write_bytes((pki / "ca-cert.pem").read_bytes())
    daemon = start_daemon(tmp_path / "pullbackd", lab.uri,
                          stream=f'{ANY_DESTINATION}\ntls_certificates = "{client_pki}"')
    try:
        with nbdkit(tmp_path, "--tls=require", f"--tls-certificates={pki}", "file",
                    str(target)) as url:
            tls_url = url.replace("nbd+unix://", "nbds+unix://")
            job = daemon.ctl.job("Start", domain="lab4", disks=["vda"], consumer="tls",
                                 destination=tls_url)
            assert daemon.ctl.wait(job["id"])["state"] == "completed"
            # The same server refuses a client that does not start TLS: the job fails.
            plain = daemon.ctl.job("Start", domain="lab4", disks=["vda"], consumer="tls",
                                   mode="incremental", destination=url)
            ended = daemon.ctl.wait(plain["id"])
            assert ended["state"] == "failed" and "TLS" in ended["error"]
        qemu_img_compare(target, "raw", expected_file(vda, tmp_path / "expected.raw"))
        assert chain(daemon, "lab4", "tls") == [job["checkpoint"]]
    finally:
        stop_daemon(daemon)


def test_full_and_five_incrementals_to_an_nbd_uri(
        lab: Lab, daemon: Daemon, tmp_path: Path) -> None:
    """The appliance keeps its own qcow2 chain: a new overlay served by qemu-nbd each time."""
    vda = Disk(lab, "lab4", "vda")
    previous: Path | None = None
    for step in range(6):
        vda.write(step * 9 * MiB + 512, (step + 2) * 100 * 1024, 0x70 + step)
        image = tmp_path / f"{step}.qcow2"
        create = ["qemu-img", "create", "-q", "-f", "qcow2"]
        if previous is not None:
            create += ["-b", str(previous), "-F", "qcow2"]
        subprocess.run([*create, str(image), str(DISK_SIZE)], check=True)
        with qemu_nbd(image) as url:
            job = daemon.ctl.job("Start", domain="lab4", disks=["vda"], consumer="uri-chain",
                                 mode="incremental", destination=url)
            done = daemon.ctl.wait(job["id"])
        assert done["state"] == "completed", done
        assert done["mode"] == ("full" if step == 0 else "incremental")
        qemu_img_compare(image, "qcow2", expected_file(vda, tmp_path / f"{step}.raw"))
        previous = image
    assert len(chain(daemon, "lab4", "uri-chain")) == 2  # [chains] keep = 1
