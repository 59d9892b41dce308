"""Many backups at once: `scripts/bench --load`.

On a lab of 16 small domains (one disk each, with data on it), pullbackd streams
1, 4, 8 and then 16 full backups at once into its local repository, while a
client calls List and Get in a loop. For each round it reports the total
throughput, the control calls' latency (p50, p99), and the daemon's peak RSS
(VmHWM, reset before each round) and CPU time per second of the round.

Each round is checked: every job must complete, and one domain's backup is
restored and compared with its disk by `qemu-img compare`.
Targets (see the issue): RSS under 80 MiB at 16 jobs; p99 under 50 ms while 16
streams run.
"""

from __future__ import annotations

import json
import os
import platform
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from bench import IFACE, LAB, MiB, daemon, lab, log, run

from pullbackd.control.client import Client

ROUNDS = (1, 4, 8, 16)
SMOKE_ROUNDS = (1, 2)


@dataclass(frozen=True)
class Round:
    jobs: int
    seconds: float
    bytes: int
    calls: int
    p50_ms: float
    p99_ms: float
    peak_rss_mib: float
    cpu_per_second: float

    @property
    def mib_per_second(self) -> float:
        return self.bytes / MiB / self.seconds


class Caller(threading.Thread):
    """List and Get, one after the other, 10 ms apart, timing each."""

    def __init__(self, socket: Path, job_ids: list[str]) -> None:
        super().__init__(daemon=True)
        self.socket, self.job_ids = socket, job_ids
        self.latencies: list[float] = []
        self.stop = threading.Event()

    def run(self) -> None:
        with Client(self.socket, timeout=60) as client:
            i = 0
            while not self.stop.wait(0.01):
                method, params = ((f"{IFACE}.List", {}) if i % 2 or not self.job_ids else
                                  (f"{IFACE}.Get", {"id": self.job_ids[i % len(self.job_ids)]}))
                t = time.perf_counter()
                client.call(method, **params)
                self.latencies.append(time.perf_counter() - t)
                i += 1


def proc_status(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p))]


def one_round(ctl: Client, socket: Path, pid: int, lab_dir: Path, domains: list[str],
              data: int, n: int, work: Path) -> Round:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM starts again from VmRSS
    cpu0 = cpu_seconds(pid)
    caller = Caller(socket, [])
    caller.start()
    t0 = time.perf_counter()
    jobs = [ctl.call(f"{IFACE}.Start", domain=d, consumer=f"load{n}", destination="local")["job"]
            for d in domains[:n]]
    caller.job_ids.extend(j["id"] for j in jobs)
    left = {j["id"] for j in jobs}
    while left:  # the caller thread keeps the daemon busy meanwhile
        time.sleep(0.05)
        for job_id in sorted(left):
            job = ctl.call(f"{IFACE}.Get", id=job_id)["job"]
            if job["state"] in ("completed", "failed", "aborted", "expired"):
                if job["state"] != "completed":
                    raise RuntimeError(f"job {job_id} ended {job['state']}: {job['error']}")
                left.discard(job_id)
    seconds = time.perf_counter() - t0
    caller.stop.set()
    caller.join(30)
    cpu = cpu_seconds(pid) - cpu0
    peak = proc_status(pid, "VmHWM")
    # The data is right: one domain restored and compared with its disk.
    restored = work / f"load{n}.raw"
    ctl.call(f"{IFACE}.Restore", domain=domains[0], disk="vda", consumer=f"load{n}",
             to=str(restored))
    run("qemu-img", "compare", "-q", "-U", "-F", "raw",
        str(lab_dir / "disks" / f"{domains[0]}-vda.qcow2"), str(restored))
    restored.unlink()
    ms = [x * 1000 for x in caller.latencies]
    result = Round(n, seconds, n * data, len(ms), percentile(ms, 0.5), percentile(ms, 0.99),
                   peak / MiB, cpu / seconds)
    log(f"load {n:2} jobs: {result.mib_per_second:6.0f} MiB/s, p50 {result.p50_ms:.1f} ms, "
        f"p99 {result.p99_ms:.1f} ms, peak RSS {result.peak_rss_mib:.1f} MiB")
    return result


def table(rounds: list[Round]) -> str:
    lines = [f"{'jobs':>4} {'seconds':>8} {'MiB/s':>7} {'calls':>6} {'p50 ms':>7} "
             f"{'p99 ms':>7} {'peak RSS MiB':>13} {'CPU/s':>6}"]
    lines += [f"{r.jobs:4} {r.seconds:8.2f} {r.mib_per_second:7.0f} {r.calls:6} "
              f"{r.p50_ms:7.1f} {r.p99_ms:7.1f} {r.peak_rss_mib:13.1f} {r.cpu_per_second:6.2f}"
              for r in rounds]
    return "\n".join(lines)


def main(work: Path, smoke: bool, output: Path | None) -> int:
    rounds = SMOKE_ROUNDS if smoke else ROUNDS
    size, data = (64 * MiB, 8 * MiB) if smoke else (512 * MiB, 64 * MiB)
    count = max(rounds)
    domains = [f"lab{i}" for i in range(1, count + 1)]
    lab_dir = work / "lab-load"
    with lab(lab_dir, size, count) as uri, \
            daemon(work / "pullbackd-load", uri) as (ctl, pid):
        log(f"load: {count} domains, {data // MiB} MiB of data on each {size // MiB} MiB disk")
        for n, domain in enumerate(domains):
            run(str(LAB), "--dir", str(lab_dir), "write", domain, "vda", str(n * MiB),
                str(data), str(0x30 + n))
        results = [one_round(ctl, work / "pullbackd-load" / "control.sock", pid, lab_dir,
                             domains, data, n, work) for n in rounds]
    print(table(results))
    last = results[-1]
    verdict = {"rss_under_80_mib": last.peak_rss_mib < 80, "p99_under_50_ms": last.p99_ms < 50}
    print(f"at {last.jobs} jobs: peak RSS {last.peak_rss_mib:.1f} MiB (target < 80), "
          f"p99 {last.p99_ms:.1f} ms (target < 50)")
    if output is not None:
        output.write_text(json.dumps({
            "machine": {"cpus": os.cpu_count(), "kernel": platform.release()},
            "disk": size, "data": data,
            "rounds": [asdict(r) | {"mib_per_second": r.mib_per_second} for r in results],
            "targets_met": verdict,
        }, indent=2) + "\n")
        log(f"wrote {output}")
    return 0
