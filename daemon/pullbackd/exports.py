"""pullbackd's own NBD endpoints: one Unix socket per pull job, relayed to QEMU.

QEMU's NBD server for a job listens on `<exports>/.qemu/<id>.sock`, in a folder
only pullbackd and the QEMU user can enter. Appliances connect to the job's
endpoint `<exports>/<id>.sock` instead, and each connection is relayed to QEMU
byte for byte: the appliance cannot tell the difference, and pullbackd knows
every session (who, which disk, when, how much was read), can limit them, and
can close them.

Reaching an endpoint ([exports] mode and group) is not enough to read: the
client's role (its peer credentials, [roles] as in effect when it connects) must
be one that reads backups (roles.READ_DISKS). Any other is closed at once, before
NBD's greeting, without taking one of the job's places, and logged.

The relay reads the client's side with `handshake.Sniffer` (small: options,
then 28-byte requests), and QEMU's answers to the options until an export is
open; from then on it moves QEMU's side, the data, with splice(2) through a
pipe, so the payload never enters Python. Each session has a thread of its own
for it. Under systemd, sessions outlive a restart of the daemon: see
`Endpoint.hand_off`. Each session handed over is recorded as soon as its sockets
are in systemd's store, whatever becomes of the others: one that cannot be paused
in time is cut, alone. A connection made as the endpoint hands off goes to the
next run too: one not yet accepted stays in the listening socket's backlog, and
one accepted, still in its admission, is seated if there is a place and handed
over before it relayed anything. An endpoint that hands off is never idle: its
sessions go on in the next run, whose clock ([exports] idle_timeout) starts afresh.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import grp
import math
import os
import select
import socket
import struct
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Protocol

import anyio
import structlog

from . import names
from .accepting import Refusals, backing_off, exhausted
from .handshake import Refusal, Sniffer
from .model import Handed, Session, now
from .roles import Roles

log = structlog.get_logger()

#: Bytes moved per splice(2); the pipe is grown to hold as much.
CHUNK = 1 << 20
#: Relay threads (one per session) are not limited by number: a session's
#: thread must run for it to run, and the connection limit bounds them.
_RELAY_THREADS = anyio.CapacityLimiter(math.inf)
#: Seconds a connection over the limit waits for a session to close before it is refused.
ADMIT_WAIT = 1.0
#: Connections of one endpoint that may have their role looked up, wait for a place or be
#: told they have none (each holds a descriptor for up to ADMIT_WAIT + REFUSAL_TIMEOUT);
#: more are closed at once.
MAX_WAITING = 64
#: Looking up a connection's role may ask NSS (blocking): a few at a time, so that a flood
#: of connections does not take the worker threads libvirt's calls need.
_LOOKUPS = anyio.CapacityLimiter(4)
#: Seconds a refused client has to read why.
REFUSAL_TIMEOUT = 10.0
#: Seconds QEMU's NBD server may take to accept a session's connection.
CONNECT_TIMEOUT = 10.0
#: Seconds past the handshake timeout a session waits for QEMU to answer its handshake,
#: looking every ANSWER_POLL seconds.
QEMU_ANSWER_TIMEOUT = 60.0
ANSWER_POLL = 0.1
_PEERCRED = struct.Struct("3i")


#: Ended sessions a job lists; older ones only count in its totals. Appliances that
#: connect and close thousands of times must not grow a job's record (and every
#: List reply) without bound.
KEEP_SESSIONS = 64


#: A session opened (ended is None) or closed.
OnSession = Callable[[str, Session], None]
#: Gives file descriptors to the service manager to keep, under a name (sd_notify FDSTORE).
StoreFds = Callable[[str, list[int]], None]
#: Records a session whose sockets the service manager keeps, for the next run to resume
#: it (state.Store.save_handoff).
RecordHanded = Callable[[Handed], Awaitable[None]]


class Endpoint:
    """One job's socket and its sessions."""

    def __init__(self, job_id: str, path: Path, upstream: Path, limit: int,
                 on_session: OnSession, past: tuple[Session, ...] = (),
                 resumed: list[tuple[Handed, socket.socket, socket.socket]] | None = None,
                 exports: dict[str, str] | None = None,
                 earlier: tuple[int, int] = (0, 0), handshake_timeout: float = 5.0,
                 roles: Callable[[], Roles] = Roles) -> None:
        """`past`: the sessions on record; `earlier`: how many sessions, and bytes read,
        the record counts beyond them (see KEEP_SESSIONS); `roles`: [roles] as in effect
        now (asked at each connection: a reload changes them)."""
        self.job_id = job_id
        self.path = path
        self.upstream = upstream
        self.limit = limit
        #: Seconds a new session may take to open an export before it is cut: silent
        #: clients must not hold the job's places.
        self.handshake_timeout = handshake_timeout
        #: QEMU's export name -> the disk it is.
        self.exports = exports or {}
        self._on_session = on_session
        self._roles = roles
        self._resumed = resumed or []
        # A session the record shows open, and that was not handed over, was
        # cut when the previous run ended.
        resumed_ids = {h.session.id for h, _, _ in self._resumed}
        self._past = _Past([s if s.ended else replace(s, ended=now())
                            for s in past if s.id not in resumed_ids], earlier)
        self._live: dict[int, tuple[Session, Relay]] = {}
        self._next_id = max((s.id for s in (*past, *(h.session for h, _, _ in self._resumed))),
                            default=0) + 1
        self._idle_since = time.monotonic()
        self._idle_wall = now()
        self._changed = anyio.Event()
        self._scope = anyio.CancelScope()
        self._accepting = anyio.CancelScope()
        self._over = anyio.Event()
        self._listener: socket.socket | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        #: Set by `hand_off`: where the sessions' sockets go, and their records.
        self._store: StoreFds | None = None
        self._record: RecordHanded | None = None
        self._handed: list[Handed] = []
        #: The hand-off's seconds, once they ran out: a session that ends now was cut.
        self._too_late: float | None = None
        self._refusals = Refusals(f"endpoint of job {job_id}")
        #: Connections refused with a message (see `_refuse`): logged at most once a second.
        self._refused = Refusals(f"endpoint of job {job_id}", "nbd connection refused")
        #: Connections closed for their role (see `_reads_disks`): the same.
        self._denied = Refusals(f"endpoint of job {job_id}",
                                "nbd connection refused: its role may not read backups")
        #: Connections accepted that have their role looked up, wait for a place or are
        #: being refused.
        self._waiting = 0

    # What Get shows.

    @property
    def active(self) -> int:
        return len(self._live)

    @property
    def idle_since(self) -> str | None:
        """Since when no session has been open; None while one is, or once the endpoint
        hands off (its sessions go on, in the next run)."""
        return None if self._live or self._store is not None else self._idle_wall

    def sessions(self) -> list[Session]:
        """The sessions open now, and the last KEEP_SESSIONS that ended."""
        live = [self._snapshot(s, relay.sniffer) for s, relay in self._live.values()]
        return sorted(self._past.listed + live, key=lambda s: s.id)

    @property
    def total(self) -> int:
        """Sessions so far, listed or not."""
        return self._past.dropped + len(self._past.listed) + len(self._live)

    def bytes_read(self, disk: str | None = None) -> int:
        """Bytes read by every session so far (of one disk: since this run started)."""
        listed = sum(s.bytes_read for s in self.sessions() if disk is None or s.disk == disk)
        return listed + self._past.dropped_bytes(disk)

    # Lifetime.

    async def serve(self, listener: socket.socket,
                    *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
                    ) -> None:
        """Accept and relay until closed; every session ends with it."""
        self._listener = listener
        with self._scope, listener, _setting(self._over):
            async with anyio.create_task_group() as tg:
                self._tg = tg
                for handed, client, qemu in self._resumed:
                    relay = _Relay(client, qemu, Sniffer.from_state(handed.sniffer))
                    # One handed over in its handshake still has to open an export (as
                    # far as we know: an earlier version's record does not say).
                    tg.start_soon(self._run, handed.session, relay, True,  # resumed
                                  "opened" in handed.sniffer and not relay.sniffer.opened)
                self._resumed.clear()
                task_status.started()
                with self._accepting:
                    while True:
                        await anyio.wait_readable(listener)
                        if self._accepting.cancel_called:
                            # The hand-off came as the connection did (the wait was
                            # over, so its cancel let this run on): it stays in the
                            # backlog, for the next run (the listener goes to it).
                            break
                        try:
                            client, _ = listener.accept()
                        except (BlockingIOError, InterruptedError):
                            continue
                        except OSError as e:
                            if (cause := exhausted(e)) is None:
                                raise
                            await backing_off(cause, self._refusals)
                            continue
                        if self._waiting >= MAX_WAITING:
                            client.close()
                            self._refusals.note("too many connections waiting for a place",
                                                waiting=self._waiting)
                            continue
                        client.setblocking(False)
                        self._waiting += 1
                        tg.start_soon(self._admit, client)

    async def close(self) -> None:
        """Stop accepting and cut every session at once (Abort, the job's end)."""
        self._scope.cancel()
        self._changed_now()  # a connection waiting for room is refused now
        await self._over.wait()

    @property
    def _admitting(self) -> bool:
        """Whether a new session may still begin: not once the endpoint closes, hands its
        sessions off, or is done (one let in then would relay on, and the close or the
        hand-off, which waits for every session, would never end)."""
        return not (self._scope.cancel_called or self._accepting.cancel_called
                    or self._over.is_set())

    async def hand_off(self, store: StoreFds, record: RecordHanded,
                       seconds: float) -> list[Handed]:
        """Pass the listening socket and every session to the next run of the daemon;
        the sessions handed over.

        Each session stops between two chunks, with nothing read that is not yet
        sent, so that the next run can go on relaying where this one stopped; its
        sockets go to `store`, then its record to `record` at once (see `_run`). One
        that cannot stop so within `seconds` (its client, or QEMU, does not take
        what is on its way to it) is cut: the others do not wait for it.
        """
        if self._listener is not None:
            store(names.fd_listener(self.job_id), [self._listener.fileno()])
        self._accepting.cancel()
        self._store, self._record = store, record
        self._changed_now()  # a connection waiting for room is refused now
        for _, relay in self._live.values():
            relay.pause()
        with anyio.move_on_after(seconds):
            await self._over.wait()
        if not self._over.is_set():
            # What has not paused by now is cut (and a refusal still being told ends).
            self._too_late = seconds
            self._scope.cancel()
            await self._over.wait()
        return self._handed

    async def idle_for(self, seconds: float) -> None:
        """Return once no session has been open for `seconds` in a row; never once the
        endpoint hands off (the next run's clock decides)."""
        while True:
            changed = self._changed
            if self._live or self._store is not None:
                await changed.wait()
                continue
            with anyio.move_on_after(self._idle_since + seconds - time.monotonic()):
                await changed.wait()
                continue
            return

    async def drained(self) -> None:
        """Return once no session is open."""
        while self._live:
            await self._changed.wait()

    # Sessions.

    async def _admit(self, client: socket.socket) -> None:
        """Serve a new connection, or refuse it if its role may not read backups (see
        `_reads_disks`) or there is no room (see `_room`). Whatever goes wrong ends this
        connection alone."""
        try:
            try:
                reads = await self._reads_disks(client)
                seated = reads and await self._room(accepted=True)
                if reads and not seated:
                    await self._refuse(client)
            finally:
                self._waiting -= 1
            if not seated:
                client.close()  # refused already, or for its role: at once, told nothing
                return
            relay = _Relay(client, None, Sniffer())  # its pipes take descriptors too
            session = Session(self._next_id, _peer(client), now())
            self._next_id += 1
            await self._run(session, relay, resumed=False, handshake=True)
        except Exception as e:
            if exhausted(e):
                self._refusals.note(f"cannot serve: {e}")
            else:
                log.exception("nbd connection failed", job=self.job_id)
            client.close()

    async def attach(self, peer: str, relay: Relay) -> bool:
        """Take a session the remote endpoint opened for this job (it chose the job by
        export name). False, and nothing taken, if the job has no room for it (or
        closes)."""
        if not await self._room() or self._tg is None:
            return False
        session = Session(self._next_id, peer, now())
        self._next_id += 1
        # Counted now, not once its task runs: the next waiter must see it.
        self._live[session.id] = (session, relay)
        self._tg.start_soon(self._attached, session, relay)
        return True

    async def _attached(self, session: Session, relay: Relay) -> None:
        """An attached session; whatever goes wrong ends it alone."""
        try:
            await self._run(session, relay, resumed=False, handshake=True)
        except Exception:
            log.exception("nbd connection failed", job=self.job_id, session=session.id)

    async def _room(self, accepted: bool = False) -> bool:
        """Whether one more session fits, waiting up to ADMIT_WAIT for one to close (an
        appliance may close one session and open the next at once); never once the
        endpoint closes or hands off. But for a connection this endpoint `accepted` (its
        backlog goes to the next run, and so does it): as it hands off, a place free now
        seats it, to be handed over with the other sessions."""
        if accepted and self._store is not None and not self._scope.cancel_called:
            return len(self._live) < self.limit
        with anyio.move_on_after(ADMIT_WAIT):
            while self._admitting and len(self._live) >= self.limit:
                await self._changed.wait()
        return self._admitting and len(self._live) < self.limit

    async def _run(self, session: Session, relay: Relay, resumed: bool,
                   handshake: bool = False) -> None:
        """`handshake`: the client has yet to open an export: it has until the handshake
        timeout (a TCP session has named one of ours, but its GO may yet be refused, and
        an INFO opens nothing)."""
        # Counted at once: the next connection must see this one.
        self._live[session.id] = (session, relay)
        self._changed_now()
        if resumed:
            log.info("nbd session resumed", job=self.job_id, session=session.id)
        else:
            self._on_session(self.job_id, session)
            log.info("nbd session opened", job=self.job_id, session=session.id,
                     peer=session.peer)
        handed = False
        try:
            if not resumed:
                await relay.connect(self.upstream)
                if self._store is not None:
                    # Seated as the endpoint hands off (`_room`): paused before it relays
                    # anything, QEMU's greeting left in its socket for the next run.
                    relay.pause()
            if not relay.errors and await self._relayed(session, relay, handshake) and \
                    self._store is not None and self._record is not None:
                h = Handed(self.job_id, self._snapshot(session, relay.sniffer),
                           relay.sniffer.state())
                for name, fd in zip(h.names, relay.fds(), strict=True):
                    self._store(name, [fd])
                handed = await self._recorded(h)
        finally:
            with anyio.CancelScope(shield=True):  # systemd holds copies of what was handed
                await relay.aclose()
            del self._live[session.id]
            self._changed_now()
            if handed:
                log.info("nbd session handed over", job=self.job_id, session=session.id)
            else:
                if self._too_late is not None:
                    log.warning("nbd session cut: it could not be paused in time to be handed "
                                "to the next run (its client, or QEMU, did not take what was "
                                "on its way to it); its appliance must reconnect",
                                job=self.job_id, session=session.id, seconds=self._too_late)
                ended = replace(self._snapshot(session, relay.sniffer), ended=now())
                self._past.add(ended)
                self._idle_since, self._idle_wall = time.monotonic(), now()
                self._on_session(self.job_id, ended)
                log.info("nbd session closed", job=self.job_id, session=session.id,
                         disk=ended.disk, bytes_read=ended.bytes_read,
                         error="; ".join(relay.errors) or None)

    async def _recorded(self, handed: Handed) -> bool:
        """Record a session whose sockets systemd now keeps: at once, whatever the other
        sessions do, and shielded (without its record the next run closes them). False
        if it could not be: it is cut."""
        assert self._record is not None
        try:
            with anyio.CancelScope(shield=True):
                await self._record(handed)
        except Exception:
            log.exception("cannot record a session handed over: the next run closes it",
                          job=self.job_id, session=handed.session.id)
            return False
        self._handed.append(handed)
        return True

    async def _relayed(self, session: Session, relay: Relay, handshake: bool) -> bool:
        """Relay (see Relay.run); with `handshake`, a session that has not opened an
        export within the handshake timeout is cut."""
        async with anyio.create_task_group() as tg:
            if handshake:
                tg.start_soon(self._handshake_deadline, session, relay)
            paused = await relay.run()
            tg.cancel_scope.cancel()
        return paused

    async def _handshake_deadline(self, session: Session, relay: Relay) -> None:
        await anyio.sleep(self.handshake_timeout)
        # The timeout is the client's time: while QEMU owes it an answer (a busy QEMU
        # slow to open the export of a GO the client sent at once), wait for that too,
        # QEMU_ANSWER_TIMEOUT at most.
        for _ in range(int(QEMU_ANSWER_TIMEOUT / ANSWER_POLL)):
            if relay.sniffer.opened or not relay.sniffer.awaiting_server:
                break
            await anyio.sleep(ANSWER_POLL)  # the relay's thread follows QEMU's answer
        # Once an export is open (EXPORT_NAME, or a GO QEMU accepted), the client may
        # take its time to read; before that, it has no reason to wait. A client QEMU
        # answered an INFO or refused a GO, or one past what the sniffer can read, has
        # opened nothing.
        if relay.sniffer.opened:
            return
        if relay.sniffer.awaiting_server:
            log.warning("nbd session cut: QEMU did not answer its handshake", job=self.job_id,
                        session=session.id, seconds=self.handshake_timeout + QEMU_ANSWER_TIMEOUT)
        else:
            log.warning("nbd session cut: no export opened in time", job=self.job_id,
                        session=session.id, seconds=self.handshake_timeout)
        relay.stop()

    async def _reads_disks(self, client: socket.socket) -> bool:
        """Whether the client's role may read backups. One that may not is told nothing,
        not even NBD's greeting (nothing it could hold the connection open with), and is
        logged (at most once a second) with who it is."""
        credentials = _credentials(client)
        if credentials is None:  # nobody can tell who it is: nobody who may read
            return False
        pid, uid, gid = credentials
        roles = self._roles()
        role = await anyio.to_thread.run_sync(roles.of, uid, gid, limiter=_LOOKUPS)
        if roles.reads_disks(role):
            return True
        self._denied.note("ask the host's administrator for the role backup in [roles]",
                          job=self.job_id, uid=uid, pid=pid, role=role.label)
        return False

    def refusal(self) -> str:
        """What a client that gets no session (`_room`) is told."""
        if not self._admitting:
            return "this backup's endpoint is closing (the job ended, or the daemon restarts)"
        return f"this backup already has {self.limit} connections, the limit: close one first"

    async def _refuse(self, client: socket.socket) -> None:
        reason = self.refusal()
        refusal = Refusal(reason)
        self._refused.note(reason, job=self.job_id, peer=_peer(client), limit=self.limit)
        with client, anyio.move_on_after(REFUSAL_TIMEOUT):
            try:
                await _send_all(client, refusal.greeting())
                while not refusal.done:
                    await anyio.wait_readable(client)
                    data = client.recv(4096)
                    if not data:
                        break
                    await _send_all(client, refusal.feed(data))
            except OSError:
                pass

    def _snapshot(self, session: Session, sniffer: Sniffer) -> Session:
        # Only a name of ours is a disk: any other a client sent (QEMU refused it) is not
        # kept, in the record or in what Get and Watch show.
        disk = session.disk if sniffer.export is None else self.exports.get(sniffer.export)
        return replace(session, disk=disk, bytes_read=sniffer.read)

    def _changed_now(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()


class _Past:
    """An endpoint's sessions that ended: the last KEEP_SESSIONS listed (a job's record
    stays small), the earlier ones counted: how many, and the bytes they read (in all,
    and per disk since this run started)."""

    def __init__(self, listed: list[Session], earlier: tuple[int, int]) -> None:
        self.listed = listed
        self.dropped, self._bytes = earlier
        self._by_disk: dict[str, int] = {}

    def add(self, ended: Session) -> None:
        self.listed.append(ended)
        if len(self.listed) > KEEP_SESSIONS:
            dropped = self.listed.pop(0)
            self.dropped += 1
            self._bytes += dropped.bytes_read
            if dropped.disk is not None:
                self._by_disk[dropped.disk] = self._by_disk.get(dropped.disk, 0) + \
                    dropped.bytes_read

    def dropped_bytes(self, disk: str | None = None) -> int:
        """What the sessions no longer listed read (of `disk`)."""
        return self._bytes if disk is None else self._by_disk.get(disk, 0)


class Relay(Protocol):
    """One session's relay between its client and QEMU."""

    sniffer: Sniffer
    errors: list[str]

    async def connect(self, upstream: Path) -> None:
        """Reach QEMU's NBD server; a failure goes into `errors`."""

    async def run(self) -> bool:
        """Relay until either side closes (False), or until paused (True)."""

    def pause(self) -> None:
        """Stop where the session can be handed over; one that cannot be just stops."""

    def stop(self) -> None:
        """Stop at once."""

    def fds(self) -> tuple[int, int]:
        """A paused session's client and QEMU sockets, to hand over."""

    async def aclose(self) -> None:
        """Close both sides."""


class _Relay:
    """Both directions of one session, in one thread of its own.

    The data moves with splice(2) through a pipe, in a thread rather than on
    the event loop: a wakeup per chunk costs the loop more than the move costs
    the kernel. One thread polls both sockets, so that what is ready on both
    sides at once costs one wakeup. It also polls an eventfd, written by
    `pause` (stop between two chunks, with nothing read left unsent) and by
    `stop` (at once) after each sets its flag.
    """

    def __init__(self, client: socket.socket, qemu: socket.socket | None,
                 sniffer: Sniffer) -> None:
        self.client = client
        self.qemu = qemu or socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sniffer = sniffer
        self.errors: list[str] = []
        self._pausing = False
        self._stopping = False
        self._paused = False
        # Room for a chunk on the way to the client (the kernel doubles what it is
        # told), a few of QEMU's bursts: fewer waits for the client. Not more: data
        # that waits longer in the socket is no longer in the CPU's cache when the
        # client copies it (measured: 8 MiB cost about 4 % of the relay's speed).
        for option in (getattr(socket, "SO_SNDBUFFORCE", 32), socket.SO_SNDBUF):
            with contextlib.suppress(OSError):
                client.setsockopt(socket.SOL_SOCKET, option, CHUNK // 2)
                break
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        #: `run` has returned and closed `_wake`: its number may be another file's now.
        self._done = False

    async def connect(self, upstream: Path) -> None:
        try:
            await connect_unix(self.qemu, upstream)
        except OSError as e:
            self.errors.append(f"cannot reach QEMU's NBD server: {e}")

    def fds(self) -> tuple[int, int]:
        return self.client.fileno(), self.qemu.fileno()

    async def aclose(self) -> None:
        self.client.close()
        self.qemu.close()
        if not self._done:  # never run: its connect failed, or was cancelled
            self._done = True
            os.close(self._wake)

    async def run(self) -> bool:
        """Relay until either side closes (False), or until paused (True)."""
        try:
            async with anyio.create_task_group() as tg:
                async def stop_when_cancelled() -> None:
                    try:
                        await anyio.sleep_forever()
                    finally:
                        self.stop()  # the thread notices at once; we wait for it

                tg.start_soon(stop_when_cancelled)
                await anyio.to_thread.run_sync(self._relay, limiter=_RELAY_THREADS)
                tg.cancel_scope.cancel()
        finally:
            self._done = True
            os.close(self._wake)
        return self._paused and not self.errors

    def pause(self) -> None:
        """(On the event loop, as `run`'s end: a relay that ended is told nothing.)"""
        self._pausing = True
        if not self._done:
            os.eventfd_write(self._wake, 1)

    def stop(self) -> None:
        if not self._stopping:
            self._stopping = True
            if not self._done:
                with contextlib.suppress(OSError):
                    os.eventfd_write(self._wake, 1)

    def _relay(self) -> None:
        read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            with contextlib.suppress(OSError):  # a smaller pipe only means more calls
                fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, CHUNK)
            with contextlib.closing(_Loop(self, read_end, write_end)) as loop:
                loop.run()
        except OSError as e:
            if e.errno not in (errno.EPIPE, errno.ECONNRESET):
                self.errors.append(str(e))
        finally:
            os.close(read_end)
            os.close(write_end)


class _Loop:
    """The relay thread's loop over one session's two sockets.

    A steady stream from QEMU costs one wait and two splices per burst and
    little Python: the poller's interest changes only when a side falls behind
    (or the session pauses), never per burst. That Python is a good part of
    what a relay costs the machine, so the hot path stays flat.
    """

    FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK

    def __init__(self, relay: _Relay, read_end: int, write_end: int) -> None:
        self.relay, self.read_end, self.write_end = relay, read_end, write_end
        self.client, self.qemu = relay.client.fileno(), relay.qemu.fileno()
        # epoll rather than poll: the kernel keeps what we wait for between two
        # waits instead of taking it and hooking onto each socket per call.
        self.poller = select.epoll(4)
        self.poller.register(relay._wake, select.EPOLLIN)
        self.interest: dict[int, int] = {}
        #: Bytes in the pipe on their way to the client; bytes on their way to QEMU.
        self.down = 0
        self.up = memoryview(b"")
        self.client_done = False
        self.qemu_hung_up = False
        self.client_hung_up = False

    def run(self) -> None:
        relay, poll = self.relay, self.poller.poll
        qemu, client = self.qemu, self.client
        known = None  # the state the interest was last set for
        while True:
            state = (self.down > 0, len(self.up) > 0, self.client_done, relay._pausing,
                     self.qemu_hung_up, self.client_hung_up)
            if state != known:
                if relay._pausing and not self.down and not self.up:
                    relay._paused = True
                    return
                self._interest()
                known = state
            for fd, events in poll():
                if fd == qemu:
                    if not self._from_qemu(events):
                        return
                elif fd == client:
                    if not self._from_client(events):
                        return
                else:  # woken: stop, or pause (the state above takes it from here)
                    os.eventfd_read(fd)  # first: a stop from now on wakes the next poll
                    if relay._stopping:
                        return

    def close(self) -> None:
        self.poller.close()

    def _interest(self) -> None:
        """Read a side only once what came from it before is passed on."""
        pausing = self.relay._pausing
        want_client = (0 if self.up or self.client_done or pausing else select.EPOLLIN) | (
            select.EPOLLOUT if self.down else 0)
        # A hangup is reported whatever we wait for: a side that hung up is not waited
        # on while nothing of it is wanted (the loop would spin on its hangup until then).
        self._want(self.client, want_client if want_client or not self.client_hung_up
                   else None)
        want_qemu = (0 if self.down or pausing else select.EPOLLIN) | (
            select.EPOLLOUT if self.up else 0)
        self._want(self.qemu, want_qemu if want_qemu or not self.qemu_hung_up else None)

    def _want(self, fd: int, events: int | None) -> None:
        """Wait for `events` on `fd` (None: not at all)."""
        if events == self.interest.get(fd):
            return
        if events is None:
            self.poller.unregister(fd)
            del self.interest[fd]
        elif fd in self.interest:
            self.poller.modify(fd, events)
            self.interest[fd] = events
        else:
            self.poller.register(fd, events)
            self.interest[fd] = events

    def _from_qemu(self, events: int) -> bool:
        """QEMU's replies and data, spliced through the pipe. False: the session is over."""
        if events & select.EPOLLOUT and self.up:
            self._send_up()
        if events & (select.EPOLLHUP | select.EPOLLERR):
            self.qemu_hung_up = True
        if events & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR) and not self.down \
                and not self.relay._pausing:
            try:
                if self.relay.sniffer.answering:
                    self.down = self._answer()
                else:
                    self.down = os.splice(self.qemu, self.write_end, CHUNK, None, None,
                                          self.FLAGS)
            except BlockingIOError:
                return True
            if self.down == 0:
                # QEMU closed: nothing more can come, so the client is done too.
                self.relay.client.shutdown(socket.SHUT_WR)
                return False
            self._send_down()
        return True

    def _answer(self) -> int:
        """QEMU's side of the handshake, read on its way for the sniffer (see
        `Sniffer.answer`), into the empty pipe: what a read takes, the pipe holds."""
        data = self.relay.qemu.recv(select.PIPE_BUF)
        self.relay.sniffer.answer(data)
        return os.write(self.write_end, data) if data else 0

    def _from_client(self, events: int) -> bool:
        """The client's options and requests, read as they pass. False: it is gone."""
        if events & select.EPOLLOUT and self.down:
            self._send_down()
        if events & (select.EPOLLHUP | select.EPOLLERR):
            self.client_hung_up = True
        if events & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR) and not self.up \
                and not self.client_done and not self.relay._pausing:
            try:
                data = self.relay.client.recv(256 << 10)
            except BlockingIOError:
                return True
            if not data:
                # The client is done asking; QEMU's last answers still come.
                self.client_done = True
                self.relay.qemu.shutdown(socket.SHUT_WR)
                return True
            self.relay.sniffer.feed(data)
            self.up = memoryview(data)
            self._send_up()
        elif self.client_done and events & (select.EPOLLHUP | select.EPOLLERR):
            return False  # gone altogether: nobody to answer
        return True

    def _send_down(self) -> None:
        try:  # noqa: SIM105 (the hot path: contextlib.suppress costs more than the splice)
            self.down -= os.splice(self.read_end, self.client, self.down, None, None, self.FLAGS)
        except BlockingIOError:
            pass  # the client is behind: the loop now waits for it to make room

    def _send_up(self) -> None:
        with contextlib.suppress(BlockingIOError):
            self.up = self.up[self.relay.qemu.send(self.up):]


