"""Many backups at once on a lab of eight domains: the queue, the event stream, the data."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pullbackd import api
from pullbackd.control.client import Client

from .conftest import Daemon, Lab, lab_up, start_daemon, stop_daemon
from .images import Disk, MiB, assert_image, assert_same, read_export

DOMAINS = [f"lab{i}" for i in range(1, 9)]
MAX_ACTIVE = 4


@pytest.fixture(scope="module")
def lab8(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    with lab_up(tmp_path_factory.mktemp("lab8"), "--domains", "8", "--disks", "2",
                "--size", str(64 * MiB)) as lab:
        yield lab


@pytest.fixture
def daemon(lab8: Lab, tmp_path: Path) -> Iterator[Daemon]:
    d = start_daemon(tmp_path / "pullbackd", lab8.uri,
                     extra_config=f"[jobs]\nmax_active = {MAX_ACTIVE}\n")
    try:
        yield d
    finally:
        stop_daemon(d)
        assert "call crashed" not in d.log_text()


class Recorder(threading.Thread):
    """Watch() on every job, from before the first Start until told to stop."""

    def __init__(self, daemon: Daemon) -> None:
        super().__init__(daemon=True)
        self.client = Client(daemon.socket, timeout=None)
        self.events: list[dict[str, Any]] = []
        self.replies = self.client.stream(f"{api.INTERFACE}.Watch")

    def run(self) -> None:
        try:
            for reply in self.replies:
                self.events.append(reply["event"])
        except OSError:
            pass  # closed by stop()

    def stop(self) -> None:
        self.client.close()
        self.join(10)

    def states(self, job_id: str) -> list[str]:
        return [e["job"]["state"] for e in self.events
                if e["kind"] == "state" and e["job"]["id"] == job_id]


class Poller(threading.Thread):
    """List every 50 ms while the backups run: the daemon must keep answering."""

    def __init__(self, daemon: Daemon) -> None:
        super().__init__(daemon=True)
        self.daemon_ = daemon
        self.latencies: list[float] = []
        self.errors: list[BaseException] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.05):
            try:
                with Client(self.daemon_.socket, timeout=10) as client:
                    t = time.perf_counter()
                    client.call(f"{api.INTERFACE}.List")
                    self.latencies.append(time.perf_counter() - t)
            except BaseException as e:
                self.errors.append(e)


def appliance(daemon: Daemon, job_id: str, disks: dict[str, Disk],
              failures: list[BaseException]) -> None:
    """Wait for the job to be ready, read every disk with libnbd, check it, Finish."""
    try:
        with Client(daemon.socket, timeout=300) as client:
            for reply in client.stream(f"{api.INTERFACE}.Watch", id=job_id):
                job = reply["event"]["job"]
                if reply["event"]["kind"] == "state" and job["state"] == "ready":
                    for d in job["disks"]:
                        assert_same(read_export(d["url"]), disks[d["name"]].expected)
                    daemon.ctl.call("Finish", id=job_id)
    except BaseException as e:
        failures.append(e)


def test_eight_domains_back_up_four_at_a_time_in_order(
        lab8: Lab, daemon: Daemon, tmp_path: Path) -> None:
    disks: dict[str, dict[str, Disk]] = {}
    for n, domain in enumerate(DOMAINS):
        disks[domain] = {name: Disk(lab8, domain, name) for name in ("vda", "vdb")}
        disks[domain]["vda"].write(n * MiB, 2 * MiB, 0x10 + n)
        disks[domain]["vdb"].write(32 * MiB + n * 4096, MiB, 0x80 + n)

    recorder = Recorder(daemon)
    recorder.start()
    poller = Poller(daemon)
    poller.start()
    # Pull jobs read by appliances take the first places (they hold them until
    # the appliances come); the ones streamed by pullbackd wait in the queue.
    jobs = [daemon.ctl.job("Start", domain=domain) for domain in DOMAINS[:4]]
    jobs += [daemon.ctl.job("Start", domain=domain, destination="local")
             for domain in DOMAINS[4:]]
    assert [j["state"] for j in jobs[:MAX_ACTIVE]] == ["ready"] * 4
    assert [(j["state"], j["position"]) for j in jobs[MAX_ACTIVE:]] == [
        ("queued", i) for i in range(1, 5)]
    e = daemon.ctl.error("Start", domain="lab1")
    assert e.short_name == "BackupInProgress" and e.parameters["id"] == jobs[0]["id"]

    failures: list[BaseException] = []
    readers = [threading.Thread(target=appliance, args=(daemon, j["id"], disks[j["domain"]],
                                                        failures))
               for j in jobs[:4]]
    for reader in readers:
        reader.start()
    ended = [daemon.ctl.wait(j["id"], timeout=300) for j in jobs]
    for reader in readers:
        reader.join(60)
    poller.done.set()
    poller.join(30)
    recorder.stop()

    assert failures == []
    assert [j["state"] for j in ended] == ["completed"] * 8, [j["error"] for j in ended]
    # The queue let them in in the order they came.
    started = sorted(ended, key=lambda j: next(
        t["at"] for t in j["history"] if t["state"] == "starting"))
    assert [j["id"] for j in started] == [j["id"] for j in jobs]
    # Never more than MAX_ACTIVE at once: each queued job started only after one ended.
    for k, job in enumerate(ended[MAX_ACTIVE:]):
        start = next(t["at"] for t in job["history"] if t["state"] == "starting")
        assert sum(j["ended"] <= start for j in ended) >= k + 1
    # The watcher saw every transition of every job, in order, and nothing else.
    for job in ended:
        assert recorder.states(job["id"]) == [t["state"] for t in job["history"]]
    # Streamed: what the repository holds is the disk at backup time.
    for job in ended[4:]:
        for name, disk in disks[job["domain"]].items():
            restored = tmp_path / f"{job['domain']}-{name}.raw"
            daemon.ctl.call("Restore", domain=job["domain"], disk=name, to=str(restored))
            assert_image(restored, disk, tmp_path)
    # Statistics: every disk's bytes done reached its bytes to transfer.
    for job in ended:
        for d in job["disks"]:
            assert d["transfer"] is not None and d["done"] >= d["transfer"] > 0, d
    assert poller.errors == [] and poller.latencies
    print(f"List while 8 backups ran: {len(poller.latencies)} calls, "
          f"max {max(poller.latencies) * 1000:.1f} ms")


def test_watchers_see_every_transition_while_jobs_start_and_abort(
        lab8: Lab, daemon: Daemon) -> None:
    recorder = Recorder(daemon)
    recorder.start()
    jobs = [daemon.ctl.job("Start", domain=domain) for domain in DOMAINS[:6]]
    refused = daemon.ctl.error("Start", domain="lab7", queue=False)
    assert refused.short_name == "TooManyJobs"
    assert refused.parameters == {"limit": MAX_ACTIVE, "active": MAX_ACTIVE}
    assert daemon.ctl.error("Finish", id=jobs[-1]["id"]).short_name == "JobNotReady"
    for job in reversed(jobs):  # the queued ones first, then the running ones
        daemon.ctl.call("Abort", id=job["id"])
    ended = [daemon.ctl.job("Get", id=j["id"]) for j in jobs]
    deadline = time.monotonic() + 30
    while sum(e["kind"] == "state" for e in recorder.events) < sum(
            len(j["history"]) for j in ended) and time.monotonic() < deadline:
        time.sleep(0.05)
    recorder.stop()
    for job in ended:
        assert job["state"] == "aborted"
        assert recorder.states(job["id"]) == [t["state"] for t in job["history"]]
    assert [t["state"] for t in ended[-1]["history"]] == ["queued", "aborted"]
    assert [t["state"] for t in ended[0]["history"]] == ["starting", "ready", "aborted"]
