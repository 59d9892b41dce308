"""The TCP endpoint for remote appliances: one port for every job, TLS only.

pullbackd speaks the start of the NBD handshake itself: the greeting, then
options until the client has started TLS (NBD_OPT_STARTTLS, answered and ended
here with `[exports] tls_certificates`; any other option before it gets
NBD_REP_ERR_TLS_REQD), then options until one names an export. Export names are
unguessable and unique per job (names.export_token), so the name picks the job and the
disk; the connection then becomes a session of that job's endpoint (counted,
limited, cut by Abort like any other) and is relayed to QEMU's NBD server:
pullbackd replays the client's flags and structured-reply choice to QEMU,
forwards the option that named the export, and from then on passes bytes both
ways. A client that lists exports gets an empty list.

TLS sessions run on the event loop (the bytes are decrypted in Python anyway)
and cannot outlive a restart of the daemon: the TLS state is the process's.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
from pathlib import Path
from typing import Any, cast

import anyio
import structlog
from anyio.abc import SocketAttribute, SocketListener, UNIXSocketStream
from anyio.streams.buffered import BufferedByteReceiveStream
from anyio.streams.tls import TLSAttribute, TLSStream

from .accepting import Refusals, accepted
from .exports import Exports, connect_unix
from .handshake import (
    GREETING,
    IHAVEOPT,
    NBDMAGIC,
    OPT_ABORT,
    OPT_EXPORT_NAME,
    OPT_LIST,
    OPT_STARTTLS,
    OPT_STRUCTURED_REPLY,
    OPTION,
    REP_ACK,
    REP_ERR_INVALID,
    REP_ERR_POLICY,
    REP_ERR_TLS_REQD,
    REP_ERR_UNKNOWN,
    REP_ERR_UNSUP,
    REPLY,
    REPLY_MAGIC,
    Sniffer,
    export_name,
    greeting,
    option_reply,
)

log = structlog.get_logger()

#: Bytes of option data a client may send before it is a session: names, not payloads.
MAX_OPTION = 64 << 10
#: Seconds a client may take to get from connecting to naming an export.
HANDSHAKE_TIMEOUT = 30.0


def tls_context(folder: Path, verify_clients: bool) -> ssl.SSLContext:
    """The server side of TLS, from a folder laid out as QEMU's and libnbd's are:
    server-cert.pem, server-key.pem, and ca-cert.pem (checks client certificates)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(folder / "server-cert.pem", folder / "server-key.pem")
    if verify_clients:
        context.load_verify_locations(folder / "ca-cert.pem")
        context.verify_mode = ssl.CERT_REQUIRED
    return context


