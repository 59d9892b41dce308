"""The migration gate: a domain moves only once its appliances are done with it.

Migrate drains the domain first. No new backup starts (MigrationPending); the
running ones keep serving, and their appliances may still open sessions (one
disk after another). A Start already under way (claimed, not yet recorded while
it plans, or a queued job whose turn came) may begin its backup any moment: it is
waited for, until it is ready or failed, and its job then judged as the others.
The gate opens when no session is open and every job of the domain has ended,
or, for a pull job, has had no session for [migration] grace seconds: such a job
is then ended as failed, its checkpoint rolled back (nobody confirmed the data).
pullbackd's own copies (streamed, push) are waited for. Past the drain timeout,
the migration is refused (MigrationBlocked) and every backup goes on untouched,
unless forced: then the backups are aborted (a Start under way once it is ready
or failed: it cannot be before) and the migration goes ahead.

A destination that is not a QEMU driver's URI is refused before the drain (a
migration libvirt refuses at once would end the backups for nothing). Until
the gate opens, the caller hanging up cancels the migration and changes
nothing; from the step "migrating" on, it runs to its end.

The domain's chains travel in its own metadata (see chain.py); the pullbackd
where it lands takes them in before its first backup there.
"""

from __future__ import annotations

import contextlib
import math
import re
import time
import urllib.parse
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from datetime import UTC, datetime

import anyio
import structlog
from anyio.streams.memory import MemoryObjectReceiveStream

from .admission import Admission
from .errors import DomainNotRunning, InvalidParameter, MigrationBlocked, PullbackError
from .jobs import Jobs
from .model import Change, Job, JobState
from .virt import Virt

log = structlog.get_logger()

#: How libvirt reaches another host's QEMU driver (qemu+<transport>://host/system), and
#: what a URI may say of it: libvirtd follows it as root, so none of the keys that name
#: a command (ext's command, ssh's netcat, a proxy) or a file of the host to use.
TRANSPORTS = frozenset({"", "tcp", "tls", "ssh", "libssh", "libssh2", "unix"})
URI_KEYS = frozenset({"socket", "mode", "no_tty", "no_verify", "sshauth", "tls_priority"})
#: A host's name or address, or a user's name, in such a URI.
NAME = re.compile(r"[A-Za-z0-9_:][A-Za-z0-9._:%-]*")


@dataclass(frozen=True)
class Step:
    """How far a migration has come: draining, migrating, completed or failed."""

    state: str
    #: Draining: the domain's backups still running, and their open sessions.
    jobs: tuple[str, ...] = ()
    sessions: int = 0
    #: Failed: why.
    message: str | None = None


