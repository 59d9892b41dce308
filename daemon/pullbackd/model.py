"""The job model: a backup job's records and states, without any I/O.

    queued ──> starting                            (when fewer than [jobs] max_active run)
    pull:      starting ──> ready ───> completed   (Finish)
                              └──────> expired     (no appliance came for [exports] idle_timeout,
                                                    or it outlived [exports] max_lifetime)
    push:      starting ──> running ─> completed   (libvirt: the copy is done)
    stream:    starting ──> running ─> completed   (pullbackd's own copy: every byte arrived)
                  │           ├──────> aborted     (Abort)
                  └───────────┴──────> failed      (the source refused, the domain stopped,
                                                    the job vanished, the copy failed,
                                                    Finish(success=false))

A job's kind is one value (`Kind`): who moves the data, and where to. Only
`completed` makes the job's checkpoint part of its consumer's chain (chain.py).
jobs.py moves jobs through these states; state.py stores them; api.py shows
them as the varlink `Job` type.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any
from urllib.parse import quote

from .errors import InvalidParameter
from .names import CONSUMER, DEFAULT_CONSUMER, fd_session

MODES = ("full", "incremental", "differential")
#: Start's `quiesce`: freeze the guest's filesystems through its agent around the backup's
#: start, or go on crash-consistent ("auto"), or fail ("required"); or never try ("off").
QUIESCE = ("auto", "required", "off")
#: `destination` for the embedded repository.
LOCAL = "local"
NBD_SCHEMES = ("nbd://", "nbd+unix://", "nbds://", "nbds+unix://")
#: The longest of Start's texts a job keeps (each reply about the job carries them): a
#: path (PATH_MAX), an NBD URI (an export name has up to 4096 bytes, a socket's path 108),
#: a checkpoint's name (names.checkpoint_name: far shorter).
LONGEST = {"domain": 1024, "target_dir": 4096, "destination": 8192, "since": 256}
#: The longest error a job keeps; the journal has the whole of it.
LONGEST_ERROR = 4096


def plain(record: Any) -> Any:
    """A record (a dataclass of these modules, nested) as plain dicts and lists, for JSON:
    `dataclasses.asdict` without its deep copies, which made it the costliest step of
    storing a job and of telling watchers about it."""
    fields = getattr(record, "__dataclass_fields__", None)
    if fields is not None:
        return {name: plain(getattr(record, name)) for name in fields}
    if isinstance(record, list | tuple):
        return [plain(item) for item in record]
    if isinstance(record, dict):
        return {key: plain(value) for key, value in record.items()}
    return record


def brief(error: str | None) -> str | None:
    """An error as a job keeps it: at most LONGEST_ERROR characters."""
    if error is None or len(error) <= LONGEST_ERROR:
        return error
    cut = len(error) - LONGEST_ERROR + 64
    return f"{error[:LONGEST_ERROR - 64]}... ({cut} characters more in the journal)"


def now() -> str:
    """The time as every record of pullbackd's keeps it: RFC 3339, UTC, milliseconds."""
    return timestamp(datetime.now(UTC))


def timestamp(t: datetime) -> str:
    """`t` (aware) as every record of pullbackd's keeps a time (see `now`)."""
    return t.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class JobState(StrEnum):
    QUEUED = "queued"
    STARTING = "starting"
    READY = "ready"
    RUNNING = "running"
    COMPLETED = "completed"
    ABORTED = "aborted"
    FAILED = "failed"
    EXPIRED = "expired"

    @property
    def final(self) -> bool:
        return self in (JobState.COMPLETED, JobState.ABORTED, JobState.FAILED, JobState.EXPIRED)


class Kind(StrEnum):
    """Who moves a backup's data, and where to."""

    #: Appliances read the source's exports, through the job's endpoint.
    PULL = "pull"
    #: libvirt writes each disk into a file of `target_dir`.
    PUSH = "push"
    #: pullbackd copies each disk itself: into the repository ("local") or an
    #: appliance's NBD server.
    STREAM = "stream"


def kind_of(target_dir: str | None, destination: str | None) -> Kind:
    if target_dir is not None:
        return Kind.PUSH
    if destination is not None:
        return Kind.STREAM
    return Kind.PULL


