"""Every name and path pullbackd derives, in one place.

A job's files are named after its id alone, so that they can be found again from
the state database (or from libvirt's word) after a crash:

    <exports>/<id>.sock                 the job's endpoint, for appliances (exports.py)
    <exports>/.qemu/<id>.sock           QEMU's NBD server for the job
    <scratch>/<id>.<disk>.qcow2         a pull job's scratch file, one per disk
    <target_dir>/<id>.<disk>.qcow2      a push job's target, one per disk
    pullbackd.<consumer>.<id>           the job's checkpoint
    <id>.listen, <id>.<session>.client, <id>.<session>.qemu
                                        its sockets in systemd's fd store (exports.py)

Nothing else ever uses these names: whatever matches them and belongs to no
running job is a leftover of ours (recovery removes it).

The embedded repository (repository.py) keeps a folder per domain, consumer and
disk, each name checked to stay one folder (`component`):

    <root>/<domain>/<consumer>/<disk>/0001.qcow2    a backup (0002.qcow2 is backed by it)
                                      0001.json     its manifest: without it, no backup
                                      0001.qcow2.partial        a backup being written
                                      0001.qcow2.flat.partial   a backup being flattened
                                      0001.tmp      a manifest being written
    <exports>/.repository/w-<token>.sock            qemu-nbd writing a backup
    <exports>/.repository/r-<token>.src.sock        qemu-storage-daemon serving a restore's chain
    <exports>/.repository/r-<token>.dst.sock        qemu-nbd writing a restore's new file
    <exports>/.repository/v-<token>.sock            qemu-storage-daemon serving a Verify's files

The last three kinds of file are what a crash leaves (`LEFTOVERS`); the sockets
are those of NBD servers of ours.

A Unix socket's path must fit in `sockaddr_un.sun_path` (108 bytes with its
NUL); `Layout.check` refuses an exports folder whose longest socket would not
(`Layout.longest_socket`, derived from the functions that name them), so that
the configuration fails at start rather than every backup or restore later.
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from .errors import InvalidParameter

#: A job id: 12 lowercase hex digits (`new_job_id`).
JOB_ID = re.compile(r"[0-9a-f]{12}")
#: A consumer's name, and the default one.
CONSUMER = re.compile(r"[a-z0-9_-]{1,32}")
DEFAULT_CONSUMER = "default"
#: Every checkpoint of ours starts with it.
PREFIX = "pullbackd."
#: `sun_path` holds 108 bytes, and C code (libvirt's among it) wants a NUL in them.
#: qemu-nbd 7.2 and libnbd 1.14 take 108 without the NUL (measured); 107 fits all.
MAX_SOCKET_PATH = 107
#: The state database in [state] dir.
DATABASE = "state.db"
#: The control socket's name among the descriptors systemd passes (pullbackd.socket's
#: FileDescriptorName=); the fd store's names are fd_listener's and fd_session's.
CONTROL_FD = "control"


def new_job_id() -> str:
    """A fresh job id (the caller makes sure no job has it yet)."""
    return secrets.token_hex(6)


def checkpoint_name(consumer: str, job_id: str) -> str:
    return f"{PREFIX}{consumer}.{job_id}"


def of_job(checkpoint: str, job_id: str) -> bool:
    """Whether a checkpoint's name says it is ours, of the job `job_id`."""
    return checkpoint.startswith(PREFIX) and checkpoint.endswith(f".{job_id}")


def consumer_of(checkpoint: str, job_id: str) -> str | None:
    """The consumer a checkpoint of the job `job_id` names, if it names a valid one."""
    consumer = checkpoint[len(PREFIX):-len(job_id) - 1]
    return consumer if of_job(checkpoint, job_id) and CONSUMER.fullmatch(consumer) else None


def export_token() -> str:
    """What makes a job's export names unguessable: on a TCP endpoint shared by every
    job, the name is what selects a job's disk."""
    return secrets.token_hex(16)


def job_file(folder: Path, job_id: str, disk: str) -> Path:
    """A job's file for one disk: a scratch file, or a push target."""
    return folder / f"{job_id}.{disk}.qcow2"


