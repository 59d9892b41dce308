"""pullbackd under stress: random backups and random faults, every completed backup checked.

    scripts/stress [--dir DIR] [--cycles N] [--seed S] [--domains D] [--disks K] [--size 64M]
                   [--consumers C] [--faults LIST] [--fault-rate P] [--report FILE]
                   [--lab LAB_DIR] [--daemon-src DIR] [--prefill F] [--keep-images N]

Issue 13's proof. On a lab of D domains with K disks each (its own, in DIR/lab and torn down at
the end; or one that is up already, with --lab), pullbackd runs under a stand-in for systemd
(its notify socket and file descriptor store, as the tests' ServiceManager), and this driver
plays C backup appliances, the consumers c1..cC. Each cycle draws a domain, a consumer, a mode
(full, incremental, or differential since a checkpoint of the consumer's chain as
ListCheckpoints shows it) and a kind of job:

    pull   the driver reads the exports: a full disk with nbdcopy, an incremental one by copying
           the image it rebuilt at the disk's `since` and writing onto it the ranges the dirty
           bitmap marks (libnbd: block_status on the `bitmap` meta context, then pread); Finish
    local  pullbackd streams the backup into its repository (`destination: "local"`); once it
           completed, the driver restores each disk (Restore) into a file

Before each backup the guest writes (scripts/lab write, zero, scatter: pattern bytes) and the
driver replays every write in a model of each disk (a bytearray; the disks are zeroed first, then
--prefill of each is written, so that copies last long enough for a fault to land inside them).
The model is copied as Start is called, and no guest write of the driver happens until Start
returns: the export is frozen at backupBegin, inside Start. After Start the guest may write
again, which no export may show.

Faults, drawn at random (with --faults, only those kinds, each at least once):

    abort      Abort, before, during or after the read (pull), or while pullbackd streams (local)
    fail       Finish(success: false) after the read
    sigterm    SIGTERM to pullbackd, then a start with the descriptors it stored (sessions go on)
    kill9      kill -9 of pullbackd, then a start
    qemu       kill -9 of the domain's QEMU (after a flush of its disks, as a guest's fsync,
               so that the model stays right), then `scripts/lab start`
    libvirtd   kill -9 of the lab's libvirtd, then `scripts/lab restart-libvirtd`; pullbackd
               exits when it loses libvirt (a restart reconnects) and is started again

SIGTERM and kill -9 land between cycles, or inside Start, the read, Finish, the stream or the
Restore: the call runs in a thread and the fault comes after a random part of the time that step
has been taking, so that it lands inside the daemon's work. After a restart the driver does what
an appliance would: a Start whose answer was lost is looked up with List (and used if it is
ready), a read that was cut is read again from the start, a Finish that was cut is asked again
if the job is still ready, a Restore is asked again. Whatever did not complete is discarded.
An incremental whose `since` the driver holds no image at (it never saw that backup complete) is
aborted, and the consumer's next backup is full. All that is random is drawn from --seed up
front, cycle by cycle: the same seed makes the same cycles and faults (where in a step a fault
lands, and so what comes of it, still depends on the timing).

Checks. Every completed backup's images are compared byte for byte with the model at its start
(wrong bytes are counted; a sample, and every image with a wrong byte, also by `qemu-img
compare`). After every cycle, and after every restart once pullbackd is ready, the driver looks
for chain violations: a checkpoint in a chain (ListCheckpoints) whose job (List/Get) is not
`completed`; an incremental disk whose `since` was not in the consumer's chain when it started,
not its head for that disk, or (differential) not the one asked for, or a checkpoint whose job
the driver never saw complete; the newest confirmed checkpoint of a disk missing from the chain
or not its head; a chain out of order; a job seen `completed` that no longer is. And for leaks:
qemu-nbd processes on pullbackd's folders while no streamed job runs (and a repository writer
that outlived the pullbackd that started it), `*.partial` and `*.tmp`
files in the repository, scratch files and sockets of jobs that do not run, libvirt backup jobs
pullbackd does not list as running, and libvirt checkpoints `pullbackd.*` neither in a chain nor
of a running job. A checkpoint pullbackd took out of a chain (its job failed, or `[chains] keep`
trimmed it) while libvirt could not delete it (its domain was down) is only deferred: its
database records it `discard`, pullbackd deletes it before the domain's next backup, and the
driver checks that it did (once a later backup of that domain started, and at the end, with one
more backup of such a domain, aborted). At the end pullbackd is stopped with
SIGTERM: it must exit 0 and leave no qemu-nbd or repository writer behind. A read that a
SIGTERM cut is reported too (under systemd sessions are to survive a restart), but does not
fail the run.

The report (stdout, and --report as JSON) counts cycles, backups by outcome, faults by kind and
what came of each (and lists every fault), restarts, compared images, wrong bytes, violations and
leaks (each with the job and the faults that came before it; a leak, whether it was still there
at the end). Exit status 1 if any byte was wrong or there was any violation, leak or error (an
unexpected exit of pullbackd, a failed Restore, the lab failing...), 0 otherwise; 2 for bad
arguments. --daemon-src runs another copy of the daemon's code, e.g. a `git archive` of a commit.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import libvirt
import libvirt_qemu
import nbd
from tests.systemd import ServiceManager

from pullbackd import api
from pullbackd.control import idl
from pullbackd.control.client import Client, VarlinkError

ROOT = Path(__file__).resolve().parent.parent
LAB = ROOT / "scripts" / "lab"
MARKER = ".pullbackd-stress"
MiB = 1 << 20
CHUNK = 4 * MiB
STATUS_WINDOW = 1 << 30

FINAL = frozenset({"completed", "aborted", "failed", "expired"})
FAULT_KINDS = ("abort", "fail", "sigterm", "kill9", "qemu", "libvirtd")
#: How often each kind comes when a cycle draws a fault.
FAULT_WEIGHTS = {"abort": 1, "fail": 1, "sigterm": 2, "kill9": 3, "qemu": 1, "libvirtd": 1}
#: Where each kind of fault may land, in a pull and in a local cycle.
PHASES: dict[tuple[str, str], tuple[str, ...]] = {
    ("abort", "pull"): ("before-read", "read", "after-read"),
    ("abort", "local"): ("stream",),
    ("fail", "pull"): ("after-read",),
    ("sigterm", "pull"): ("idle", "start", "read", "finish"),
    ("sigterm", "local"): ("idle", "start", "stream", "restore"),
    ("kill9", "pull"): ("idle", "start", "read", "finish"),
    ("kill9", "local"): ("idle", "start", "stream", "restore"),
    ("qemu", "pull"): ("idle", "read"),
    ("qemu", "local"): ("idle", "stream"),
    ("libvirtd", "pull"): ("idle", "read"),
    ("libvirtd", "local"): ("idle", "stream"),
}
#: Faults that land while a step runs in a thread.
DISRUPTIONS = frozenset({"abort", "sigterm", "kill9", "qemu", "libvirtd"})
#: First guesses of each step's seconds; the run measures them as it goes.
TYPICAL = {"start": 0.08, "read": 0.03, "finish": 0.025, "stream": 0.1, "restore": 0.1}
WRITE_LENGTHS = (512, 4096, 65536, 200_000, MiB, 3 * MiB)
CALL_TIMEOUT = 180.0
READY_TIMEOUT = 60.0
EXIT_TIMEOUT = 60.0

Job = dict[str, Any]
T = TypeVar("T")


class StressError(Exception):
    """Something the run cannot go on after (the lab, or pullbackd not starting)."""


def log(message: str) -> None:
    print(f"stress: {message}", file=sys.stderr, flush=True)


def parse_size(text: str) -> int:
    match = re.fullmatch(r"(\d+)\s*([KMG]?)(?:i?B)?", text.strip(), re.IGNORECASE)
    if not match or int(match[1]) <= 0:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 64M, 1G)")
    return int(match[1]) << {"": 0, "K": 10, "M": 20, "G": 30}[match[2].upper()]


def cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [os.fsdecode(arg) for arg in raw.split(b"\0") if arg]


def writer_of(pid: int, sockets: Path) -> bool:
    """Whether `pid` is the repository's writer (a qemu-storage-daemon serving in the
    repository's `sockets` folder)."""
    args = cmdline(pid)
    return bool(args) and os.path.basename(args[0]) == "qemu-storage-daemon" and \
        any(f"path={sockets}/w-" in a for a in args)


def writer_sockets(sockets: Path, daemon: int) -> set[str]:
    """The sockets (NBD, QMP) of the repository writer of pullbackd `daemon`."""
    found = set()
    for pid in (int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()):
        if writer_of(pid, sockets) and parent(pid) == daemon:
            found |= {option.removeprefix("path=").removeprefix("addr.path=")
                      for arg in cmdline(pid) for option in arg.split(",")
                      if option.startswith(("path=", "addr.path="))}
    return found


def parent(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rpartition(")")[2].split()[1])


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


# --- the lab ------------------------------------------------------------------------------


