"""The varlink server on anyio.

One task per connection; the calls of one connection are answered in the order
they came (varlink allows pipelining, and its replies carry no call id). A call
runs to its end even if its client goes away meanwhile, so a `Start` whose
caller vanished still leaves a job that `List` shows, never half of one. A
stream of replies (`Watch`, `Migrate`) is the exception: it is for its caller,
and ends when the caller hangs up, not at the next reply it could not take.

The caller's role is looked up again after a reload changed [roles]: a role
taken away applies from the connection's next call.

A stop (`stop`: systemd stops or restarts the daemon) answers what callers already
sent: it stops accepting (connections not yet accepted wait in the socket, systemd's,
for the next run), and each open connection answers the calls it has read or that wait
in its socket, then closes; a stream of replies ends at once. A connection closed with a
call unread in it reached its caller as a reset, a call lost in a restart that promised
none would be.
"""

from __future__ import annotations

import contextlib
import grp
import inspect
import itertools
import os
import select
import socket
import stat
import struct
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator, Mapping
from contextlib import aclosing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import structlog
from anyio.abc import SocketAttribute, SocketListener, SocketStream

from ..accepting import Refusals, accepted
from ..errors import InvalidParameter, PullbackError
from ..roles import Role, Roles
from . import idl
from .codec import Call, Decoder, ProtocolError, Reply, decode, encode, parse_call

log = structlog.get_logger()

SERVICE = "org.varlink.service"
#: Seconds between two looks at whether the caller of a stream of replies hung up.
HANGUP_POLL = 1.0
#: Seconds a connection waits, once the service stops, for what its caller is sending
#: (a call already in its socket arrives at once; one written as the stop came, soon).
STOP_READ = 0.5


@dataclass(frozen=True)
class Last:
    """The final reply of a streaming method (`continues` false)."""

    parameters: dict[str, Any]


#: A method handler: called with the call's parameters as keyword arguments;
#: returns the reply's parameters, or is an async generator of them for
#: methods that stream replies (`more`), sent as they come, and ending with a
#: `Last` (or never, until the client hangs up). A handler with a keyword-only
#: parameter of GIVEN is given that of its caller too: what it shows, or allows, may
#: depend on it.
Handler = Callable[...,
                   Awaitable[dict[str, Any]] | AsyncGenerator[dict[str, Any] | Last, None]]
#: What a handler may be given of its caller: `role` (roles.Role), and `uid` (from its
#: peer credentials; None for a call that came through no socket).
GIVEN = ("role", "uid")


@dataclass(frozen=True)
class Peer:
    """Who is on the other end of a Unix socket (SO_PEERCRED)."""

    pid: int
    uid: int
    gid: int


def peer_of(stream: SocketStream) -> Peer | None:
    sock = stream.extra(SocketAttribute.raw_socket)
    if sock.family != socket.AF_UNIX:
        return None
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return Peer(*struct.unpack("3i", raw))


@dataclass(frozen=True)
class Limits:
    """What one client can hold of the daemon ([control] in the configuration)."""

    #: Connections open at once from users other than root, in all and per user;
    #: one more is closed at once. Root is never refused: it must always get in.
    connections: int = 256
    per_user: int = 32
    #: Seconds a connection may wait between calls saying nothing; then it is closed.
    idle_timeout: float = 60.0