def job_files(folder: Path, job_id: str) -> Iterator[Path]:
    """The job's files for all its disks, as they are now."""
    return folder.glob(f"{job_id}.*.qcow2")


def job_of(path: Path) -> str:
    """The id of the job a file of ours (socket, scratch file) belongs to."""
    return path.name.split(".")[0]


def backup_bitmap(disk: str) -> str:
    """The temporary bitmap a shut-off domain's incremental disk is exported with (qsd.py):
    the name libvirt gives QEMU's own, so appliances see one meta context either way."""
    return f"backup-{disk}"


def fd_listener(job_id: str) -> str:
    """The name in systemd's fd store of the job's endpoint's listening socket."""
    return f"{job_id}.listen"


def fd_session(job_id: str, session: int) -> tuple[str, str]:
    """The names in systemd's fd store of a session's client and QEMU sockets."""
    return f"{job_id}.{session}.client", f"{job_id}.{session}.qemu"


def endpoint(exports: Path, job_id: str) -> Path:
    """The job's endpoint, where appliances connect."""
    return exports / f"{job_id}.sock"


def qemu_folder(exports: Path) -> Path:
    """QEMU's sockets: a folder for QEMU and us alone."""
    return exports / ".qemu"


def qemu_socket(exports: Path, job_id: str) -> Path:
    """Where QEMU's NBD server for the job listens."""
    return qemu_folder(exports) / f"{job_id}.sock"


def qsd_monitor(exports: Path, job_id: str) -> Path:
    """The QMP socket of the qemu-storage-daemon serving a shut-off domain's job."""
    return qemu_folder(exports) / f"{job_id}.qmp"


def qsd_pidfile(exports: Path, job_id: str) -> Path:
    """Its PID file: how a later run of pullbackd finds it."""
    return qemu_folder(exports) / f"{job_id}.pid"


def repository_sockets(exports: Path) -> Path:
    """The repository's qemu-nbd sockets: a folder for us alone."""
    return exports / ".repository"


class Served(Enum):
    """What an NBD server of the repository serves; the value names its socket."""

    #: The backups being written (writers.py), each an export of its own; the server's
    #: QMP monitor is `WRITER_MONITOR`.
    BACKUP = "w-{token}.sock"
    #: The chain's files a restore reads (a segment at a time, verifying.py), and the new
    #: file it writes (the same token).
    RESTORE_SOURCE = "r-{token}.src.sock"
    RESTORE_TARGET = "r-{token}.dst.sock"
    #: Backup files a Verify reads, each on its own (verifying.py).
    VERIFY = "v-{token}.sock"


#: Random bytes in a repository socket's name: unique among the few served at once.
#: Short: socket paths end at MAX_SOCKET_PATH.
SOCKET_TOKEN_BYTES = 4


def socket_token() -> str:
    """A fresh token for `repository_socket` (one for both sockets of a restore)."""
    return secrets.token_hex(SOCKET_TOKEN_BYTES)


#: The QMP monitor of the server of backups being written (a socket: `recover` removes it).
WRITER_MONITOR = "w-{token}.qmp.sock"


def writer_monitor(folder: Path, token: str) -> Path:
    """The QMP socket in `folder` (`repository_sockets`) of the writers' server."""
    return folder / WRITER_MONITOR.format(token=token)


def repository_socket(folder: Path, served: Served, token: str) -> Path:
    """The socket in `folder` (`repository_sockets`) of the qemu-nbd serving `served`."""
    return folder / served.value.format(token=token)


def component(parameter: str, name: str) -> str:
    """`name` if it is one path component that stays inside its folder (names come
    from clients: "../../etc" must never become a path); raises InvalidParameter
    naming `parameter` if not."""
    if not name or len(name.encode()) > 255 or "/" in name or "\0" in name or \
            name.startswith("."):
        raise InvalidParameter(parameter, "must be a name, without '/' and not starting "
                                          "with '.'")
    return name


def domain_folder(root: Path, domain: str) -> Path:
    """A domain's folder in the repository at `root`; raises InvalidParameter for a
    name that would not stay one folder."""
    return root / component("domain", domain)


