"""The embedded repository: backups streamed by pullbackd itself, kept as qcow2 chains.

    <root>/<domain>/<consumer>/<disk>/0001.qcow2    the full backup
                                      0002.qcow2    an incremental: backing file 0001.qcow2
                                      0001.json ... one manifest per backup
                             .domain/<checkpoint>/       the domain's own files of a
                                                         backup (domainfiles.py)

Each file is made and written through the repository's writer (writers.py: one
qemu-storage-daemon, an NBD export per file on a private Unix socket), so it stays
sparse and every point of the chain is an ordinary qcow2 that `qemu-img` reads
directly. A backup is written as `NNNN.qcow2.partial` and becomes `NNNN.qcow2`
only once every byte arrived; its manifest (job, checkpoint, time, bytes, and a
checksum of each region written) is written last, atomically. A file without
a manifest is not a backup.

Every name in it comes from names.py, every qemu-nbd from qemu_nbd.py.

Nothing outlives a crash. The kernel kills our qemu-nbd servers, the writer and a
Verify's qemu-storage-daemon when the daemon dies (see qemu_nbd.TIED), and
`Repository.recover`, run at start before anything is served, ends those that
escaped (orphans.py) (a daemon killed in the instant between starting one and tying it to
itself, or a daemon from before they were tied) and removes what a crash leaves:
after `recover()`, no NBD server of an earlier run serves a repository file, no
temporary file (`*.qcow2.partial`, `*.flat.partial`, `*.tmp`, domain files'
`*.partial` folders) exists, neither
does a backup file without its manifest (a commit or a prune cut short between
the two), and every manifest describes its file (a prune cut short between
replacing a file by its flattened copy and rewriting the manifest: rewritten).
At any instant, every backup with a manifest has its backing files' manifests too
(a prune removes the manifests of the backups it drops newest first).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import stat
import subprocess
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import nbd
import structlog

from . import crash, domainfiles, names, orphans, qcow2, qemu_nbd, stream, verifying, writers
from .durable import Moved, create_in, fsync, fsync_dir, makedirs, unlink_same, write_new
from .errors import InvalidParameter, NoBackup, NoSuchCheckpoint, RepositoryError
from .manifest import (
    CHECKSUM,
    CHECKSUMS,
    Manifest,
    Region,
    checksum,
    from_first_line,
    from_text,
    to_text,
)
from .names import Served
from .qsd import StorageDaemonError
from .uses import Uses
from .writebehind import WriteBehind, direct_io

log = structlog.get_logger()



def image_server(image: Path, fmt: str, sock: Path, *, writable: bool,
                 direct: bool = False) -> qemu_nbd.Server:
    """How the repository serves an image on `sock` (not started yet), tied to the
    thread that starts it: a restore's target; the benchmark serves its targets the same
    way. The writer (writers.py) opens the backups it writes with the same cache options.

    A writable image is written past the page cache (`--cache none`, O_DIRECT) where
    its filesystem allows it (`direct`, from `direct_io`): each byte is copied once
    less, and nothing is left for the kernel to write back later (with 16 domains
    backed up at once, a full backup took an eighth to a third less CPU time, as
    `scripts/bench --night` drives them). Elsewhere it is served with `--cache unsafe` and a
    `WriteBehind`, and qemu-nbd never flushes it: qcow2 flushes each time it adds an
    L2 table (every 512 MiB of disk touched) while it holds the image's lock, so
    every write would wait for the page cache to be written back. Either way its
    caller makes the file durable once (`fsync`) before it counts: a backup when it
    is committed, a restore before it is reported done. A file that a crash cut
    short counts for nothing (a partial backup is deleted, a restore was never
    reported done). Raises nothing.
    """
    cache = ("none" if direct else "unsafe") if writable else "writeback"
    return qemu_nbd.Server(image, fmt, sock, read_only=not writable, shared=16,
                           cache=cache, persistent=True, tied=True)



#: Whether a job is known not to have completed (it runs, or ended otherwise:
#: Jobs.did_not_complete). What it stored in the repository is no backup (yet).
Unfinished = Callable[[str], bool]


@dataclass
class Writer:
    """One backup file being written: a partial qcow2 the repository's writers serve."""

    manifest: Manifest
    folder: Path
    opened: writers.Opened
    behind: WriteBehind
    regions: list[Region] = field(default_factory=list)
    #: Whether it still counts as a use of its disk's backups (`Uses`).
    using: bool = True

    @property
    def url(self) -> str:
        return self.opened.url

    @property
    def cluster(self) -> int | None:
        """Bytes every write into it must cover whole (writers.py), if any: a file over a
        backing file is written with its backing chain shut."""
        return qcow2.CLUSTER if self.manifest.backing is not None else None

    @property
    def partial(self) -> Path:
        return names.partial(self.folder, self.manifest.sequence)