async def connect_unix(sock: socket.socket, path: Path) -> None:
    """Connect `sock` to QEMU's NBD server at `path`, on the event loop.

    A Unix socket's connect does not wait: it fails with EAGAIN while the server's
    backlog is full, and nothing tells when there is room again, so it is tried again
    until CONNECT_TIMEOUT. Never in a worker thread: a QEMU that stopped accepting
    would hold that thread (anyio's pool, which every libvirt call shares) for ever.
    """
    sock.setblocking(False)
    try:
        with anyio.fail_after(CONNECT_TIMEOUT):
            while True:
                try:
                    return sock.connect(str(path))
                except BlockingIOError:
                    await anyio.sleep(0.02)
    except TimeoutError:
        raise TimeoutError(f"QEMU's NBD server accepted no connection in "
                           f"{CONNECT_TIMEOUT:g} s") from None


async def _send_all(sock: socket.socket, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[sock.send(view):]
        except (BlockingIOError, InterruptedError):
            await anyio.wait_writable(sock)


@contextlib.contextmanager
def _setting(event: anyio.Event) -> Iterator[None]:
    try:
        yield
    finally:
        event.set()


def _credentials(sock: socket.socket) -> tuple[int, int, int] | None:
    """The peer's (pid, uid, gid) as it connected (SO_PEERCRED); None if unknown."""
    try:
        pid, uid, gid = _PEERCRED.unpack(
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
    except OSError:
        return None
    return pid, uid, gid


def _peer(sock: socket.socket) -> str:
    credentials = _credentials(sock)
    if credentials is None:
        return "unknown"
    pid, uid, gid = credentials
    return f"pid {pid} uid {uid} gid {gid}"


def listen(path: Path, mode: int, gid: int | None) -> socket.socket:
    """Bind a job's endpoint, replacing what a crash left at its (deterministic) path."""
    path.unlink(missing_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(str(path))
        os.chmod(path, mode)
        if gid is not None:
            os.chown(path, -1, gid)
        sock.listen(64)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        path.unlink(missing_ok=True)
        raise
    return sock


class Exports:
    """Every job's endpoint, and the private folder QEMU's servers listen in."""

    def __init__(self, dir: Path, *, mode: int = 0o660, group: str = "", qemu_group: str = "",
                 limit: int = 8, handshake_timeout: float = 5.0,
                 roles: Roles | None = None) -> None:
        self.dir = dir
        #: Who may read backups through the endpoints ([roles]: a reload replaces them).
        self.roles = roles or Roles()
        self.handshake_timeout = handshake_timeout
        self.private = names.qemu_folder(dir)
        self._mode = mode
        self._gid = grp.getgrnam(group).gr_gid if group else None
        self._qemu_gid = grp.getgrnam(qemu_group).gr_gid if qemu_group else None
        self.limit = limit
        self._endpoints: dict[str, Endpoint] = {}
        self._inherited: dict[str, socket.socket] = {}
        self._handed: dict[str, list[Handed]] = {}

    def prepare(self) -> None:
        """Create the folders: QEMU's is ours and QEMU's group's alone (QEMU creates its
        sockets there, we connect to them: its umask leaves them group-writable); the
        endpoints' is open to every user (each endpoint has its own mode and group)."""
        if not self.dir.is_dir():
            self.dir.mkdir(parents=True)
            os.chmod(self.dir, 0o755)  # the daemon's umask is 0077
        self.private.mkdir(mode=0o700, exist_ok=True)
        if self._qemu_gid is None:
            os.chmod(self.private, 0o700)
        else:
            os.chown(self.private, -1, self._qemu_gid)
            os.chmod(self.private, 0o770)

    def endpoint_path(self, job_id: str) -> Path:
        return names.endpoint(self.dir, job_id)

    def qemu_path(self, job_id: str) -> Path:
        return names.qemu_socket(self.dir, job_id)

    def get(self, job_id: str) -> Endpoint | None:
        return self._endpoints.get(job_id)

    def by_export(self, name: str) -> Endpoint | None:
        """The endpoint of the job that exports `name` (names are unique per job)."""
        return next((e for e in self._endpoints.values() if name in e.exports), None)

    def inherit(self, fds: dict[str, int], handed: list[Handed]) -> None:
        """Take what the previous run handed over: sockets by fd store name, and its
        record of each session. Used by `open`; `release` closes what is left."""
        self._inherited = {name: socket.socket(fileno=fd) for name, fd in fds.items()}
        for sock in self._inherited.values():
            sock.setblocking(False)
        self._handed = {h.job: [] for h in handed}
        for h in handed:
            self._handed[h.job].append(h)

    def release(self) -> list[str]:
        """Close the inherited sockets no job took: their jobs ended meanwhile (or, after
        a crash in the hand-off, their sessions were not recorded)."""
        for name, sock in self._inherited.items():
            log.info("closing a handed-over socket no job took (its job ended, or its "
                     "session was not recorded)", name=name)
            sock.close()
        closed = list(self._inherited)
        self._inherited.clear()
        self._handed.clear()
        return closed

    async def open(self, job_id: str, exports: dict[str, str], tg: anyio.abc.TaskGroup,
                   on_session: OnSession, past: tuple[Session, ...] = (),
                   earlier: tuple[int, int] = (0, 0)) -> Endpoint:
        """Serve the job's endpoint: the socket the previous run handed over, or a new one.
        `exports` maps QEMU's export names to disk names; `past` and `earlier` are the
        sessions on record (see Endpoint)."""
        path = self.endpoint_path(job_id)
        listener = self._inherited.pop(names.fd_listener(job_id), None)
        if listener is None:
            listener = await anyio.to_thread.run_sync(listen, path, self._mode, self._gid)
        resumed = []
        for h in self._handed.pop(job_id, []):
            client, qemu = (self._inherited.pop(name, None) for name in h.names)
            if client is not None and qemu is not None:
                resumed.append((h, client, qemu))
            else:
                for sock in (client, qemu):
                    if sock is not None:
                        sock.close()
        endpoint = Endpoint(job_id, path, self.qemu_path(job_id), self.limit, on_session, past,
                            resumed, exports, earlier, self.handshake_timeout,
                            lambda: self.roles)
        self._endpoints[job_id] = endpoint
        await tg.start(endpoint.serve, listener)
        return endpoint

    async def hand_off(self, store: StoreFds, record: RecordHanded,
                       seconds: float) -> list[Handed]:
        """Pass every endpoint and session on to the next run (see Endpoint.hand_off),
        all at once: each session that cannot be paused within `seconds` is cut, alone."""
        handed: list[Handed] = []
        async with anyio.create_task_group() as tg:
            async def one(endpoint: Endpoint) -> None:
                handed.extend(await endpoint.hand_off(store, record, seconds))
            for endpoint in self._endpoints.values():
                tg.start_soon(one, endpoint)
        self._endpoints.clear()
        return handed

    async def close(self, job_id: str) -> Endpoint | None:
        """Cut the job's sessions and remove its socket; the endpoint, if it was open."""
        endpoint = self._endpoints.pop(job_id, None)
        if endpoint is not None:
            await endpoint.close()
        await anyio.Path(self.endpoint_path(job_id)).unlink(missing_ok=True)
        return endpoint
