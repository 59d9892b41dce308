"""What a chain of checkpoints costs the guest: `scripts/bench --checkpoints`.

A libvirt checkpoint is a persistent QEMU dirty bitmap on each of its disks, and
libvirt 9.0 keeps every one of them recording (so that a backup can start from any
checkpoint): each guest write request sets its bits in every bitmap of the disk.
A stress run once left 303 checkpoints on one domain; pullbackd now trims each
consumer's chain ([chains] keep, 1 by default). This measures what a long chain
costs, against one checkpoint and against none (the baseline), on a lab of its own
with three idle domains whose disks are first written in full (so that the writes
measured overwrite allocated clusters). Per domain and round:

    small       2000 writes of 64 KiB (a bitmap bit each) at scattered offsets: a
                bitmap costs per request. Each is an HMP `qemu-io` write on the
                guest's own block backend (the path of a guest's writes, bitmaps
                included), all over one libvirt connection. Reported: writes/s as
                the caller sees them, QEMU's own time for a request (the median of
                qemu-io's reports in QEMU's log: the monitor's round trip left out),
                and the CPU time QEMU's process (all threads; the vCPU idles) spent
                per write: bitmaps cost CPU, and CPU time is not stretched by the
                waits that other work on the machine causes
    large       256 MiB in 4 MiB requests, MiB/s
    backup      backupBegin of a full pull backup, then abortJob, ms
    checkpoint  checkpointCreateXML of one more checkpoint, and deleting it, ms

The three chains (0, 1 and 100 checkpoints) move from domain to domain every round
(checkpoints created or deleted between rounds, not timed), so that no domain's
quirks pass for a chain's cost; within a round the domains take turns, one of each
per measurement, every other round in reverse order (bench.turns), after a round
that is not counted. Medians of 9 rounds are reported, the ratio of 100 checkpoints
to 1, and that ratio round by round (median, min .. max), beside the same for 1 to
0 (a bitmap apart: what the machine's noise alone does). Every round is checked:
each write and each read-back (`qemu-io read -P`, the round's pattern) must be
confirmed by qemu-io's own line in QEMU's log (its errors, a failed pattern check
too, go there and not into the monitor's reply), and each domain's recording
bitmaps are counted. `--smoke` runs tiny sizes once: it checks that the benchmark
works, nothing more.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import random
import re
import statistics
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import libvirt
import libvirt_qemu
from bench import BLOCK, LAB, GiB, MiB, lab, log, run, turns
from load import cpu_seconds

#: qemu-io on the first virtio disk's block backend: the guest's own path.
DEVICE = "/machine/peripheral/virtio-disk0/virtio-backend"
HMP = libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP
LARGE_REQUEST = 4 * MiB
FILL_BYTE = 0x11
JOB_END_TIMEOUT = 30.0
#: qemu-io's report of one request: its line, then its timing line.
REPORT = re.compile(r"^(wrote|read) (\d+)/(\d+) bytes at offset (\d+)\n"
                    r".*, 1 ops; .* and ([0-9.]+|inf) ops/sec\)$", re.MULTILINE)
FAILURE = re.compile(r"^.*(failed|error|not found|cannot).*$", re.MULTILINE | re.IGNORECASE)
SAID = {"write": "wrote", "read": "read"}


@dataclass(frozen=True)
class Size:
    disk: int
    small_writes: int
    large: int
    chain: int  # checkpoints in the long chain
    rounds: int


FULL_SIZE = Size(disk=1 * GiB, small_writes=2000, large=256 * MiB, chain=100, rounds=9)
SMOKE_SIZE = Size(disk=64 * MiB, small_writes=32, large=8 * MiB, chain=100, rounds=1)


@dataclass
class Case:
    """A chain's length and what was measured with it, a value per counted round."""

    checkpoints: int
    domains: list[str] = field(default_factory=list)  # which domain had it, round by round
    small_seconds: list[float] = field(default_factory=list)
    small_qemu_us: list[float] = field(default_factory=list)  # QEMU's own, per request
    small_cpu_us: list[float] = field(default_factory=list)  # QEMU's CPU, per request
    large_seconds: list[float] = field(default_factory=list)
    backup_ms: list[float] = field(default_factory=list)
    create_ms: list[float] = field(default_factory=list)
    delete_ms: list[float] = field(default_factory=list)


@dataclass
class Guest:
    """A lab domain, its QEMU (log, where qemu-io reports, and pid), and its checkpoints, named
    chain-000, chain-001, ... (each the child of the one before)."""

    name: str
    dom: Any  # libvirt.virDomain
    qemu_log: Path
    pid: int  # QEMU's
    checkpoints: int = 0