class Repository:
    def __init__(self, root: Path, sockets: Path, write_behind: int) -> None:
        self.root = root
        self._sockets = sockets
        self._write_behind = write_behind
        self._uses = Uses()
        #: What makes and serves the backup files being written.
        self.writers = writers.Writers(sockets)

    async def close(self) -> None:
        """At the daemon's stop, once no copy runs: the writers' process ends."""
        await self.writers.stop()

    def folder(self, domain: str, consumer: str, disk: str) -> Path:
        """A disk's folder; raises InvalidParameter for a name that would not stay a
        single folder inside the repository."""
        return names.disk_folder(self.root, domain, consumer, disk)

    def domain_folder(self, domain: str) -> Path:
        """Raises InvalidParameter as `folder` does."""
        return names.domain_folder(self.root, domain)

    def files_folder(self, domain: str, consumer: str, checkpoint: str) -> Path:
        return names.files_folder(self.root, domain, consumer, checkpoint)

    async def store_files(self, domain: str, consumer: str, checkpoint: str,
                          files: domainfiles.DomainFiles) -> None:
        """Keep the domain's files of a backup beside its disks (before they are committed:
        a backup is complete once its disks are)."""
        await anyio.to_thread.run_sync(
            domainfiles.save, self.files_folder(domain, consumer, checkpoint), files)

    def files_at(self, domain: str, consumer: str, checkpoint: str
                 ) -> domainfiles.DomainFiles | None:
        """The domain's files of the backup at `checkpoint`; None if it kept none (a
        backup from before pullbackd kept them). Raises RepositoryError if damaged."""
        folder = self.files_folder(domain, consumer, checkpoint)
        return domainfiles.load(folder) if folder.is_dir() else None

    def drop_files(self, domain: str, consumer: str, checkpoints: list[str]) -> None:
        """Remove the domain files of the backups at `checkpoints` (a prune dropped
        them) that no disk of theirs is kept of. Only theirs: a backup being written
        stores its domain files before its disks."""
        kept = _listed(names.consumer_folder(self.root, domain, consumer))
        for checkpoint in checkpoints:
            folder = self.files_folder(domain, consumer, checkpoint)
            if checkpoint not in kept and folder.is_dir():
                shutil.rmtree(folder)

    def verify_files(self, domain: str, consumer: str) -> list[str]:
        """What is damaged in the domain files of a consumer's backups."""
        return [p for folder in names.files_folders(names.consumer_folder(self.root, domain,
                                                                          consumer))
                if not folder.name.endswith(".partial") for p in domainfiles.verify(folder)]

    def recover(self) -> None:
        """Undo what a crash of an earlier run left, before anything is served
        (blocking: run it in a worker thread).

        Ends the NBD servers of an earlier run (qemu-nbd, and the qemu-storage-daemons
        of the writer and of Verify: SIGTERM; SIGKILL for any still there after
        orphans.ORPHAN_GRACE), then removes their sockets and the temporary files
        of backups, flattenings and manifests being written, and the domain files of
        backups a prune cut short dropped (`_drop_unlisted_files`). Only the daemon that owns
        the repository may call it: it ends every qemu-nbd serving on a socket in the
        repository's sockets folder. Raises RepositoryError if a server cannot be ended.
        """
        orphans.end(orphans.find(self._sockets))
        for sock in sorted(self._sockets.glob("*.sock")):
            log.warning("removing a stale socket", path=str(sock))
            sock.unlink(missing_ok=True)
        for leftover in names.every_leftover(self.root):
            log.warning("removing a leftover of a crash", path=str(leftover))
            leftover.unlink(missing_ok=True)
        for folder in names.every_files_folder(self.root):
            if folder.name.endswith(".partial"):
                log.warning("removing a leftover of a crash", path=str(folder))
                shutil.rmtree(folder)
        _mend_backups(self.root)
        _drop_unlisted_files(self.root)

    def manifests(self, domain: str, consumer: str, disk: str) -> list[Manifest]:
        return _manifests(self.folder(domain, consumer, disk))

    def at(self, domain: str, consumer: str, disk: str, checkpoint: str | None) -> Manifest:
        """The backup of a disk at a checkpoint (the newest without one, complete or not: a
        restore looks its backup up with `restorable`). Its manifests are read newest
        first, up to it: a backup starts from the newest, and a chain grows by one each
        night."""
        folder = self.folder(domain, consumer, disk)
        for path in reversed(names.manifests(folder) if folder.is_dir() else []):
            manifest = _read_manifest(path)
            if checkpoint is None or manifest.checkpoint == checkpoint:
                return manifest
        raise NoSuchCheckpoint(domain, consumer, checkpoint or "")

    async def begin(self, domain: str, consumer: str, disk: str, size: int, job: str,
                    checkpoint: str, created: str, base: Manifest | None,
                    disks: tuple[str, ...] = ()) -> Writer:
        """The file of `disk`'s backup at `checkpoint`, over `base`'s; `disks`: every disk
        the backup stores (Manifest.disks)."""
        folder = self.folder(domain, consumer, disk)
        self._uses.write(folder)  # until the commit or the abort
        try:
            return await self._begin(folder, domain, consumer, disk, size, job, checkpoint,
                                     created, base, disks)
        except BaseException:
            self._uses.written(folder)
            raise

    async def _begin(self, folder: Path, domain: str, consumer: str, disk: str, size: int,
                     job: str, checkpoint: str, created: str, base: Manifest | None,
                     disks: tuple[str, ...]) -> Writer:
        # Its backing file by a name relative to it, so the folder can move as a whole.
        backing = base.file if base else None
        sequence, direct = await anyio.to_thread.run_sync(self._new_file, domain, consumer,
                                                          disk, size, base)
        manifest = Manifest(sequence, domain, consumer, disk, job, checkpoint, created,
                            "incremental" if base else "full", size, backing, disks=disks)
        partial = names.partial(folder, sequence)
        behind = None
        try:
            behind = WriteBehind(partial, 0 if direct else self._write_behind)
            opened = await self.writers.open(partial, direct)
        except BaseException as e:
            with anyio.CancelScope(shield=True):  # an Abort as the file was being made
                if behind is not None:
                    await anyio.to_thread.run_sync(behind.close)
                await anyio.Path(partial).unlink(missing_ok=True)
            if isinstance(e, StorageDaemonError):
                raise RepositoryError(str(partial), str(e)) from None
            raise
        return Writer(manifest, folder, opened, behind)

    def _new_file(self, domain: str, consumer: str, disk: str, size: int,
                  base: Manifest | None) -> tuple[int, bool]:
        """The disk's next backup file, created exclusively as an empty qcow2 image of
        `size` bytes over the file of `base` (qcow2.py; the commit syncs it): its sequence
        number, and whether it takes O_DIRECT. Raises RepositoryError. Blocks."""
        folder = self.folder(domain, consumer, disk)
        makedirs(folder)  # on disk before the commit: the first backup of a disk is in it
        if base is not None:
            try:
                still = self.at(domain, consumer, disk, base.checkpoint).file == base.file
            except NoSuchCheckpoint:
                still = False
            if not still:
                raise RepositoryError(str(folder / base.file), (
                    "the backup this one builds on was pruned since the backup began: "
                    "start it again"))
        # Leftovers of a crash are not backups: nothing may build on them.
        for leftover in names.partials(folder):
            leftover.unlink()
        try:
            sequence = self.at(domain, consumer, disk, None).sequence + 1
        except NoSuchCheckpoint:
            sequence = 1
        partial = names.partial(folder, sequence)
        try:
            image = qcow2.empty(size, base.file if base else None)
        except qcow2.ImageError as e:
            raise RepositoryError(str(partial), str(e)) from None
        write_new(partial, image, 0o644, sync=False)
        return sequence, direct_io(partial)

    async def _serve(self, image: Path, fmt: str, served: Served, token: str,
                     writable: bool, direct: bool = False) -> qemu_nbd.Server:
        """`image` served by a qemu-nbd of ours (see `image_server`), on a socket in a folder
        only we can enter; raises RepositoryError if qemu-nbd does not serve it."""
        await _make_sockets_folder(self._sockets)
        sock = names.repository_socket(self._sockets, served, token)
        server = image_server(image, fmt, sock, writable=writable, direct=direct)
        try:
            # From the event loop's thread, so tied to the daemon's life (qemu_nbd.TIED).
            await server.astart()
        except qemu_nbd.ServeError as e:
            raise RepositoryError(str(e.image), e.reason) from None
        return server

    async def commit(self, writer: Writer) -> Manifest:
        """Every byte arrived: the partial file becomes a backup, its manifest last.
        Raises RepositoryError if the writer failed, or if a write covered part of a
        cluster of a file whose backing chain it did not open (writers.py)."""
        try:
            return await self._commit(writer)
        finally:
            self._done(writer)

    def _done(self, writer: Writer) -> None:
        """The writer no longer uses its disk's backups (once, however often called)."""
        if writer.using:
            writer.using = False
            self._uses.written(writer.folder)

    async def _commit(self, writer: Writer) -> Manifest:
        try:
            await self.writers.close(writer.opened)
        except StorageDaemonError as e:
            raise RepositoryError(str(writer.partial), str(e)) from None
        cluster, size = writer.cluster, writer.manifest.size
        if cluster is not None and (bad := next((
                r for r in writer.regions
                if not stream.in_whole_clusters(r.offset, r.length, cluster, size)), None)):
            raise RepositoryError(str(writer.partial), (
                f"BUG: {bad.length} bytes at {bad.offset} were written in part of a "
                f"{cluster}-byte cluster: the file is no backup"))
        regions = sorted(writer.regions, key=lambda r: r.offset)
        manifest = dataclasses.replace(writer.manifest, bytes=sum(r.length for r in regions))
        final = writer.folder / manifest.file
        await anyio.to_thread.run_sync(_store, writer, final, manifest, regions)
        log.info("backup stored", file=str(final), bytes=manifest.bytes, job=manifest.job)
        return manifest

    async def abort(self, writer: Writer) -> None:
        try:
            with contextlib.suppress(StorageDaemonError):  # then it closed every file it had
                await self.writers.close(writer.opened)
            await anyio.to_thread.run_sync(writer.behind.close)
            await anyio.Path(writer.partial).unlink(missing_ok=True)
        finally:
            self._done(writer)

    def stored_jobs(self) -> set[str]:
        """The ids of every job with a backup in the repository (`_stored_jobs`)."""
        return _stored_jobs(self.root)

    def forget_job(self, domain: str, consumer: str, job: str) -> None:
        """Remove what a job that did not complete stored: no backup may point to a
        checkpoint that is not in the chain."""
        consumer_dir = names.consumer_folder(self.root, domain, consumer)
        if not consumer_dir.is_dir():
            return
        for folder in names.files_folders(consumer_dir):
            if names.of_job(folder.name.removesuffix(".partial"), job):
                log.info("removing stored domain files of a failed job", job=job)
                shutil.rmtree(folder)
        for folder in names.disk_folders(consumer_dir):
            for m in self.manifests(domain, consumer, folder.name):
                if m.job == job:
                    log.info("removing stored backup of a failed job", file=m.file, job=job)
                    names.manifest(folder, m.sequence).unlink(missing_ok=True)
                    fsync_dir(folder)  # never a manifest without its file
                    (folder / m.file).unlink(missing_ok=True)

    async def prune(self, domain: str, consumer: str, disk: str, keep: int) -> list[Manifest]:
        """Keep the newest `keep` backups of a disk, dropping the older ones
        (`prune_disks`)."""
        return await self.prune_disks(domain, [(consumer, disk)], keep)

    async def prune_disks(self, domain: str, disks: list[tuple[str, str]], keep: int
                          ) -> list[Manifest]:
        """Keep the newest `keep` backups of each of the domain's `disks` ((consumer, disk)
        pairs, each once), dropping the older ones; the backups dropped, disk after disk.

        Nothing is dropped until every disk's backups are the prune's alone (Uses:
        RepositoryError if one is in use) and verified (RepositoryError naming the first
        damage, "nothing pruned": none of them changed). Crash-safe at every step:
        each kept backup whose backing file is to go is first flattened into a
        standalone file that replaces it atomically (same point in time, so it
        restores the same), then its manifest is rewritten; only then are the old
        manifests removed, newest first, and after them their files.
        """
        folders = [self.folder(domain, consumer, disk) for consumer, disk in disks]
        with contextlib.ExitStack() as pruning:
            for folder in folders:
                pruning.enter_context(self._uses.pruning(folder))
            older = []
            for folder, (consumer, disk) in zip(folders, disks, strict=True):
                manifests = await anyio.to_thread.run_sync(self.manifests, domain, consumer,
                                                           disk)
                if len(manifests) <= keep:
                    continue
                if problems := await self._verify(*manifests):
                    # Never fold damaged data into the backups that stay; and no disk's
                    # backups go while another's are in doubt.
                    raise RepositoryError(str(folder),
                                          f"verify failed, nothing pruned: {problems[0]}")
                older.append((folder, manifests))
            dropped: list[Manifest] = []
            for folder, manifests in older:
                dropped += await self._drop_older(folder, manifests, keep)
            return dropped

    async def _drop_older(self, folder: Path, manifests: list[Manifest], keep: int
                          ) -> list[Manifest]:
        """Drop all but the newest `keep` of a disk's verified backups `manifests`."""
        dropped, kept = manifests[:-keep], manifests[-keep:]
        kept_files = {m.file for m in kept}
        for m in kept:
            if m.backing is not None and m.backing not in kept_files:
                await self._flatten(folder, m)
        await anyio.to_thread.run_sync(_drop, folder, dropped)
        log.info("pruned backups", folder=str(folder), dropped=[m.checkpoint for m in dropped])
        return dropped

    async def _flatten(self, folder: Path, m: Manifest) -> None:
        flat = names.flat_partial(folder, m.sequence)
        # qemu-img creates it, following a symlink there: none may be left in the way.
        await anyio.Path(flat).unlink(missing_ok=True)
        await _run(folder / m.file, "qemu-img", "convert", "-t", "writeback", "-f", "qcow2",
                   "-O", "qcow2", str(folder / m.file), str(flat))
        regions = await anyio.to_thread.run_sync(_scan, flat)
        await anyio.to_thread.run_sync(_durable_rename, flat, folder / m.file)
        crash.point("prune.flattened")
        await anyio.to_thread.run_sync(
            _durable_write, names.manifest(folder, m.sequence), _flattened(m, regions))
        crash.point("prune.manifest")

    async def restore(self, manifest: Manifest, to: Path, fmt: str,
                      tuning: stream.Tuning | None = None) -> os.stat_result:
        """Rebuild the disk as it was at a backup into a new file, with the engine; the
        file made (its identity: what removes it checks it still is).

        The new image (written through a qemu-nbd of ours) starts as zeroes. The
        backup's chain is read in segments of consecutive files, newest first
        (verifying.segment_server: QEMU reads each through its own files): from each,
        what its files hold that no newer segment holds. That is what a read through
        the whole chain finds there, without a lookup through every file below for
        each request of a long chain. What no file holds stays zeroes, as do the
        zeroes a file holds.
        """
        with self._uses.using(self.folder(manifest.domain, manifest.consumer,
                                          manifest.disk)):
            return await self._restore(manifest, to, fmt, tuning)

    async def _restore(self, manifest: Manifest, to: Path, fmt: str,
                       tuning: stream.Tuning | None) -> os.stat_result:
        layers = await anyio.to_thread.run_sync(_chain, self.folder(
            manifest.domain, manifest.consumer, manifest.disk), manifest)
        fd = await anyio.to_thread.run_sync(_create_target, to)
        # From here on the file is reached through its descriptor, never by its name: the
        # folder may be a user's, who could swap the name for a link to any file.
        image = Path(f"/proc/{os.getpid()}/fd/{fd}")
        try:
            await _run(to, "qemu-img", "create", "-q", "-f", fmt, str(image), str(manifest.size))
            token = names.socket_token()
            # Undone in reverse, each shielded: the images must be closed, the
            # write-behind's thread must end, before the file is synced (or deleted).
            async with contextlib.AsyncExitStack() as undo:
                direct = await anyio.to_thread.run_sync(direct_io, fd)
                behind = WriteBehind(image, 0 if direct else self._write_behind)
                undo.push_async_callback(_shielded, anyio.to_thread.run_sync, behind.close)
                writer = await self._serve(image, fmt, Served.RESTORE_TARGET, token,
                                           writable=True, direct=direct)
                undo.push_async_callback(writer.astop)
                # The folder of its socket is the target's (made by `_serve`).
                await _fill(layers, writer.url, names.repository_socket(
                    self._sockets, Served.RESTORE_SOURCE, token), tuning, behind)
            await anyio.to_thread.run_sync(fsync, fd)
            await anyio.to_thread.run_sync(fsync_dir, to.parent)  # its name too, once done
            return os.fstat(fd)
        except BaseException:
            with anyio.CancelScope(shield=True):  # half a restore is no restore
                await anyio.to_thread.run_sync(unlink_same, to, os.fstat(fd))
            raise
        finally:
            os.close(fd)

    async def verify_disk(self, domain: str, consumer: str, disk: str
                          ) -> tuple[int, list[str]]:
        """`verify` every backup of a disk: how many there are, and the problems. They
        are looked up once the disk's backups are Verify's to read (a prune is not
        dropping them)."""
        with self._uses.using(self.folder(domain, consumer, disk)):
            manifests = await anyio.to_thread.run_sync(self.manifests, domain, consumer, disk)
            return len(manifests), await self._verify(*manifests) if manifests else []

    async def verify(self, *manifests: Manifest) -> list[str]:
        """Re-read every region the backups `manifests` (of one disk: their files' names
        differ) wrote, each from its own file (verifying.py), and return what does not
        match: their problems, in their order. Their files are served by one
        qemu-storage-daemon (FILES_PER_SERVER at a time); a file QEMU cannot open is a
        problem. Raises RepositoryError if a file is not ours, or cannot be read at all,
        or no server starts."""
        if not manifests:
            return []
        m = manifests[0]
        with self._uses.using(self.folder(m.domain, m.consumer, m.disk)):
            return await self._verify(*manifests)

    async def _verify(self, *manifests: Manifest) -> list[str]:
        folder = self.folder(manifests[0].domain, manifests[0].consumer, manifests[0].disk)
        unfit = await anyio.to_thread.run_sync(
            lambda: [_unverifiable(folder, m) for m in manifests])
        problems = {i: [f"{m.file}: {why}"] for i, (m, why) in enumerate(
            zip(manifests, unfit, strict=True)) if why is not None}
        known = [i for i in range(len(manifests)) if i not in problems]
        for start in range(0, len(known), verifying.FILES_PER_SERVER):
            batch = known[start:start + verifying.FILES_PER_SERVER]
            # Their regions read now, a batch's at a time: a manifest's may be millions.
            expected = await anyio.to_thread.run_sync(
                _expected, folder, [manifests[i] for i in batch])
            problems |= {i: [why] for i, why in zip(batch, expected, strict=True)
                         if isinstance(why, str)}
            readable = [(i, e) for i, e in zip(batch, expected, strict=True)
                        if not isinstance(e, str)]
            found = await _check(self._sockets, [e for _, e in readable]) if readable else []
            problems |= dict(zip([i for i, _ in readable], found, strict=True))
        return [p for i in range(len(manifests)) for p in problems[i]]