class Remote:
    """The TCP listener, and the handshake up to the export name."""

    def __init__(self, exports: Exports, host: str, port: int,
                 tls: ssl.SSLContext | None, handshakes: int = 64, per_address: int = 8
                 ) -> None:
        """`handshakes`, `per_address`: connections that may be in their handshake (not
        yet a job's session, maybe not even TLS) at once, in all and from one address;
        one more is closed at once. Nobody has been authenticated yet: they must not
        take every descriptor, nor every place, of the daemon."""
        self._exports = exports
        self.host, self.port = host, port
        #: None: plain TCP, allowed only by `[exports] insecure_tcp`.
        self._tls = tls
        self._refusals = Refusals("tcp")
        self._handshakes, self._per_address = handshakes, per_address
        #: Connections in their handshake now, per address.
        self._shaking: dict[str, int] = {}

    async def serve(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
                    ) -> None:
        listener = await anyio.create_tcp_listener(local_host=self.host or None,
                                                   local_port=self.port, reuse_port=False)
        self.port = listener.extra(SocketAttribute.local_port)
        log.info("remote endpoint listening", host=self.host, port=self.port,
                 tls=self._tls is not None)
        task_status.started()
        async with listener, anyio.create_task_group() as tg:
            for one in listener.listeners:  # an address family each: SocketListeners
                tg.start_soon(self._accept, cast(SocketListener, one), tg)

    async def _accept(self, listener: SocketListener, tg: anyio.abc.TaskGroup) -> None:
        async for stream in accepted(listener, self._refusals):
            address = stream.extra(SocketAttribute.remote_address)
            host = str(address[0]) if isinstance(address, tuple) else "?"
            if sum(self._shaking.values()) >= self._handshakes or \
                    self._shaking.get(host, 0) >= self._per_address:
                self._refusals.note("too many connections in their handshake", address=host)
                await stream.aclose()
                continue
            self._shaking[host] = self._shaking.get(host, 0) + 1
            tg.start_soon(self._connection, stream, host)

    async def _connection(self, stream: anyio.abc.SocketStream, host: str) -> None:
        address = stream.extra(SocketAttribute.remote_address)
        peer = f"tcp {address[0]}:{address[1]}" if isinstance(address, tuple) else "tcp"
        handed = False
        try:
            with anyio.fail_after(HANDSHAKE_TIMEOUT):
                handed = await self._handshake(stream, peer)
        except (TimeoutError, OSError, ssl.SSLError, anyio.EndOfStream,
                anyio.BrokenResourceError, anyio.IncompleteRead, _Hangup) as e:
            log.info("remote connection ended in the handshake", peer=peer, reason=repr(e))
        except Exception:  # ends this connection alone, never the endpoint
            log.exception("remote connection failed in the handshake", peer=peer)
        finally:
            self._shaking[host] -= 1
            if not self._shaking[host]:
                del self._shaking[host]
            if not handed:
                with anyio.CancelScope(shield=True):
                    await stream.aclose()

    async def _handshake(self, stream: anyio.abc.SocketStream, peer: str) -> bool:
        """Negotiate until the client names an export; True once a job took it."""
        conn: anyio.abc.ByteStream = stream
        reader = BufferedByteReceiveStream(stream)
        await conn.send(greeting())
        flags = await reader.receive_exactly(4)
        secure = self._tls is None  # nothing to wait for without TLS
        structured = False
        while True:
            magic, option, length = OPTION.unpack(await reader.receive_exactly(OPTION.size))
            if magic != IHAVEOPT or length > MAX_OPTION:
                raise _Hangup("not an NBD option")
            data = await reader.receive_exactly(length) if length else b""
            if option == OPT_ABORT:
                await conn.send(option_reply(option, REP_ACK))
                raise _Hangup("the client aborted")
            if not secure:
                if option == OPT_STARTTLS and self._tls is not None:
                    await conn.send(option_reply(option, REP_ACK))
                    conn = await TLSStream.wrap(stream, server_side=True,
                                                ssl_context=self._tls,
                                                standard_compatible=False)
                    reader = BufferedByteReceiveStream(conn)
                    secure = True
                    peer += _subject(conn)
                    continue
                if option == OPT_EXPORT_NAME:
                    raise _Hangup("export name before TLS")
                await conn.send(option_reply(option, REP_ERR_TLS_REQD,
                                             b"TLS is required: start it with NBD_OPT_STARTTLS"))
                continue
            if option == OPT_STARTTLS:
                await conn.send(option_reply(option, REP_ERR_INVALID, b"TLS is already on"))
            elif option == OPT_STRUCTURED_REPLY:
                # QEMU offers it; the choice is replayed to it once the export is known.
                structured = True
                await conn.send(option_reply(option, REP_ACK))
            elif option == OPT_LIST:
                await conn.send(option_reply(option, REP_ACK))  # names are not for listing
            elif (name := export_name(option, data)) is None:
                await conn.send(option_reply(option, REP_ERR_UNSUP))
            elif (endpoint := self._exports.by_export(name)) is None:
                if option == OPT_EXPORT_NAME:
                    raise _Hangup("no such export")
                await conn.send(option_reply(option, REP_ERR_UNKNOWN, b"no such export"))
            else:
                relay = _RemoteRelay(conn, reader, flags, structured,
                                     OPTION.pack(magic, option, length) + data)
                if await endpoint.attach(peer, relay):
                    return True
                await conn.send(option_reply(option, REP_ERR_POLICY,
                                             endpoint.refusal().encode()))
                raise _Hangup("connection limit")