def consumer_folder(root: Path, domain: str, consumer: str) -> Path:
    """A consumer's folder of a domain in the repository at `root`: its disks' folders and
    FILES; raises InvalidParameter for a name that would not stay one folder."""
    return domain_folder(root, domain) / component("consumer", consumer)


def disk_folder(root: Path, domain: str, consumer: str, disk: str) -> Path:
    """A disk's folder in the repository at `root`, where its chain is; raises
    InvalidParameter for a name that would not stay one folder."""
    return consumer_folder(root, domain, consumer) / component("disk", disk)


def disk_folders(consumer_folder: Path) -> list[Path]:
    """The disk folders in a consumer's folder (not FILES)."""
    return sorted(p for p in consumer_folder.iterdir()
                  if not p.name.startswith(".") and p.is_dir())


#: In a consumer's folder: the domain's own files of each backup (domainfiles.py), in
#: a folder named after its checkpoint. No disk's folder has a name with a dot first.
FILES = ".domain"


def files_folder(root: Path, domain: str, consumer: str, checkpoint: str) -> Path:
    """Where the repository at `root` keeps the domain's files of a backup."""
    return checkpoint_files(consumer_folder(root, domain, consumer), checkpoint)


def checkpoint_files(consumer_folder: Path, checkpoint: str) -> Path:
    """`files_folder`, in a consumer's folder."""
    return consumer_folder / FILES / component("checkpoint", checkpoint)


def files_folders(consumer_folder: Path) -> list[Path]:
    """The domain's files of each backup in a consumer's folder, and those being written
    (`*.partial`)."""
    return sorted((consumer_folder / FILES).glob("*"))


def consumers_with_files(root: Path) -> list[Path]:
    """Every consumer's folder, in the repository at `root`, that holds domain files."""
    return sorted(files.parent for files in root.glob(f"*/*/{FILES}"))


def every_files_folder(root: Path) -> list[Path]:
    """Every backup's domain files, and those being written (`*.partial`)."""
    return sorted(root.glob(f"*/*/{FILES}/*"))


def restored_disk(folder: Path, domain: str, disk: str, fmt: str) -> Path:
    """A disk of a domain RestoreDomain brings back as `domain`, in the restore folder."""
    return folder / f"{component('name', domain)}.{component('disk', disk)}.{fmt}"


def restored_nvram(folder: Path, domain: str) -> Path:
    """The NVRAM of a domain RestoreDomain brings back as `domain`."""
    return folder / f"{component('name', domain)}.nvram.fd"


#: Every disk folder, from the repository's root.
DISK_FOLDERS = "*/*/*"
#: In a disk folder: the backups, and their manifests.
BACKUPS = "[0-9]*.qcow2"
MANIFESTS = "[0-9]*.json"
#: In a disk folder: what a crash can leave, a backup being written (`partial`), a
#: backup being flattened (`flat_partial`), a manifest being written (`temporary`).
#: None is a backup, and nothing builds on them.
LEFTOVERS = ("*.qcow2.partial", "*.flat.partial", "*.tmp")


def backup_name(sequence: int) -> str:
    """The file of a disk's backup number `sequence` (1, 2, ...), in its disk folder;
    also how the next backup names it as its backing file."""
    return f"{sequence:04d}.qcow2"


def manifest(folder: Path, sequence: int) -> Path:
    """The manifest of backup number `sequence` in the disk folder `folder`."""
    return folder / f"{sequence:04d}.json"


def manifest_of(backup: Path) -> Path:
    """The manifest of the backup file `backup`."""
    return backup.with_suffix(".json")


def partial(folder: Path, sequence: int) -> Path:
    """Backup number `sequence` while it is being written."""
    return folder / f"{backup_name(sequence)}.partial"


def flat_partial(folder: Path, sequence: int) -> Path:
    """Backup number `sequence` while it is being flattened (prune)."""
    return folder / f"{backup_name(sequence)}.flat.partial"


def temporary(path: Path) -> Path:
    """Where `path` (a manifest) is written before it replaces the file at `path`."""
    return path.with_suffix(".tmp")