async def _check(sockets: Path, expected: list[verifying.Expected]) -> list[list[str]]:
    """verifying.check, with its server on a socket of ours in `sockets` (see
    `Repository._serve`)."""
    await _make_sockets_folder(sockets)
    sock = names.repository_socket(sockets, Served.VERIFY, names.socket_token())
    server = verifying.server([e.file for e in expected], sock)
    try:
        # From the event loop's thread, so tied to the daemon's life (qemu_nbd.TIED).
        await server.astart()
    except qemu_nbd.ServeError as e:
        # Its --blockdev, quoted: the file's name ends a JSON string there.
        if not any(f'/{one.file.name}"' in e.reason for one in expected):
            raise RepositoryError(str(e.image), e.reason) from None
        if len(expected) == 1:
            return [[f"{expected[0].file.name}: QEMU cannot open it ({e.reason}); "
                     "restore a backup before it, or one whose chain does not hold it"]]
        # A file of the batch QEMU cannot open: each on its own, which finds which,
        # and the others are checked all the same.
        return [(await _check(sockets, [one]))[0] for one in expected]
    try:
        return await anyio.to_thread.run_sync(verifying.check, sock, expected)
    except nbd.Error as e:
        raise RepositoryError(str(expected[0].file.parent), str(e)) from None
    finally:
        await server.astop()