class _Hangup(Exception):
    """The handshake is over without a session."""


def _subject(conn: anyio.abc.ByteStream) -> str:
    cert: dict[str, Any] | None = conn.extra(TLSAttribute.peer_certificate, None)
    if not cert:
        return ""
    names = dict(item for rdn in cert.get("subject", ()) for item in rdn)
    return f" cert CN={names.get('commonName', '?')}"


class _RemoteRelay:
    """A remote session, relayed to QEMU on the event loop (see exports.Relay)."""

    def __init__(self, client: anyio.abc.ByteStream, reader: BufferedByteReceiveStream,
                 flags: bytes, structured: bool, first: bytes) -> None:
        self.client, self.reader = client, reader
        self.flags, self.structured, self.first = flags, structured, first
        self.sniffer = Sniffer()
        self.errors: list[str] = []
        self.qemu: anyio.abc.ByteStream | None = None
        self._scope = anyio.CancelScope()

    async def connect(self, upstream: Path) -> None:
        """Reach QEMU and bring it to where the client is: flags given, structured
        replies chosen; then hand it the option that named the export."""
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                await connect_unix(sock, upstream)
            except BaseException:
                sock.close()
                raise
            self.qemu = qemu = await UNIXSocketStream.from_socket(sock)
            replies = BufferedByteReceiveStream(qemu)

            async def said(data: bytes) -> None:  # the sniffer follows QEMU's conversation
                self.sniffer.feed(data)
                await qemu.send(data)

            async def answered(size: int) -> bytes:
                data = await replies.receive_exactly(size)
                self.sniffer.answer(data)
                return data

            magic, opt, _ = GREETING.unpack(await answered(GREETING.size))
            if (magic, opt) != (NBDMAGIC, IHAVEOPT):
                raise OSError("QEMU's NBD server sent no newstyle greeting")
            await said(self.flags)
            if self.structured:
                await said(OPTION.pack(IHAVEOPT, OPT_STRUCTURED_REPLY, 0))
                magic, opt, reply, length = REPLY.unpack(await answered(REPLY.size))
                if length:
                    await answered(length)
                if (magic, opt, reply) != (REPLY_MAGIC, OPT_STRUCTURED_REPLY, REP_ACK):
                    raise OSError("QEMU's NBD server refused structured replies")
            await said(self.first)
            if replies.buffer:
                raise OSError("QEMU's NBD server said more than asked")
        except (OSError, anyio.EndOfStream, anyio.IncompleteRead, anyio.BrokenResourceError,
                anyio.ClosedResourceError) as e:
            self.errors.append(f"cannot reach QEMU's NBD server: {e!r}")

    async def run(self) -> bool:
        assert self.qemu is not None
        with self._scope:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._pass, self.reader, self.qemu, True, tg.cancel_scope)
                tg.start_soon(self._pass, self.qemu, self.client, False, tg.cancel_scope)
        return False  # never paused: TLS cannot be handed over

    async def _pass(self, source: anyio.abc.ByteReceiveStream,
                    sink: anyio.abc.ByteSendStream, sniff: bool,
                    scope: anyio.CancelScope) -> None:
        try:
            while True:
                data = await source.receive(256 << 10)
                if sniff:
                    self.sniffer.feed(data)
                else:
                    self.sniffer.answer(data)  # nothing once the handshake is over
                await sink.send(data)
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError,
                ssl.SSLError, OSError) as e:
            if not isinstance(e, anyio.EndOfStream | anyio.BrokenResourceError):
                self.errors.append(repr(e))
        scope.cancel()  # one side gone: the session is over

    def pause(self) -> None:
        self.stop()

    def stop(self) -> None:
        self._scope.cancel()

    def fds(self) -> tuple[int, int]:
        raise AssertionError("a TLS session is never handed over")

    async def aclose(self) -> None:
        for stream in (self.client, self.qemu):
            if stream is not None:
                with contextlib.suppress(OSError, anyio.BrokenResourceError, ssl.SSLError):
                    await stream.aclose()