@dataclass(frozen=True)
class Disk:
    name: str
    size: int
    mode: str
    export: str | None = None
    url: str | None = None
    bitmap: str | None = None
    since: str | None = None
    fallback: str | None = None
    target: str | None = None
    #: Pull, with [exports] tcp_listen: the disk on the TCP endpoint for remote appliances.
    remote_url: str | None = None
    #: Bytes of data to transfer, once known; bytes done (streamed by pullbackd or
    #: read by appliances), bytes per second, seconds left.
    transfer: int | None = None
    done: int | None = None
    rate: int | None = None
    eta: int | None = None
    #: Bytes the disk's scratch file holds now (Get only).
    scratch: int | None = None


@dataclass(frozen=True)
class Transition:
    state: JobState
    at: str


@dataclass(frozen=True)
class Scratch:
    """libvirt's account of a pull job's scratch files: used, and what they may grow to."""

    used: int
    limit: int


@dataclass(frozen=True)
class Progress:
    done: int
    total: int
    rate: int
    eta: int | None


@dataclass(frozen=True)
class Session:
    """One client connection to a pull job's endpoint."""

    id: int
    #: Who: "pid P uid U gid G" for a Unix socket.
    peer: str
    started: str
    #: The export (disk) it opened, once it did.
    disk: str | None = None
    ended: str | None = None
    #: Bytes the client asked to read.
    bytes_read: int = 0


@dataclass(frozen=True)
class Handed:
    """A session passed on to the next run of the daemon, its sockets in systemd's fd store."""

    job: str
    session: Session
    #: Where the relay was in the protocol, both sides (Sniffer.state()).
    sniffer: dict[str, Any]

    @property
    def names(self) -> tuple[str, str]:
        """The fd store names of its client and QEMU sockets."""
        return fd_session(self.job, self.session.id)


@dataclass(frozen=True)
class Appliance:
    """How appliances use a pull job's endpoint."""

    #: Sessions open now, and so far.
    active: int
    total: int
    bytes_read: int
    #: Since when no session is open; None while one is.
    idle_since: str | None
    sessions: tuple[Session, ...] = ()

    @property
    def earlier(self) -> tuple[int, int]:
        """Sessions, and bytes read, counted but no longer listed."""
        return (self.total - len(self.sessions),
                self.bytes_read - sum(s.bytes_read for s in self.sessions))


@dataclass(frozen=True)
class Job:
    id: str
    domain: str
    state: JobState
    mode: str
    created: str
    consumer: str = DEFAULT_CONSUMER
    checkpoint: str = ""
    since: str | None = None
    target_dir: str | None = None
    destination: str | None = None
    progress: Progress | None = None
    appliance: Appliance | None = None
    disks: tuple[Disk, ...] = ()
    ended: str | None = None
    error: str | None = None
    history: tuple[Transition, ...] = ()
    #: Queued: the place in the queue, from 1 (shown, never stored).
    position: int | None = None
    #: Shown by Get only, never stored.
    scratch: Scratch | None = None
    #: The domain was shut off: offline.py serves its disks.
    offline: bool = False
    #: What Start asked (QUIESCE), and what the backup is: "filesystem" (the agent froze the
    #: guest's filesystems as it began), "crash" (as if the power went: a running domain's,
    #: or one destroyed or crashed) or "shut off" (shut down by its guest).
    quiesce: str = "auto"
    consistency: str | None = None
    #: Seconds the guest was frozen.
    frozen: float | None = None
    #: The uid of who started it (None: a job of an earlier version, mine to anyone).
    owner: int | None = None

    @property
    def kind(self) -> Kind:
        return kind_of(self.target_dir, self.destination)

    @property
    def local(self) -> bool:
        """Streamed into the embedded repository."""
        return self.destination == LOCAL

    @property
    def ready_since(self) -> str | None:
        """When the job became ready (its history's first `ready`; after a restart, its
        first run's), if it did."""
        return next((t.at for t in self.history if t.state == JobState.READY), None)

    def failed(self, error: str) -> Job:
        return dataclasses.replace(self, state=JobState.FAILED, ended=now(), error=error)


@dataclass(frozen=True)
class Change:
    """What watchers hear: a job's new state, or a warning about it."""

    kind: str
    job: Job
    message: str | None = None
    session: Session | None = None