async def _make_sockets_folder(sockets: Path) -> None:
    """The folder of our servers' sockets, which only we may enter."""
    await anyio.Path(sockets).mkdir(mode=0o700, parents=True, exist_ok=True)
    await anyio.Path(sockets).chmod(0o700)


def regions(repository: Repository, manifest: Manifest) -> tuple[Region, ...]:
    """What backup `manifest` of `repository` wrote, from its manifest (RepositoryError if
    damaged, or no longer that backup's). Blocks."""
    return _read_regions(repository.folder(manifest.domain, manifest.consumer, manifest.disk),
                         manifest)


def restorable(repository: Repository, domain: str, consumer: str, at: str | None,
               unfinished: Unfinished, disk: str | None = None) -> dict[str, Manifest]:
    """What a restore reads from `repository`: each disk's backup (`disk`'s alone, if
    named) at checkpoint `at`, or without one at the newest complete backup's (by
    `created`). Blocks.

    A backup is complete once its job completed (jobs.py): its disks are committed one
    after another, and a job that fails between two has what it stored removed only
    as it ends. So the files of a job `unfinished` names are left out: a restore while
    a backup is being committed, or before a failed one's files are gone, takes the
    backup before it, every disk as it was then (the newest manifest's checkpoint
    restored the disks committed so far and "dropped" the others). A job the daemon
    no longer knows completed: one that did not left nothing. `unfinished` is
    called in this worker thread (Jobs.did_not_complete only looks a record up).
    Nor is the newest one that lacks a disk its manifests name (`whole`): one cut
    short between two disks' commits by a crash whose job the daemon no longer
    knows (its database lost, or moved aside as damaged).

    Raises NoBackup (no complete backup), NoSuchCheckpoint (none at `at`),
    InvalidParameter (a name that is no folder's), RepositoryError (a manifest
    that cannot be read)."""
    if disk is not None:
        repository.folder(domain, consumer, disk)  # InvalidParameter if it is no folder's
    consumer_dir = names.consumer_folder(repository.root, domain, consumer)
    every_chain = {f.name: [m for m in _manifests(f) if not unfinished(m.job)]
                   for f in (names.disk_folders(consumer_dir) if consumer_dir.is_dir()
                             else [])}
    stored: dict[str, set[str]] = {}
    for m in (m for chain in every_chain.values() for m in chain):
        stored.setdefault(m.checkpoint, set()).add(m.disk)

    def whole(m: Manifest) -> bool:
        return set(m.disks) <= stored[m.checkpoint]

    chains = {d: chain for d, chain in every_chain.items() if disk in (None, d)}
    if at is None:
        every = sorted((m for chain in chains.values() for m in chain if whole(m)),
                       key=lambda m: m.created)
        if not every:
            raise NoBackup(domain, consumer, disk)
        at = every[-1].checkpoint
    found = {d: m for d, chain in chains.items() for m in chain if m.checkpoint == at}
    if not found:
        raise NoSuchCheckpoint(domain, consumer, at)
    return found