@dataclass
class Lab:
    dir: Path
    uri: str
    domains: list[str]
    disks: list[str]
    size: int

    def run(self, *args: str, timeout: float = 120) -> str:
        proc = subprocess.run([str(LAB), "--dir", str(self.dir), *args], capture_output=True,
                              text=True, timeout=timeout, check=False)
        if proc.returncode != 0:
            raise StressError(f"scripts/lab {' '.join(args)} failed: {proc.stderr.strip()}")
        return proc.stdout

    def state(self) -> dict[str, Any]:
        state: dict[str, Any] = json.loads((self.dir / "state.json").read_text())
        return state

    def qemu_pid(self, domain: str) -> int:
        return int((self.dir / "run" / "libvirt" / "qemu" / f"{domain}.pid").read_text())

    def disk_file(self, domain: str, disk: str) -> Path:
        return self.dir / "disks" / f"{domain}-{disk}.qcow2"


def discover(folder: Path, domains: int | None = None) -> Lab:
    """The lab that is up in `folder`: its URI, domains, disks (those of its first domain)
    and their size."""
    state = json.loads((folder / "state.json").read_text())
    uri = state["uri"]
    names = list(state["domains"])[:domains]
    conn = libvirt.open(uri)
    try:
        dom = conn.lookupByName(names[0])
        targets = [t.get("dev", "") for t in ET.fromstring(dom.XMLDesc()).iterfind(
            "devices/disk[@device='disk']/target")]
        size = int(dom.blockInfo(targets[0])[0])
    finally:
        conn.close()
    return Lab(folder, uri, names, targets, size)


@contextlib.contextmanager
def own_lab(folder: Path, domains: int, disks: int, size: int) -> Iterator[Lab]:
    """`scripts/lab up` in folder, and `down` afterwards whatever happens."""
    try:
        proc = subprocess.run([str(LAB), "--dir", str(folder), "up", "--domains", str(domains),
                               "--disks", str(disks), "--size", str(size)],
                              capture_output=True, text=True, timeout=300, check=False)
        if proc.returncode != 0:
            raise StressError(f"scripts/lab up failed:\n{proc.stderr}")
        yield discover(folder)
    finally:
        subprocess.run([str(LAB), "--dir", str(folder), "down"], capture_output=True,
                       timeout=300, check=False)


class Virt:
    """The driver's own libvirt connection, opened again when it was lost."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self._conn: Any = None
        libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # they come as exceptions

    def conn(self) -> Any:
        if self._conn is not None:
            with contextlib.suppress(libvirt.libvirtError):
                if self._conn.isAlive():
                    return self._conn
            self.close()
        self._conn = libvirt.open(self.uri)
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(libvirt.libvirtError):
                self._conn.close()
            self._conn = None

    def domain(self, name: str) -> Any:
        return self.conn().lookupByName(name)

    def active(self, name: str) -> bool:
        return bool(self.domain(name).isActive())

    def checkpoints(self, name: str) -> list[str]:
        return [c.getName() for c in self.domain(name).listAllCheckpoints()]

    def backup_xml(self, name: str) -> str | None:
        try:
            return str(self.domain(name).backupGetXMLDesc(0))
        except libvirt.libvirtError as e:
            if e.get_error_code() in (libvirt.VIR_ERR_NO_DOMAIN_BACKUP,
                                      libvirt.VIR_ERR_OPERATION_INVALID):
                return None
            raise

    def flush(self, name: str) -> None:
        """What a guest's fsync does: QEMU writes what it holds of each disk to the file."""
        dom = self.domain(name)
        for disk in ET.fromstring(dom.XMLDesc()).iterfind("devices/disk"):
            alias = disk.find("alias")
            if alias is None:
                continue
            device = f"/machine/peripheral/{alias.get('name')}/virtio-backend"
            reply = libvirt_qemu.qemuMonitorCommand(
                dom, f'qemu-io -d {device} "flush"',
                libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP)
            if reply.strip():
                raise StressError(f"flush of {name}'s {device}: {reply.strip()}")


# --- pullbackd under a stand-in for systemd -------------------------------------------------


class Control:
    """Varlink calls to pullbackd, each reply checked against the interface."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.iface = api.interface(api.INTERFACE)

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        with Client(self.path, timeout=CALL_TIMEOUT) as client:
            reply = client.call(f"{api.INTERFACE}.{method}", **params)
        idl.check_fields(self.iface, self.iface.methods[method].output, reply)
        return reply

    def job(self, method: str, **params: Any) -> Job:
        job: Job = self.call(method, **params)["job"]
        return job


class Daemon:
    """pullbackd as a subprocess, started, stopped, killed and started again."""

    def __init__(self, base: Path, uri: str, source: Path | None) -> None:
        base.mkdir(parents=True, exist_ok=True)
        self.base = base
        self.socket = base / "control.sock"
        self.scratch = base / "scratch"
        self.repository = base / "repository"
        self.log = base / "pullbackd.log"
        self.config = base / "pullbackd.toml"
        # Short, as socket paths must be; the same for the same base, as a restart needs.
        self.exports = Path(tempfile.gettempdir()) / \
            f"pbs-{hashlib.sha1(str(base).encode()).hexdigest()[:10]}"
        shutil.rmtree(self.exports, ignore_errors=True)
        self.source = source
        self.fdstore: dict[str, int] = {}
        self.manager: ServiceManager | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.ctl = Control(self.socket)
        self.config.write_text(
            f'[libvirt]\nuri = "{uri}"\n'
            f'[control]\nsocket = "{self.socket}"\n'
            f'[exports]\ndir = "{self.exports}"\n'
            f'[scratch]\ndir = "{self.scratch}"\nreserve = 0\n'
            f'[state]\ndir = "{base / "state"}"\n'
            f'[repository]\ndir = "{self.repository}"\nwrite_behind = {1 << 20}\n'
            f'[restore]\ndirs = ["{base.parent}"]\n'
            f'[log]\nlevel = "debug"\n')

    def discarding(self, checkpoint: str) -> bool:
        """Whether pullbackd's database holds `checkpoint` out of every chain, to be
        deleted (read-only, as a second reader of its SQLite database)."""
        db = self.base / "state" / "state.db"
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True,
                                                timeout=10)) as conn:
            row = conn.execute("SELECT state FROM checkpoints WHERE name = ?",
                               (checkpoint,)).fetchone()
        return row is not None and row[0] == "discard"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        """Start it with what the fd store holds; wait for READY=1."""
        assert not self.running()
        manager = self.manager = ServiceManager(self.base / "notify.sock", self.fdstore)
        env = {}
        if self.source is not None:
            env["PYTHONPATH"] = os.pathsep.join(
                p for p in (str(self.source), os.environ.get("PYTHONPATH", "")) if p)
        with self.log.open("ab") as out:
            self.proc = manager.spawn(
                [sys.executable, "-m", "pullbackd.service", "--config", str(self.config)],
                out, env)
        deadline = time.monotonic() + READY_TIMEOUT
        while not manager.ready.wait(0.1):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                code = self.proc.poll()
                if code is None:
                    self.proc.kill()
                self.proc.wait()
                manager.close()
                raise StressError(f"pullbackd did not get ready (exit status {code}); "
                                  f"its log:\n{self.tail()}")

    def wait(self, timeout: float) -> int | None:
        """Its exit status once it exited (the manager is closed then), None if it goes on."""
        assert self.proc is not None and self.manager is not None
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        self.manager.close()
        return code

    def sigterm(self) -> int | None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        code = self.wait(EXIT_TIMEOUT)
        if code is None:
            self.kill9()
        return code

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.wait(EXIT_TIMEOUT)

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def close(self) -> None:
        """After the last stop: the fd store's copies go."""
        for fd in self.fdstore.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fdstore.clear()


# --- the model of the disks, and reading backups ------------------------------------------


@dataclass(frozen=True)
class Write:
    """One guest write: `write` (pattern byte), `zero` (write -z) or `scatter`
    (`count` writes of `length` at offsets drawn with `seed`)."""

    op: str
    domain: str
    disk: str
    offset: int
    length: int
    byte: int
    count: int = 1
    seed: int = 0

    def __str__(self) -> str:
        if self.op == "scatter":
            return f"scatter {self.domain}/{self.disk} {self.count}x{self.length} {self.byte:#x}"
        return f"{self.op} {self.domain}/{self.disk} {self.offset}+{self.length} {self.byte:#x}"


def nbdcopy(url: str, path: Path) -> None:
    path.unlink(missing_ok=True)
    subprocess.run(["nbdcopy", url, str(path)], check=True, capture_output=True, timeout=120)


def apply_dirty(url: str, bitmap: str, path: Path) -> int:
    """Write what the export holds in the ranges its dirty bitmap marks onto `path`, an
    image at the incremental's `since`. Returns the dirty bytes."""
    h = nbd.NBD()
    try:
        h.add_meta_context(bitmap)
        h.connect_uri(url)
        if not h.can_meta_context(bitmap):
            raise RuntimeError(f"{url} does not offer {bitmap}")
        size = h.get_size()
        dirty = 0
        entries: list[int] = []

        def extent(context: str, offset: int, found: list[int], error: object) -> int:
            if context == bitmap:
                entries.extend(found)
            return 0

        with path.open("r+b") as image:
            offset = 0
            while offset < size:
                entries.clear()
                h.block_status(min(size - offset, STATUS_WINDOW), offset, extent)
                if not entries:
                    raise RuntimeError(f"no extents of {bitmap} at {offset}")
                for extent_length, flags in zip(entries[::2], entries[1::2], strict=True):
                    length = min(extent_length, size - offset)
                    if flags & 1:
                        for start in range(offset, offset + length, CHUNK):
                            count = min(CHUNK, offset + length - start)
                            image.seek(start)
                            image.write(h.pread(count, start))
                        dirty += length
                    offset += length
                    if offset >= size:
                        break
        return dirty
    finally:
        with contextlib.suppress(nbd.Error):
            h.shutdown()