class Migrations:
    def __init__(self, jobs: Jobs, admission: Admission, virt: Virt, grace: float,
                 drain_timeout: float) -> None:
        self._jobs = jobs
        self._admission = admission
        self._virt = virt
        self.grace = grace
        self.drain_timeout = drain_timeout

    async def migrate(self, domain: str, destination: str, *, live: bool = True,
                      copy_storage: bool = False, unsafe: bool = False,
                      drain_timeout: float | None = None, force: bool = False
                      ) -> AsyncGenerator[Step, None]:
        check_destination(destination)
        if not (await self._virt.domain(domain)).running:
            raise DomainNotRunning(domain)
        with self._admission.draining(domain):
            deadline = time.monotonic() + (self.drain_timeout if drain_timeout is None
                                           else drain_timeout)
            open_jobs, sessions, _ = self._blockers(domain)
            yield Step("draining", self._ids(domain, open_jobs), sessions)
            forced = False
            if not await self._gate(domain, deadline):
                open_jobs, sessions, _ = self._blockers(domain)
                if not force:
                    raise MigrationBlocked(domain, list(self._ids(domain, open_jobs)),
                                           sessions)
                forced = True
                # A Start under way cannot be aborted before it is recorded: it ends
                # first (the caller hanging up still cancels), then its job is aborted.
                await self._jobs.started(domain)
            yield Step("migrating")
            # Shielded: once the gate opened and its caller heard so, the backups end and
            # libvirt migrates to the end, whoever still listens.
            with anyio.CancelScope(shield=True):
                failure = await self._move(domain, destination, forced, live=live,
                                           copy_storage=copy_storage, unsafe=unsafe)
            if failure is not None:
                log.warning("migration failed", domain=domain, error=failure)
                yield Step("failed", message=failure)
                return
            log.info("migrated", domain=domain, destination=destination)
            yield Step("completed")

    async def _move(self, domain: str, destination: str, forced: bool, *, live: bool,
                    copy_storage: bool, unsafe: bool) -> str | None:
        """End the domain's backups (abort them, `forced`) and migrate it: None once it
        moved, else why not."""
        open_jobs, _, wait = self._blockers(domain)
        if forced:
            for job in open_jobs:
                log.warning("aborting a backup for a forced migration", job=job.id)
                await self._jobs.abort(job.id)
        elif open_jobs and wait > 0:
            # Since the gate opened (its step went out meanwhile).
            return ("an appliance began reading as the migration was to begin; its backup "
                    "goes on: migrate again once it is done")
        for job in self._blockers(domain)[0]:
            await self._jobs.end_for_migration(job.id)
        log.info("migrating", domain=domain, destination=destination)
        try:
            await self._virt.migrate(domain, destination, live=live,
                                     copy_storage=copy_storage, unsafe=unsafe)
        except PullbackError as e:
            return str(e)
        return None

    def _blockers(self, domain: str) -> tuple[list[Job], int, float]:
        """The domain's jobs still open, their open sessions, and the seconds until the
        gate could open if nothing changes (math.inf: not by waiting alone)."""
        open_jobs = [j for j in self._jobs.all() if j.domain == domain and not j.state.final]
        sessions = sum(j.appliance.active for j in open_jobs if j.appliance)
        wait = 0.0
        for job in open_jobs:
            if job.state == JobState.QUEUED and job.position is not None:
                continue  # it waits in the queue: nothing to wait for
            # A queued job out of the queue is in its turn: it starts, or fails (the
            # drain), and its record tells which.
            if job.appliance is None or job.appliance.idle_since is None:
                wait = math.inf  # a copy of ours, or a session open: only an event helps
                continue
            idle = (datetime.now(UTC) - datetime.fromisoformat(job.appliance.idle_since)
                    ).total_seconds()
            wait = max(wait, self.grace - idle)
        return open_jobs, sessions, max(wait, 0.0)

    def _ids(self, domain: str, open_jobs: list[Job]) -> tuple[str, ...]:
        """What the drain waits for: the open jobs, and a Start under way."""
        ids = tuple(j.id for j in open_jobs)
        starting = self._jobs.starting(domain)
        return ids if starting is None or starting in ids else (*ids, starting)

    async def _gate(self, domain: str, deadline: float) -> bool:
        """Wait until the gate opens (True) or the deadline passes (False)."""
        # A Start under way tells nothing before its end (one that fails before it is
        # recorded leaves no job to watch); the drain keeps any other from beginning,
        # so from its end on the jobs' records tell all.
        with anyio.move_on_after(max(deadline - time.monotonic(), 0.0)):
            await self._jobs.started(domain)
        if self._jobs.starting(domain) is not None:
            return False
        while True:
            with self._jobs.watch() as changes, contextlib.suppress(anyio.EndOfStream):
                # Ended if it fell behind a burst of changes: only that something changed
                # counts, and the next watch looks again.
                return await self._opens(domain, deadline, changes)

    async def _opens(self, domain: str, deadline: float,
                     changes: MemoryObjectReceiveStream[Change]) -> bool:
        """`_gate`, while `changes` tells of every change."""
        while True:
            open_jobs, _, wait = self._blockers(domain)
            if not open_jobs or wait == 0:
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            # A job's change (state, session) or the grace running out.
            with anyio.move_on_after(min(left, wait)):
                await changes.receive()


def check_destination(uri: str) -> None:
    """InvalidParameter unless `uri` is a libvirt QEMU driver's URI of another host's
    libvirt (qemu[+transport]://host/system, or a `socket` of another libvirt here),
    with none but URI_KEYS: checked before the drain, as a migration libvirt refuses
    at once would have ended the backups for nothing. Whether the host answers only
    libvirt can tell, as it connects with its own credentials."""
    try:
        parts = urllib.parse.urlsplit(uri)
        if parts.port == 0:  # a port that is not a number raises ValueError
            raise ValueError("port 0")
        keys = [key for key, _ in urllib.parse.parse_qsl(
            parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))]
    except ValueError as e:
        raise InvalidParameter("destination", f"not a URI ({e})") from None
    driver, _, transport = parts.scheme.partition("+")
    if driver != "qemu" or transport not in TRANSPORTS:
        raise InvalidParameter("destination", "a libvirt URI of the QEMU driver, e.g. "
                                              "qemu+ssh://host2/system")
    if parts.path not in ("/system", "/session") or parts.fragment:
        raise InvalidParameter("destination", "its path is /system (or /session), e.g. "
                                              "qemu+ssh://host2/system")
    if unknown := sorted(set(keys) - URI_KEYS):
        raise InvalidParameter("destination", f"pullbackd does not pass {', '.join(unknown)}"
                                              f" on to libvirt (only "
                                              f"{', '.join(sorted(URI_KEYS))})")
    # libvirt also splits its parameters at ";", which Python's parser does not.
    if len(keys) != len(set(keys)) or ";" in parts.query:
        raise InvalidParameter("destination", "a key given twice, or a \";\" in its "
                                              "parameters")
    # ssh would take a name starting with "-" for an option.
    for name in (parts.hostname, parts.username):
        if name is not None and not NAME.fullmatch(name):
            raise InvalidParameter("destination", f"{name!r} is not a host's or a user's "
                                                  "name")
    if not parts.hostname and "socket" not in keys:
        raise InvalidParameter("destination", "names this host's own libvirt; name the "
                                              "host to migrate to")