def _chain(folder: Path, manifest: Manifest) -> list[tuple[Path, int]]:
    """The files a backup in `folder` reads through, newest first, each with its disk's
    size (those of its manifest and of the manifests of its backing files); raises
    RepositoryError if one is missing or not ours. Blocks.

    Each file's backing file is the one its own header names, not its manifest's
    `backing`: the file is what a read finds, and a prune cut short between
    replacing a file by its flattened copy and rewriting its manifest leaves a
    manifest naming a backing file the file no longer reads through (its zeroes
    would be filled from there)."""
    backups = {m.file: m for m in _manifests(folder)}
    if backups.get(manifest.file) != manifest:
        raise RepositoryError(str(folder / manifest.file), (
            "this backup changed since it was looked up (a prune dropped it, or merged "
            "older ones into it); look it up and restore again"))
    chain: list[tuple[Path, int]] = []
    m: Manifest | None = manifest
    while m is not None:
        path = owned(folder / m.file)
        if any(path == p for p, _ in chain):
            raise RepositoryError(str(path), "its backing chain loops back to it")
        chain.append((path, m.size))
        backing = _backing(path, m)
        if backing is not None and backing not in backups:
            raise RepositoryError(str(folder / backing), "missing: the backing file "
                                                         f"of {m.file} has no manifest")
        m = backups[backing] if backing is not None else None
    return chain


