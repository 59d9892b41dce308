"""A host's whole night: `scripts/bench --night N`.

The lab has 2N domains, each with one disk holding data: lab1..labN for pullbackd, and
their twins lab(N+1)..lab(2N), written the same, for virtnbdbackup (which keeps
checkpoints of its own). Each side takes a full backup of all its domains, then 64 KiB
writes land at the same scattered offsets on every disk, and each side takes an
incremental:

    pullbackd       as an appliance drives it: the N Starts pipelined on 4
                    connections (destination "local", the embedded repository),
                    then it waits until every job ended, following them with one
                    Watch ([jobs] max_active at its default queues the rest)
    virtnbdbackup   one domain after the other, as its documentation runs it

While one side runs, the other's domains are paused (`paused`).

Every pullbackd backup is then checked byte for byte: the repository's newest file of
each disk, read through its backing chain, against the domain's disk (`qemu-img
compare`; the guests are idle). virtnbdbackup's are not this benchmark's to check.

It prints the seconds of each side, their ratio, what each Start took to answer
(median, max), the CPU time per domain of pullbackd's side by process (libvirtd, the
domains' QEMUs, the daemon, its writer), how busy the machine's CPUs were meanwhile and
what share of them the hypervisor gave to others (steal: these are shared vCPUs), what
libvirt alone spends on a backup (`floor`) and the daemon's peak RSS; and writes
bench/night.json. Targets at N = 32 (issue "a host's whole night"): incremental at least
30 times faster than virtnbdbackup, full at least 8 times, RSS under 100 MiB.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import libvirt
from bench import IFACE, LAB, MiB, daemon, lab, log, run

from pullbackd import qcow2
from pullbackd.control.client import Client

CONSUMER = "night"
#: Connections the appliance sends its Starts on at once.
PIPELINE = 4


@dataclass(frozen=True)
class Size:
    disk: int
    data: int
    writes: int  # 64 KiB writes per disk between the full and the incremental


NIGHT = Size(disk=256 * MiB, data=128 * MiB, writes=40)
SMOKE = Size(disk=64 * MiB, data=8 * MiB, writes=8)


@dataclass(frozen=True)
class Side:
    mode: str
    pullbackd: float
    virtnbdbackup: float
    starts_median_ms: float
    starts_max_ms: float
    #: CPU time per domain of pullbackd's side, by process (`cpu_seconds`).
    cpu_ms: dict[str, float]
    #: While pullbackd's side ran, the share of all the machine's CPUs' time that was busy,
    #: and the share the hypervisor gave to others (steal; `machine`).
    busy: float
    stolen: float

    @property
    def ratio(self) -> float:
        return self.virtnbdbackup / self.pullbackd


def backup_all(control: Path, domains: list[str], mode: str
               ) -> tuple[float, list[float]]:
    """pullbackd's night: the N Starts pipelined (PIPELINE connections, each sending its
    next Start as soon as the last one answered), then every job to its end, followed
    as an appliance follows them: one Watch of every job, which tells each end as it
    happens (polling `Get` would ask libvirt for each job's statistics each time). The
    seconds of it all, and of each Start's answer."""
    starts: list[float] = []
    ids: list[str] = []

    def start(share: list[str]) -> None:
        with Client(control, timeout=600) as client:
            for domain in share:
                t = time.perf_counter()
                job = client.call(f"{IFACE}.Start", domain=domain, mode=mode,
                                  consumer=CONSUMER, destination="local")["job"]
                starts.append(time.perf_counter() - t)
                ids.append(job["id"])

    ended: dict[str, dict[str, Any]] = {}
    changed = threading.Condition()

    def follow(events: Iterator[dict[str, Any]]) -> None:
        with contextlib.suppress(OSError):  # the watcher hung up: done
            for event in events:
                if (job := event["event"]["job"])["ended"] is not None:
                    with changed:
                        ended[job["id"]] = job
                        changed.notify_all()

    with Client(control, timeout=600) as watcher:
        threading.Thread(target=follow, args=(watcher.stream(f"{IFACE}.Watch"),),
                         daemon=True).start()
        t0 = time.perf_counter()
        with ThreadPoolExecutor(PIPELINE) as pool:
            list(pool.map(start, [domains[i::PIPELINE] for i in range(PIPELINE)]))
        with changed:
            changed.wait_for(lambda: all(i in ended for i in ids))
        seconds = time.perf_counter() - t0
    for job in (ended[i] for i in ids):
        if job["state"] != "completed":
            raise AssertionError(f"{job['domain']}: {job['state']}: {job['error']}")
    return seconds, starts


@dataclass(frozen=True)
class Process:
    pid: int
    name: str
    command: bytes
    parent: int
    #: Seconds of CPU time: its own (its threads', finished ones too), its reaped children's.
    cpu: float
    children: float


def processes() -> list[Process]:
    """Every process, from /proc."""
    hz, found = os.sysconf("SC_CLK_TCK"), []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            command = (entry / "cmdline").read_bytes()
        except OSError:  # it ended
            continue
        f = stat[stat.rindex(")") + 2:].split()
        found.append(Process(int(entry.name), stat[stat.index("(") + 1:stat.rindex(")")],
                             command, int(f[1]), (int(f[11]) + int(f[12])) / hz,
                             (int(f[13]) + int(f[14])) / hz))
    return found


def cpu_seconds(daemon_pid: int) -> dict[str, float]:
    """CPU time so far of what a night of pullbackd's runs on: libvirtd, the domains'
    QEMUs, the daemon (with its finished threads and reaped children), its writer."""
    spent: dict[str, float] = {}
    for p in processes():
        if p.pid == daemon_pid:
            group, cpu = "pullbackd", p.cpu + p.children
        elif p.name == "libvirtd":
            group, cpu = "libvirtd", p.cpu
        elif p.name.startswith("qemu-system"):
            group, cpu = "QEMU", p.cpu
        elif b"qemu-storage-daemon" in p.command and p.parent == daemon_pid:
            group, cpu = "writer", p.cpu
        else:
            continue
        spent[group] = spent.get(group, 0.0) + cpu
    return spent


def machine() -> tuple[int, int, int]:
    """The machine's CPU time so far, in ticks (/proc/stat): busy, stolen, all."""
    user, nice, system, idle, iowait, irq, softirq, steal = (
        int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9])
    busy = user + nice + system + irq + softirq
    return busy, steal, busy + steal + idle + iowait


