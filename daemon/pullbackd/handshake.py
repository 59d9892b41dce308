"""Just enough of the NBD protocol for a relay, sans-IO.

https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md

`Sniffer` follows a session through the relay without changing a byte: the
export the client opens (the server's answers tell whether it did) and the
bytes it asks to read. `Refusal` is the
server side of a handshake that answers every option with an error, for a
client the relay will not serve: NBD clients then show our message instead of
a bare "connection closed".
"""

from __future__ import annotations

import struct
from enum import Enum, auto
from typing import Any

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
EXTENDED_REQUEST_MAGIC = 0x21E41C71

FLAG_FIXED_NEWSTYLE = 1
FLAG_NO_ZEROES = 2

OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10

REP_ACK = 1
#: Set in every error reply's type.
REP_ERR = 1 << 31
REP_ERR_UNSUP = (1 << 31) + 1
REP_ERR_POLICY = (1 << 31) + 2
REP_ERR_INVALID = (1 << 31) + 3
REP_ERR_TLS_REQD = (1 << 31) + 5
REP_ERR_UNKNOWN = (1 << 31) + 6

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2

#: The options that open an export: the only ones whose data the sniffer reads.
NAMING = (OPT_EXPORT_NAME, OPT_GO, OPT_INFO)
#: The most of one such option it holds: a name of NBD's longest (4096 bytes), and room
#: for the information requests that may follow it; the rest passes unread.
MAX_OPTION = 8192

OPTION = struct.Struct(">QII")
_REQUEST = struct.Struct(">IHHQQI")
_EXTENDED_REQUEST = struct.Struct(">IHHQQQ")
REPLY = struct.Struct(">QIII")
GREETING = struct.Struct(">QQH")


class Phase(Enum):
    FLAGS = auto()
    OPTIONS = auto()
    TRANSMISSION = auto()
    #: Past what we can read (TLS started, a protocol we don't know): bytes only.
    OPAQUE = auto()
    CLOSED = auto()


#: Options a client may send ahead of their answers that the sniffer keeps track of;
#: past that it stops following the server (a client that has its GO accepted still
#: shows it with its first request).
MAX_ASKED = 64


class _Unread:
    """One direction's bytes not yet read (`held`), and how many more pass by unread
    (`skip`: a write's payload, an option's data; never held here)."""

    def __init__(self, held: bytes = b"", skip: int = 0) -> None:
        self.held, self.skip = bytearray(held), skip

    def add(self, data: bytes | bytearray | memoryview) -> None:
        if self.skip:
            taken = min(self.skip, len(data))
            self.skip -= taken
            data = data[taken:]
        self.held += data

    def pass_by(self, header: int, length: int) -> None:
        """Drop a `header` held, then `length` bytes after it: those here now, the
        rest as they come."""
        del self.held[:header]
        taken = min(length, len(self.held))
        del self.held[:taken]
        self.skip = length - taken

    def clear(self) -> None:
        self.held.clear()
        self.skip = 0


