"""Crash tests: pullbackd dies at each named point (pullbackd/crash.py: `os._exit`,
what a kill -9 leaves), starts again, and must reach one outcome everywhere.

After each crash and restart, for the job the crash hit and every other:
- a checkpoint is in its consumer's chain only if its job completed, and the
  crashed job's is there exactly if it completed (chain.py's invariant);
- libvirt holds no checkpoint of the consumer that is not in the chain, and
  runs no backup that pullbackd does not list as running;
- no scratch file, QEMU socket, endpoint, temporary repository file,
  qemu-nbd of the repository or repository writer of the crashed run is left;
- the next incremental, applied to what the appliance kept (the crashed job's
  copy only if the job says completed), equals the disk byte for byte; for the
  repository, every backup it still lists restores to the disk as it was then.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pullbackd import crash

from .conftest import Daemon, Lab, start_daemon, stop_daemon
from .images import Disk, MiB, apply_incremental, assert_image, assert_same, copy_full

DOMAIN = "lab2"
Job = dict[str, Any]

#: (crash point, what reaches it)
CASES = [
    ("start.recorded", "pull"),
    ("start.begun", "pull"),
    ("start.ready", "pull"),
    ("end.sessions", "finish"),
    ("end.libvirt", "finish"),
    ("end.recorded", "finish"),
    ("end.cleaned", "fail"),
    ("end.recorded", "abort"),
    ("checkpoint.deleted", "abort"),
    ("commit.renamed", "local"),
    ("commit.stored", "local"),
    ("end.recorded", "local"),
    ("chain.deleting", "delete-chain"),
    ("chain.trimmed", "finish"),
    ("prune.flattened", "prune"),
    ("prune.manifest", "prune"),
    ("prune.dropping", "prune"),
]


#: Crash points tested in a module of their own (they need a guest with an agent, or
#: more backups than a scenario here makes).
ELSEWHERE = {"start.frozen": "test_quiesce.py", "start.served": "test_offline.py",
             "commit.files": "test_domainfiles.py", "prune.unlinked": "test_repository.py"}


def test_every_crash_point_is_tested() -> None:
    tested = {point for point, _ in CASES}
    assert tested | set(ELSEWHERE) == set(crash.POINTS)
    for point, module in ELSEWHERE.items():
        assert f'"{point}"' in (Path(__file__).parent / module).read_text(), point
    source = "".join(p.read_text() for p in (Path(crash.__file__).parent).glob("*.py")
                     if p.name != "crash.py")
    for point in crash.POINTS:  # each named where the daemon reaches it
        assert f'"{point}"' in source, point


class Appliance:
    """An appliance that keeps an image of the disk at its last completed backup and
    reads each new backup into a copy, kept only if the job ends completed."""

    def __init__(self, tmp_path: Path, consumer: str) -> None:
        self.dir = tmp_path / "appliance"
        self.dir.mkdir()
        self.consumer = consumer
        self.image = self.dir / "vda.raw"

    def read(self, job: Job) -> Path:
        [disk] = job["disks"]
        copy = self.dir / f"{job['id']}.raw"
        if disk["mode"] == "full":
            copy_full(disk["url"], copy)
        else:
            shutil.copyfile(self.image, copy)
            apply_incremental(disk["url"], disk["bitmap"], copy)
        return copy

    def settle(self, job: Job, copy: Path | None) -> None:
        """What the appliance does once it knows how the job ended."""
        if job["state"] == "completed" and copy is not None:
            copy.replace(self.image)
        elif copy is not None:
            copy.unlink(missing_ok=True)


def virsh(lab: Lab, *args: str) -> str:
    return subprocess.run(["virsh", "-q", "-c", lab.uri, *args], check=True,
                          capture_output=True, text=True, timeout=60).stdout


def libvirt_checkpoints(lab: Lab, consumer: str) -> set[str]:
    return {name for name in virsh(lab, "checkpoint-list", DOMAIN, "--name").split()
            if name.startswith(f"pullbackd.{consumer}.")}




def chain(d: Daemon, consumer: str) -> list[str]:
    return [c["name"] for c in d.ctl.call("ListCheckpoints", domain=DOMAIN,
                                          consumer=consumer)["checkpoints"]]


def in_thread(fn: Any, *args: Any, **kwargs: Any) -> threading.Thread:
    """Call something the daemon will not live to answer."""
    def call() -> None:
        with contextlib.suppress(Exception):
            fn(*args, **kwargs)
    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    return thread


def crashed(d: Daemon) -> None:
    """The daemon died at its crash point, and at nothing else."""
    try:
        status = d.proc.wait(timeout=120)
    finally:
        d.manager.close()
    assert status == crash.STATUS, d.log_text()
    assert "crash point" in d.log_text()


def assert_nothing_left(d: Daemon, lab: Lab, consumer: str) -> None:
    jobs = d.ctl.call("List", domain=DOMAIN)["jobs"]
    running = [j for j in jobs if j["state"] in ("starting", "ready", "running", "queued")]
    in_chain = set(chain(d, consumer))
    for job in jobs:
        if job["consumer"] == consumer:
            assert job["checkpoint"] not in in_chain or job["state"] == "completed", job
    pending = {j["checkpoint"] for j in running}
    assert libvirt_checkpoints(lab, consumer) == in_chain | (pending & libvirt_checkpoints(
        lab, consumer))
    if not running:
        assert "no job" in virsh(lab, "domjobinfo", DOMAIN).lower() or \
            "none" in virsh(lab, "domjobinfo", DOMAIN).lower()
        assert not [p for p in d.scratch.glob("*") if p.is_file()]
        assert not list(d.exports.glob("*.sock")) and not list(d.exports.glob(".qemu/*"))
    leftovers = [p for p in d.repository.rglob("*")
                 if p.name.endswith((".partial", ".tmp"))]
    assert not leftovers
    served = subprocess.run(["pgrep", "-f", f"qemu-nbd.*{d.exports}/.repository"],
                            capture_output=True, text=True, check=False).stdout.split()
    assert not served, served
    # The repository's writer, if one runs, is the running daemon's, never the crashed one's.
    writers = subprocess.run(["pgrep", "-f", f"qemu-storage-daemon.*{d.exports}/.repository/w-"],
                             capture_output=True, text=True, check=False).stdout.split()
    assert all(parent(int(pid)) == d.proc.pid for pid in writers), writers


def parent(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])
    except OSError:
        return None  # gone meanwhile


@contextlib.contextmanager
def daemon_at(base: Path, lab: Lab, point: str | None = None) -> Iterator[Daemon]:
    d = start_daemon(base, lab.uri, env={crash.ENV: point} if point else None)
    try:
        yield d
    finally:
        if d.proc.poll() is None:
            for job in d.ctl.call("List")["jobs"]:
                if job["state"] == "ready":
                    d.ctl.call("Abort", id=job["id"])
            stop_daemon(d)


def test_crash_points_are_inert_without_the_variable(lab: Lab, tmp_path: Path) -> None:
    with daemon_at(tmp_path / "pullbackd", lab) as d:
        job = d.ctl.job("Start", domain=DOMAIN, disks=["vda"], consumer="inert")
        assert d.ctl.job("Finish", id=job["id"])["state"] == "completed"
        d.ctl.call("DeleteChain", domain=DOMAIN, consumer="inert")


class Scenario:
    """One consumer's backups of lab2's vda, by an appliance or into the repository."""

    def __init__(self, lab: Lab, tmp_path: Path, consumer: str, local: bool) -> None:
        self.lab, self.tmp_path, self.consumer, self.local = lab, tmp_path, consumer, local
        self.base = tmp_path / "pullbackd"
        self.vda = Disk(lab, DOMAIN, "vda")
        self.app = Appliance(tmp_path, consumer)
        #: checkpoint -> the disk at that backup (the repository's backups)
        self.states: dict[str, bytes] = {}
        #: The job the crash hit, and the appliance's copy of what it read.
        self.job_id: str | None = None
        self.copy: Path | None = None

    def start(self, d: Daemon, mode: str) -> Job:
        params = {"destination": "local"} if self.local else {}
        job = d.ctl.job("Start", domain=DOMAIN, disks=["vda"], consumer=self.consumer,
                        mode=mode, **params)
        self.states[job["checkpoint"]] = bytes(self.vda.expected)
        return job

    def backup(self, d: Daemon, mode: str) -> None:
        """A backup that completes: read and confirmed, or stored."""
        job = self.start(d, mode)
        if self.local:
            done = d.ctl.wait(job["id"])
            assert done["state"] == "completed", done
            check_repository(d, self.consumer, self.states, self.tmp_path)
        else:
            copy = self.app.read(job)
            self.app.settle(d.ctl.job("Finish", id=job["id"]), copy)
            assert_image(self.app.image, self.vda, self.tmp_path)

    def cut_short(self, d: Daemon, op: str) -> None:
        """Start the operation the daemon will not live through."""
        ctl = d.ctl
        if op == "pull":
            in_thread(ctl.call, "Start", domain=DOMAIN, disks=["vda"], consumer=self.consumer,
                      mode="incremental")
        elif op in ("finish", "fail", "abort"):
            job = self.start(d, "incremental")
            self.job_id = job["id"]
            if op == "abort":
                in_thread(ctl.call, "Abort", id=job["id"])
            else:
                self.copy = self.app.read(job)
                in_thread(ctl.call, "Finish", id=job["id"], success=op == "finish")
        elif op == "local":
            self.job_id = self.start(d, "incremental")["id"]
        elif op == "delete-chain":
            in_thread(ctl.call, "DeleteChain", domain=DOMAIN, consumer=self.consumer)
        elif op == "prune":
            in_thread(ctl.call, "Prune", domain=DOMAIN, consumer=self.consumer, keep=1)

    def settle_crashed_job(self, d: Daemon, point: str) -> None:
        """The appliance asks how the job it lost ended, and acts on the answer."""
        if self.job_id is None:  # Start never answered: look for the job it made
            mine = [j for j in d.ctl.call("List", domain=DOMAIN)["jobs"]
                    if j["consumer"] == self.consumer and j["mode"] != "full"]
            if not mine:
                return
            self.job_id = mine[0]["id"]
        job = d.ctl.job("Get", id=self.job_id)
        if job["state"] == "ready":  # adopted: the appliance reads it and confirms
            self.copy = self.app.read(job)
            job = d.ctl.job("Finish", id=self.job_id)
        assert job["state"] in ("completed", "failed", "aborted"), job
        if point.startswith("start."):
            assert job["state"] != "completed" or point == "start.ready"
        in_chain = job["checkpoint"] in chain(d, self.consumer)
        assert in_chain == (job["state"] == "completed"), (job, chain(d, self.consumer))
        assert (job["checkpoint"] in libvirt_checkpoints(self.lab, self.consumer)) == in_chain
        self.app.settle(job, self.copy)


@pytest.mark.parametrize(("point", "op"), CASES, ids=[f"{p}-{o}" for p, o in CASES])
def test_a_crash_leaves_one_outcome(point: str, op: str, lab: Lab, tmp_path: Path) -> None:
    s = Scenario(lab, tmp_path, f"crash{CASES.index((point, op))}", op in ("local", "prune"))
    s.vda.write(MiB, 3 * MiB, 0x11)
    with daemon_at(s.base, lab) as d:
        s.backup(d, "full")
        if op == "prune" or point == "chain.trimmed":
            s.vda.write(5 * MiB, MiB, 0x12)
            # Zeroes over the full's data: a flattened copy holds nothing there.
            s.vda.zero(2 * MiB, 256 << 10)
            s.backup(d, "incremental")
    s.vda.write(9 * MiB, 2 * MiB, 0x22)

    d = start_daemon(s.base, lab.uri, env={crash.ENV: point})
    s.cut_short(d, op)
    crashed(d)

    with daemon_at(s.base, lab) as d:
        s.settle_crashed_job(d, point)
        assert_nothing_left(d, lab, s.consumer)
        if op == "prune":
            kept = check_repository(d, s.consumer, s.states, tmp_path)
            d.ctl.call("Prune", domain=DOMAIN, consumer=s.consumer, keep=1)
            assert check_repository(d, s.consumer, s.states, tmp_path) == kept[-1:]
        elif s.local:
            check_repository(d, s.consumer, s.states, tmp_path)
        elif op == "delete-chain":
            d.ctl.call("DeleteChain", domain=DOMAIN, consumer=s.consumer)
            assert chain(d, s.consumer) == [] and not libvirt_checkpoints(lab, s.consumer)
        # The next backup is exact, whatever the crash cut short.
        s.vda.write(20 * MiB, MiB, 0x33)
        s.backup(d, "incremental")
        assert_nothing_left(d, lab, s.consumer)


def check_repository(d: Daemon, consumer: str, states: dict[str, bytes],
                     tmp_path: Path) -> list[str]:
    """Every backup the repository lists restores to the disk as it was then, and
    belongs to a completed job, and the domain files kept are those of these backups
    alone; returns their checkpoints, oldest first."""
    folder = d.repository / DOMAIN / consumer / "vda"
    manifests = [json.loads(p.read_text()) for p in sorted(folder.glob("[0-9]*.json"))]
    files = folder.parent / ".domain"
    assert sorted(p.name for p in files.iterdir()) == sorted(m["checkpoint"] for m in manifests)
    for m in manifests:
        assert d.ctl.job("Get", id=m["job"])["state"] == "completed", m["job"]
        to = tmp_path / f"restored-{m['sequence']}.raw"
        to.unlink(missing_ok=True)
        d.ctl.call("Restore", domain=DOMAIN, disk="vda", consumer=consumer,
                   at=m["checkpoint"], to=str(to))
        assert_same(to.read_bytes(), states[m["checkpoint"]])
    assert d.ctl.call("Verify", domain=DOMAIN, consumer=consumer)["problems"] == []
    return [m["checkpoint"] for m in manifests]


def test_a_lost_database_is_rebuilt_from_libvirt(lab: Lab, tmp_path: Path) -> None:
    """state.db deleted while a job is ready: the next start rebuilds the job from
    libvirt's backup and checkpoint, the appliance reads on and finishes it, and the
    next incremental starts there."""
    s = Scenario(lab, tmp_path, "lost", local=False)
    s.vda.write(MiB, MiB, 0x44)
    with daemon_at(s.base, lab) as d:
        s.backup(d, "full")
    s.vda.write(3 * MiB, MiB, 0x45)
    d = start_daemon(s.base, lab.uri)
    job = s.start(d, "incremental")
    d.proc.kill()
    d.proc.wait()
    d.manager.close()
    for path in (s.base / "state").glob("state.db*"):
        path.unlink()
    with daemon_at(s.base, lab) as d:
        assert "rebuilt a running backup" in d.log_text()
        rebuilt = d.ctl.job("Get", id=job["id"])
        assert rebuilt["state"] == "ready" and rebuilt["consumer"] == "lost"
        assert [(x["name"], x["mode"], x["since"], x["url"]) for x in rebuilt["disks"]] == \
            [(x["name"], x["mode"], x["since"], x["url"]) for x in job["disks"]]
        copy = s.app.read(rebuilt)
        s.app.settle(d.ctl.job("Finish", id=job["id"]), copy)
        assert_image(s.app.image, s.vda, tmp_path)
        assert chain(d, "lost")[-1] == job["checkpoint"]
        s.vda.write(5 * MiB, MiB, 0x46)
        s.backup(d, "incremental")
        assert_nothing_left(d, lab, "lost")


def test_a_damaged_database_stops_the_daemon_with_what_to_do(lab: Lab, tmp_path: Path) -> None:
    base = tmp_path / "pullbackd"
    with daemon_at(base, lab):
        pass
    for path in (base / "state").glob("state.db-*"):
        path.unlink()
    damaged = b"SQLite format 3\x00" + bytes(range(256)) * 32
    (base / "state" / "state.db").write_bytes(damaged)
    proc = subprocess.run([sys.executable, "-m", "pullbackd.service", "--config",
                           str(base / "pullbackd.toml")],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2, proc.stderr
    assert "move it aside" in proc.stderr and "Traceback" not in proc.stderr
    assert (base / "state" / "state.db").read_bytes() == damaged  # left for the operator