def _one(pids: list[int], what: str) -> int:
    if len(pids) != 1:
        raise AssertionError(f"{len(pids)} processes of {what}: is another lab up?")
    return pids[0]


def floor(uri: str, domain: str, work: Path, rounds: int) -> dict[str, float]:
    """What libvirt alone spends on a backup, beside the night: rounds of nothing but a
    pull backup begun with its checkpoint (incremental since the round before, on a
    scratch file made beforehand, as pullbackd makes them: scratch.py), ended (its end
    awaited by asking for the domain's job every 2 ms, a call libvirt answers without
    QEMU), and the checkpoint before it deleted, as pullbackd does; the CPU time per round
    of libvirtd and of the domain's QEMU."""
    conn = libvirt.open(uri)
    try:
        dom = conn.lookupByName(domain)
        found = processes()
        pids = {"libvirtd": _one([p.pid for p in found if p.name == "libvirtd"], "libvirtd"),
                "QEMU": _one([p.pid for p in found if f"guest={domain},".encode() in p.command],
                             f"{domain}'s QEMU")}

        def spent() -> dict[str, float]:
            cpu = {p.pid: p.cpu for p in processes()}
            return {group: cpu[pid] for group, pid in pids.items()}

        empty = qcow2.empty(dom.blockInfo("vda")[0])
        before = spent()
        previous = None
        for n in range(rounds):
            since = f"<incremental>{previous}</incremental>" if previous else ""
            (work / f"floor-{n}.qcow2").write_bytes(empty)
            dom.backupBegin(
                f"<domainbackup mode='pull'>{since}<server transport='unix' "
                f"socket='{work}/floor.sock'/><disks><disk name='vda' backup='yes' "
                f"type='file'><scratch file='{work}/floor-{n}.qcow2'/><driver type='qcow2'/>"
                "</disk></disks></domainbackup>",
                f"<domaincheckpoint><name>floor-{n}</name><disks><disk name='vda' "
                "checkpoint='bitmap'/></disks></domaincheckpoint>",
                libvirt.VIR_DOMAIN_BACKUP_BEGIN_REUSE_EXTERNAL)
            dom.abortJob()
            while dom.jobInfo()[0] != libvirt.VIR_DOMAIN_JOB_NONE:
                time.sleep(0.002)
            (work / f"floor-{n}.qcow2").unlink()
            if previous:
                dom.checkpointLookupByName(previous).delete(0)
            previous = f"floor-{n}"
        after = spent()
        if previous:
            dom.checkpointLookupByName(previous).delete(0)
    finally:
        conn.close()
    return {k: round((v - before[k]) * 1000 / rounds, 1) for k, v in after.items()}


@contextlib.contextmanager
def paused(uri: str, domains: list[str]) -> Iterator[None]:
    """The other side's domains paused while one side runs. The lab's guests run under
    TCG, where an idle guest still costs CPU time (64 of them a third of a core), which
    an idle guest of a KVM host does not: the other side's need not take it from this
    one's."""
    def each(command: str) -> None:
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda d: run("virsh", "-q", "-c", uri, command, d), domains))
    each("suspend")
    try:
        yield
    finally:
        each("resume")


def virtnbdbackup_all(uri: str, work: Path, twins: list[str], level: str) -> float:
    t0 = time.perf_counter()
    for twin in twins:
        scratch = work / "vnb-scratch" / twin
        scratch.mkdir(parents=True, exist_ok=True)
        run("virtnbdbackup", "-U", uri, "-d", twin, "-f", str(scratch / "nbd.sock"),
            "-S", str(scratch), "--noprogress", "-l", level, "-o", str(work / "vnb" / twin))
    return time.perf_counter() - t0