def count_wrong(path: Path, expected: bytes) -> tuple[int, int | None]:
    """Bytes of the image that differ from what it should hold, and the first one's offset
    (a size that differs counts the bytes one has more)."""
    data = path.read_bytes()
    common = min(len(data), len(expected))
    wrong = abs(len(data) - len(expected))
    first = None if not wrong else common
    if wrong == 0 and data == expected:
        return 0, None
    a, b = memoryview(data), memoryview(expected)
    for offset in range(0, common, MiB):
        end = min(offset + MiB, common)
        x, y = a[offset:end], b[offset:end]
        if x == y:
            continue
        differ = [i for i, (p, q) in enumerate(zip(x, y, strict=True)) if p != q]
        wrong += len(differ)
        if first is None or offset + differ[0] < first:
            first = offset + differ[0]
    return wrong, first


# --- one cycle's draw ---------------------------------------------------------------------


@dataclass
class Fault:
    kind: str
    phase: str
    #: When it lands: this part of the time its step has been taking.
    delay: float


@dataclass
class Plan:
    cycle: int
    domain: str
    consumer: str
    kind: str  # pull, local
    mode: str
    disks: list[str] | None
    #: Picks the differential's `since` among those the driver can use then.
    pick: float
    before: list[Write]
    during: list[Write]
    fault: Fault | None
    sample: bool
    #: The domain is shut off for the cycle: pullbackd serves its disks itself (offline.py).
    offline: bool = False

    def describe(self) -> str:
        fault = f" [{self.fault.kind} @ {self.fault.phase}]" if self.fault else ""
        disks = f" {','.join(self.disks)}" if self.disks else ""
        off = " (shut off)" if self.offline else ""
        return f"{self.domain} {self.consumer} {self.kind} {self.mode}{disks}{off}{fault}"


@dataclass
class Finding:
    """A violation or a leak, with what came before it."""

    kind: str
    what: str
    detail: str
    cycle: int
    context: str
    job: str | None = None
    #: Leaks: whether it was still there at the end of the run.
    at_end: str = ""


@dataclass
class Deferred:
    """A checkpoint pullbackd took out of a chain (its job failed, or `[chains] keep`
    trimmed it) while libvirt could not delete it (its domain was down): pullbackd
    deletes it before the domain's next backup."""

    checkpoint: str
    domain: str
    job: str
    detail: str
    cycle: int
    #: The domain's newest job when it was found: a later one must not find it.
    before: str | None
    deleted: str | None = None


@dataclass
class Event:
    """A fault injected, and what came of it."""

    cycle: int
    kind: str
    phase: str
    backup: str
    job: str | None
    landed: str
    notes: list[str] = field(default_factory=list)
    outcome: str = ""

    def describe(self) -> str:
        job = f" of {self.backup} job {self.job}" if self.job else ""
        return f"cycle {self.cycle}: {self.kind} at {self.phase}{job} ({self.landed})"


# --- the driver ---------------------------------------------------------------------------


