"""An NBD server that answers every read short: a success made of one data chunk that
covers only the first half of the read (fixed newstyle, structured replies), as a buggy
or corrupt server might. Its disk reads 0x5a throughout. Read-only.

Usage: python -m tests.short_reads SOCKET SIZE"""

from __future__ import annotations

import contextlib
import socket
import struct
import sys
import threading

OPTION_REPLY = 0x3E889045565A9
STRUCTURED = 0x668E33EF
ACK, INFO, META_CONTEXT, ERR_UNSUP = 1, 3, 4, (1 << 31) + 1
OPT_ABORT, OPT_GO, OPT_STRUCTURED_REPLY, OPT_SET_META_CONTEXT = 2, 7, 8, 10
CMD_READ, CMD_DISC, CMD_BLOCK_STATUS = 0, 2, 7
ALLOCATION = 1  # our id of base:allocation


def _recv(c: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        more = c.recv(n - len(data))
        if not more:
            raise EOFError
        data += more
    return data


def _option_reply(c: socket.socket, option: int, kind: int, data: bytes = b"") -> None:
    c.sendall(struct.pack(">QIII", OPTION_REPLY, option, kind, len(data)) + data)


def _serve(c: socket.socket, size: int) -> None:
    with c:
        c.sendall(b"NBDMAGICIHAVEOPT" + struct.pack(">H", 3))
        _recv(c, 4)
        while True:
            _, option, length = struct.unpack(">QII", _recv(c, 16))
            data = _recv(c, length)
            if option == OPT_STRUCTURED_REPLY:
                _option_reply(c, option, ACK)
            elif option == OPT_SET_META_CONTEXT:
                if b"base:allocation" in data:
                    _option_reply(c, option, META_CONTEXT,
                                  struct.pack(">I", ALLOCATION) + b"base:allocation")
                _option_reply(c, option, ACK)
            elif option == OPT_GO:
                flags = 1 | 2  # HAS_FLAGS | READ_ONLY
                _option_reply(c, option, INFO, struct.pack(">HQH", 0, size, flags))
                _option_reply(c, option, ACK)
                break
            elif option == OPT_ABORT:
                return
            else:
                _option_reply(c, option, ERR_UNSUP)
        while True:
            _, _, kind, handle, offset, length = struct.unpack(">IHHQQI", _recv(c, 28))
            if kind == CMD_DISC:
                return
            if kind == CMD_READ:
                data = struct.pack(">Q", offset) + b"\x5a" * (length // 2)
                c.sendall(struct.pack(">IHHQI", STRUCTURED, 0, 1, handle, len(data)) + data)
                c.sendall(struct.pack(">IHHQI", STRUCTURED, 1, 0, handle, 0))  # DONE
            elif kind == CMD_BLOCK_STATUS:  # all data
                data = struct.pack(">III", ALLOCATION, length, 0)
                c.sendall(struct.pack(">IHHQI", STRUCTURED, 1, 5, handle, len(data)) + data)
            else:
                c.sendall(struct.pack(">IIQ", 0x67446698, 22, handle))  # EINVAL


def main() -> None:
    path, size = sys.argv[1], int(sys.argv[2])
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen(16)
    while True:
        c, _ = server.accept()
        threading.Thread(target=lambda c=c: _ignore_eof(c, size), daemon=True).start()


def _ignore_eof(c: socket.socket, size: int) -> None:
    with contextlib.suppress(EOFError, OSError):  # the client went
        _serve(c, size)


if __name__ == "__main__":
    main()
