"""pullbackd's streaming engine against nbdcopy and qemu-img, on the lab (and, with
--load, --checkpoints or --repository, the benchmarks of those modules).

Each case runs against one pull-backup export of a lab domain, started by a
real pullbackd; every tool copies that same export, on QEMU's own socket (as
pullbackd's streamed jobs read it), into the same kind of target (a fresh
qcow2, or a qcow2 overlay on the full backup, served as the repository serves a
backup being written, and made durable with fsync before the clock stops),
each run is checked with `qemu-img compare` against the export, and the median
of the repeats is reported; the tools of a case take turns, a run of each per
round (every other round in reverse order), after a round that is not counted.
What pullbackd's endpoint for appliances adds is the relay case.

    full      a 4 GiB disk holding 1 GiB of data, full backup
    incr      the same disk with 1 % of it rewritten in scattered 64 KiB blocks
    incr-16g  the same 1 % of 64 KiB writes on a 16 GiB disk holding 1 GiB
    relay     nbdcopy reading the full backup's export into null: through
              pullbackd's endpoint (tool "pullbackd") and straight from QEMU's
              socket (tool "nbdcopy"), runs interleaved: what the relay costs

nbdcopy and qemu-img cannot read a dirty bitmap: for an incremental they copy
every allocated block onto the overlay (the result is right, the cost is not).
virtnbdbackup keeps checkpoints of its own, so it backs up a twin domain (lab2,
written exactly like lab1) into its own format; its runs are checked by
`virtnbdrestore` and `qemu-img compare` against that domain's disk.
`--smoke` runs tiny sizes once: it checks that the benchmark works, nothing more.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

from pullbackd import config, manifest, repository, stream, writebehind
from pullbackd.control.client import Client
from pullbackd.durable import fsync

ROOT = Path(__file__).resolve().parent.parent
LAB = ROOT / "scripts" / "lab"
IFACE = "org.pullbackd.Backup"
MiB = 1 << 20
GiB = 1 << 30
_T = TypeVar("_T")


@dataclass(frozen=True)
class Size:
    disk: int
    big_disk: int
    data: int
    dirty_writes: int
    repeats: int


FULL_SIZE = Size(disk=4 * GiB, big_disk=16 * GiB, data=1 * GiB, dirty_writes=655, repeats=7)
SMOKE_SIZE = Size(disk=256 * MiB, big_disk=512 * MiB, data=32 * MiB, dirty_writes=16, repeats=1)
CHUNK = 64 * MiB
BLOCK = 64 << 10
#: The benchmarks of their own (bench/<name>.py, `--<name>`), each writing bench/<name>.json.
OTHERS = ("repository", "night", "load", "checkpoints", "start")
ALL_TOOLS = ("pullbackd", "nbdcopy", "qemu-img", "virtnbdbackup", "relay")


@dataclass(frozen=True)
class Result:
    case: str
    tool: str
    seconds: list[float]
    moved: int  # bytes the case requires to move (data, or dirty data)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


def log(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def run(*command: str) -> str:
    return subprocess.run(command, check=True, capture_output=True, text=True,
                          timeout=3600).stdout


@contextmanager
def lab(folder: Path, disk_size: int, domains: int) -> Iterator[str]:
    out = run(str(LAB), "--dir", str(folder), "up", "--size", str(disk_size),
              "--domains", str(domains))
    uri = next(line.split("=", 1)[1] for line in out.splitlines()
               if line.startswith("LIBVIRT_URI="))
    try:
        yield uri.strip("'")
    finally:
        subprocess.run([str(LAB), "--dir", str(folder), "down"], capture_output=True,
                       check=False, timeout=300)


@contextmanager
def daemon(folder: Path, uri: str, extra: str = "") -> Iterator[tuple[Client, int]]:
    """pullbackd with its defaults on the lab (and the sections of `extra`): a client of
    it, and its pid. The client holds one connection across minutes of copying: the
    control socket's idle timeout is raised for it."""
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "pullbackd.toml"
    config.write_text(f'[libvirt]\nuri = "{uri}"\n[control]\nsocket = "{folder}/control.sock"\n'
                      'idle_timeout = 86400.0\n'
                      f'[exports]\ndir = "{folder}/exports"\n[scratch]\ndir = "{folder}/scratch"\n'
                      f'[state]\ndir = "{folder}/state"\n'
                      f'[restore]\ndirs = ["{folder.parent}"]\n' + extra)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(folder / "notify.sock"))
    notify.settimeout(60)
    with (folder / "pullbackd.log").open("ab") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "pullbackd.service", "--config",
                                 str(config)], stderr=log_file,
                                env=os.environ | {"NOTIFY_SOCKET": str(folder / "notify.sock")})
    try:
        while b"READY=1" not in notify.recv(4096):
            pass
        notify.close()
        with Client(folder / "control.sock", timeout=600) as client:
            yield client, proc.pid
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