Request = tuple[int, int]  # offset, length


def hmp(dom: Any, command: str) -> None:
    """An HMP command whose every reply is an error."""
    reply = str(libvirt_qemu.qemuMonitorCommand(dom, command, HMP))
    if reply.strip():
        raise RuntimeError(f"{command}: {reply.strip()}")


def qemu_io(verb: str, byte: int, request: Request) -> str:
    offset, length = request
    return f'qemu-io -d {DEVICE} "{verb} -P 0x{byte:02x} {offset} {length}"'


@dataclass(frozen=True)
class Timing:
    seconds: float  # the caller's, for all the requests
    requests: list[float]  # QEMU's own seconds for each request, as qemu-io reports them
    cpu: float  # the QEMU process's CPU seconds (all its threads) meanwhile


def issue(guest: Guest, verb: str, byte: int, requests: list[Request]) -> Timing:
    """`requests` one after the other, each checked by qemu-io's report."""
    mark = guest.qemu_log.stat().st_size
    commands = [qemu_io(verb, byte, r) for r in requests]
    cpu = cpu_seconds(guest.pid)
    t = time.perf_counter()
    for command in commands:
        hmp(guest.dom, command)
    seconds = time.perf_counter() - t
    cpu = cpu_seconds(guest.pid) - cpu
    return Timing(seconds, confirmed(guest, mark, verb, requests), cpu)


def confirmed(guest: Guest, mark: int, verb: str, requests: list[Request]) -> list[float]:
    """qemu-io's reports since `mark`: one whole `verb` per request and nothing
    else that looks like an error; QEMU's seconds for each."""
    with guest.qemu_log.open(errors="replace") as stream:
        stream.seek(mark)
        output = stream.read()
    failure = FAILURE.search(output)
    if failure:
        raise RuntimeError(f"{guest.name}: qemu-io: {failure.group(0)}")
    reports = REPORT.findall(output)
    done = Counter((int(offset), int(count)) for said, count, total, offset, _ in reports
                   if said == SAID[verb] and count == total)
    if done != Counter(requests) or len(reports) != len(requests):
        raise RuntimeError(f"{guest.name}: qemu-io confirmed {sum(done.values())} of "
                           f"{len(requests)} {verb}s ({len(reports)} reports)")
    return [1 / float(ops) for *_, ops in reports]