@dataclass
class Service:
    """The interfaces a socket serves, with `org.varlink.service` built in."""

    vendor: str
    product: str
    version: str
    url: str
    #: The error a handler's unexpected exception becomes, fully qualified.
    internal_error: str
    #: Who may call what (org.varlink.service is open to everyone who connects).
    roles: Roles = field(default_factory=Roles)
    limits: Limits = field(default_factory=Limits)
    #: Connections open now, per uid (root's not counted).
    _open: dict[int, int] = field(default_factory=dict)
    _refusals: Refusals = field(default_factory=lambda: Refusals("control"))
    _interfaces: dict[str, tuple[idl.Interface, Mapping[str, Handler]]] = field(
        default_factory=dict
    )
    _ids: itertools.count[int] = field(default_factory=itertools.count)
    #: What each method's handler ("interface.Method") is given of its caller (GIVEN).
    _given: dict[str, set[str]] = field(default_factory=dict)
    #: Set by `stop`; then what it cancels: the accept loop, each connection's wait for
    #: a call, each stream of replies.
    _stopping: bool = False
    _stoppable: set[anyio.CancelScope] = field(default_factory=set)
    #: Accept loops running, and connections being served (`serve`): `stop` waits for
    #: both to end, as an accept loop cancelled by the stop may yet take a connection (its
    #: accept was ready to run), which must be answered too. `_changed`: set when either
    #: drops, for `stop`.
    _accepting: int = 0
    _live: int = 0
    _changed: anyio.Event | None = None

    def add(self, iface: idl.Interface, handlers: Mapping[str, Handler]) -> None:
        unknown = set(handlers) - set(iface.methods)
        missing = set(iface.methods) - set(handlers)
        if unknown or missing:
            raise ValueError(f"{iface.name}: handlers without method {unknown}, "
                             f"methods without handler {missing}")
        for name, handler in handlers.items():
            parameters = inspect.signature(handler).parameters
            for given in GIVEN:
                if given in parameters and \
                        parameters[given].kind == inspect.Parameter.KEYWORD_ONLY:
                    if given in dict(iface.methods[name].input.fields):
                        raise ValueError(f"{iface.name}.{name}: a parameter is named {given}")
                    self._given.setdefault(f"{iface.name}.{name}", set()).add(given)
        self._interfaces[iface.name] = (iface, handlers)

    def add_service_interface(self, iface: idl.Interface) -> None:
        self.add(iface, {
            "GetInfo": self._get_info,
            "GetInterfaceDescription": self._get_interface_description,
        })

    async def _get_info(self) -> dict[str, Any]:
        return {"vendor": self.vendor, "product": self.product, "version": self.version,
                "url": self.url, "interfaces": list(self._interfaces)}

    async def _get_interface_description(self, interface: str) -> dict[str, Any]:
        if interface not in self._interfaces:
            raise _Error(f"{SERVICE}.InterfaceNotFound", {"interface": interface})
        return {"description": self._interfaces[interface][0].description}

    async def replies(self, call: Call, role: Role = Role.ADMIN,
                      peer: Peer | None = None) -> AsyncGenerator[Reply, None]:
        """Answer one call: one reply, or several for a streaming method called with `more`."""
        try:
            handler = self._resolve(call)
            if call.interface != SERVICE:
                self.roles.check(role, call.member)
                if self.roles.changes(call.member):
                    log.info("call", method=call.method, uid=peer and peer.uid,
                             pid=peer and peer.pid, role=role.label,
                             parameters=call.parameters)
            about = {"role": role, "uid": peer and peer.uid}
            given = {k: about[k] for k in self._given.get(call.method, ())}
            result = handler(**call.parameters, **given)
            if isinstance(result, AsyncGenerator):
                if not call.more or call.oneway:
                    # A stream of replies nobody reads (oneway) would run on unseen,
                    # and hold its place, for as long as the daemon does.
                    await result.aclose()
                    raise _Error(f"{SERVICE}.ExpectedMore", {})
                # Each reply goes out as soon as it exists: a watcher must not
                # wait for the next event to hear of this one.
                async with aclosing(result):
                    async for item in result:
                        if isinstance(item, Last):
                            yield Reply(item.parameters)
                            return
                        yield Reply(item, continues=True)
                raise RuntimeError(f"{call.method} ended its replies without a last one")
            else:
                yield Reply(await result)
        except _Error as e:
            yield Reply(e.parameters, error=e.name)
        except InvalidParameter as e:
            # varlink's own error carries the parameter's name alone: why goes to the log.
            log.info("call failed", method=call.method, error="InvalidParameter",
                     reason=str(e))
            yield Reply(e.parameters, error=f"{SERVICE}.InvalidParameter")
        except PullbackError as e:
            interface = call.interface
            if e.name in self._interfaces[interface][0].errors:
                log.info("call failed", method=call.method, error=e.name, reason=str(e))
                yield Reply(e.parameters, error=f"{interface}.{e.name}")
            else:
                yield self._internal(call, e)
        except Exception as e:
            yield self._internal(call, e)

    def _resolve(self, call: Call) -> Handler:
        if call.upgrade:
            raise _Error(f"{SERVICE}.InvalidParameter", {"parameter": "upgrade"})
        if call.interface not in self._interfaces:
            raise _Error(f"{SERVICE}.InterfaceNotFound", {"interface": call.interface})
        iface, handlers = self._interfaces[call.interface]
        method = iface.methods.get(call.member)
        if method is None:
            raise _Error(f"{SERVICE}.MethodNotFound", {"method": call.method})
        try:
            idl.check_fields(iface, method.input, call.parameters)
        except idl.Mismatch as e:
            raise _Error(f"{SERVICE}.InvalidParameter", {"parameter": e.path}) from None
        return handlers[call.member]

    def _internal(self, call: Call, exc: Exception) -> Reply:
        # Unknown exceptions never cross the socket: the journal gets the
        # traceback, the caller a reference to find it by.
        reference = uuid.uuid4().hex[:12]
        log.error("call crashed", method=call.method, reference=reference, exc_info=exc)
        return Reply({"reference": reference}, error=self.internal_error)

    async def _violation(self, stream: SocketStream,
                         clog: structlog.typing.FilteringBoundLogger, error: ProtocolError,
                         name: str) -> None:
        clog.warning("protocol violation, closing", reason=str(error))
        with anyio.fail_after(self.limits.idle_timeout):
            await stream.send(encode(Reply({"reason": str(error)}, name).to_message()))

    def _streams(self, call: Call) -> bool:
        """Whether the call is answered with a stream of replies."""
        handlers = self._interfaces.get(call.interface, (None, {}))[1]
        return call.more and not call.oneway and \
            inspect.isasyncgenfunction(handlers.get(call.member))

    async def serve(self, listener: SocketListener, protocol_error: str) -> None:
        """Accept connections until cancelled, each served in a task of its own.

        Out of file descriptors, it backs off and accepts again; over the limits, a
        connection is closed at once. Neither ends the loop or touches the others.
        """
        async with anyio.create_task_group() as tg:
            self._accepting += 1
            try:
                with self._stoppable_scope():
                    async for stream in accepted(listener, self._refusals):
                        peer = peer_of(stream)
                        uid = -1 if peer is None else peer.uid
                        if uid != 0 and (sum(self._open.values()) >= self.limits.connections
                                         or self._open.get(uid, 0) >= self.limits.per_user):
                            self._refusals.note("too many connections", uid=uid)
                            await stream.aclose()
                            continue
                        self._live += 1
                        tg.start_soon(self._counted, stream, uid, protocol_error)
            finally:
                self._accepting -= 1
                self._note_change()

    async def stop(self, grace: float) -> None:
        """Stop serving (see above): return once every connection answered what it had
        been sent and closed, or after `grace` seconds (the caller then cancels what is
        left: calls that run longer, as a Verify)."""
        self._stopping = True
        for scope in self._stoppable:
            scope.cancel()
        with anyio.move_on_after(grace):
            while self._accepting or self._live:
                self._changed = anyio.Event()
                await self._changed.wait()

    def _note_change(self) -> None:
        if self._changed is not None:
            self._changed.set()

    @contextlib.contextmanager
    def _stoppable_scope(self) -> Iterator[anyio.CancelScope]:
        """A scope `stop` cancels (at once, if it was called already)."""
        with anyio.CancelScope() as scope:
            if self._stopping:
                scope.cancel()
            self._stoppable.add(scope)
            try:
                yield scope
            finally:
                self._stoppable.discard(scope)

    async def _counted(self, stream: SocketStream, uid: int, protocol_error: str) -> None:
        if uid != 0:
            self._open[uid] = self._open.get(uid, 0) + 1
        try:
            await self.handle(stream, protocol_error)
        finally:
            if uid != 0:
                self._open[uid] -= 1
                if not self._open[uid]:
                    del self._open[uid]
            self._live -= 1
            self._note_change()

    async def _receive(self, stream: SocketStream) -> bytes | None:
        """What the caller sends next (TimeoutError after `limits.idle_timeout`); once
        the service stops, only what it sends within STOP_READ (None if nothing)."""
        if not self._stopping:
            with anyio.fail_after(self.limits.idle_timeout), self._stoppable_scope():
                return await stream.receive()
        with anyio.move_on_after(STOP_READ):
            return await stream.receive()
        return None

    async def handle(self, stream: SocketStream, protocol_error: str) -> None:
        """Serve one connection until the peer closes it, breaks the protocol, or says
        nothing (or reads nothing) for `limits.idle_timeout`."""
        conn = next(self._ids)
        peer = peer_of(stream)
        clog = log.bind(conn=conn, peer_pid=peer and peer.pid, peer_uid=peer and peer.uid)
        caller = _Caller(peer)
        clog.debug("connected", role=(await caller.role(self.roles)).label)
        decoder = Decoder()
        async with stream, anyio.create_task_group() as tg:
            try:
                while True:
                    try:
                        data = await self._receive(stream)
                        if data is None:
                            clog.debug("closing: the service stops")
                            return
                        frames = decoder.feed(data)
                    except ProtocolError as e:
                        return await self._violation(stream, clog, e, protocol_error)
                    except TimeoutError:
                        clog.debug("idle, closing", seconds=self.limits.idle_timeout)
                        return
                    for frame in frames:
                        try:
                            call = parse_call(decode(frame))
                        except ProtocolError as e:
                            return await self._violation(stream, clog, e, protocol_error)
                        clog.debug("call", method=call.method)
                        role = await caller.role(self.roles)
                        if not await self._answer(stream, call, role, peer, tg):
                            clog.debug("hung up during a stream of replies",
                                       method=call.method)
                            return
            except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
                clog.debug("disconnected", unread=decoder.pending)
            except TimeoutError:
                clog.info("reads no replies, closing", seconds=self.limits.idle_timeout)
            except Exception:
                # No client may take the daemon down: whatever one connection
                # did, it ends that connection alone.
                clog.exception("connection crashed; closing it")

    async def _answer(self, stream: SocketStream, call: Call, role: Role,
                      peer: Peer | None, tg: anyio.abc.TaskGroup) -> bool:
        """Send the call's replies (none if oneway). False if the caller hung up in
        the middle of a stream of them, which then ended; TimeoutError if it reads
        nothing for `limits.idle_timeout`."""
        with self._stoppable_scope() if self._streams(call) else \
                anyio.CancelScope() as replying:
            watching = await tg.start(_until_hung_up, stream, replying) \
                if self._streams(call) else None
            try:
                # Closed here, not by the garbage collector, when the replies end early.
                async with aclosing(self.replies(call, role, peer)) as replies:
                    async for reply in replies:
                        if not call.oneway:
                            with anyio.fail_after(self.limits.idle_timeout):
                                await stream.send(encode(reply.to_message()))
            finally:
                if watching is not None:
                    watching.cancel()
        if call.oneway:
            # Nothing was sent, so nothing yielded: a stream of oneway calls would
            # hold the event loop (and the watchdog) for as long as it lasts.
            await anyio.lowlevel.checkpoint()
        return not replying.cancelled_caught