def _expected(folder: Path, manifests: list[Manifest]) -> list[verifying.Expected | str]:
    """What the file of each backup in `folder` must hold (its manifest's regions), or
    the problem of one whose manifest cannot tell (damaged, or no longer the one looked
    up). Blocks."""
    expected: list[verifying.Expected | str] = []
    for m in manifests:
        try:
            regions = _read_regions(folder, m)
        except RepositoryError as e:
            expected.append(f"{m.file}: {e.parameters['reason']}")
            continue
        expected.append(verifying.Expected(
            owned(folder / m.file), [(r.offset, r.length, r.checksum) for r in regions],
            CHECKSUMS[m.checksums], backed=m.backing is not None, size=m.size))
    return expected


def _stored_jobs(root: Path) -> set[str]:
    """The ids of every job with a backup under `root`. A manifest that cannot be read is
    left out, and logged (Verify reports it): at start, one damaged file must not keep
    the daemon from serving. Blocks."""
    jobs = set()
    for path in names.every_manifest(root):
        try:
            jobs.add(_read_manifest(path).job)
        except RepositoryError as e:
            log.error("a backup's manifest cannot be read", error=str(e))
    return jobs


def _mend_backups(root: Path) -> None:
    """At start: a backup file without its manifest (a commit cut short: the manifest
    comes last; a prune cut short: it removes the manifests first, newest first) is
    removed, unless backups after it build on it (no crash leaves that; damage does:
    what they need stays). A prune cut short is followed through
    (`_follow_flattened`). Blocks."""
    backed_on: dict[Path, set[str]] = {}
    for image in names.every_backup(root):
        if names.manifest_of(image).exists():
            _follow_flattened(image)
            continue
        if image.parent not in backed_on:
            backed_on[image.parent] = _backing_files(image.parent)
        if image.name in backed_on[image.parent]:
            log.error("a backup file has lost its manifest, and backups after it build "
                      "on it: kept; restore a backup before it, or move the disk's folder "
                      "out of the repository", path=str(image))
        else:
            log.warning("removing a backup file without its manifest", path=str(image))
            image.unlink(missing_ok=True)


def _drop_unlisted_files(root: Path) -> None:
    """At start, once the backups are mended: the domain files of a checkpoint no disk's
    backup is listed at any more (a prune cut short after it dropped the disks' backups,
    before their files: `drop_files`) are removed. At start only: a backup being written
    stores its domain files before its disks, and none is being written then. Blocks."""
    for consumer_dir in names.consumers_with_files(root):
        try:
            listed = {names.checkpoint_files(consumer_dir, c) for c in _listed(consumer_dir)}
        except RepositoryError:  # a manifest that cannot be read: which files it needs is
            continue             # unknown (Verify reports it)
        for folder in names.files_folders(consumer_dir):
            if folder not in listed:
                log.warning("removing the domain files of a backup no disk is kept of (a "
                            "prune cut short)", path=str(folder))
                shutil.rmtree(folder)