def check(uri: str, lab_dir: Path, repository: Path, domain: str) -> None:
    """The newest backup of the domain's disk holds what the disk holds."""
    folder = repository / domain / CONSUMER / "vda"
    newest = sorted(folder.glob("[0-9]*.qcow2"))[-1]
    # What QEMU caches of the qcow2 (its L2 tables, for one) written out first.
    run("virsh", "-q", "-c", uri, "qemu-monitor-command", domain, "--hmp",
        'qemu-io -d /machine/peripheral/virtio-disk0/virtio-backend "flush"')
    run("qemu-img", "compare", "-q", "-U", str(newest),
        str(lab_dir / "disks" / f"{domain}-vda.qcow2"))


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def main(work: Path, n: int, smoke: bool, output: Path | None) -> int:
    size = SMOKE if smoke else NIGHT
    ours = [f"lab{i}" for i in range(1, n + 1)]
    twins = [f"lab{i}" for i in range(n + 1, 2 * n + 1)]
    lab_dir, daemon_dir = work / "lab-night", work / "pullbackd-night"
    repository = daemon_dir / "repository"
    with lab(lab_dir, size.disk, 2 * n) as uri, \
            daemon(daemon_dir, uri, f'[repository]\ndir = "{repository}"\n') as (_, pid):
        log(f"night: {n} domains and {n} twins, {size.data // MiB} MiB of data on each "
            f"{size.disk // MiB} MiB disk")
        write = [(d, i % n) for i, d in enumerate(ours + twins)]
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda dw: run(str(LAB), "--dir", str(lab_dir), "write", dw[0], "vda",
                                         "0", str(size.data), str(0x40 + dw[1])), write))
        sides = []
        for mode, level in (("full", "full"), ("incremental", "inc")):
            if mode == "incremental":
                with ThreadPoolExecutor(4) as pool:  # the same offsets on both twins
                    list(pool.map(lambda dw: run(
                        str(LAB), "--dir", str(lab_dir), "scatter", dw[0], "vda",
                        str(size.writes), str(64 << 10), "0xd2", "--seed", str(dw[1])), write))
            with paused(uri, twins):
                before, ticks = cpu_seconds(pid), machine()
                seconds, starts = backup_all(daemon_dir / "control.sock", ours, mode)
                after = cpu_seconds(pid)
                busy, stolen, total = (b - a for a, b in zip(ticks, machine(), strict=True))
            cpu = {k: round((v - before.get(k, 0.0)) * 1000 / n, 1) for k, v in after.items()}
            log(f"{mode}: pullbackd {seconds:.2f} s")
            with paused(uri, ours):
                theirs = virtnbdbackup_all(uri, work, twins, level)
            log(f"{mode}: virtnbdbackup {theirs:.2f} s")
            for domain in ours:
                check(uri, lab_dir, repository, domain)
            sides.append(Side(mode, seconds, theirs, statistics.median(starts) * 1000,
                              max(starts) * 1000, cpu, round(busy / total, 3),
                              round(stolen / total, 3)))
        alone = floor(uri, twins[0], work, 3 if smoke else 40)
        rss = peak_rss_mib(pid)
    print(f"{'':12} {'pullbackd':>10} {'virtnbdbackup':>14} {'ratio':>7} "
          f"{'Start p50':>10} {'Start max':>10}")
    for s in sides:
        print(f"{s.mode:12} {s.pullbackd:9.2f}s {s.virtnbdbackup:13.2f}s {s.ratio:6.1f}x "
              f"{s.starts_median_ms:8.1f}ms {s.starts_max_ms:8.1f}ms")
    for s in sides:
        print(f"{s.mode:12} CPU per domain: " + ", ".join(
            f"{k} {v:.1f} ms" for k, v in sorted(s.cpu_ms.items(), key=lambda kv: -kv[1])))
    for s in sides:
        print(f"{s.mode:12} the machine's CPUs meanwhile: {s.busy:.0%} busy, {s.stolen:.0%} "
              "stolen by the hypervisor")
    print("libvirt alone, per backup (backupBegin with its checkpoint, its end, the checkpoint "
          "before it deleted): " + ", ".join(f"{k} {v:.1f} ms" for k, v in alone.items()))
    print(f"daemon peak RSS {rss:.1f} MiB; every backup of pullbackd's compared equal")
    if output is not None:
        full, incremental = sides
        output.write_text(json.dumps({
            "machine": {"cpus": os.cpu_count(), "kernel": platform.release()},
            "domains": n, "size": asdict(size),
            "sides": [asdict(s) | {"ratio": s.ratio} for s in sides],
            "peak_rss_mib": rss,
            "libvirt_alone_cpu_ms": alone,
            "targets_met": {"incremental_30x": incremental.ratio >= 30,
                            "full_8x": full.ratio >= 8, "rss_under_100_mib": rss < 100},
        }, indent=2) + "\n")
        log(f"wrote {output}")
    return 0
