"""The repository at scale: `scripts/bench --repository`.

No lab: a chain is built straight into a repository, by the code the daemon's
streamed backups run (`Repository.begin`, the engine with the repository's
checksums and write-behind, `Repository.commit`), from a local qcow2 image
that stands in for the domain's disk. Its changes are tracked by a persistent
dirty bitmap, served by qemu-nbd as `qemu:dirty-bitmap:<name>` the way QEMU
serves a pull backup's: so each incremental copies exactly what changed (data,
and zeroed ranges as zero writes), and the files and manifests are the ones
the daemon writes.

    full       `data` bytes in chunks spread over the disk
    each step  `writes` scattered writes of 64 KiB, and one 64 KiB range zeroed

Two cases, each checked:

    verify   Verify of one disk's chain of `verify_chain` backups, from cold
             files (target: 500 in at most 30 s); each run must find no
             problem, and then, with one byte of a backup in the middle of the
             chain changed (and put back after), exactly that backup's region
    restore  restoring the newest point of a chain of `restore_chain` backups
             against restoring a full backup of the same data, each run from
             cold files (dropped from the page cache first), compared with the
             source by `qemu-img compare` (target: at most 1.2 times the full)

Medians of `repeats` runs, the two restores taking turns (bench.turns), after a
round that is not counted. `--smoke` runs tiny sizes once: it checks that the
benchmark works, nothing more.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import random
import statistics
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import anyio
import structlog
from bench import BLOCK, GiB, MiB, log, run, turns

from pullbackd import config, qemu_nbd, stream
from pullbackd.manifest import Manifest, recorder
from pullbackd.repository import Repository, regions

DOMAIN = "bench"
DISK = "vda"
#: The persistent bitmap of the source image that tracks the changes since the last backup.
BITMAP = "since-last"


@dataclass(frozen=True)
class Size:
    disk: int
    data: int
    writes: int  # 64 KiB writes per incremental of the restore case
    verify_writes: int  # and of the verify case
    verify_chain: int
    restore_chain: int
    repeats: int


FULL_SIZE = Size(disk=4 * GiB, data=1 * GiB, writes=160, verify_writes=16, verify_chain=500,
                 restore_chain=30, repeats=5)
SMOKE_SIZE = Size(disk=64 * MiB, data=8 * MiB, writes=4, verify_writes=4, verify_chain=6,
                  restore_chain=4, repeats=1)
#: Targets (issue 18).
VERIFY_TARGET = 30.0
RESTORE_RATIO_TARGET = 1.2
#: What verifying the backups of `VERIFY_TARGET_BACKUPS` may take at most.
VERIFY_TARGET_BACKUPS = 500


@dataclass(frozen=True)
class Results:
    verify_backups: int
    verify_bytes: int
    verify_seconds: list[float]
    restore_chain: int
    restore_bytes: int
    restore_chain_seconds: list[float]
    restore_full_seconds: list[float]

    @property
    def verify_median(self) -> float:
        return statistics.median(self.verify_seconds)

    @property
    def restore_ratio(self) -> float:
        return statistics.median(self.restore_chain_seconds) / \
            statistics.median(self.restore_full_seconds)


class Source:
    """A qcow2 image standing in for a domain's disk, with a persistent bitmap that
    records every write since the last backup."""

    def __init__(self, path: Path, size: int) -> None:
        self.path = path
        self.size = size
        run("qemu-img", "create", "-q", "-f", "qcow2", str(path), str(size))
        run("qemu-img", "bitmap", "--add", str(path), BITMAP)

    def write(self, commands: list[str]) -> None:
        """qemu-io commands, in one run (its writes set the bitmap's bits)."""
        args = ["qemu-io", "-f", "qcow2"]
        for command in commands:
            args += ["-c", command]
        run(*args, str(self.path))

    @contextmanager
    def export(self, sock: Path) -> Iterator[str]:
        """The image served read-only, its bitmap as `qemu:dirty-bitmap:BITMAP`; the URL."""
        process = subprocess.Popen(
            ["qemu-nbd", "--read-only", "--format", "qcow2", "--shared", "8", "--persistent",
             "--bitmap", BITMAP, "--socket", str(sock), str(self.path)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            qemu_nbd.wait_serving(sock, self.path, process.poll, qemu_nbd.SERVE_TIMEOUT)
            yield f"nbd+unix:///?socket={sock}"
        finally:
            process.terminate()
            process.wait()
            sock.unlink(missing_ok=True)

    def backed_up(self) -> None:
        """The next backup starts from here."""
        run("qemu-img", "bitmap", "--clear", str(self.path), BITMAP)


def fill(source: Source, size: Size) -> None:
    chunk = min(64 * MiB, size.data)
    chunks = size.data // chunk
    stride = size.disk // chunks // chunk * chunk
    source.write([f"write -P {0x10 + i % 200:#x} {i * stride} {chunk}" for i in range(chunks)])


def change(source: Source, size: Size, writes: int, seed: str, step: int) -> None:
    """One step's writes: scattered 64 KiB blocks, and one block zeroed."""
    rng = random.Random(seed)
    blocks = size.disk // BLOCK
    offsets = [rng.randrange(blocks) * BLOCK for _ in range(writes + 1)]
    source.write([f"write -P {step % 251 + 1:#x} {o} {BLOCK}" for o in offsets[1:]] +
                 [f"write -z {offsets[0]} {BLOCK}"])


async def backup(repository: Repository, source: Source, consumer: str, job: str,
                 base: Manifest | None, tuning: stream.Tuning, sock: Path) -> Manifest:
    """One streamed backup of the source into the repository, as copying.Copy makes it."""
    writer = await repository.begin(DOMAIN, consumer, DISK, source.size, job, f"cp-{job}",
                                    "2026-01-01T00:00:00.000Z", base)
    try:
        with source.export(sock) as url:
            await stream.stream(url, writer.url,
                                bitmap=None if base is None else f"qemu:dirty-bitmap:{BITMAP}",
                                zeroed_destination=base is None, tuning=tuning,
                                on_progress=writer.behind.progress,
                                checksums=recorder(writer.regions), cluster=writer.cluster)
    except BaseException:
        await repository.abort(writer)
        raise
    manifest = await repository.commit(writer)
    await anyio.to_thread.run_sync(source.backed_up)
    return manifest


def build(repository: Repository, source: Source, consumer: str, links: int, size: Size,
          writes: int, tuning: stream.Tuning, work: Path) -> list[Manifest]:
    """A chain of `links` backups: a full, then incrementals, the source changed by
    `writes` blocks before each."""
    async def chain() -> list[Manifest]:
        manifests: list[Manifest] = []
        for i in range(links):
            if manifests:
                await anyio.to_thread.run_sync(change, source, size, writes,
                                               f"{consumer}-{i}", i)
            manifests.append(await backup(repository, source, consumer, f"{consumer}-{i:04}",
                                          manifests[-1] if manifests else None, tuning,
                                          work / "source.sock"))
            if (i + 1) % 50 == 0:
                log(f"{consumer}: {i + 1} backups")
        return manifests
    return anyio.run(chain)


def verify_disk(repository: Repository, consumer: str) -> tuple[int, list[str]]:
    """What Verify does for one disk of one consumer: backups checked, problems."""
    return anyio.run(repository.verify_disk, DOMAIN, consumer, DISK)


def drop_cache(folder: Path) -> None:
    """Every file in `folder` out of the page cache (written back first)."""
    for path in folder.iterdir():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def restore(repository: Repository, manifest: Manifest, to: Path, expected: Path,
            tuning: stream.Tuning) -> float:
    """Seconds to restore `manifest` from cold files; the result compared with `expected`."""
    drop_cache(repository.folder(DOMAIN, manifest.consumer, DISK))
    to.unlink(missing_ok=True)
    t = time.perf_counter()
    anyio.run(repository.restore, manifest, to, "raw", tuning)
    took = time.perf_counter() - t
    run("qemu-img", "compare", "-q", "-f", "raw", "-F", "qcow2", str(to), str(expected))
    to.unlink()
    return took


def measure_verify(repository: Repository, source: Source, size: Size,
                   tuning: stream.Tuning, work: Path) -> tuple[list[float], int]:
    manifests = build(repository, source, "verify", size.verify_chain, size,
                      size.verify_writes, tuning, work)
    stored = sum(m.bytes for m in manifests)
    log(f"verify: a chain of {len(manifests)} backups, {stored // MiB} MiB written")
    seconds = []
    for _ in range(size.repeats):
        drop_cache(repository.folder(DOMAIN, "verify", DISK))
        t = time.perf_counter()
        checked, problems = verify_disk(repository, "verify")
        seconds.append(time.perf_counter() - t)
        if (checked, problems) != (len(manifests), []):
            raise RuntimeError(f"verify checked {checked}, found {problems[:3]}")
    log(f"verify: {len(manifests)} backups in {statistics.median(seconds):.2f} s (median)")
    damaged(repository, manifests)
    return seconds, stored


def damaged(repository: Repository, manifests: list[Manifest]) -> None:
    """One byte of a backup in the middle of the chain damaged: Verify names its region."""
    victim = manifests[len(manifests) // 2]
    region = next(r for r in regions(repository, victim) if r.checksum is not None)
    folder = repository.folder(DOMAIN, "verify", DISK)
    image = folder / victim.file
    saved = folder.parent / "saved.qcow2"
    run("cp", "--reflink=auto", str(image), str(saved))
    try:
        run("qemu-io", "-f", "qcow2", "-c", f"write -P 0xee {region.offset + 7} 1", str(image))
        _, problems = verify_disk(repository, "verify")
        expected = f"{victim.file}: {region.length} bytes at {region.offset} differ"
        if len(problems) != 1 or not problems[0].startswith(expected):
            raise RuntimeError(f"verify of a damaged chain found {problems[:3]}")
    finally:
        saved.replace(image)


def measure_restore(repository: Repository, source: Source, size: Size,
                    tuning: stream.Tuning, work: Path) -> tuple[list[float], list[float], int]:
    chain = build(repository, source, "chain", size.restore_chain, size, size.writes, tuning,
                  work)
    # A full backup of the same point: the same data, in one file.
    [full] = build(repository, source, "full", 1, size, 0, tuning, work)
    log(f"restore: a chain of {len(chain)} backups, and a full of {full.bytes // MiB} MiB")
    expected = work / "expected.qcow2"
    run("cp", "--reflink=auto", str(source.path), str(expected))
    seconds: dict[str, list[float]] = {"chain": [], "full": []}
    warm_up = 1 if size.repeats > 1 else 0
    for n in range(warm_up + size.repeats):
        for name, manifest in turns(n, [("chain", chain[-1]), ("full", full)]):
            took = restore(repository, manifest, work / f"restored-{name}.raw", expected,
                           tuning)
            if n >= warm_up:
                seconds[name].append(took)
    for name, times in seconds.items():
        log(f"restore {name:5}: {statistics.median(times):.3f} s (median)")
    return seconds["chain"], seconds["full"], full.bytes


def main(work: Path, smoke: bool, output: Path | None) -> int:
    size = SMOKE_SIZE if smoke else FULL_SIZE
    # The repository's own log (every backup stored) would drown the benchmark's.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    tuning = stream.Tuning(buffers=stream.BufferPool(config.Stream().memory,
                                                     config.Stream().request_size))
    repository = Repository(work / "repository", work / "sockets",
                            config.Repository().write_behind)
    log(f"repository: {size.disk // MiB} MiB disk, {size.data // MiB} MiB of data, "
        f"{size.writes} writes of 64 KiB and a zeroed one per incremental")
    source = Source(work / "source.qcow2", size.disk)
    fill(source, size)
    chain, full, restored = measure_restore(repository, source, size, tuning, work)
    verify, verified = measure_verify(repository, source, size, tuning, work)
    results = Results(size.verify_chain, verified, verify, size.restore_chain, restored,
                      chain, full)
    # Verify's time scaled to the target's number of backups (the smoke run has few).
    scaled = results.verify_median * VERIFY_TARGET_BACKUPS / results.verify_backups
    verdict = {"verify_500_within_30_s": scaled <= VERIFY_TARGET,
               "restore_chain_within_1_2_full": results.restore_ratio <= RESTORE_RATIO_TARGET}
    print(f"{'case':28} {'median s':>9}")
    print(f"{f'verify {results.verify_backups} backups':28} {results.verify_median:9.3f}")
    print(f"{f'restore {results.restore_chain}-link chain':28} "
          f"{statistics.median(chain):9.3f}")
    print(f"{'restore full':28} {statistics.median(full):9.3f}")
    print(f"verify: {results.verify_median:.2f} s for {results.verify_backups} backups "
          f"(target: {VERIFY_TARGET_BACKUPS} in {VERIFY_TARGET:g} s); restore: the chain "
          f"takes {results.restore_ratio:.2f} x the full (target <= {RESTORE_RATIO_TARGET})")
    if output is not None:
        output.write_text(json.dumps({
            "machine": {"cpus": os.cpu_count(), "kernel": platform.release(),
                        "python": platform.python_version()},
            "size": asdict(size),
            "results": asdict(results) | {"verify_median": results.verify_median,
                                          "restore_ratio": results.restore_ratio},
            "targets_met": verdict,
        }, indent=2) + "\n")
        log(f"wrote {output}")
    return 0