@contextmanager
def qemu_nbd(image: Path) -> Iterator[str]:
    """`image` served as the repository's writer serves a backup being written (by a
    qemu-nbd: the same block layer, with the same cache options)."""
    sock = image.with_suffix(".sock")
    with repository.image_server(image, "qcow2", sock, writable=True,
                                 direct=writebehind.direct_io(image)) as server:
        yield server.url


def qcow2(path: Path, size: int, backing: Path | None = None) -> Path:
    path.unlink(missing_ok=True)
    args = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if backing is not None:
        args += ["-b", str(backing), "-F", "qcow2"]
    run(*args, str(path), str(size))
    return path


def fill(lab_dir: Path, size: Size, disk_size: int, domain: str) -> None:
    """`size.data` bytes of data, in chunks spread evenly over the disk."""
    chunk = min(CHUNK, size.data)
    chunks = size.data // chunk
    stride = disk_size // chunks // chunk * chunk
    for i in range(chunks):
        run(str(LAB), "--dir", str(lab_dir), "write", domain, "vda", str(i * stride),
            str(chunk), str(0x10 + i % 200))


def dirty(lab_dir: Path, size: Size, seed: int, domain: str) -> int:
    offsets = run(str(LAB), "--dir", str(lab_dir), "scatter", domain, "vda",
                  str(size.dirty_writes), str(BLOCK), "0xd1", "--seed", str(seed)).split()
    return len(offsets) * BLOCK


def start(ctl: Client, daemon_dir: Path, mode: str) -> dict[str, str]:
    """A pull backup of lab1's disk: its export on QEMU's own socket (`url`, what
    pullbackd's streamed jobs read, and what the tools compared here read), and on
    pullbackd's endpoint for appliances (`endpoint`, whose cost the relay case measures)."""
    job = ctl.call(f"{IFACE}.Start", domain="lab1", consumer="bench", mode=mode)["job"]
    disk: dict[str, str] = job["disks"][0]
    qemu = f"{daemon_dir}/exports/.qemu/{job['id']}.sock"
    return {"id": job["id"], "url": f"nbd+unix:///{disk['export']}?socket={qemu}",
            "endpoint": disk["url"], "bitmap": disk["bitmap"] or ""}


def timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


#: A tool's copy into a target: the URL it writes to (for qemu-img, the file itself),
#: and the target's file.
Copy = Callable[[str, Path], object]


@dataclass(frozen=True)
class Run:
    """One tool's copy in one case: into a target `prepare` makes fresh each time,
    checked against `export`."""

    case: str
    tool: str
    copy: Copy
    prepare: Callable[[], Path]
    export: str
    moved: int


def turns(n: int, items: list[_T]) -> list[_T]:
    """Round `n`'s order: every other round reversed, so that no tool always runs
    first, or always after the same other one."""
    return items if n % 2 == 0 else items[::-1]


def measure(runs: list[Run], repeats: int) -> list[Result]:
    """Time each run, the runs taking turns (one of each per round, see `turns`), so
    that the machine's drift weighs on all of them alike, after a first round that
    is not counted (it was often the slowest for every tool). Each starts with
    nothing left to write back from the one before (sync). For NBD tools the target
    is served by qemu-nbd, started before the clock and stopped after it; the clock
    stops once the target is on disk (fsync), as when the repository commits a
    backup."""
    seconds: dict[Run, list[float]] = {r: [] for r in runs}
    warm_up = 1 if repeats > 1 else 0  # a smoke run's single round counts
    for n in range(warm_up + repeats):
        for r in turns(n, runs):
            target = r.prepare()
            run("sync")
            if r.tool == "qemu-img":
                took = timed(lambda: r.copy(str(target), target))  # noqa: B023 (called here)
            else:
                with qemu_nbd(target) as dest:
                    took = timed(lambda: durable(r.copy, dest, target))  # noqa: B023
            if n >= warm_up:
                seconds[r].append(took)
            # Every run is checked: a fast wrong copy is worth nothing.
            run("qemu-img", "compare", "-q", "-f", "qcow2", "-F", "raw", str(target), r.export)
    for r, times in seconds.items():
        log(f"{r.case:9} {r.tool:9} {statistics.median(times):7.3f} s")
    return [Result(r.case, r.tool, times, r.moved) for r, times in seconds.items()]