class Stress:
    def __init__(self, args: argparse.Namespace, lab: Lab, work: Path) -> None:
        self.args = args
        self.lab = lab
        self.work = work
        self.rng = random.Random(args.seed)
        self.consumers = [f"c{i}" for i in range(1, args.consumers + 1)]
        self.faults: list[str] = args.faults
        self.virt = Virt(lab.uri)
        self.daemon = Daemon(work / "daemon", lab.uri, args.daemon_src)
        self.ctl = self.daemon.ctl
        self.images_dir = work / "images"
        self.tmp = work / "tmp"
        for folder in (self.images_dir, self.tmp):
            folder.mkdir(parents=True, exist_ok=True)
        self.pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="stress")
        self.typical = dict(TYPICAL)
        self.model = {(d, k): bytearray(lab.size) for d in lab.domains for k in lab.disks}
        # The appliances: per domain, consumer and disk, the image rebuilt at each checkpoint
        # (oldest first); per domain and consumer, the confirmed checkpoints, with their job
        # and disks, in the order they completed.
        self.images: dict[tuple[str, str, str], dict[str, Path]] = {}
        self.confirmed: dict[tuple[str, str], list[tuple[str, str, tuple[str, ...]]]] = {}
        self.seen: dict[str, str] = {}  # job id -> the last state the driver saw
        self.needs_full: set[tuple[str, str]] = set()
        self.unrestorable: set[str] = set()  # checkpoints the driver could not rebuild
        self.last_job: dict[str, str] = {}  # domain -> its newest job
        self.cycle = 0
        #: The cycle's job while it runs: a check in the middle of a cycle (after a restart)
        #: may find it completed before the driver heard so.
        self.inflight: Job | None = None
        self.event: Event | None = None
        self.unchecked: list[Event] = []
        # The report.
        self.outcomes: Counter[str] = Counter()
        self.kinds: Counter[str] = Counter()
        #: Backups started with the domain running, and shut off.
        self.power: Counter[str] = Counter()
        self.modes: Counter[str] = Counter()
        self.fallbacks: Counter[str] = Counter()
        self.events: list[Event] = []
        self.restarts: Counter[str] = Counter()
        self.compared = 0
        self.qemu_img_compared = 0
        self.wrong_bytes = 0
        self.wrong_images: list[dict[str, Any]] = []
        self.violations: dict[tuple[str, str], Finding] = {}
        self.leaks: dict[tuple[str, str], Finding] = {}
        self.deferred: dict[str, Deferred] = {}
        self.errors: list[str] = []
        self.cut_by_sigterm: list[str] = []
        self.started = time.monotonic()

    # The run.

    def run(self) -> None:
        self.prepare_lab()
        self.daemon.start()
        schedule = self.schedule()
        for n in range(1, self.args.cycles + 1):
            self.cycle = n
            plan = self.draw(n, schedule.get(n))
            log(f"cycle {n}/{self.args.cycles}: {plan.describe()}")
            self.run_cycle(plan)
            self.end_cycle()
        self.cycle = self.args.cycles + 1
        self.sweep()
        self.check("the end of the run")
        for leak in self.leaks.values():
            leak.at_end = "still there" if self.still_there(leak) else "gone"
        self.stop()

    def still_there(self, leak: Finding) -> bool:
        if leak.kind == "qemu-nbd":
            return alive(int(leak.what))
        if leak.kind == "libvirt-checkpoint":
            return any(leak.what in self.virt.checkpoints(d) for d in self.lab.domains)
        if leak.kind == "libvirt-backup":
            return self.virt.backup_xml(leak.what.split(":")[0]) is not None
        return Path(leak.what).exists()

    def prepare_lab(self) -> None:
        """Every domain running with no checkpoint; every disk zeroed, then --prefill of it
        written (data makes copies last long enough for a fault to land inside them)."""
        rng = random.Random(self.args.seed * 7919 + 2)  # the cycles' draws stay the seed's
        for domain in self.lab.domains:
            if not self.virt.active(domain):
                self.lab.run("start", domain)
            if any(c.startswith("pullbackd.") for c in self.virt.checkpoints(domain)):
                raise StressError(f"{domain} has pullbackd checkpoints already: "
                                  "the driver needs a fresh lab")
            for disk in self.lab.disks:
                self.lab.run("zero", domain, disk, "0", str(self.lab.size))
                length = int(self.lab.size * self.args.prefill) // 512 * 512
                if length:
                    offset = rng.randrange(0, self.lab.size - length + 1) // 512 * 512
                    self.guest([Write("write", domain, disk, offset, length,
                                      rng.randrange(1, 256))])

    def schedule(self) -> dict[int, str]:
        """Each kind of fault asked for lands at least once, at cycles drawn from the seed."""
        rng = random.Random(self.args.seed * 7919 + 1)
        cycles = rng.sample(range(1, self.args.cycles + 1),
                            min(len(self.faults), self.args.cycles))
        return dict(zip(cycles, self.faults, strict=False))

    def draw(self, n: int, forced: str | None) -> Plan:
        """Everything random about a cycle, drawn up front: the same seed draws the same
        cycles whatever the timing does to them."""
        rng = self.rng
        domain = rng.choice(self.lab.domains)
        consumer = rng.choice(self.consumers)
        kind = "local" if rng.random() < 0.4 else "pull"
        mode = rng.choices(("full", "incremental", "differential"), weights=(1, 3, 1))[0]
        subset = rng.random() < 0.2 and len(self.lab.disks) > 1
        size = rng.randint(1, max(len(self.lab.disks) - 1, 1))
        disks = sorted(rng.sample(self.lab.disks, size)) if subset else None
        pick = rng.random()
        before = self.draw_writes(domain, rng.randint(1, 3))
        during = self.draw_writes(domain, 1) if rng.random() < 0.5 else []
        with_fault = rng.random() < self.args.fault_rate
        drawn = rng.choices(self.faults or ["abort"],
                            weights=[FAULT_WEIGHTS[f] for f in self.faults or ["abort"]])[0]
        chosen = forced or (drawn if with_fault and self.faults else None)
        phase_draw, delay = rng.random(), rng.uniform(0.0, 0.85)
        sample = rng.random() < 0.3
        offline = rng.random() < self.args.offline_rate
        if offline:
            # Nothing writes a shut-off domain, and it has no QEMU to kill.
            during = [w for w in during if w.domain != domain]
            if chosen == "qemu":
                chosen = None
        fault = None
        if chosen is not None:
            if chosen == "fail":
                kind = "pull"
            phases = PHASES[chosen, kind]
            fault = Fault(chosen, phases[int(phase_draw * len(phases))], delay)
        return Plan(n, domain, consumer, kind, mode, disks, pick, before, during, fault, sample,
                    offline)

    def draw_writes(self, focus: str, count: int) -> list[Write]:
        rng, size = self.rng, self.lab.size
        writes = []
        for _ in range(count):
            domain = focus if rng.random() < 0.75 else rng.choice(self.lab.domains)
            disk = rng.choice(self.lab.disks)
            op = rng.choices(("write", "zero", "scatter"), weights=(6, 1, 2))[0]
            byte = rng.randrange(1, 256)
            if op == "scatter":
                length = min(rng.choice((4096, 65536)), size)
                writes.append(Write(op, domain, disk, 0, length, byte,
                                    min(rng.randint(2, 8), size // length),
                                    rng.randrange(1 << 30)))
                continue
            length = min(rng.choice(WRITE_LENGTHS), size)
            offset = rng.randrange(0, size - length + 1)
            if rng.random() < 0.7:
                offset -= offset % 512
            writes.append(Write(op, domain, disk, offset, length, byte))
        return writes

    def guest(self, writes: list[Write]) -> None:
        for w in writes:
            model = self.model[w.domain, w.disk]
            if w.op == "scatter":
                out = self.lab.run("scatter", w.domain, w.disk, str(w.count), str(w.length),
                                   hex(w.byte), "--seed", str(w.seed))
                for line in out.split():
                    model[int(line):int(line) + w.length] = bytes([w.byte]) * w.length
            elif w.op == "write":
                self.lab.run("write", w.domain, w.disk, str(w.offset), str(w.length),
                             hex(w.byte))
                model[w.offset:w.offset + w.length] = bytes([w.byte]) * w.length
            else:
                self.lab.run("zero", w.domain, w.disk, str(w.offset), str(w.length))
                model[w.offset:w.offset + w.length] = bytes(w.length)

    # One cycle.

    def run_cycle(self, plan: Plan) -> None:
        self.guest(plan.before)
        if not plan.offline:
            self.backup(plan)
            return
        self.lab.run("stop", plan.domain)
        try:
            self.backup(plan)
        finally:
            self.lab.run("start", plan.domain)

    def backup(self, plan: Plan) -> None:
        if plan.fault is not None and plan.fault.phase == "idle":
            self.inject(plan.fault, plan, None, "between cycles")
        key = plan.domain, plan.consumer
        chain = self.chain(plan.domain, plan.consumer)
        mode, since = plan.mode, None
        if key in self.needs_full:
            mode = "full"
        elif mode == "differential":
            usable = [c["name"] for c in chain if self.can_rebuild(plan, c)]
            if usable:
                since = usable[int(plan.pick * len(usable))]
            else:
                mode = "incremental"
        params: dict[str, Any] = {"domain": plan.domain, "consumer": plan.consumer,
                                  "mode": mode}
        if since is not None:
            params["since"] = since
        if plan.disks is not None:
            params["disks"] = plan.disks
        if plan.kind == "local":
            params["destination"] = "local"
        # Taken before Start, with no guest write of ours until it returns: the export is
        # frozen at backupBegin, inside Start.
        snapshot = {d: bytes(self.model[plan.domain, d]) for d in plan.disks or self.lab.disks}
        job = self.start(plan, params, chain)
        if job is None:
            return
        if plan.kind == "pull":
            self.pull(plan, job, snapshot)
        else:
            self.local(plan, job, snapshot)

    def can_rebuild(self, plan: Plan, checkpoint: dict[str, Any]) -> bool:
        """Whether the driver holds an image at the checkpoint of every disk it covers that
        this cycle backs up (a local job rebuilds from the repository: any will do)."""
        if plan.kind == "local":
            return True
        disks = [d for d in plan.disks or self.lab.disks if d in checkpoint["disks"]]
        return bool(disks) and all(
            checkpoint["name"] in self.images.get((plan.domain, plan.consumer, d), {})
            for d in disks)

    def start(self, plan: Plan, params: dict[str, Any], chain: list[dict[str, Any]]
              ) -> Job | None:
        job, error, disrupted = self.step("start", plan, None,
                                          lambda: self.ctl.job("Start", **params))
        if job is None and disrupted:
            job = self.lost_start(plan)
        if job is None:
            name = error.short_name if isinstance(error, VarlinkError) else \
                type(error).__name__
            outcome = "start-lost" if disrupted else f"start-refused ({name})"
            if not disrupted:
                log(f"Start refused: {error}")
                if name in ("InternalError", "LibvirtError", "BackupInProgress"):
                    self.error(f"cycle {plan.cycle}: Start of {plan.domain} refused: {error}")
            self.outcome(plan, outcome)
            return None
        self.seen[job["id"]] = job["state"]
        self.last_job[plan.domain] = job["id"]
        self.inflight = job
        self.kinds[plan.kind] += 1
        self.power["shut off" if plan.offline else "running"] += 1
        self.modes[job["mode"]] += 1
        if self.event is not None:
            self.event.job = job["id"]
        plan_mode = params["mode"]
        self.check_since(plan, job, plan_mode, params.get("since"), chain)
        return job

    def lost_start(self, plan: Plan) -> Job | None:
        """Start's answer was lost to a restart: the job, if pullbackd made one."""
        fresh = [j for j in self.jobs(domain=plan.domain) if j["id"] not in self.seen]
        note = f"Start's answer was lost; List shows {len(fresh)} new job(s)"
        if fresh:
            note += f": {fresh[-1]['id']} {fresh[-1]['state']}"
        self.note(note)
        return fresh[-1] if fresh else None

    def check_since(self, plan: Plan, job: Job, mode: str, since: str | None,
                    chain: list[dict[str, Any]]) -> None:
        names = [c["name"] for c in chain]
        for disk in job["disks"]:
            name = disk["name"]
            if disk["mode"] != "incremental":
                if disk.get("fallback") and mode != "full":
                    self.fallbacks[fallback_kind(disk["fallback"])] += 1
                continue
            what = f"{job['id']}/{name}"
            head = next((c["name"] for c in reversed(chain) if name in c["disks"]), None)
            if disk["since"] not in names:
                self.violation("since-not-in-chain", what, (
                    f"{plan.kind} job {job['id']} ({job['mode']}) reads {name} since "
                    f"{disk['since']}, not in {plan.consumer}'s chain {names}"), job["id"])
            elif mode == "incremental" and disk["since"] != head:
                self.violation("since-not-head", what, (
                    f"incremental job {job['id']} reads {name} since {disk['since']}, but "
                    f"the chain's newest checkpoint with {name} is {head}"), job["id"])
            elif mode == "differential" and disk["since"] != since:
                self.violation("since-not-asked", what, (
                    f"differential job {job['id']} reads {name} since {disk['since']}, "
                    f"asked for {since}"), job["id"])
            origin = disk["since"].rpartition(".")[2]
            confirmed = any(cp == disk["since"] for cp, _, _ in
                            self.confirmed.get((plan.domain, plan.consumer), []))
            if not confirmed and disk["since"] not in self.unrestorable:
                self.violation("since-not-confirmed", what, (
                    f"{plan.kind} job {job['id']} reads {name} since {disk['since']}, whose "
                    f"job {origin} the driver saw end {self.seen.get(origin, 'unknown')}: "
                    f"an appliance has no copy at that point"), job["id"])

    def usable(self, plan: Plan, job: Job) -> bool:
        """Whether the driver can rebuild each incremental disk: it holds its image at since."""
        return all(disk["mode"] != "incremental" or disk["since"] in self.images.get(
            (plan.domain, plan.consumer, disk["name"]), {}) for disk in job["disks"])

    def pull(self, plan: Plan, job: Job, snapshot: dict[str, bytes]) -> None:
        job_id, fault = job["id"], plan.fault
        if job["state"] in FINAL:
            self.settle(plan, job, None, snapshot)
            return
        self.guest(plan.during)
        if not self.usable(plan, job):
            # What an appliance does with an incremental it has no base for.
            self.note(f"job {job_id}: no image at its since; aborted, next backup full")
            self.needs_full.add((plan.domain, plan.consumer))
            self.settle(plan, self.ctl.job("Abort", id=job_id), None, snapshot,
                        "aborted (no base)")
            return
        if fault is not None and fault.kind == "abort" and fault.phase == "before-read":
            self.inject(fault, plan, job_id, "before the read")
        images, error, disrupted = self.step("read", plan, job_id,
                                             lambda: self.read(plan, job, 1))
        current = self.get(job_id)
        if disrupted and fault is not None and fault.kind == "qemu" and \
                current["state"] not in FINAL:
            # The domain stopped: libvirt's event ends the job.
            try:
                current = self.wait_final(job_id, 30)
            except TimeoutError:
                self.error(f"cycle {plan.cycle}: job {job_id} still {current['state']} 30 s "
                           "after its domain's QEMU died")
        if current["state"] not in FINAL and error is not None:
            if disrupted and fault is not None and fault.kind == "sigterm":
                # A restart under systemd is to pause sessions, not to cut them.
                self.cut_by_sigterm.append(f"cycle {plan.cycle}: job {job_id}: {short(error)}")
            if disrupted:
                self.note(f"the read failed ({short(error)}); read again")
                try:
                    images = self.read(plan, job, 2)
                    error = None
                except Exception as e:
                    error = e
            if error is not None:
                self.note(f"the read failed: {short(error)}; aborted")
                if not disrupted:
                    self.error(f"cycle {plan.cycle}: reading job {job_id} failed: {error}")
                current = self.ctl.job("Abort", id=job_id)
        if current["state"] in FINAL:
            self.settle(plan, current, None, snapshot)
            return
        if fault is not None and fault.kind == "abort" and fault.phase == "after-read":
            self.inject(fault, plan, job_id, "after the read")
            self.settle(plan, self.get(job_id), None, snapshot)
            return
        if fault is not None and fault.kind == "fail":
            self.inject(fault, plan, job_id, "after the read")
            self.settle(plan, self.ctl.job("Finish", id=job_id, success=False), None, snapshot,
                        "finished failed")
            return
        done, error, disrupted = self.step("finish", plan, job_id,
                                           lambda: self.ctl.job("Finish", id=job_id))
        if done is None:
            current = self.get(job_id)
            self.note(f"Finish failed ({short(error)}); the job is {current['state']}")
            if current["state"] == "ready":
                done = self.ctl.job("Finish", id=job_id)
                self.note(f"Finish again: {done['state']}")
            else:
                done = current
        self.settle(plan, done, images, snapshot)

    def read(self, plan: Plan, job: Job, attempt: int) -> dict[str, Path]:
        images = {}
        for disk in job["disks"]:
            name = disk["name"]
            path = self.tmp / f"{job['id']}.{name}.{attempt}.raw"
            if disk["mode"] == "full":
                nbdcopy(disk["url"], path)
            else:
                base = self.images[plan.domain, plan.consumer, name][disk["since"]]
                subprocess.run(["cp", "--sparse=always", str(base), str(path)], check=True)
                apply_dirty(disk["url"], disk["bitmap"], path)
            images[name] = path
        return images

    def local(self, plan: Plan, job: Job, snapshot: dict[str, bytes]) -> None:
        job_id = job["id"]
        self.guest(plan.during)
        final, error, disrupted = self.step("stream", plan, job_id,
                                            lambda: self.wait_final(job_id))
        if final is None:
            self.note(f"waiting for the job failed ({short(error)})")
            final = self.wait_final(job_id)
        if final["state"] != "completed":
            self.settle(plan, final, None, snapshot)
            return
        images, error, disrupted = self.step("restore", plan, job_id,
                                             lambda: self.restore(plan, final, 1))
        if images is None and disrupted:
            self.note(f"Restore failed ({short(error)}); restore again")
            try:
                images = self.restore(plan, final, 2)
            except Exception as e:
                error = e
        if images is None:
            self.error(f"cycle {plan.cycle}: Restore of completed job {job_id} failed: {error}")
            self.unrestorable.add(final["checkpoint"])
            self.confirmed.setdefault((plan.domain, plan.consumer), []).append(
                (final["checkpoint"], job_id, tuple(d["name"] for d in final["disks"])))
            self.needs_full.add((plan.domain, plan.consumer))
            self.settle(plan, final, None, snapshot, "completed (not restored)")
            return
        self.settle(plan, final, images, snapshot)

    def restore(self, plan: Plan, job: Job, attempt: int) -> dict[str, Path]:
        images = {}
        for disk in job["disks"]:
            to = self.tmp / f"{job['id']}.{disk['name']}.r{attempt}.raw"
            to.unlink(missing_ok=True)
            self.ctl.call("Restore", domain=plan.domain, disk=disk["name"],
                          consumer=plan.consumer, at=job["checkpoint"], to=str(to),
                          format="raw")
            images[disk["name"]] = to
        return images

    def wait_final(self, job_id: str, timeout: float = CALL_TIMEOUT) -> Job:
        """The job once it ended; rides out a restart of pullbackd."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                job = self.ctl.job("Get", id=job_id)
                if job["state"] in FINAL:
                    return job
            except (OSError, ConnectionError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} did not end within {timeout:g} s")
            time.sleep(0.02)

    def get(self, job_id: str) -> Job:
        return self.ctl.job("Get", id=job_id)

    def jobs(self, **filters: str) -> list[Job]:
        """Every job List shows, page after page."""
        jobs: list[Job] = []
        after = None
        while True:
            page = self.ctl.call("List", **filters, **({"after": after} if after else {}))
            jobs += page["jobs"]
            if (after := page["next"]) is None:
                return jobs

    def settle(self, plan: Plan, job: Job, images: dict[str, Path] | None,
               snapshot: dict[str, bytes], outcome: str | None = None) -> None:
        """Keep a completed backup (checked against the model), discard anything else."""
        job_id = job["id"]
        if job["state"] not in FINAL:
            job = self.wait_final(job_id)
        self.inflight = None
        state = job["state"]
        self.seen[job_id] = state
        if state == "completed" and images is not None:
            self.keep(plan, job, images, snapshot)
        elif state == "completed" and outcome is None:
            self.error(f"cycle {plan.cycle}: job {job_id} completed without being read")
        label = outcome or state
        if state != "completed" and job.get("error"):
            log(f"job {job_id} {state}: {job['error']}")
        self.outcome(plan, label, job)

    def keep(self, plan: Plan, job: Job, images: dict[str, Path],
             snapshot: dict[str, bytes]) -> None:
        checkpoint = job["checkpoint"]
        for n, (disk, path) in enumerate(sorted(images.items())):
            wrong, first = count_wrong(path, snapshot[disk])
            self.compared += 1
            if wrong or (plan.sample and n == 0):
                self.qemu_img_compare(plan, job, disk, path, snapshot[disk], wrong)
            if wrong:
                self.wrong_bytes += wrong
                self.wrong_images.append({
                    "cycle": plan.cycle, "job": job["id"], "kind": plan.kind, "disk": disk,
                    "mode": next(d["mode"] for d in job["disks"] if d["name"] == disk),
                    "since": next(d["since"] for d in job["disks"] if d["name"] == disk),
                    "wrong_bytes": wrong, "first_offset": first,
                    "faults": [e.describe() for e in self.unchecked]})
                log(f"WRONG: job {job['id']} {disk}: {wrong} bytes differ from {first}")
                path.write_bytes(snapshot[disk])  # later incrementals are checked on their own
            folder = self.images_dir / plan.domain / plan.consumer / disk
            folder.mkdir(parents=True, exist_ok=True)
            kept = folder / f"{checkpoint}.raw"
            path.rename(kept)
            self.images.setdefault((plan.domain, plan.consumer, disk), {})[checkpoint] = kept
        self.confirmed.setdefault((plan.domain, plan.consumer), []).append(
            (checkpoint, job["id"], tuple(d["name"] for d in job["disks"])))
        self.needs_full.discard((plan.domain, plan.consumer))

    def qemu_img_compare(self, plan: Plan, job: Job, disk: str, path: Path, expected: bytes,
                         wrong: int) -> None:
        reference = self.tmp / "expected.raw"
        reference.write_bytes(expected)
        proc = subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", str(path),
                               str(reference)], capture_output=True, timeout=300, check=False)
        reference.unlink()
        self.qemu_img_compared += 1
        if proc.returncode != (1 if wrong else 0):
            self.error(f"cycle {plan.cycle}: qemu-img compare of job {job['id']} {disk} exited "
                       f"{proc.returncode}, the byte count found {wrong} wrong")

    def outcome(self, plan: Plan, label: str, job: Job | None = None) -> None:
        self.outcomes[label] += 1
        if self.event is not None and self.event.cycle == plan.cycle:
            self.event.outcome = label + (f" ({job['error']})" if job and job.get("error")
                                          and label != "completed" else "")
        log(f"  -> {label}" + (f" (job {job['id']})" if job else ""))

    # Faults.

    def step(self, name: str, plan: Plan, job_id: str | None, work: Callable[[], T]
             ) -> tuple[T | None, Exception | None, bool]:
        """Run a step; if this cycle's fault lands in it, in a thread, with the fault after
        a random part of the time the step has been taking. Returns its result or its
        error, and whether the fault landed."""
        fault = plan.fault
        began = time.monotonic()
        if fault is None or fault.phase != name or fault.kind not in DISRUPTIONS:
            try:
                result = work()
            except Exception as e:
                return None, e, False
            self.typical[name] = 0.7 * self.typical[name] + 0.3 * (time.monotonic() - began)
            return result, None, False
        future = self.pool.submit(work)
        delay = fault.delay * self.typical[name]
        wait_futures([future], timeout=delay)
        landed = f"after {name} returned" if future.done() else \
            f"inside {name}, {time.monotonic() - began:.2f} s in"
        self.inject(fault, plan, job_id, landed)
        try:
            return future.result(timeout=CALL_TIMEOUT), None, True
        except TimeoutError as e:
            if job_id is not None:
                self.note(f"{name} hung; Abort")
                self.ctl.call("Abort", id=job_id)
            self.error(f"cycle {plan.cycle}: {name} hung after {fault.kind}")
            try:
                return future.result(timeout=60), None, True
            except Exception:
                return None, e, True
        except Exception as e:
            return None, e, True

    def inject(self, fault: Fault, plan: Plan, job_id: str | None, landed: str) -> None:
        event = self.event = Event(plan.cycle, fault.kind, fault.phase, plan.kind, job_id,
                                   landed)
        self.events.append(event)
        self.unchecked.append(event)
        log(f"  {fault.kind} at {fault.phase} ({landed})")
        if fault.kind == "abort":
            assert job_id is not None
            event.notes.append(f"Abort: {self.ctl.job('Abort', id=job_id)['state']}")
        elif fault.kind in ("sigterm", "kill9"):
            self.restart(fault.kind)
        elif fault.kind == "qemu":
            self.kill_qemu(plan.domain)
        elif fault.kind == "libvirtd":
            self.kill_libvirtd()

    def note(self, text: str) -> None:
        log(f"  {text}")
        if self.event is not None and self.event.cycle == self.cycle:
            self.event.notes.append(text)

    def restart(self, how: str) -> None:
        began = time.monotonic()
        if how == "kill9":
            self.daemon.kill9()
        else:
            code = self.daemon.sigterm()
            if code != 0:
                self.error(f"cycle {self.cycle}: pullbackd " + (
                    f"exited with status {code} after SIGTERM" if code is not None
                    else f"did not exit within {EXIT_TIMEOUT:g} s of SIGTERM (killed)"))
        self.restarts[how] += 1
        self.daemon.start()
        self.note(f"pullbackd restarted in {time.monotonic() - began:.2f} s")
        self.check(f"the restart after {how}")

    def kill_qemu(self, domain: str) -> None:
        self.virt.flush(domain)
        pid = self.lab.qemu_pid(domain)
        if not any(f"guest={domain}," in arg for arg in cmdline(pid)):
            raise StressError(f"PID {pid} is not {domain}'s QEMU: {cmdline(pid)}")
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while self.virt.active(domain):
            if time.monotonic() > deadline:
                raise StressError(f"libvirt still sees {domain} running after its QEMU died")
            time.sleep(0.05)
        self.lab.run("start", domain)
        self.note(f"{domain}'s QEMU killed and started again")
        self.check_disks(domain)

    def check_disks(self, domain: str) -> None:
        """The disks kept every write the model has (flushed before the kill): else the model
        follows the disk, and the report says so."""
        for disk in self.lab.disks:
            reference = self.tmp / "model.raw"
            reference.write_bytes(self.model[domain, disk])
            proc = subprocess.run(["qemu-img", "compare", "-q", "-U", "-f", "qcow2", "-F",
                                   "raw", str(self.lab.disk_file(domain, disk)),
                                   str(reference)], capture_output=True, timeout=300,
                                  check=False)
            if proc.returncode != 0:
                self.error(f"cycle {self.cycle}: {domain}/{disk} lost writes when its QEMU "
                           f"was killed (qemu-img compare: {proc.returncode}); model reloaded")
                subprocess.run(["qemu-img", "convert", "-U", "-f", "qcow2", "-O", "raw",
                                str(self.lab.disk_file(domain, disk)), str(reference)],
                               check=True, timeout=300)
                self.model[domain, disk][:] = reference.read_bytes()
            reference.unlink()

    def kill_libvirtd(self) -> None:
        began = time.monotonic()
        pid = int(self.lab.state()["libvirtd_pid"])
        if str(self.lab.dir / "etc" / "libvirtd.conf") not in cmdline(pid):
            raise StressError(f"PID {pid} is not the lab's libvirtd: {cmdline(pid)}")
        os.kill(pid, signal.SIGKILL)
        if not wait_gone(pid, 30):
            raise StressError(f"libvirtd {pid} survived kill -9")
        self.virt.close()
        code = self.daemon.wait(EXIT_TIMEOUT)
        if code is None:
            self.error(f"cycle {self.cycle}: pullbackd did not exit within {EXIT_TIMEOUT:g} s "
                       "of losing libvirt (killed)")
            self.daemon.kill9()
        else:
            self.note(f"pullbackd exited with status {code} when libvirtd died")
        self.lab.run("restart-libvirtd")
        for domain in self.lab.domains:
            if not self.virt.active(domain):
                self.note(f"{domain} was not running after libvirtd's restart; started")
                self.lab.run("start", domain)
        self.restarts["libvirtd"] += 1
        self.daemon.start()
        self.note(f"libvirtd and pullbackd restarted in {time.monotonic() - began:.2f} s")
        self.check("libvirtd's restart")

    # Checks.

    def end_cycle(self) -> None:
        """Nothing of the cycle may still run; then the chains and leftovers are checked."""
        if not self.daemon.running():
            code = self.daemon.wait(0)
            self.error(f"cycle {self.cycle}: pullbackd exited by itself (status {code})")
            self.daemon.start()
        for job in self.jobs():
            if job["state"] not in FINAL:
                self.error(f"cycle {self.cycle}: job {job['id']} still {job['state']} at the "
                           "end of its cycle; aborted")
                self.ctl.call("Abort", id=job["id"])
        self.check(f"cycle {self.cycle}")
        self.prune_images()
        for leftover in self.tmp.iterdir():
            leftover.unlink()
        self.event = self.inflight = None

    def check(self, where: str) -> None:
        jobs = {j["id"]: j for j in self.jobs()}
        context = "; ".join(e.describe() for e in self.unchecked) or "no fault since the " \
            "last check"
        self.check_chains(jobs, f"{where}: {context}")
        self.check_leaks(jobs, f"{where}: {context}")
        self.unchecked.clear()

    def chain(self, domain: str, consumer: str | None = None) -> list[dict[str, Any]]:
        params = {"domain": domain} | ({"consumer": consumer} if consumer else {})
        chain: list[dict[str, Any]] = self.ctl.call("ListCheckpoints", **params)["checkpoints"]
        return chain

    def check_chains(self, jobs: dict[str, Job], context: str) -> None:
        for domain in self.lab.domains:
            listed = self.chain(domain)
            unconfirmed = set()
            for c in listed:
                job = jobs.get(c["job"])
                if job is None or job["state"] != "completed":
                    unconfirmed.add(c["name"])
                    state = "unknown to pullbackd" if job is None else job["state"]
                    error = f" ({job['error']})" if job and job.get("error") else ""
                    self.violation("chain-has-unconfirmed", c["name"], (
                        f"{c['name']} is in {c['consumer']}'s chain of {domain}, but its job "
                        f"{c['job']} is {state}{error}"), c["job"], context)
            for consumer in self.consumers:
                mine = [c for c in listed if c["consumer"] == consumer]
                names = [c["name"] for c in mine]
                confirmed = list(self.confirmed.get((domain, consumer), []))
                job = self.inflight
                if job is not None and (job["domain"], job["consumer"]) == (domain, consumer) \
                        and jobs.get(job["id"], {}).get("state") == "completed":
                    confirmed.append((job["checkpoint"], job["id"],
                                      tuple(d["name"] for d in job["disks"])))
                order = [cp for cp, _, _ in confirmed]
                if [n for n in names if n in order] != [n for n in order if n in names]:
                    self.violation("chain-order", f"{domain}/{consumer}", (
                        f"{consumer}'s chain of {domain} is {names}, confirmed in the order "
                        f"{order}"), None, context)
                for disk in self.lab.disks:
                    entry = next((e for e in reversed(confirmed) if disk in e[2]), None)
                    if entry is None:
                        continue
                    want, job_id, _ = entry
                    have = next((c["name"] for c in reversed(mine) if disk in c["disks"]),
                                None)
                    if want not in names:
                        self.violation("head-missing", want, (
                            f"{want} (job {job_id}, completed) is no longer in {consumer}'s "
                            f"chain of {domain}, though it is the newest backup of {disk}"),
                            job_id, context)
                    elif have != want and have not in unconfirmed:
                        self.violation("head-differs", f"{want}/{disk}", (
                            f"the head of {consumer}'s chain of {domain} for {disk} is {have}, "
                            f"not {want} (job {job_id}, the newest backup completed)"),
                            job_id, context)
                for _, job_id, _ in confirmed:
                    job = jobs.get(job_id)
                    if job is None or job["state"] != "completed":
                        self.violation("completed-job-changed", job_id, (
                            f"job {job_id} completed, and is now "
                            f"{job['state'] if job else 'unknown to pullbackd'}"), job_id,
                            context)

    def check_leaks(self, jobs: dict[str, Job], context: str) -> None:
        running = {j["id"]: j for j in jobs.values() if j["state"] not in FINAL}
        streaming = [j for j in running.values() if j.get("destination") == "local"]
        daemon = self.daemon
        ours = (str(daemon.repository), str(daemon.exports))
        for pid in (int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()):
            args = cmdline(pid)
            if args and os.path.basename(args[0]) == "qemu-nbd" and alive(pid) and \
                    any(a.startswith(ours) for a in args) and not streaming:
                self.leak("qemu-nbd", str(pid), f"qemu-nbd PID {pid} runs with no streamed job "
                          f"running: {' '.join(args)}", None, context)
            elif writer_of(pid, daemon.exports / ".repository") and alive(pid) and \
                    parent(pid) != daemon.pid:
                self.leak("qemu-nbd", str(pid), f"the repository's writer PID {pid} outlived "
                          f"the pullbackd that started it: {' '.join(args)}", None, context)
        for pattern in ("*.partial", "*.tmp"):
            for path in daemon.repository.rglob(pattern):
                parts = path.relative_to(daemon.repository).parts
                if not any(j["domain"] == parts[0] and j["consumer"] == parts[1]
                           for j in streaming):
                    self.leak("repository-file", str(path), f"{path} with no streamed job of "
                              f"{parts[0]}/{parts[1]} running", None, context)
        for folder in (daemon.scratch, daemon.exports, daemon.exports / ".qemu"):
            for path in folder.glob("*") if folder.is_dir() else ():
                if path.is_dir():
                    continue
                job_id = path.name.split(".")[0]
                if job_id not in running:
                    job = jobs.get(job_id)
                    state = job["state"] if job else "unknown"
                    self.leak("job-file", str(path), f"{path}: its job is {state}",
                              job_id if job else None, context)
        sockets = daemon.exports / ".repository"
        writer = writer_sockets(sockets, daemon.pid)  # kept open between backups
        for path in sockets.glob("*") if sockets.is_dir() and not streaming else ():
            if str(path) not in writer:
                self.leak("repository-socket", str(path), f"{path} with no streamed job "
                          "running", None, context)
        for domain in self.lab.domains:
            backup = self.virt.backup_xml(domain)
            mine = [j for j in running.values() if j["domain"] == domain]
            if backup is not None and not mine:
                found = ET.fromstring(backup).find("server")
                where = found.get("socket", "?") if found is not None else "a push"
                self.leak("libvirt-backup", f"{domain}:{where}", (
                    f"libvirt runs a backup of {domain} ({where}) that pullbackd does not "
                    "list as running"), None, context)
            known = {c["name"] for c in self.chain(domain)} | {j["checkpoint"] for j in mine}
            present = self.virt.checkpoints(domain)
            for d in self.deferred.values():
                if d.domain == domain and d.deleted is None and d.checkpoint not in present:
                    d.deleted = f"by cycle {min(self.cycle, self.args.cycles)}" if \
                        self.cycle <= self.args.cycles else "by the sweep"
            for name in present:
                if not name.startswith("pullbackd.") or name in known:
                    continue
                job_id = name.rpartition(".")[2]
                job = jobs.get(job_id)
                state = job["state"] if job else "unknown to pullbackd"
                detail = f"libvirt has checkpoint {name} of {domain}; its job {job_id} is " \
                    f"{state}" + (f" ({job['error']})" if job and job.get("error") else "")
                deferred = self.deferred.get(name)
                if deferred is None and self.cycle <= self.args.cycles and \
                        self.daemon.discarding(name):
                    # pullbackd took it out of the chain and could not delete it yet (its
                    # domain was down): it goes before the domain's next backup.
                    deferred = self.deferred[name] = Deferred(
                        name, domain, job_id, detail, self.cycle, self.last_job.get(domain))
                if deferred is not None and deferred.before == self.last_job.get(domain) \
                        and self.cycle <= self.args.cycles:
                    continue
                if deferred is not None:
                    detail += "; not deleted before the domain's next backup"
                self.leak("libvirt-checkpoint", name, detail, job_id, context)

    def violation(self, kind: str, what: str, detail: str, job: str | None,
                  context: str | None = None) -> None:
        if (kind, what) not in self.violations:
            log(f"VIOLATION {kind}: {detail}")
            self.violations[kind, what] = Finding(kind, what, detail, self.cycle,
                                                  context or self.context(), job)

    def leak(self, kind: str, what: str, detail: str, job: str | None, context: str) -> None:
        if (kind, what) not in self.leaks:
            log(f"LEAK {kind}: {detail}")
            self.leaks[kind, what] = Finding(kind, what, detail, self.cycle, context, job)

    def context(self) -> str:
        return f"cycle {self.cycle}: " + ("; ".join(e.describe() for e in self.unchecked)
                                          or "no fault since the last check")

    def error(self, text: str) -> None:
        log(f"ERROR {text}")
        self.errors.append(text)

    def sweep(self) -> None:
        """Checkpoints left while their domain was down go before its next backup: one
        backup of each domain that still has one, aborted, then the end's check."""
        for domain in sorted({d.domain for d in self.deferred.values() if d.deleted is None}):
            try:
                job = self.ctl.job("Start", domain=domain, consumer="sweep")
            except VarlinkError as e:
                self.error(f"sweep: Start of {domain} refused: {e}")
                continue
            self.seen[job["id"]] = job["state"]
            self.last_job[domain] = job["id"]
            self.ctl.call("Abort", id=job["id"])
            log(f"sweep: a backup of {domain} started and aborted")

    def prune_images(self) -> None:
        """Images the appliances keep: at checkpoints still in the chain, the newest few."""
        chains: dict[str, set[str]] = {}
        for (domain, _, _), images in self.images.items():
            if domain not in chains:
                chains[domain] = {c["name"] for c in self.chain(domain)}
            names = list(images)
            for name in names:
                if name not in chains[domain] or \
                        names.index(name) < len(names) - self.args.keep_images:
                    images.pop(name).unlink(missing_ok=True)

    def stop(self) -> None:
        """SIGTERM at the end: exit status 0, and no qemu-nbd of pullbackd's left."""
        if not self.daemon.running():
            return
        code = self.daemon.sigterm()
        if code != 0:
            self.error(f"pullbackd's final stop: exit status {code}")
        ours = (str(self.daemon.repository), str(self.daemon.exports))
        for pid in (int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()):
            args = cmdline(pid)
            if args and os.path.basename(args[0]) == "qemu-nbd" and alive(pid) and \
                    any(a.startswith(ours) for a in args):
                self.leak("qemu-nbd", str(pid), f"qemu-nbd PID {pid} outlived pullbackd's "
                          f"final stop: {' '.join(args)}", None, "the final stop")
            elif writer_of(pid, self.daemon.exports / ".repository") and alive(pid):
                self.leak("qemu-nbd", str(pid), f"the repository's writer PID {pid} outlived "
                          f"pullbackd's final stop: {' '.join(args)}", None, "the final stop")

    def close(self) -> None:
        """Whatever happened: pullbackd and what it left running stopped, threads ended."""
        if self.daemon.running():
            with contextlib.suppress(Exception):
                self.daemon.kill9()
        self.daemon.close()
        ours = (str(self.daemon.repository), str(self.daemon.exports))
        for pid in (int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()):
            args = cmdline(pid)
            if (args and os.path.basename(args[0]) == "qemu-nbd" and \
                    any(a.startswith(ours) for a in args)) or \
                    writer_of(pid, self.daemon.exports / ".repository"):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.virt.close()
        if not self.daemon.running():
            shutil.rmtree(self.daemon.exports, ignore_errors=True)

    # The report.

    def report(self, fatal: str | None = None) -> dict[str, Any]:
        by_kind: dict[str, dict[str, Any]] = {}
        for e in self.events:
            entry = by_kind.setdefault(e.kind, {"count": 0, "phases": Counter(),
                                                "outcomes": Counter()})
            entry["count"] += 1
            entry["phases"][e.phase] += 1
            entry["outcomes"][e.outcome.split(" (")[0] or "-"] += 1
        errors = self.errors + ([f"fatal: {fatal}"] if fatal else [])
        return {
            "seed": self.args.seed,
            "cycles": self.cycle if fatal else self.args.cycles,
            "cycles_asked": self.args.cycles,
            "lab": {"domains": self.lab.domains, "disks": self.lab.disks,
                    "size": self.lab.size, "dir": str(self.lab.dir)},
            "consumers": self.consumers,
            "faults_enabled": self.faults,
            "fault_rate": self.args.fault_rate,
            "daemon_source": str(self.args.daemon_src or ROOT / "daemon"),
            "seconds": round(time.monotonic() - self.started, 1),
            "backups": {
                "started": sum(self.kinds.values()),
                "completed": self.outcomes["completed"],
                "by_outcome": dict(self.outcomes),
                "by_kind": dict(self.kinds),
                "by_power": dict(self.power),
                "by_mode": dict(self.modes),
                "fallbacks": dict(self.fallbacks),
            },
            "faults": {k: {"count": v["count"], "phases": dict(v["phases"]),
                           "outcomes": dict(v["outcomes"])} for k, v in by_kind.items()},
            "fault_events": [asdict(e) for e in self.events],
            "restarts": {k: self.restarts[k] for k in ("sigterm", "kill9", "libvirtd")},
            "compared_images": self.compared,
            "qemu_img_compared": self.qemu_img_compared,
            "wrong_bytes": self.wrong_bytes,
            "wrong_images": self.wrong_images,
            "violations": [asdict(f) for f in self.violations.values()],
            "leaks": [asdict(f) for f in self.leaks.values()],
            "deferred": [asdict(f) for f in self.deferred.values()],
            "reads_cut_by_sigterm": self.cut_by_sigterm,
            "step_seconds": {k: round(v, 3) for k, v in self.typical.items()},
            "errors": errors,
            "ok": not (self.wrong_bytes or self.violations or self.leaks or errors),
        }


def fallback_kind(reason: str) -> str:
    """Why a disk asked for incrementally was backed up in full, in a few words."""
    for pattern, kind in ((r"has no earlier backup", "first backup of the consumer"),
                          (r"local repository has no backup", "no base in the repository"),
                          (r"bitmap of .* cannot be used", "bitmap broken"),
                          (r"has no bitmap for this disk", "since has no bitmap of the disk")):
        if re.search(pattern, reason):
            return kind
    return re.sub(r"pullbackd\.\S+", "X", reason)[:60]


def short(error: BaseException | None) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:160]