def _listed(consumer_dir: Path) -> set[str]:
    """The checkpoints a backup of some disk of a consumer is listed at (RepositoryError if
    a manifest cannot be read). Blocks."""
    return {m.checkpoint for disk in names.disk_folders(consumer_dir) for m in _manifests(disk)}


def _unverifiable(folder: Path, m: Manifest) -> str | None:
    """Why the backup `m` in `folder` cannot be checked, if it cannot: how it links to the
    one before it (its header names another, `_backing`; that one has no manifest), or
    checksums of a kind a newer pullbackd wrote. Blocks."""
    try:
        _backing(folder / m.file, m)
    except RepositoryError as e:
        return str(e.parameters["reason"])
    if m.backing is not None and not names.manifest_of(folder / m.backing).exists():
        return (f"its backing file {m.backing} has no manifest: it cannot be restored; "
                "restore a backup before it")
    if m.checksums not in CHECKSUMS:
        return f"cannot check checksums of kind {m.checksums!r}"
    return None


def _backing_files(folder: Path) -> set[str]:
    """The backing files the headers of a disk folder's backups (those with a manifest)
    name. Blocks."""
    found = set()
    for image in sorted(folder.glob(names.BACKUPS)):
        if names.manifest_of(image).exists():
            with contextlib.suppress(OSError, qcow2.ImageError):
                if (backing := qcow2.backing_file(image)) is not None:
                    found.add(backing)
    return found


def _backing(path: Path, m: Manifest) -> str | None:
    """The backing file the header of `path` (the file of `m`) names: `m`'s own, or none
    (a prune cut short, see `_chain`); RepositoryError if another (a damaged header:
    one bit turns 0003.qcow2 into 0001.qcow2, and a read would find another backup's
    data) or if it cannot be read."""
    try:
        backing = qcow2.backing_file(path)
    except (OSError, qcow2.ImageError) as e:
        raise RepositoryError(str(path), f"cannot read its header: {e}") from None
    if backing not in (None, m.backing):
        raise RepositoryError(str(path), (
            f"its header names {backing} as its backing file, its manifest {m.backing}: "
            "the file is damaged; restore a backup before it, or one whose chain does not "
            "hold it"))
    return backing


async def _fill(layers: list[tuple[Path, int]], destination: str, sock: Path,
                tuning: stream.Tuning | None, behind: WriteBehind) -> None:
    """Copy what a read of `layers[0]` through its chain finds into `destination`
    (zeroes at first), the chain's segments newest first (see `Repository.restore`),
    each served on `sock` (its folder made)."""
    covered: stream.Ranges = []  # what newer segments hold
    visible = layers[0][1]  # a backing file shows only as far as every newer file goes
    done = 0

    def progress(p: stream.Progress) -> None:
        # Made directly: dataclasses.replace, at every request's end, was a twentieth of
        # a restore's Python.
        behind.progress(stream.Progress(p.size, p.scanned, p.planned, done + p.done))

    for start in range(0, len(layers), verifying.FILES_PER_SEGMENT):
        segment = layers[start:start + verifying.FILES_PER_SEGMENT]
        top = segment[0][0]
        # QEMU reads the segment through its own files as far as each goes (qcow2's
        # rule, which `visible` keeps between segments).
        visible = min(visible, segment[0][1])
        server = verifying.segment_server([path for path, _ in segment], sock)
        try:
            await server.astart()  # from the event loop's thread: tied (qemu_nbd.TIED)
        except qemu_nbd.ServeError as e:
            raise RepositoryError(str(e.image), e.reason) from None
        try:
            # Served without what is below it, what the segment's files do not hold
            # reads as zeroes, which the copy skips.
            if todo := verifying.subtract([(0, visible)], covered):
                copied = await stream.stream(
                    verifying.url(sock, top.name), destination, zeroed_destination=True,
                    tuning=tuning, on_progress=progress, only=todo)
                done += copied.done
            if start + len(segment) < len(layers):  # what it holds hides older segments
                held = await anyio.to_thread.run_sync(verifying.held, sock, top.name,
                                                      visible)
                covered = verifying.union(covered, held)
        finally:
            await server.astop()
        visible = min(visible, *(size for _, size in segment))