def durable(copy: Copy, dest: str, target: Path) -> None:
    copy(dest, target)
    fsync(target)


def engine(url: str, bitmap: str | None, zeroed: bool, tuning: stream.Tuning) -> Copy:
    """pullbackd's engine, doing what a streamed backup does: writing as the repository
    does (past the page cache, or with its write-behind) and checksumming each region for
    the manifest."""
    def copy(dest: str, target: Path) -> None:
        regions: list[manifest.Region] = []
        step = 0 if writebehind.direct_io(target) else config.Repository().write_behind
        with writebehind.WriteBehind(target, step) as behind:
            stream.copy(url, dest, bitmap=bitmap, zeroed_destination=zeroed, tuning=tuning,
                        on_progress=behind.progress, checksums=manifest.recorder(regions))
    return copy


# Every tool ends with its copy durable, as a backup must. The NBD tools' clock
# stops after an fsync of the target (`durable`); before it, the engine flushes the
# destination and nbdcopy does with --flush, so that qemu-nbd writes out the qcow2
# metadata it holds. qemu-img convert syncs on close in writeback mode (its
# default for convert is "unsafe": no sync at all).


def nbdcopy(url: str, zeroed: bool) -> Copy:
    flags = ["--flush"] + (["--destination-is-zero"] if zeroed else [])
    return lambda dest, target: run("nbdcopy", *flags, url, dest)


def qemu_img(url: str) -> Copy:
    # convert writes the target file itself; -n keeps the qcow2 (and its backing) we made.
    return lambda dest, target: run("qemu-img", "convert", "-n", "-t", "writeback", "-f",
                                    "raw", "-O", "qcow2", url, dest)


def engine_into(base: Path, url: str) -> None:
    """A full backup by the engine, when the case needs a base and does not time one."""
    with qemu_nbd(base) as dest:
        engine(url, None, True, stream.Tuning())(dest, base)


class Virtnbdbackup:
    """virtnbdbackup on the twin domain lab2: a fresh output folder per full backup,
    as it wants; its incremental follows a full in the same folder."""

    def __init__(self, work: Path, lab_dir: Path, uri: str) -> None:
        self.work, self.lab_dir = work, lab_dir
        scratch = work / "vnb-scratch"
        scratch.mkdir(exist_ok=True)
        self.command = ["virtnbdbackup", "-U", uri, "-d", "lab2", "-f",
                        str(work / "vnb.sock"), "-S", str(scratch), "--noprogress"]
        self.uri = uri
        self.runs = 0

    def full(self) -> Path:
        self.runs += 1
        out = self.work / f"vnb-{self.runs}"
        run(*self.command, "-l", "full", "-o", str(out))
        return out

    def check(self, out: Path) -> None:
        restored = self.work / f"vnb-restored-{self.runs}"
        run("virtnbdrestore", "-U", self.uri, "-i", str(out), "-o", str(restored), "-n",
            "-L", str(self.work / "vnb-restore.log"))
        # -U: the domain runs (idle); its disk is what the backup must hold, once QEMU
        # has written out what it caches of the qcow2 (its L2 tables, for one).
        run("virsh", "-q", "-c", self.uri, "qemu-monitor-command", "lab2", "--hmp",
            'qemu-io -d /machine/peripheral/virtio-disk0/virtio-backend "flush"')
        run("qemu-img", "compare", "-q", "-U", str(restored / "lab2-vda.qcow2"),
            str(self.lab_dir / "disks" / "lab2-vda.qcow2"))
        shutil.rmtree(restored)

    def measure_full(self, size: Size) -> Result:
        seconds = []
        for _ in range(size.repeats):
            t = time.perf_counter()
            out = self.full()
            seconds.append(time.perf_counter() - t)
            self.check(out)
        log(f"{'full':9} {'virtnbd':9} {statistics.median(seconds):7.3f} s")
        return Result("full", "virtnbdbackup", seconds, size.data)

    def measure_incremental(self, size: Size, moved: int) -> Result:
        seconds = []
        for _ in range(size.repeats):
            out = self.full()
            dirty(self.lab_dir, size, seed=1, domain="lab2")  # the same blocks as lab1's
            seconds.append(timed(lambda out=out: run(  # type: ignore[misc]
                *self.command, "-l", "inc", "-o", str(out))))
            self.check(out)
        log(f"{'incr':9} {'virtnbd':9} {statistics.median(seconds):7.3f} s")
        return Result("incr", "virtnbdbackup", seconds, moved)