def table(report: dict[str, Any]) -> str:
    """The report for people."""
    lab, backups = report["lab"], report["backups"]

    def counts(counter: dict[str, int]) -> str:
        return ", ".join(f"{k} {v}" for k, v in sorted(counter.items(), key=lambda kv: -kv[1]))

    lines = [
        f"pullbackd stress: {report['cycles']} cycles, seed {report['seed']}, "
        f"{len(lab['domains'])} domains x {len(lab['disks'])} disks of "
        f"{lab['size'] >> 20} MiB, {len(report['consumers'])} consumers, "
        f"{report['seconds']:.0f} s (daemon: {report['daemon_source']})",
        "",
        f"  {'backups started':<22}{backups['started']} ({counts(backups['by_kind'])}; "
        f"{counts(backups['by_mode'])}; {counts(backups.get('by_power', {}))})",
        f"  {'completed':<22}{backups['completed']}",
        f"  {'by outcome':<22}{counts(backups['by_outcome'])}",
    ]
    if backups["fallbacks"]:
        lines.append(f"  {'full fallbacks':<22}{counts(backups['fallbacks'])}")
    lines += ["", f"  {'fault':<10}{'count':>6}  {'where':<52}what came of it"]
    for kind in FAULT_KINDS:
        if kind in report["faults"]:
            f = report["faults"][kind]
            lines.append(f"  {kind:<10}{f['count']:>6}  {counts(f['phases']):<52}"
                         f"{counts(f['outcomes'])}")
    for e in report["fault_events"]:
        job = f"{e['backup']} {e['job']}" if e["job"] else e["backup"]
        lines.append(f"    {e['cycle']:>4}  {e['kind']:<9}{e['phase']:<12}{job:<20}"
                     f"{e['landed']:<28}-> {e['outcome'] or '-'}")
    restarts = report["restarts"]
    lines += [
        "",
        f"  {'daemon restarts':<22}SIGTERM {restarts['sigterm']}, kill -9 {restarts['kill9']}, "
        f"libvirtd {restarts['libvirtd']}",
        f"  {'compared images':<22}{report['compared_images']} "
        f"(qemu-img compare: {report['qemu_img_compared']})",
        f"  {'WRONG BYTES':<22}{report['wrong_bytes']}",
        f"  {'CHAIN VIOLATIONS':<22}{len(report['violations'])}",
        f"  {'LEAKS':<22}{len(report['leaks'])}",
        f"  {'errors':<22}{len(report['errors'])}",
        f"  {'reads cut by SIGTERM':<22}{len(report['reads_cut_by_sigterm'])}",
    ]
    for w in report["wrong_images"]:
        lines.append(f"    wrong      job {w['job']} {w['disk']} ({w['kind']}, {w['mode']}): "
                     f"{w['wrong_bytes']} bytes from {w['first_offset']}")
    for name, key in (("violation", "violations"), ("leak", "leaks")):
        for f in report[key]:
            lines.append(f"    {name:<10} {f['kind']}: {f['detail']}")
            end = f"; at the end: {f['at_end']}" if f["at_end"] else ""
            lines.append(f"    {'':<10} found at {f['context']}{end}")
    for d in report["deferred"]:
        lines.append(f"    deferred   {d['checkpoint']} (cycle {d['cycle']}): deleted "
                     f"{d['deleted'] or 'never (a leak)'}")
    for e in report["errors"]:
        lines.append(f"    error      {e}")
    lines.append("")
    lines.append("  OK" if report["ok"] else "  FAILED")
    return "\n".join(lines)