def owned(path: Path) -> Path:
    """`path`, if it is a regular file of ours (not a link, not someone else's file that
    found its way in); RepositoryError if not. What pullbackd reads and hands on
    must be what it wrote."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        raise RepositoryError(str(path), "missing: the repository lost this file") from None
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
        raise RepositoryError(str(path), "not a file pullbackd wrote (a link, or another "
                                         "user's); move it out of the repository")
    return path


def _drop(folder: Path, dropped: list[Manifest]) -> None:
    """Manifests first: a file without one is no backup, so a crash between is harmless.
    Newest first, each gone for good before the next: a crash between two leaves the older
    ones listed, each with the manifests of its backing files (oldest first, it left a
    backup listed over a file that was no backup: it could not be restored, and Verify
    and every later Prune refused it)."""
    for m in reversed(dropped):
        names.manifest(folder, m.sequence).unlink()
        fsync_dir(folder)
        crash.point("prune.unlinked")
    crash.point("prune.dropping")
    for m in dropped:
        (folder / m.file).unlink(missing_ok=True)


def _scan(image: Path) -> tuple[Region, ...]:
    """Checksums of what a standalone image holds, region by allocated region."""
    mapping = json.loads(subprocess.run(
        ["qemu-img", "map", "--output=json", "-f", "qcow2", str(image)],
        check=True, capture_output=True, text=True).stdout)
    regions = []
    with qemu_nbd.connect(image, "qcow2") as h:
        for extent in mapping:
            if not extent["present"]:
                continue
            start, length = extent["start"], extent["length"]
            if extent["zero"]:
                regions.append(Region(start, length, None))
                continue
            for offset in range(start, start + length, SCAN_CHUNK):
                n = min(SCAN_CHUNK, start + length - offset)
                regions.append(Region(offset, n, checksum(h.pread(n, offset))))
    return tuple(regions)


#: Bytes per checksummed region when rescanning a flattened file.
SCAN_CHUNK = 4 << 20


def _flattened(m: Manifest, regions: tuple[Region, ...]) -> str:
    """The manifest of backup `m` once flattened into a standalone file holding `regions`."""
    return to_text(dataclasses.replace(
        m, backing=None, mode="full", bytes=sum(r.length for r in regions),
        checksums=CHECKSUM), regions)


def _follow_flattened(image: Path) -> None:
    """If `image` stands alone while its manifest names a backing file (a prune was cut
    short after it flattened the file), rewrite the manifest as the prune would have."""
    try:
        if qcow2.backing_file(image) is not None:
            return
        m = _read_manifest(names.manifest_of(image))
    except (OSError, qcow2.ImageError, RepositoryError, ValueError, KeyError):
        return  # not ours to mend: Verify and Restore tell what is wrong with it
    if m.backing is None:
        return
    log.warning("rewriting the manifest of a backup a prune cut short had flattened",
                path=str(image))
    _durable_write(names.manifest_of(image), _flattened(m, _scan(image)))


def _manifests(folder: Path) -> list[Manifest]:
    """The backups of a disk folder (none if there is no such folder), oldest first."""
    return [_read_manifest(p) for p in names.manifests(folder)]


def _create_target(to: Path) -> int:
    """A new file at `to` (in its real folder: the caller checked where that is), and its
    descriptor: never one that exists, never through a link, not even on the way to its
    folder (a link swapped in after the check)."""
    try:
        return create_in(to.parent, to.name)
    except FileExistsError:
        raise InvalidParameter("to", "exists; restore never overwrites a file") from None
    except Moved:
        raise InvalidParameter("to", "its folder moved as the restore began (a link "
                                     "on its way); restore again") from None
    except OSError as e:
        raise InvalidParameter("to", f"cannot be created: {e.strerror}") from None


def _read_manifest(path: Path) -> Manifest:
    """A manifest of the repository, from its first line alone (`manifest.from_first_line`; a
    manifest of an earlier layout whole); RepositoryError if it is not one of ours, or
    damaged."""
    owned(path)
    with _damaged(path), path.open(encoding="utf-8") as f:
        first = f.readline()
        try:
            return from_first_line(first)
        except ValueError:
            return from_text(first + f.read())[0]


def _read_regions(folder: Path, m: Manifest) -> tuple[Region, ...]:
    """The regions of backup `m` in `folder`, read whole from its manifest;
    RepositoryError if damaged, or if the manifest is no longer `m`'s (a prune
    flattened it since it was looked up)."""
    path = owned(names.manifest(folder, m.sequence))
    with _damaged(path):
        now, regions = from_text(path.read_text(encoding="utf-8"))
    if now != m:
        raise RepositoryError(str(path), "this backup changed since it was looked up (a "
                                         "prune merged older ones into it); verify again")
    return regions


@contextlib.contextmanager
def _damaged(path: Path) -> Iterator[None]:
    """What a manifest that cannot be parsed raises."""
    try:
        yield
    except (ValueError, TypeError, KeyError) as e:  # JSONDecodeError is a ValueError
        raise RepositoryError(str(path), (
            f"damaged manifest ({type(e).__name__}: {e}): move it and its backup file out "
            "of the repository; the backups of this disk after it are then left out "
            "too")) from None


def _store(writer: Writer, final: Path, manifest: Manifest, regions: list[Region]) -> None:
    """A written backup file becomes `final`, then its manifest is written. Blocks."""
    writer.behind.close()
    _durable_rename(writer.partial, final)
    crash.point("commit.renamed")
    _durable_write(names.manifest(writer.folder, manifest.sequence),
                   to_text(manifest, regions))


def _durable_rename(src: Path, dst: Path) -> None:
    fsync(src)
    os.replace(src, dst)
    fsync_dir(dst.parent)


def _durable_write(path: Path, text: str) -> None:
    tmp = names.temporary(path)
    tmp.unlink(missing_ok=True)  # a crash's leftover (or anything planted: never followed)
    write_new(tmp, text.encode())
    os.replace(tmp, path)
    fsync_dir(path.parent)


async def _run(path: Path, *command: str) -> None:
    """Run `command` on the file `path`; RepositoryError naming it if it fails."""
    result = await anyio.run_process(list(command), check=False)
    if result.returncode != 0:
        raise RepositoryError(str(path), result.stderr.decode(errors="replace").strip()
                              or f"{command[0]} failed")



async def _shielded(fn: Callable[..., Awaitable[object]], *args: Any) -> None:
    with anyio.CancelScope(shield=True):
        await fn(*args)