class Sniffer:
    """One NBD connection, read as it passes by.

    `feed` takes what the client sends, for the whole session: the options, then
    the requests (whose read lengths it counts). `answer` takes what the server
    sends, but only while `answering`: until the handshake is over, so that it
    knows whether an export was opened (GO acknowledged) rather than only asked
    for (GO or INFO, which the server may refuse). Past the handshake the server
    sends data, which the relay then moves without showing it to anyone.

    A STARTTLS is followed like any other option: a server without TLS refuses
    it and the client goes on in the clear; one that accepts it sees TLS next,
    which is no option, and the sniffer gives up (OPAQUE).
    """

    def __init__(self) -> None:
        self.phase = Phase.FLAGS
        #: The export opened: by EXPORT_NAME, or by a GO the server acknowledged.
        self.export: str | None = None
        #: Whether an export is open (its name may be unknown: one longer than we read).
        self.opened = False
        #: Whether `answer` still wants the server's bytes.
        self.answering = True
        #: Bytes the client asked to read (NBD_CMD_READ lengths).
        self.read = 0
        self.requests = 0
        self._client = _Unread()
        #: The export the last GO named, for a server not followed to its answer.
        self._named: str | None = None
        #: Options sent and not yet answered, oldest first, with the export each names.
        self._asked: list[tuple[int, str | None]] = []
        self._server = _Unread()
        self._greeted = False

    def state(self) -> dict[str, Any]:
        """Where it is, as JSON, for `from_state` in another process."""
        return {"phase": self.phase.name, "export": self.export, "opened": self.opened,
                "read": self.read, "requests": self.requests, "buffer": self._client.held.hex(),
                "skip": self._client.skip, "named": self._named, "answering": self.answering,
                "asked": self._asked, "answers": self._server.held.hex(),
                "greeted": self._greeted, "answer_skip": self._server.skip}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Sniffer:
        sniffer = cls()
        sniffer.phase = Phase[state["phase"]]
        sniffer.export = state["export"]
        sniffer.read = state["read"]
        sniffer.requests = state["requests"]
        sniffer._client = _Unread(bytes.fromhex(state["buffer"]), state["skip"])
        if "opened" not in state:
            # From a version that did not follow the server: its `export` was the last
            # named (maybe by an INFO, or a GO refused), and the server is not followed
            # on: in the handshake still, the first request tells what opened.
            sniffer._named = sniffer.export
            sniffer.opened = sniffer.phase not in (Phase.FLAGS, Phase.OPTIONS)
            if not sniffer.opened:
                sniffer.export = None
        else:
            sniffer.opened, sniffer._named = state["opened"], state["named"]
        sniffer.answering = state.get("answering", False)
        sniffer._asked = [(option, name) for option, name in state.get("asked", [])]
        sniffer._server = _Unread(bytes.fromhex(state.get("answers", "")),
                                  state.get("answer_skip", 0))
        sniffer._greeted = state.get("greeted", True)
        return sniffer

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self.phase in (Phase.OPAQUE, Phase.CLOSED):
            return
        self._client.add(data)
        while self._step():
            pass
        if self.phase not in (Phase.FLAGS, Phase.OPTIONS):
            self.answering = False  # no more answers to options: nothing to learn

    def answer(self, data: bytes | bytearray | memoryview) -> None:
        """The server's bytes, in order, while `answering`."""
        if not self.answering:
            return
        self._server.add(data)
        while self.answering and self._answered():
            pass

    def _step(self) -> bool:
        buf = self._client.held
        match self.phase:
            case Phase.FLAGS if len(buf) >= 4:
                del buf[:4]
                self.phase = Phase.OPTIONS
                return True
            case Phase.OPTIONS if len(buf) >= 4 and struct.unpack_from(">I", buf)[0] in (
                    REQUEST_MAGIC, EXTENDED_REQUEST_MAGIC):
                if self.answering:
                    # Its answers show the server accepted no GO (each reaches us before
                    # the client sees it): whatever this is, no request.
                    return self._give_up()
                # The server accepted GO (its answers were not followed): requests follow.
                self._opened(self._named)
                self.phase = Phase.TRANSMISSION
                return True
            case Phase.OPTIONS if len(buf) >= OPTION.size:
                magic, option, length = OPTION.unpack_from(buf)
                if magic != IHAVEOPT:
                    return self._give_up()
                if option not in NAMING or (option == OPT_EXPORT_NAME and length > MAX_OPTION):
                    # Nothing in it is ours to read: it passes by, never held here
                    # (a client may send up to 32 MiB of an option QEMU refuses).
                    self._client.pass_by(OPTION.size, length)
                    if option == OPT_EXPORT_NAME:  # a name longer than NBD allows
                        self._opened(None)
                        self.phase = Phase.TRANSMISSION
                    else:
                        self._ask(option, None)
                    return True
                # A GO's or an INFO's name comes first; the information requests
                # after it, as many as the client likes, pass by unread.
                held = min(length, MAX_OPTION)
                if len(buf) < OPTION.size + held:
                    return False
                data = bytes(buf[OPTION.size:OPTION.size + held])
                self._client.pass_by(OPTION.size + held, length - held)
                self._option(option, data)
                return True
            case Phase.TRANSMISSION if len(buf) >= 4:
                magic = struct.unpack_from(">I", buf)[0]
                header = _REQUEST if magic == REQUEST_MAGIC else _EXTENDED_REQUEST
                if magic not in (REQUEST_MAGIC, EXTENDED_REQUEST_MAGIC):
                    return self._give_up()
                if len(buf) < header.size:
                    return False
                _, _, command, _, _, length = header.unpack_from(buf)
                self.requests += 1
                self._client.pass_by(header.size, length if command == CMD_WRITE else 0)
                if command == CMD_READ:
                    self.read += length
                elif command == CMD_DISC:
                    self.phase = Phase.CLOSED
                    buf.clear()
                    return False
                return True
        return False

    def _option(self, option: int, data: bytes) -> None:
        name = export_name(option, data)
        if option == OPT_EXPORT_NAME:  # no answer: transmission follows at once
            self._opened(name)
            self.phase = Phase.TRANSMISSION
            return
        if option == OPT_GO:
            self._named = name
        self._ask(option, name)

    def _ask(self, option: int, name: str | None) -> None:
        if len(self._asked) < MAX_ASKED:
            self._asked.append((option, name))
        else:
            self._stop_answering()

    def _answered(self) -> bool:
        """One step through the server's greeting and answers."""
        buf = self._server.held
        if not self._greeted:
            if len(buf) < GREETING.size:
                return False
            magic, opt, _ = GREETING.unpack_from(buf)
            if (magic, opt) != (NBDMAGIC, IHAVEOPT):
                return self._stop_answering()
            del buf[:GREETING.size]
            self._greeted = True
            return True
        if len(buf) < REPLY.size:
            return False
        magic, option, reply, length = REPLY.unpack_from(buf)
        if magic != REPLY_MAGIC or not self._asked or self._asked[0][0] != option:
            return self._stop_answering()  # not what we know of the protocol
        self._server.pass_by(REPLY.size, length)
        if reply == REP_ACK or reply & REP_ERR:  # the last answer to that option
            _, name = self._asked.pop(0)
            if option == OPT_GO and reply == REP_ACK:
                self._opened(name)
                return self._stop_answering()  # transmission: data from now on
        return True

    @property
    def awaiting_server(self) -> bool:
        """Whether the server, followed, owes the client an answer: its greeting, or one to
        an option asked (time that is the server's, not the client's)."""
        return self.answering and (not self._greeted or bool(self._asked))

    def _opened(self, name: str | None) -> None:
        if not self.opened:
            self.opened, self.export = True, name

    def _stop_answering(self) -> bool:
        self.answering = False
        self._server.clear()
        self._asked.clear()
        return False

    def _give_up(self) -> bool:
        self.phase = Phase.OPAQUE
        self._client.clear()
        self._stop_answering()
        return False