# --- the command --------------------------------------------------------------------------


def parse_faults(text: str) -> list[str]:
    if text in ("all", ""):
        return list(FAULT_KINDS)
    if text == "none":
        return []
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in FAULT_KINDS]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown fault {', '.join(unknown)} (known: {', '.join(FAULT_KINDS)}, all, none)")
    return list(dict.fromkeys(kinds))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scripts/stress", description="pullbackd under random backups and faults.",
        epilog="The docstring of bench/stress.py says what is checked and how.")
    parser.add_argument("--dir", type=Path, default=Path("/var/tmp/pullbackd-stress"),
                        help="work folder: the lab, pullbackd's files, the appliances' images")
    parser.add_argument("--cycles", type=int, default=60, help="backups (default 60)")
    parser.add_argument("--seed", type=int, default=1, help="draws every cycle (default 1)")
    parser.add_argument("--domains", type=int, default=3, help="lab domains (default 3)")
    parser.add_argument("--disks", type=int, default=2, help="disks per domain (default 2)")
    parser.add_argument("--size", type=parse_size, default=64 * MiB,
                        help="of each disk (default 64M; the model holds them in memory)")
    parser.add_argument("--consumers", type=int, default=2,
                        help="backup appliances, each with its chains (default 2)")
    parser.add_argument("--faults", type=parse_faults, default=list(FAULT_KINDS),
                        help="kinds of fault, comma-separated, each injected at least once: "
                             f"{','.join(FAULT_KINDS)} (default all; none for none)")
    parser.add_argument("--fault-rate", type=float, default=0.35,
                        help="chance of a fault in a cycle beyond those (default 0.35)")
    parser.add_argument("--prefill", type=float, default=0.5,
                        help="part of each disk the guest writes first (default 0.5)")
    parser.add_argument("--keep-images", type=int, default=3,
                        help="images an appliance keeps per disk (default 3)")
    parser.add_argument("--offline-rate", type=float, default=0.2,
                        help="share of cycles whose domain is shut off for the backup "
                             "(default 0.2)")
    parser.add_argument("--report", type=Path, help="write the report here as JSON")
    parser.add_argument("--lab", type=Path,
                        help="use this lab, up already and fresh (not torn down at the end)")
    parser.add_argument("--daemon-src", type=Path,
                        help="run the pullbackd package found in this folder (PYTHONPATH)")
    return parser


