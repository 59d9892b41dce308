"""The libvirt adapter: the only module that imports libvirt.

Every libvirt call blocks (it is an RPC to libvirtd), so each method runs its
calls in a worker thread and the event loop never waits on libvirt. libvirt's
error codes become pullbackd's exceptions here and nowhere else. Domain events
arrive through libvirt-python's asyncio integration (libvirtaio) on the event
loop itself and are handed on as small frozen records through `events`.

The surface is kept to the handful of calls pullbackd needs, so a test can
replace one method to inject a failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import threading
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
import libvirt
import libvirtaio
import structlog
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from .errors import DomainBusy, DomainNotRunning, LibvirtError, NoSuchDomain

log = structlog.get_logger()

#: Why a domain is shut off, when its disks are as its guest left them: it shut down, or
#: libvirt has not seen it run (since libvirt started: a host's reboot says "unknown").
#: Destroyed, crashed, saved, migrated away: as if the power went.
CLEAN_SHUTOFF = (libvirt.VIR_DOMAIN_SHUTOFF_UNKNOWN, libvirt.VIR_DOMAIN_SHUTOFF_SHUTDOWN)

T = TypeVar("T")

OPERATIONS = {
    libvirt.VIR_DOMAIN_JOB_OPERATION_START: "start",
    libvirt.VIR_DOMAIN_JOB_OPERATION_SAVE: "save",
    libvirt.VIR_DOMAIN_JOB_OPERATION_RESTORE: "restore",
    libvirt.VIR_DOMAIN_JOB_OPERATION_MIGRATION_IN: "incoming migration",
    libvirt.VIR_DOMAIN_JOB_OPERATION_MIGRATION_OUT: "migration",
    libvirt.VIR_DOMAIN_JOB_OPERATION_SNAPSHOT: "snapshot",
    libvirt.VIR_DOMAIN_JOB_OPERATION_SNAPSHOT_REVERT: "snapshot revert",
    libvirt.VIR_DOMAIN_JOB_OPERATION_DUMP: "dump",
    libvirt.VIR_DOMAIN_JOB_OPERATION_BACKUP: "backup",
    libvirt.VIR_DOMAIN_JOB_OPERATION_SNAPSHOT_DELETE: "snapshot delete",
}

STOP_REASONS = {
    libvirt.VIR_DOMAIN_EVENT_STOPPED_SHUTDOWN: "shut down",
    libvirt.VIR_DOMAIN_EVENT_STOPPED_DESTROYED: "destroyed",
    libvirt.VIR_DOMAIN_EVENT_STOPPED_CRASHED: "crashed",
    libvirt.VIR_DOMAIN_EVENT_STOPPED_MIGRATED: "migrated away",
    libvirt.VIR_DOMAIN_EVENT_STOPPED_SAVED: "saved",
    libvirt.VIR_DOMAIN_EVENT_STOPPED_FAILED: "failed",
    libvirt.VIR_DOMAIN_EVENT_STOPPED_FROM_SNAPSHOT: "reverted to a snapshot",
}


@dataclass(frozen=True)
class Domain:
    name: str
    running: bool
    #: The live definition (for a running domain, what QEMU runs now).
    xml: str
    #: The libvirt job a running domain runs (e.g. "backup"), None if none (see `domain`).
    job: str | None = None
    #: The persistent definition, when asked for (see `domain`).
    inactive: str | None = None
    #: Shut off, and libvirt knows of no unclean end (CLEAN_SHUTOFF): its disks are as
    #: its guest left them.
    clean: bool = False

    @property
    def definition(self) -> Definition:
        """Its definitions; only for a domain read with `definition=True`."""
        if self.inactive is None:
            raise ValueError("the domain was read without its persistent definition")
        return Definition(self.inactive, self.xml if self.running else None)


@dataclass(frozen=True)
class Definition:
    """A domain's definitions: persistent (`virsh dumpxml --inactive`), and live while
    it runs."""
    inactive: str
    live: str | None


@dataclass(frozen=True)
class JobEnded:
    """libvirt's JOB_COMPLETED event. For a pull backup `success` means little:
    an aborted one reports success too."""

    domain: str
    operation: str
    success: bool
    error: str | None


@dataclass(frozen=True)
class DomainStopped:
    domain: str
    reason: str


@dataclass(frozen=True)
class ConnectionLost:
    reason: str


Event = JobEnded | DomainStopped | ConnectionLost

CLOSE_REASONS = {
    libvirt.VIR_CONNECT_CLOSE_REASON_ERROR: "error",
    libvirt.VIR_CONNECT_CLOSE_REASON_EOF: "libvirtd closed the connection",
    libvirt.VIR_CONNECT_CLOSE_REASON_KEEPALIVE: "libvirtd stopped answering keepalives",
    libvirt.VIR_CONNECT_CLOSE_REASON_CLIENT: "closed by us",
}


class BrokenBitmap(Exception):
    """A checkpoint's bitmap is missing or inconsistent, so no backup can be
    incremental since it. `disk` names the disk when libvirt said which."""

    def __init__(self, message: str, disk: str | None) -> None:
        super().__init__(message)
        self.disk = disk


class AgentError(Exception):
    """The guest agent did not do what was asked; the message is libvirt's. `refused`: the
    agent answered, with an error (libvirt's internal error: "unable to execute QEMU agent
    command"), so it did nothing of what was asked (qemu-ga undoes a freeze it could not
    complete); else it may not have answered at all, and may do it yet (it answers in
    order)."""

    def __init__(self, message: str, *, refused: bool = False) -> None:
        super().__init__(message)
        self.refused = refused


class ShutOff(Exception):
    """What was asked needs the domain running (libvirt's part of it); the domain is off."""


# libvirt: "missing or broken bitmap 'NAME' for disk 'vdb'".
_BITMAP_DISK = re.compile(r"for disk '([^']+)'")


def _broken_bitmap(e: Any) -> BrokenBitmap | None:
    message = e.get_error_message() or ""
    if e.get_error_code() == libvirt.VIR_ERR_CHECKPOINT_INCONSISTENT or "bitmap" in message:
        m = _BITMAP_DISK.search(message)
        return BrokenBitmap(message, m.group(1) if m else None)
    return None


def _job(dom: Any) -> str | None:
    """The job a running domain runs (e.g. "backup"), None if none. Blocks."""
    try:
        stats = dom.jobStats()
    except libvirt.libvirtError as e:
        # "domain is not running": it stopped since isActive. Not an error of `domain`
        # (which did not ask for the job before): the caller's next call finds it off.
        if e.get_error_code() == libvirt.VIR_ERR_OPERATION_INVALID:
            return None
        raise
    if stats.get("type", libvirt.VIR_DOMAIN_JOB_NONE) == libvirt.VIR_DOMAIN_JOB_NONE:
        return None
    return OPERATIONS.get(stats.get("operation", 0), "unknown")


def _register_event_loop() -> None:
    # libvirt accepts one event implementation per process, and it must be in
    # place before the first connection is opened.
    if libvirtaio.getCurrentImpl() is None:
        libvirtaio.virEventRegisterAsyncIOImpl(loop=asyncio.get_running_loop())


def _quiet(_ctx: object, _err: object) -> None:
    """libvirt prints every error to stderr unless a handler takes it: we raise them instead."""


def shut_off_definition(uri: str, name: str) -> str:
    """The persistent definition of a domain that is shut off, from a connection of its own
    (blocking: for storage_unit.py, a program of its own). Raises NoSuchDomain, and
    LibvirtError if it runs."""
    try:
        conn = libvirt.open(uri)
    except libvirt.libvirtError as e:
        raise LibvirtError(e.get_error_code(), e.get_error_message()) from None
    try:
        dom = conn.lookupByName(name)
        if dom.isActive():
            raise LibvirtError(libvirt.VIR_ERR_OPERATION_INVALID, f"{name!r} runs")
        return str(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
    except libvirt.libvirtError as e:
        if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            raise NoSuchDomain(name) from None
        raise LibvirtError(e.get_error_code(), e.get_error_message()) from None
    finally:
        conn.close()


class Virt:
    def __init__(self, uri: str) -> None:
        self.uri = uri
        self._conn: Any = None
        #: Held by a call to the domain's agent (worker threads): `_agent`.
        self._agent_locks: defaultdict[str, threading.Lock] = defaultdict(threading.Lock)
        send, receive = anyio.create_memory_object_stream[Event](math.inf)
        self._send: MemoryObjectSendStream[Event] = send
        self.events: MemoryObjectReceiveStream[Event] = receive

    async def connect(self) -> None:
        _register_event_loop()
        libvirt.registerErrorHandler(_quiet, None)

        def open_() -> Any:
            conn = libvirt.open(self.uri)
            # Without keepalive a dead libvirtd is noticed only at the next call.
            conn.setKeepAlive(5, 3)
            conn.registerCloseCallback(self._on_close, None)
            conn.domainEventRegisterAny(
                None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle, None)
            conn.domainEventRegisterAny(
                None, libvirt.VIR_DOMAIN_EVENT_ID_JOB_COMPLETED, self._on_job_completed, None)
            return conn

        try:
            self._conn = await anyio.to_thread.run_sync(open_)
        except libvirt.libvirtError as e:
            raise LibvirtError(e.get_error_code(), e.get_error_message()) from None
        log.info("connected to libvirt", uri=self.uri)

    async def close(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            with contextlib.suppress(libvirt.libvirtError):  # already lost
                await anyio.to_thread.run_sync(conn.unregisterCloseCallback)
            await anyio.to_thread.run_sync(conn.close)
        self._send.close()

    # Event callbacks run on the event loop thread (libvirtaio).

    def _on_close(self, _conn: Any, reason: int, _opaque: Any) -> None:
        if reason != libvirt.VIR_CONNECT_CLOSE_REASON_CLIENT:
            self._send.send_nowait(ConnectionLost(CLOSE_REASONS.get(reason, "unknown")))

    def _on_lifecycle(self, _conn: Any, dom: Any, event: int, detail: int, _opaque: Any) -> None:
        if event == libvirt.VIR_DOMAIN_EVENT_STOPPED:
            self._send.send_nowait(DomainStopped(dom.name(), STOP_REASONS.get(detail, "stopped")))

    def _on_job_completed(self, _conn: Any, dom: Any, params: dict[str, Any], _opaque: Any) -> None:
        self._send.send_nowait(JobEnded(
            domain=dom.name(),
            operation=OPERATIONS.get(params.get("operation", 0), "unknown"),
            success=bool(params.get("success", False)),
            error=params.get("errmsg") or None,
        ))

    async def running_domains(self) -> list[str]:
        """The names of the domains that run now."""
        def names() -> list[str]:
            flags = libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE
            return [dom.name() for dom in self._conn.listAllDomains(flags)]

        try:
            return await anyio.to_thread.run_sync(names)
        except libvirt.libvirtError as e:
            raise LibvirtError(e.get_error_code(), e.get_error_message()) from None

    # Domain calls.

    async def _run(self, domain: str, fn: Callable[[Any], T], bitmaps: bool = False) -> T:
        """Run fn(virDomain) in a worker thread, translating libvirt's errors.

        With `bitmaps`, an error about a checkpoint's bitmap becomes BrokenBitmap.
        """

        def call() -> T:
            return fn(self._conn.lookupByName(domain))

        try:
            return await anyio.to_thread.run_sync(call)
        except libvirt.libvirtError as e:
            if bitmaps and (broken := _broken_bitmap(e)) is not None:
                raise broken from None
            code = e.get_error_code()
            if code == libvirt.VIR_ERR_NO_DOMAIN:
                raise NoSuchDomain(domain) from None
            if code == libvirt.VIR_ERR_OPERATION_TIMEOUT:
                # Another job holds the domain's lock (libvirt waited 30 s for it).
                raise DomainBusy(domain, "unknown") from None
            raise LibvirtError(code, e.get_error_message()) from None

    async def domain(self, name: str, definition: bool = False) -> Domain:
        """The domain, and for a running one the job it runs; with `definition`, its
        persistent definition too (without secrets, as `definition`): one worker
        thread's calls, as a Start asks for them all (asking for the job does not wait
        for the domain's job lock, as starting one would)."""
        def get(dom: Any) -> Domain:
            running = bool(dom.isActive())
            inactive = str(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)) if definition else None
            return Domain(dom.name(), running, dom.XMLDesc(0), _job(dom) if running else None,
                          inactive, not running and dom.state()[1] in CLEAN_SHUTOFF)

        return await self._run(name, get)

    async def definition(self, name: str) -> Definition:
        """The domain's persistent definition (without secrets such as console
        passwords: it leaves the host in backups), and its live one if it runs."""
        def get(dom: Any) -> Definition:
            live = str(dom.XMLDesc(0)) if dom.isActive() else None
            return Definition(str(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)), live)

        return await self._run(name, get)

    async def define(self, xml: str) -> None:
        """Define a new domain; raises LibvirtError if libvirt refuses the definition."""
        def define() -> None:
            self._conn.defineXML(xml)

        try:
            await anyio.to_thread.run_sync(define)
        except libvirt.libvirtError as e:
            raise LibvirtError(e.get_error_code(), e.get_error_message()) from None

    async def exists(self, name: str) -> bool:
        try:
            await self._run(name, lambda dom: None)
        except NoSuchDomain:
            return False
        return True

    async def job_stats(self, domain: str) -> dict[str, Any]:
        return await self._run(domain, lambda dom: dict(dom.jobStats()))

    async def capacity(self, domain: str, disk: str) -> int:
        return await self._run(domain, lambda dom: int(dom.blockInfo(disk)[0]))

    async def capacities(self, domain: str, disks: list[str]) -> dict[str, int]:
        """`capacity` of each disk, in one worker thread's calls."""
        return await self._run(domain, lambda dom: {d: int(dom.blockInfo(d)[0]) for d in disks})

    async def backup_begin(self, domain: str, backup_xml: str,
                           checkpoint_xml: str | None = None, *, reuse: bool = False) -> None:
        """Start a backup job, and with it the checkpoint, atomically. With `reuse`, the
        scratch files (pull) or targets (push) exist: libvirt neither makes nor removes them.

        Raises BrokenBitmap when an incremental disk's bitmap cannot be used.
        """
        flags = libvirt.VIR_DOMAIN_BACKUP_BEGIN_REUSE_EXTERNAL if reuse else 0
        try:
            await self._run(domain,
                            lambda dom: dom.backupBegin(backup_xml, checkpoint_xml, flags),
                            bitmaps=True)
        except LibvirtError as e:
            if e.parameters["code"] == libvirt.VIR_ERR_OPERATION_INVALID:
                # libvirt says "domain is not running" with this code.
                raise DomainNotRunning(domain) from None
            raise

    async def backup_xml(self, domain: str) -> str | None:
        """The running backup job's XML, None if the domain has no backup job."""

        def get(dom: Any) -> str | None:
            try:
                return str(dom.backupGetXMLDesc(0))
            except libvirt.libvirtError as e:
                if e.get_error_code() in (libvirt.VIR_ERR_NO_DOMAIN_BACKUP,
                                          libvirt.VIR_ERR_OPERATION_INVALID):
                    return None
                raise

        return await self._run(domain, get)

    async def metadata(self, domain: str, namespace: str) -> str | None:
        """The domain's metadata element in `namespace` (of its persistent definition; a
        transient domain's, of its running state), or None."""
        def get(dom: Any) -> str | None:
            where = libvirt.VIR_DOMAIN_AFFECT_CONFIG if dom.isPersistent() \
                else libvirt.VIR_DOMAIN_AFFECT_LIVE
            try:
                return str(dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, namespace, where))
            except libvirt.libvirtError as e:
                if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_METADATA:
                    return None
                raise

        return await self._run(domain, get)

    async def set_metadata(self, domain: str, element: str | None, prefix: str,
                           namespace: str) -> None:
        """Set (None: remove) the domain's metadata element in `namespace`, in its running
        state and its persistent definition (a transient domain has none), so that it
        travels with a migration."""
        def set_(dom: Any) -> None:
            flags = libvirt.VIR_DOMAIN_AFFECT_CONFIG if dom.isPersistent() else 0
            if dom.isActive():
                flags |= libvirt.VIR_DOMAIN_AFFECT_LIVE
            dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, element, prefix, namespace,
                            flags)

        await self._run(domain, set_)

    async def checkpoints(self, domain: str) -> list[str]:
        """The names of the checkpoints libvirt has metadata for."""
        return await self._run(domain, lambda dom: [c.getName() for c in dom.listAllCheckpoints()])

    async def checkpoint_xml(self, domain: str, name: str) -> str:
        return await self._run(
            domain, lambda dom: str(dom.checkpointLookupByName(name).getXMLDesc(0)))

    async def redefine_checkpoint(self, domain: str, checkpoint_xml: str, validate: bool) -> None:
        """Recreate lost checkpoint metadata. With `validate`, libvirt first checks that
        every bitmap exists and is consistent (BrokenBitmap otherwise)."""
        flags = libvirt.VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE
        if validate:
            flags |= libvirt.VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE_VALIDATE
        await self._run(domain, lambda dom: dom.checkpointCreateXML(checkpoint_xml, flags),
                        bitmaps=True)

    async def delete_checkpoint(self, domain: str, name: str, *,
                                metadata_only: bool = False) -> None:
        """Delete a checkpoint and its bitmaps; one that does not exist is already deleted.

        libvirt deletes the bitmaps of a running domain only: for a shut-off one this raises
        ShutOff, and the caller removes them from the images (OfflineSource.forget), then the
        checkpoint's metadata alone (`metadata_only`).
        """

        def delete(dom: Any) -> None:
            try:
                checkpoint = dom.checkpointLookupByName(name)
            except libvirt.libvirtError as e:
                if e.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN_CHECKPOINT:
                    raise
                # Unknown to libvirt. A shut-off domain's images may still hold its bitmap
                # (pullbackd died before libvirt took the checkpoint in): the caller's.
                if not metadata_only and not dom.isActive():
                    raise ShutOff(domain) from None
                return
            if metadata_only:
                checkpoint.delete(libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)
                return
            if not dom.isActive():
                raise ShutOff(domain)
            try:
                checkpoint.delete(0)
            except libvirt.libvirtError as e:
                # A bitmap that never reached the image (QEMU killed) or was
                # removed by hand: "bitmap 'X' not found in backing chain of 'vda'".
                # Nothing is left to delete but libvirt's metadata.
                if "not found in backing chain" not in (e.get_error_message() or ""):
                    raise
                log.warning("checkpoint has lost a bitmap; deleting its metadata only",
                            domain=domain, checkpoint=name, error=e.get_error_message())
                checkpoint.delete(libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)

        await self._run(domain, delete)

    async def migrate(self, domain: str, destination: str, *, live: bool, copy_storage: bool,
                      unsafe: bool) -> None:
        """Migrate the domain to the libvirt at `destination` (peer to peer, its
        definition and metadata moving with it). Blocks for as long as it takes."""
        flags = (libvirt.VIR_MIGRATE_PEER2PEER | libvirt.VIR_MIGRATE_PERSIST_DEST
                 | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE)
        if live:
            flags |= libvirt.VIR_MIGRATE_LIVE
        if copy_storage:
            flags |= libvirt.VIR_MIGRATE_NON_SHARED_DISK
        if unsafe:
            flags |= libvirt.VIR_MIGRATE_UNSAFE
        await self._run(domain, lambda dom: dom.migrateToURI3(destination, {}, flags))

    async def fs_freeze(self, domain: str, mountpoints: list[str] | None,
                        wait: float) -> int:
        """Freeze the guest's filesystems (`mountpoints`, or all) through its agent: how
        many. Raises AgentError, also if the agent does not answer within `wait`
        seconds (it may freeze them later all the same: it answers in order)."""
        return await self._agent(domain, lambda dom: dom.fsFreeze(mountpoints, 0), wait)

    async def fs_thaw(self, domain: str, wait: float) -> int:
        """Thaw every frozen filesystem of the guest (none frozen: 0). Raises AgentError,
        also if the agent does not answer within `wait` seconds."""
        return await self._agent(domain, lambda dom: dom.fsThaw(None, 0), wait)

    async def _agent(self, domain: str, fn: Callable[[Any], int], wait: float) -> int:
        def call(dom: Any) -> int:
            # libvirt waits for the agent's answer for ever unless told otherwise: a
            # freeze held up in the guest (its writes not completing) would hold the
            # Start, and the domain's agent, as long. The wait is the domain's, for every
            # caller, and read as the command is sent: `wait` for this call, then
            # libvirt's default again, as vdsm does (libvirt does not tell what it was),
            # one call of ours at a time per domain.
            with self._agent_locks[domain]:
                dom.agentSetResponseTimeout(max(1, math.ceil(wait)), 0)
                try:
                    return int(fn(dom))
                finally:
                    with contextlib.suppress(libvirt.libvirtError):  # the domain stopped
                        dom.agentSetResponseTimeout(
                            libvirt.VIR_DOMAIN_AGENT_RESPONSE_TIMEOUT_BLOCK, 0)

        try:
            return await self._run(domain, call)
        except LibvirtError as e:
            # Not answered, or gone while it ran: VIR_ERR_AGENT_UNRESPONSIVE.
            raise AgentError(e.parameters["message"],
                             refused=e.parameters["code"] == libvirt.VIR_ERR_INTERNAL_ERROR) \
                from None

    async def abort_job(self, domain: str) -> bool:
        """End the domain's job, False if it had none. For a pull backup this is the normal end."""

        def abort(dom: Any) -> bool:
            try:
                dom.abortJob()
            except libvirt.libvirtError as e:
                if e.get_error_code() == libvirt.VIR_ERR_OPERATION_INVALID:
                    return False
                raise
            return True

        try:
            return await self._run(domain, abort)
        except NoSuchDomain:
            return False