@dataclass(frozen=True)
class StartRequest:
    domain: str
    disks: list[str] | None = None
    mode: str = "full"
    since: str | None = None
    consumer: str = DEFAULT_CONSUMER
    target_dir: str | None = None
    destination: str | None = None
    allow_scratch_overcommit: bool = False
    #: Wait in the queue when [jobs] max_active are running (else TooManyJobs).
    queue: bool = True
    quiesce: str = "auto"
    #: The mount points to freeze (None: every one the agent knows).
    mountpoints: list[str] | None = None
    #: The caller's uid (SO_PEERCRED), given by the control socket, never by the caller.
    owner: int | None = None

    @property
    def kind(self) -> Kind:
        return kind_of(self.target_dir, self.destination)

    def check(self) -> None:
        """Refuse what no domain could satisfy, before anything is touched: raises
        InvalidParameter. (Where it may write is places.py's to check.)"""
        if not self.domain:
            raise InvalidParameter("domain", "empty")
        for name, longest in LONGEST.items():
            if len(getattr(self, name) or "") > longest:
                raise InvalidParameter(name, f"longer than {longest} characters")
        if not CONSUMER.fullmatch(self.consumer):
            raise InvalidParameter("consumer", f"must match {CONSUMER.pattern}")
        if self.mode not in MODES:
            raise InvalidParameter("mode", f"one of {', '.join(MODES)}")
        if self.mode == "differential" and not self.since:
            raise InvalidParameter("since", "a differential backup needs a checkpoint to start at")
        if self.since is not None and self.mode != "differential":
            raise InvalidParameter("since", "only a differential backup takes since")
        if self.quiesce not in QUIESCE:
            raise InvalidParameter("quiesce", f"one of {', '.join(QUIESCE)}")
        if self.mountpoints is not None and (
                self.quiesce == "off" or not self.mountpoints
                or not all(m.startswith("/") for m in self.mountpoints)):
            raise InvalidParameter("mountpoints", "absolute paths in the guest, not empty, "
                                                  "and only with quiesce")
        if self.destination is not None:
            if self.target_dir is not None:
                raise InvalidParameter("destination", "a push backup writes its own files")
            if self.destination != LOCAL and not self.destination.startswith(NBD_SCHEMES):
                raise InvalidParameter("destination", "\"local\" or an NBD URI")
            if self.destination != LOCAL and "{disk}" not in self.destination and \
                    (self.disks is None or len(self.disks) != 1):
                raise InvalidParameter("destination", "put {disk} in the URI to name each "
                                                      "disk's export, or back up one disk")


class CheckpointState(StrEnum):
    #: Created with a backup that has not ended yet.
    PENDING = "pending"
    #: Its backup was confirmed: part of the consumer's chain.
    COMPLETE = "complete"
    #: Its backup failed, or the chain no longer needs it, but libvirt could not
    #: delete it yet (the domain was off, libvirt was busy). Never used as a
    #: base; deleted at the next chance.
    DISCARD = "discard"


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint of ours, as chain.py keeps it."""

    name: str
    domain: str
    consumer: str
    job: str
    created: str
    state: CheckpointState
    #: Disks with a bitmap in this checkpoint.
    disks: tuple[str, ...]
    #: libvirt's XML for it, kept to redefine it when libvirt loses it.
    xml: str | None = None
    #: Disks its backup copied in full: where their differentials may start.
    full: tuple[str, ...] = ()
    #: The uid of who started its backup (None: unknown, a checkpoint of an earlier
    #: version, or one rebuilt from libvirt's metadata).
    owner: int | None = None


def lost(job: Job, running: bool) -> str:
    """Why a job that was not final when pullbackd stopped cannot go on."""
    if job.state == JobState.STARTING:
        return "pullbackd restarted while the job was starting"
    if job.kind == Kind.STREAM:
        return ("pullbackd restarted during its own copy, which cannot resume"
                + ("" if running else ", and libvirt no longer runs the backup"))
    return f"pullbackd restarted while the job was {job.state}, and libvirt no longer runs it"


def nbd_url(socket: object, export: str) -> str:
    """An NBD URI for a Unix socket: https://github.com/NetworkBlockDevice/nbd/blob/master/doc/uri.md"""
    return f"nbd+unix:///{quote(export, safe='')}?socket={quote(str(socket), safe='/')}"