def manifests(folder: Path) -> list[Path]:
    """The manifests in a disk folder, oldest first: by number, not by name (10000
    comes after 9999)."""
    return sorted((p for p in folder.glob(MANIFESTS) if p.stem.isdigit()),
                  key=lambda p: int(p.stem))


def partials(folder: Path) -> Iterator[Path]:
    """The backups being written or flattened in a disk folder."""
    return folder.glob("*.partial")


def every_backup(root: Path) -> list[Path]:
    """Every backup file in the repository at `root`."""
    return sorted(root.glob(f"{DISK_FOLDERS}/{BACKUPS}"))


def every_manifest(root: Path) -> list[Path]:
    """Every manifest in the repository at `root`."""
    return sorted(root.glob(f"{DISK_FOLDERS}/{MANIFESTS}"))


def every_leftover(root: Path) -> list[Path]:
    """Every temporary file (`LEFTOVERS`) in the repository at `root`."""
    return [p for pattern in LEFTOVERS for p in sorted(root.glob(f"{DISK_FOLDERS}/{pattern}"))]


@dataclass(frozen=True)
class Layout:
    """The daemon's folders ([exports] dir, [scratch] dir), and what lives in them."""

    exports: Path
    scratch: Path

    @property
    def qemu(self) -> Path:
        """QEMU's sockets: a folder for QEMU and us alone."""
        return qemu_folder(self.exports)

    @property
    def repository_sockets(self) -> Path:
        return repository_sockets(self.exports)

    def endpoint(self, job_id: str) -> Path:
        return endpoint(self.exports, job_id)

    def qemu_socket(self, job_id: str) -> Path:
        return qemu_socket(self.exports, job_id)

    def qsd_monitor(self, job_id: str) -> Path:
        return qsd_monitor(self.exports, job_id)

    def qsd_pidfile(self, job_id: str) -> Path:
        return qsd_pidfile(self.exports, job_id)

    def qsd_jobs(self) -> set[str]:
        """The ids of jobs a qemu-storage-daemon was started for (its PID file is here)."""
        return {job_of(p) for p in self.qemu.glob("*.pid")}

    def repository_socket(self, served: Served, token: str) -> Path:
        return repository_socket(self.repository_sockets, served, token)

    def scratch_file(self, job_id: str, disk: str) -> Path:
        return job_file(self.scratch, job_id, disk)

    def scratch_files(self, job_id: str) -> Iterator[Path]:
        return job_files(self.scratch, job_id)

    def leftovers(self, job_id: str) -> list[Path]:
        """What a job leaves if libvirt, QEMU or we crash: sockets and scratch files."""
        return [self.qemu_socket(job_id), self.endpoint(job_id), *self.scratch_files(job_id)]

    def jobs_with_files(self) -> set[str]:
        """The ids of jobs that have a socket or scratch file here."""
        found = [*self.exports.glob("*.sock"), *self.qemu.glob("*.sock"),
                 *self.scratch.glob("*.qcow2")]
        return {job_of(p) for p in found}

    def sockets(self) -> list[Path]:
        """One socket of each kind that is ever bound under the exports folder, each
        with the longest name of its kind."""
        job_id, token = "0" * len(new_job_id()), "0" * len(socket_token())
        return [self.endpoint(job_id), self.qemu_socket(job_id),
                *(self.repository_socket(s, token) for s in Served),
                writer_monitor(self.repository_sockets, token)]

    def longest_socket(self) -> Path:
        """The longest socket path ever bound under the exports folder."""
        return max(self.sockets(), key=lambda p: len(os.fsencode(p)))

    def check(self) -> None:
        """Raise ValueError if a socket under the exports folder would not fit in
        `sun_path` (the message says by how many bytes)."""
        longest = self.longest_socket()
        over = len(os.fsencode(longest)) - MAX_SOCKET_PATH
        if over > 0:
            raise ValueError(f"too long by {over} byte{'s' if over > 1 else ''}: the Unix "
                             f"sockets under it would not fit in {MAX_SOCKET_PATH + 1} bytes, "
                             f"the longest of them {longest}")