def option_reply(option: int, reply: int, data: bytes = b"") -> bytes:
    return REPLY.pack(REPLY_MAGIC, option, reply, len(data)) + data


def export_name(option: int, data: bytes) -> str | None:
    """The export an option names, if it names one."""
    if option == OPT_EXPORT_NAME:
        return data.decode(errors="replace")
    if option in (OPT_GO, OPT_INFO, OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT) \
            and len(data) >= 4:
        (size,) = struct.unpack_from(">I", data)
        if len(data) >= 4 + size:
            return data[4:4 + size].decode(errors="replace")
    return None


def greeting() -> bytes:
    """A fixed-newstyle server's first words."""
    return GREETING.pack(NBDMAGIC, IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)


class Refusal:
    """A server handshake that refuses every option with `message` (NBD_REP_ERR_POLICY)."""

    def __init__(self, message: str) -> None:
        self.message = message.encode()
        self.done = False
        self._buffer = bytearray()
        self._flags_read = False

    def greeting(self) -> bytes:
        return greeting()

    def feed(self, data: bytes) -> bytes:
        """What to send back; `done` once the connection should close."""
        self._buffer += data
        out = bytearray()
        buf = self._buffer
        if not self._flags_read and len(buf) >= 4:
            del buf[:4]
            self._flags_read = True
        while self._flags_read and not self.done and len(buf) >= OPTION.size:
            magic, option, length = OPTION.unpack_from(buf)
            if magic != IHAVEOPT or option == OPT_EXPORT_NAME or length > MAX_OPTION:
                self.done = True  # no way to answer either but hanging up; nor to hold it
                break
            if len(buf) < OPTION.size + length:
                break
            del buf[:OPTION.size + length]
            if option == OPT_ABORT:
                out += option_reply(option, REP_ACK)
                self.done = True
            else:
                out += option_reply(option, REP_ERR_POLICY, self.message)
        return bytes(out)