@dataclass(frozen=True)
class Host:
    """A lab (its own libvirtd) with a pullbackd on it; its domain lab1 has a disk of
    `disk_size`."""

    label: str
    disk_size: int
    lab_dir: Path
    daemon_dir: Path
    uri: str
    ctl: Client


@contextmanager
def host(work: Path, label: str, disk_size: int, domains: int) -> Iterator[Host]:
    with lab(work / f"lab-{label}", disk_size, domains) as uri, \
            daemon(work / f"pullbackd-{label}", uri) as (ctl, _):
        yield Host(label, disk_size, work / f"lab-{label}", work / f"pullbackd-{label}", uri,
                   ctl)


def cases(work: Path, size: Size, tools: tuple[str, ...], tuning: stream.Tuning,
          big: bool) -> list[Result]:
    """Every case; with `big`, a second lab with a 16 GiB disk, up at the same time, so
    that its incremental takes turns with the 4 GiB one."""
    results = []
    twin = "virtnbdbackup" in tools
    with contextlib.ExitStack() as stack:
        small = stack.enter_context(host(work, "4g", size.disk, 2 if twin else 1))
        hosts = [small]
        if big:
            hosts.append(stack.enter_context(host(work, "16g", size.big_disk, 1)))
        for h in hosts:
            log(f"{h.label}: writing {size.data // MiB} MiB of data on a "
                f"{h.disk_size // MiB} MiB disk")
            fill(h.lab_dir, size, h.disk_size, "lab1")
        vnb = None
        if twin:
            fill(small.lab_dir, size, small.disk_size, "lab2")
            vnb = Virtnbdbackup(work, small.lab_dir, small.uri)
        bases = {h.label: work / f"{h.label}-full.qcow2" for h in hosts}

        full = start(small.ctl, small.daemon_dir, "full")
        copies = {"pullbackd": engine(full["url"], None, True, tuning),
                  "nbdcopy": nbdcopy(full["url"], True), "qemu-img": qemu_img(full["url"])}
        results += measure([Run("full", tool, copy, lambda: qcow2(bases["4g"], size.disk),
                                full["url"], size.data)
                            for tool, copy in copies.items() if tool in tools], size.repeats)
        if "relay" in tools:
            results += relay(full, size)
        small.ctl.call(f"{IFACE}.Finish", id=full["id"])
        for h in hosts[1:]:
            job = start(h.ctl, h.daemon_dir, "full")
            engine_into(qcow2(bases[h.label], h.disk_size), job["url"])
            h.ctl.call(f"{IFACE}.Finish", id=job["id"])
        if vnb is not None:
            results.append(vnb.measure_full(size))

        runs: list[Run] = []
        moved = {}
        for h in hosts:
            moved[h.label] = dirty(h.lab_dir, size, seed=1, domain="lab1")
            incr = start(h.ctl, h.daemon_dir, "incremental")
            overlay = work / f"{h.label}-incr.qcow2"

            def prepare(h: Host = h, overlay: Path = overlay) -> Path:
                return qcow2(overlay, h.disk_size, bases[h.label])

            copies = {"pullbackd": engine(incr["url"], incr["bitmap"], False, tuning)}
            if h is small:
                copies |= {"nbdcopy": nbdcopy(incr["url"], False),
                           "qemu-img": qemu_img(incr["url"])}
            runs += [Run("incr" if h is small else "incr-16g", tool, copy, prepare,
                         incr["url"], moved[h.label])
                     for tool, copy in copies.items() if tool in tools]
        # pullbackd's runs on both disks one after the other: what they compare
        # should differ in the disk's size alone, not in the run before.
        runs.sort(key=lambda r: r.tool != "pullbackd")
        results += measure(runs, size.repeats)
        if vnb is not None:
            results.append(vnb.measure_incremental(size, moved["4g"]))
    return results


def relay(job: dict[str, str], size: Size) -> list[Result]:
    """nbdcopy through pullbackd's endpoint against nbdcopy on QEMU's own socket."""
    urls = {"pullbackd": job["endpoint"], "nbdcopy": job["url"]}
    # Both read the same bytes (checked once, export against export: nothing is
    # written that the disk would still be busy with while the runs are timed), then
    # only the reading is timed.
    run("qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", *urls.values())
    seconds: dict[str, list[float]] = {tool: [] for tool in urls}
    # Its runs are short and the machine noisy: more of them, after a pair not counted.
    warm_up = 1 if size.repeats > 1 else 0
    for n in range(warm_up + 2 * size.repeats + 1):
        for tool, url in turns(n, list(urls.items())):
            took = timed(lambda url=url: run("nbdcopy", url, "null:"))  # type: ignore[misc]
            if n >= warm_up:
                seconds[tool].append(took)
    for tool in urls:
        log(f"{'relay':9} {tool:9} {statistics.median(seconds[tool]):7.3f} s")
    return [Result("relay", tool, seconds[tool], size.data) for tool in urls]


