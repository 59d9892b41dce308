"""Fixtures for the tests that run against the real thing.

`lab`: a private libvirtd with running OS-less QEMU domains, from `scripts/lab`
(the same code the demo uses). `daemon`: pullbackd itself as a subprocess, on
its own control socket, ready when it says so through sd_notify: the most
faithful test there is (real socket, real signals, real readiness).
"""

from __future__ import annotations

import hashlib
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pullbackd import api
from pullbackd.control import idl
from pullbackd.control.client import Client, VarlinkError

from .systemd import ServiceManager

ROOT = Path(__file__).resolve().parent.parent
LAB = ROOT / "scripts" / "lab"
DISK_SIZE = 64 << 20
#: [stream] destinations that let the tests' NBD servers be written to.
ANY_DESTINATION = 'destinations = [' + ", ".join(
    f'"{scheme}:///?socket={folder}"' for scheme in ("nbd+unix", "nbds+unix")
    for folder in ("/tmp", "/var/tmp")) + "]"


@dataclass
class Lab:
    dir: Path
    uri: str

    def run(self, *args: str) -> str:
        proc = subprocess.run([str(LAB), "--dir", str(self.dir), *args],
                              capture_output=True, text=True, timeout=120, check=False)
        if proc.returncode != 0:
            raise AssertionError(f"scripts/lab {' '.join(args)} failed: {proc.stderr}")
        return proc.stdout

    def write(self, domain: str, disk: str, offset: int, length: int, byte: int) -> None:
        self.run("write", domain, disk, str(offset), str(length), hex(byte))

    def zero(self, domain: str, disk: str, offset: int, length: int) -> None:
        """Write zeroes the way a trim does: the range reads as zero and is not data."""
        self.run("zero", domain, disk, str(offset), str(length))


@contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A small file system of its own at `path`, to run out of room on purpose.

    A lab started before it was mounted does not see it: its libvirtd lives in
    a private copy of the mounts taken at its start.
    """
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                   check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


#: Fixtures that bring up a lab. A test using one, itself or through another fixture, is
#: marked `lab` (pyproject.toml), so that `pytest -m "not lab"` runs the fast tests alone.
LAB_FIXTURES = frozenset({"lab", "own_lab", "lab_with_small_scratch", "lab_with_tiny_scratch",
                          "lab8", "hosts"})
#: The test being set up, run or torn down: lab_up checks it is marked `lab`.
_CURRENT: dict[str, pytest.Item] = {}


#: Fixtures that bring up the host lab (`scripts/lab host`): a test using one is marked
#: `host`, and `lab` too (it needs a real libvirt and QEMU: `-m "not lab"` stays fast).
HOST_FIXTURES = frozenset({"host"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        fixtures = getattr(item, "fixturenames", ())
        if HOST_FIXTURES.intersection(fixtures):
            item.add_marker(pytest.mark.host)
        if LAB_FIXTURES.intersection(fixtures) or HOST_FIXTURES.intersection(fixtures):
            item.add_marker(pytest.mark.lab)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item) -> None:
    _CURRENT["item"] = item


def require_marker(marker: str, what: str, fixtures: str) -> None:
    """Fail the current test if it brings up `what` without being marked `marker`."""
    item = _CURRENT.get("item")
    if item is not None and item.get_closest_marker(marker) is None:
        # Or `pytest -m "not MARKER"` would start them, and slowly.
        raise AssertionError(f"{item.nodeid} brings up {what} but is not marked {marker}: "
                             f"give the fixture that does it a name in conftest.{fixtures}, "
                             f"or mark the test @pytest.mark.{marker}")


@contextmanager
def lab_up(lab_dir: Path, *args: str) -> Iterator[Lab]:
    """`scripts/lab up ARGS` in lab_dir, and `down` afterwards whatever happens."""
    require_marker("lab", "a lab", "LAB_FIXTURES")
    try:
        proc = subprocess.run([str(LAB), "--dir", str(lab_dir), "up", *args],
                              capture_output=True, text=True, timeout=300, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"scripts/lab up failed:\n{proc.stderr}")
        env = dict(shlex.split(line)[0].split("=", 1) for line in proc.stdout.splitlines())
        yield Lab(lab_dir, env["LIBVIRT_URI"])
    finally:
        subprocess.run([str(LAB), "--dir", str(lab_dir), "down"], timeout=120, check=False,
                       capture_output=True)


@pytest.fixture(scope="session")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """lab1, lab2 and lab4 running, lab3 defined but stopped; two 64 MiB disks each.

    lab4 is for tests that break checkpoint chains on purpose.
    """
    with lab_up(tmp_path_factory.mktemp("lab"), "--domains", "4", "--disks", "2",
                "--size", str(DISK_SIZE)) as lab:
        lab.run("stop", "lab3")
        yield lab


class Control:
    """A varlink client that checks every reply against the interface definition."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.iface = api.interface(api.INTERFACE)

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        with Client(self.path, timeout=120) as client:
            reply = client.call(f"{api.INTERFACE}.{method}", **params)
        idl.check_fields(self.iface, self.iface.methods[method].output, reply)
        return reply

    def error(self, method: str, **params: Any) -> VarlinkError:
        """Call a method that must fail; check the error's parameters against its declaration."""
        try:
            self.call(method, **params)
        except VarlinkError as e:
            iface = api.interface(e.name.rpartition(".")[0])
            idl.check_fields(iface, iface.errors[e.short_name], e.parameters)
            return e
        raise AssertionError(f"{method}({params}) succeeded")

    def job(self, method: str, **params: Any) -> dict[str, Any]:
        job: dict[str, Any] = self.call(method, **params)["job"]
        return job

    def wait(self, job_id: str, timeout: float = 120) -> dict[str, Any]:
        """Bounded wait for a job that ends by itself (a push, a streamed backup).

        The event stream that would let us wait without asking comes with Watch.
        """
        deadline = time.monotonic() + timeout
        while (job := self.job("Get", id=job_id))["state"] in (
                "queued", "starting", "running", "ready"):
            assert time.monotonic() < deadline, job
            time.sleep(0.05)
        return job