def prepare_work(work: Path) -> None:
    """An empty folder, or one of an earlier run: its files go (a lab in it is taken down)."""
    work.mkdir(parents=True, exist_ok=True)
    marker = work / MARKER
    if not marker.exists():
        if any(work.iterdir()):
            raise StressError(f"{work} is not empty and not a stress folder (no {MARKER})")
        marker.write_text("Work folder of pullbackd's scripts/stress.\n")
    if (work / "lab" / "state.json").exists():
        subprocess.run([str(LAB), "--dir", str(work / "lab"), "down"], capture_output=True,
                       timeout=300, check=False)
    for name in ("daemon", "images", "tmp"):
        shutil.rmtree(work / name, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.cycles < 1 or args.domains < 1 or args.disks < 1 or args.consumers < 1:
        print("scripts/stress: --cycles, --domains, --disks and --consumers must be 1 or more",
              file=sys.stderr)
        return 2
    work = args.dir.resolve()
    report: dict[str, Any] | None = None
    try:
        prepare_work(work)
        with contextlib.ExitStack() as stack:
            if args.lab is not None:
                lab = discover(args.lab.resolve(), args.domains)
            else:
                lab = stack.enter_context(own_lab(work / "lab", args.domains, args.disks,
                                                  args.size))
            stress = Stress(args, lab, work)
            fatal = None
            try:
                stress.run()
            except (StressError, VarlinkError, OSError, subprocess.SubprocessError,
                    libvirt.libvirtError) as e:
                fatal = f"{type(e).__name__}: {e}"
                log(f"FATAL {fatal}")
                log(f"pullbackd's log ends:\n{stress.daemon.tail()}")
            finally:
                stress.close()
            report = stress.report(fatal)
    except StressError as e:
        log(f"FATAL {e}")
        return 1
    if args.report is not None:
        args.report.write_text(json.dumps(report, indent=2) + "\n")
    print(table(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