async def _until_hung_up(stream: SocketStream, replying: anyio.CancelScope, *,
                         task_status: anyio.abc.TaskStatus[anyio.CancelScope]) -> None:
    """Cancel `replying` once the peer has closed its end of the connection.

    Only a hang-up counts: a peer that shut its writing side alone (a shell
    pipe) still reads, and calls it sent meanwhile wait in the socket. The
    socket is asked directly (poll), as its transport owns it on the event loop.
    """
    poller = select.poll()
    poller.register(stream.extra(SocketAttribute.raw_socket), select.POLLHUP)
    with anyio.CancelScope() as watching:
        task_status.started(watching)
        while True:
            await anyio.sleep(HANGUP_POLL)
            try:
                hung_up = bool(poller.poll(0))
            except (OSError, ValueError):
                hung_up = True  # the socket is gone: nobody reads what follows
            if hung_up:
                replying.cancel()
                return


class _Caller:
    """Who is calling, and the role [roles] gives them: looked up again only after a
    reload gave the service new roles."""

    def __init__(self, peer: Peer | None) -> None:
        self._peer = peer
        self._by: Roles | None = None
        self._role = Role.NONE

    async def role(self, roles: Roles) -> Role:
        if self._peer is not None and roles is not self._by:
            peer = self._peer
            self._role = await anyio.to_thread.run_sync(roles.of, peer.uid, peer.gid)
            self._by = roles
        return self._role


class _Error(Exception):
    """A varlink error that is not one of ours: `org.varlink.service.*`."""

    def __init__(self, name: str, parameters: dict[str, Any]) -> None:
        super().__init__(name)
        self.name = name
        self.parameters = parameters


async def bind(path: Path, mode: int, group: str | None) -> SocketListener:
    """Listen on `path`, replacing a stale socket but never a live one."""
    apath = anyio.Path(path)
    if not await apath.parent.is_dir():
        await apath.parent.mkdir(parents=True)
        await apath.parent.chmod(0o755)  # the daemon's umask is 0077; the socket has its mode
    if await apath.exists() or await apath.is_symlink():
        if not stat.S_ISSOCK((await apath.lstat()).st_mode):
            raise FileExistsError(f"{path} exists and is not a socket; remove it")
        try:
            stream = await anyio.connect_unix(path)
        except OSError:
            await apath.unlink()  # nobody listens: left over from a crash
        else:
            await stream.aclose()
            raise FileExistsError(f"another process is serving {path}")
    listener = await anyio.create_unix_listener(path, mode=mode)
    if group:
        os.chown(path, -1, grp.getgrnam(group).gr_gid)
    return listener