#: What changes while a job runs: its statistics, sessions and place in the queue.
LIVE_JOB_FIELDS = ("progress", "appliance", "position", "scratch")
LIVE_DISK_FIELDS = ("transfer", "done", "rate", "eta", "scratch")


def settled(job: dict[str, Any]) -> dict[str, Any]:
    """A job without what changes while it runs, for comparing two looks at it."""
    return {k: v for k, v in job.items() if k not in LIVE_JOB_FIELDS} | {
        "disks": [{k: v for k, v in d.items() if k not in LIVE_DISK_FIELDS}
                  for d in job["disks"]]}


@dataclass
class Daemon:
    proc: subprocess.Popen[bytes]
    socket: Path
    exports: Path
    scratch: Path
    log: Path
    ctl: Control
    repository: Path
    manager: ServiceManager

    def log_text(self) -> str:
        return self.log.read_text()


def start_daemon(base: Path, uri: str, *, timeout: float = 60, repository: Path | None = None,
                 scratch: Path | None = None, scratch_reserve: int = 0,
                 exports: str = "", extra_config: str = "",
                 fdstore: dict[str, int] | None = None,
                 env: dict[str, str] | None = None, control: str = "",
                 stream: str = ANY_DESTINATION,
                 socket: Path | None = None, libvirt: str = "") -> Daemon:
    """Start pullbackd and wait for READY=1 on a NOTIFY_SOCKET of our own.

    `exports` is more of the [exports] section; `extra_config` more sections.
    `fdstore`: what the previous run handed over (`Daemon.manager.fdstore`).
    `env`: more environment (e.g. a crash point, see pullbackd/crash.py).
    `control`, `stream`, `libvirt`: more of those sections; `socket`: the control
    socket's path.
    """
    socket = socket or base / "control.sock"
    base.mkdir(parents=True, exist_ok=True)
    config = base / "pullbackd.toml"
    # Short, as socket paths must be; the same for the same base, as a restart needs.
    exports_dir = Path(tempfile.gettempdir()) / \
        f"pbx-{hashlib.sha1(str(base).encode()).hexdigest()[:10]}"
    config.write_text(
        f'[libvirt]\nuri = "{uri}"\n{libvirt}\n'
        f'[control]\nsocket = "{socket}"\n{control}\n'
        f'[exports]\ndir = "{exports_dir}"\n{exports}\n'
        f'[scratch]\ndir = "{scratch or base / "scratch"}"\nreserve = {scratch_reserve}\n'
        f'[state]\ndir = "{base}/state"\n'
        # Write-behind every MiB: many times in every copy into the repository here.
        f'[repository]\ndir = "{repository or base / "repository"}"\nwrite_behind = {1 << 20}\n'
        # Where the tests' folders and NBD servers are.
        f'[restore]\ndirs = ["/tmp", "/var/tmp"]\n[push]\ndirs = ["/tmp", "/var/tmp"]\n'
        f'[stream]\n{stream}\n'
        f'[log]\nlevel = "debug"\n' + extra_config)
    manager = ServiceManager(base / "notify.sock")
    manager.fdstore.update(fdstore or {})
    deadline = time.monotonic() + timeout
    log = base / "pullbackd.log"
    with log.open("ab") as log_file:
        proc = manager.spawn([sys.executable, "-m", "pullbackd.service", "--config", str(config)],
                             log_file, env)
    while not manager.ready.wait(0.2):
        if proc.poll() is not None or manager.stopping.is_set() or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            manager.close()
            raise AssertionError(f"pullbackd did not get ready:\n{log.read_text()}")
    return Daemon(proc, socket, exports_dir, scratch or base / "scratch", log,
                  Control(socket), repository or base / "repository", manager)


def stop_daemon(daemon: Daemon) -> None:
    daemon.proc.send_signal(signal.SIGTERM)
    try:
        assert daemon.proc.wait(timeout=30) == 0, daemon.log_text()
    finally:
        daemon.manager.close()
    assert not daemon.socket.exists()


@contextmanager
def serving(base: Path, uri: str, **options: Any) -> Iterator[Daemon]:
    """A daemon for a module of tests (`start_daemon` options), left clean and checked."""
    d = start_daemon(base, uri, **options)
    try:
        yield d
    finally:
        # End whatever a failed test left running, so the next module starts clean.
        for job in d.ctl.call("List")["jobs"]:
            if job["state"] == "ready":
                d.ctl.call("Abort", id=job["id"])
        stop_daemon(d)
        assert "call crashed" not in d.log_text()


@pytest.fixture(scope="module")
def daemon(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    with serving(tmp_path_factory.mktemp("pullbackd"), lab.uri) as d:
        yield d