def small_requests(size: Size, n: int) -> list[Request]:
    """Round `n`'s scattered 64 KiB writes: the same for every domain, in no order."""
    slots = random.Random(n).sample(range(size.disk // BLOCK), size.small_writes)
    return [(slot * BLOCK, BLOCK) for slot in slots]


def large_requests(size: Size, n: int) -> list[Request]:
    start = n * size.large % size.disk
    return [(start + i, LARGE_REQUEST) for i in range(0, size.large, LARGE_REQUEST)]


def writes(guest: Guest, requests: list[Request], byte: int) -> Timing:
    """The writes, timed, then read back through the guest with the same pattern."""
    run("sync")  # nothing left to write back from the run before
    timing = issue(guest, "write", byte, requests)
    issue(guest, "read", byte, requests)
    return timing


def backup_xml(work: Path, guest: Guest) -> str:
    return (f"<domainbackup mode='pull'><server transport='unix' "
            f"socket='{work}/{guest.name}.sock'/><disks><disk name='vda' backup='yes' "
            f"type='file'><scratch file='{work}/{guest.name}-scratch.qcow2'/></disk>"
            f"</disks></domainbackup>")


def backup(guest: Guest, work: Path) -> float:
    """backupBegin of a full pull backup and abortJob, ms; then waits (not timed)
    for the job to be gone."""
    xml = backup_xml(work, guest)
    t = time.perf_counter()
    guest.dom.backupBegin(xml, None, 0)
    guest.dom.abortJob()
    ms = (time.perf_counter() - t) * 1000
    deadline = time.monotonic() + JOB_END_TIMEOUT
    while guest.dom.jobInfo()[0] != libvirt.VIR_DOMAIN_JOB_NONE:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{guest.name}: the aborted backup did not end")
        time.sleep(0.01)
    return ms


def checkpoint(guest: Guest, name: str) -> Any:
    return guest.dom.checkpointCreateXML(
        f"<domaincheckpoint><name>{name}</name></domaincheckpoint>", 0)


def one_more_checkpoint(guest: Guest) -> tuple[float, float]:
    """checkpointCreateXML of one more checkpoint, and deleting it: ms each."""
    t = time.perf_counter()
    extra = checkpoint(guest, "bench-extra")
    created = time.perf_counter()
    extra.delete(0)
    return (created - t) * 1000, (time.perf_counter() - created) * 1000


def chain(guest: Guest, count: int) -> None:
    """`count` checkpoints on the domain: the missing ones created, the newest deleted
    (a leaf at a time); then QEMU must list as many recording bitmaps."""
    for i in range(guest.checkpoints, count):
        checkpoint(guest, f"chain-{i:03}")
    for i in reversed(range(count, guest.checkpoints)):
        guest.dom.checkpointLookupByName(f"chain-{i:03}").delete(0)
    guest.checkpoints = count
    found = bitmaps(guest)
    if found != count:
        raise RuntimeError(f"{guest.name}: {found} recording bitmaps, {count} expected")


def bitmaps(guest: Guest) -> int:
    """The recording dirty bitmaps on the domain's disk, as QEMU lists them."""
    reply = libvirt_qemu.qemuMonitorCommand(guest.dom, '{"execute": "query-block"}', 0)
    (disk,) = (d for d in json.loads(reply)["return"] if d.get("qdev") == DEVICE)
    return sum(1 for b in disk["inserted"].get("dirty-bitmaps", []) if b["recording"])


def prepare(conn: Any, lab_dir: Path, size: Size, name: str) -> Guest:
    """A domain whose disk is written in full."""
    run(str(LAB), "--dir", str(lab_dir), "write", name, "vda", "0", str(size.disk),
        str(FILL_BYTE))
    pid = int((lab_dir / "run" / "libvirt" / "qemu" / f"{name}.pid").read_text())
    return Guest(name, conn.lookupByName(name), lab_dir / "log" / "qemu" / f"{name}.log", pid)


@dataclass(frozen=True)
class Round:
    n: int
    size: Size
    work: Path


def small(guest: Guest, case: Case, r: Round) -> None:
    timing = writes(guest, small_requests(r.size, r.n), 0x20 + r.n)
    case.small_seconds.append(timing.seconds)
    case.small_qemu_us.append(statistics.median(timing.requests) * 1e6)
    case.small_cpu_us.append(timing.cpu / r.size.small_writes * 1e6)


def large(guest: Guest, case: Case, r: Round) -> None:
    case.large_seconds.append(writes(guest, large_requests(r.size, r.n), 0xa0 + r.n).seconds)


def backup_step(guest: Guest, case: Case, r: Round) -> None:
    case.backup_ms.append(backup(guest, r.work))


def checkpoint_step(guest: Guest, case: Case, r: Round) -> None:
    created, deleted = one_more_checkpoint(guest)
    case.create_ms.append(created)
    case.delete_ms.append(deleted)


STEPS: tuple[Callable[[Guest, Case, Round], None], ...] = (
    small, large, backup_step, checkpoint_step)


def measure(guests: list[Guest], counts: tuple[int, ...], size: Size, work: Path
            ) -> dict[int, Case]:
    """Round after round, each chain on another domain, and each measurement on
    every domain in turn; what the first round measures is not kept (unless it is
    the only one)."""
    cases = {count: Case(count) for count in counts}
    warm_up = 1 if size.rounds > 1 else 0
    for n in range(warm_up + size.rounds):
        t = time.perf_counter()
        for i, guest in enumerate(guests):
            chain(guest, counts[(i + n) % len(counts)])
        sinks = {g.name: cases[g.checkpoints] if n >= warm_up else Case(g.checkpoints)
                 for g in guests}
        log(f"checkpoints: round {n + 1 - warm_up} of {size.rounds}"
            + (" (warm-up, not counted)" if n < warm_up else "") + ": "
            + ", ".join(f"{g.name} {g.checkpoints}" for g in guests)
            + f" (chains made in {time.perf_counter() - t:.1f} s)")
        for guest in guests:
            sinks[guest.name].domains.append(guest.name)
        r = Round(n, size, work)
        for step in STEPS:
            for guest in turns(n, guests):
                step(guest, sinks[guest.name], r)
    for guest in guests:
        chain(guest, guest.checkpoints)  # the bitmaps are all still there
    return cases


@dataclass(frozen=True)
class Summary:
    """A case's medians, in the units of the table."""

    checkpoints: int
    writes_per_second: float
    small_mib_per_second: float
    qemu_us_per_write: float
    cpu_us_per_write: float
    large_mib_per_second: float
    backup_ms: float
    create_ms: float
    delete_ms: float


def summary(case: Case, size: Size) -> Summary:
    med = statistics.median
    return Summary(case.checkpoints, size.small_writes / med(case.small_seconds),
                   size.small_writes * BLOCK / MiB / med(case.small_seconds),
                   med(case.small_qemu_us), med(case.small_cpu_us),
                   size.large / MiB / med(case.large_seconds),
                   med(case.backup_ms), med(case.create_ms), med(case.delete_ms))


def paired(cases: dict[int, Case], a: int, b: int) -> dict[str, list[float]]:
    """Round by round, the ratio of chain `b`'s figure to chain `a`'s (same round,
    so the machine's drift weighs on both): small writes' writes/s, QEMU's time and
    CPU time per write, and large writes' MiB/s."""
    def ratios(x: list[float], y: list[float]) -> list[float]:
        return [q / p for p, q in zip(x, y, strict=True)]
    return {"writes_per_second": ratios(cases[b].small_seconds, cases[a].small_seconds),
            "qemu_us_per_write": ratios(cases[a].small_qemu_us, cases[b].small_qemu_us),
            "cpu_us_per_write": ratios(cases[a].small_cpu_us, cases[b].small_cpu_us),
            "large_mib_per_second": ratios(cases[b].large_seconds, cases[a].large_seconds)}


#: The table's columns after the first: heading, Summary field, format.
COLUMNS = (("writes/s", "writes_per_second", "9.0f"), ("MiB/s", "small_mib_per_second", "7.1f"),
           ("QEMU us/write", "qemu_us_per_write", "14.1f"),
           ("CPU us/write", "cpu_us_per_write", "13.1f"),
           ("large MiB/s", "large_mib_per_second", "12.0f"), ("backup ms", "backup_ms", "10.1f"),
           ("create ms", "create_ms", "10.1f"), ("delete ms", "delete_ms", "10.1f"))


def table(summaries: list[Summary], longest: int) -> str:
    """A row per case, and the ratio of the long chain's figures to one checkpoint's."""
    width = [int(fmt.split(".")[0]) for _, _, fmt in COLUMNS]
    lines = [f"{'checkpoints':>11} " + " ".join(f"{h:>{w}}" for (h, _, _), w in
                                                zip(COLUMNS, width, strict=True))]
    for s in summaries:
        lines.append(f"{s.checkpoints:11} " + " ".join(
            f"{getattr(s, key):{fmt}}" for _, key, fmt in COLUMNS))
    by = {s.checkpoints: s for s in summaries}
    lines.append(f"{f'{longest} / 1':>11} " + " ".join(
        f"{getattr(by[longest], key) / getattr(by[1], key):{w}.2f}"
        for (_, key, _), w in zip(COLUMNS, width, strict=True)))
    return "\n".join(lines)


def spread(name: str, ratios: dict[str, list[float]]) -> str:
    parts = [f"{key.replace('_', ' ')} {statistics.median(v):.3f} "
             f"({min(v):.3f} .. {max(v):.3f})" for key, v in ratios.items()]
    return f"per round, {name}: " + "; ".join(parts)


def main(work: Path, smoke: bool, output: Path | None) -> int:
    size = SMOKE_SIZE if smoke else FULL_SIZE
    counts = (0, 1, size.chain)
    lab_dir = work / "lab-checkpoints"
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # errors as exceptions only
    with lab(lab_dir, size.disk, len(counts)) as uri, \
            contextlib.closing(libvirt.open(uri)) as conn:
        log(f"checkpoints: {len(counts)} domains, {size.disk // MiB} MiB disks written in full; "
            f"chains of {', '.join(map(str, counts))} checkpoints")
        guests = [prepare(conn, lab_dir, size, f"lab{i + 1}") for i in range(len(counts))]
        cases = measure(guests, counts, size, work)
    summaries = [summary(cases[c], size) for c in counts]
    ratios = {f"{size.chain}/1": paired(cases, 1, size.chain), "1/0": paired(cases, 0, 1)}
    print(table(summaries, size.chain))
    for name, values in ratios.items():
        print(spread(name, values))
    if output is not None:
        output.write_text(json.dumps({
            "machine": {"cpus": os.cpu_count(), "kernel": platform.release(),
                        "python": platform.python_version()},
            "size": asdict(size) | {"small_write": BLOCK, "large_request": LARGE_REQUEST},
            "cases": [asdict(cases[c]) | {"median": asdict(s)}
                      for c, s in zip(counts, summaries, strict=True)],
            "paired_ratios": ratios,
        }, indent=2) + "\n")
        log(f"wrote {output}")
    return 0