def table(results: list[Result]) -> str:
    ours = {r.case: r.median for r in results if r.tool == "pullbackd"}
    lines = [f"{'case':9} {'tool':13} {'median s':>9} {'MiB/s':>8} {'x pullbackd':>12}"]
    order = {"full": 0, "incr": 1, "incr-16g": 2, "relay": 3}
    for r in sorted(results, key=lambda r: order[r.case]):
        ratio = f"{r.median / ours[r.case]:.2f}" if r.case in ours else "-"
        lines.append(f"{r.case:9} {r.tool:13} {r.median:9.3f} "
                     f"{r.moved / MiB / r.median:8.0f} {ratio:>12}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one run each")
    parser.add_argument("--tools", default=",".join(ALL_TOOLS),
                        help="some of the tools (and the relay case) only; "
                             "results.json is then left alone")
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results.json")
    parser.add_argument("--tuning", default="", metavar="KEY=VALUE,...",
                        help="engine settings (and memory, the buffer pool's bytes) to try "
                             "instead of the defaults, e.g. "
                             "request_size=262144,connections=4,in_flight=64")
    parser.add_argument("--only-4g", action="store_true", help="skip the 16 GiB case")
    parser.add_argument("--load", action="store_true",
                        help="the load benchmark instead: 1, 4, 8, 16 backups at once "
                             "(writes bench/load.json)")
    parser.add_argument("--checkpoints", action="store_true",
                        help="the checkpoints benchmark instead: guest writes with 0, 1 and "
                             "100 checkpoints (writes bench/checkpoints.json)")
    parser.add_argument("--repository", action="store_true",
                        help="the repository benchmark instead: Verify of a 500-backup chain, "
                             "restore of a 30-link chain against a full (writes "
                             "bench/repository.json)")
    parser.add_argument("--night", type=int, metavar="N",
                        help="the night benchmark instead: N domains backed up at once, full "
                             "then incremental, against virtnbdbackup on N twins one after "
                             "another (writes bench/night.json)")
    parser.add_argument("--start", action="store_true",
                        help="the start benchmark instead: a Start's latency against "
                             "libvirt's own backupBegin (writes bench/start.json)")
    args = parser.parse_args()
    for name in OTHERS:
        if getattr(args, name):
            # bench/<name>.py imports this file too: load it only here.
            other = importlib.import_module(name)
            extra = (args.night,) if name == "night" else ()
            with tempfile.TemporaryDirectory(prefix="pullbackd-bench-", dir="/var/tmp") as tmp:
                return int(other.main(Path(tmp), *extra, args.smoke,
                                      None if args.smoke else ROOT / "bench" / f"{name}.json"))
    settings: dict[str, Any] = {k: int(v) for k, v in
                                (item.split("=") for item in args.tuning.split(",") if item)}
    # The engine as the daemon runs it: its buffers from one pool of [stream] memory.
    memory = settings.pop("memory", config.Stream().memory)
    tuning = stream.Tuning(**settings)
    tuning = dataclasses.replace(tuning, buffers=stream.BufferPool(memory, tuning.request_size))
    size = SMOKE_SIZE if args.smoke else FULL_SIZE
    tools = tuple(args.tools.split(","))
    with tempfile.TemporaryDirectory(prefix="pullbackd-bench-", dir="/var/tmp") as tmp:
        work = Path(tmp)
        results = cases(work, size, tools, tuning, big=not args.only_4g and "pullbackd" in tools)
    print(table(results))
    if not (args.smoke or args.tuning or args.only_4g) and set(tools) == set(ALL_TOOLS):
        args.output.write_text(json.dumps({
            "machine": {"cpus": os.cpu_count(), "kernel": platform.release(),
                        "python": platform.python_version()},
            "size": asdict(size),
            "tuning": asdict(dataclasses.replace(tuning, buffers=None)) | {"memory": memory},
            "results": [asdict(r) | {"median": r.median} for r in results],
        }, indent=2) + "\n")
        log(f"wrote {args.output}")
    return 0


def _exit_on_term(signum: int, _frame: object) -> None:
    """A benchmark ended with SIGTERM (a timeout, a CI job cancelled) takes its labs and
    daemons down as an interrupted one does: SystemExit unwinds through every `finally`."""
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _exit_on_term)
    sys.exit(main())
