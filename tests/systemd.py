"""systemd's part, as far as pullbackd talks to it: $NOTIFY_SOCKET and the fd store.

For the tests and for scripts/stress, which run pullbackd as systemd would, without it.
"""

from __future__ import annotations

import array
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO

LAUNCH = Path(__file__).resolve().parent / "launch.py"


class ServiceManager:
    """The part of systemd pullbackd talks to: $NOTIFY_SOCKET, and the fd store.

    Reads notifications as they come (the kernel queues only a few datagrams),
    keeps descriptors sent with FDSTORE=1 by name, and passes them to the next
    start as $LISTEN_FDS, as systemd does across a restart of the service.
    """

    def __init__(self, path: Path, fdstore: dict[str, int] | None = None) -> None:
        """`fdstore`: what an earlier run stored (kept in this very dict, so that the
        next manager, given it, hands it on)."""
        path.unlink(missing_ok=True)
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)
        self.fdstore: dict[str, int] = {} if fdstore is None else fdstore
        self.ready = threading.Event()
        #: Every notification's fields, in the order they came.
        self.messages: list[dict[str, str]] = []
        self.stopping = threading.Event()
        self._done = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while not self._done.is_set():
            try:
                data, ancdata, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(16 * 4))
            except TimeoutError:
                continue
            fds = array.array("i")
            for level, kind, payload in ancdata:
                if (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS):
                    fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
            fields = dict(line.split("=", 1) for line in data.decode().splitlines()
                          if "=" in line)
            self.messages.append(fields)
            if fields.get("FDSTORE") == "1" and len(fds) == 1:
                self._drop(fields["FDNAME"])
                self.fdstore[fields["FDNAME"]] = fds.pop()
            elif fields.get("FDSTOREREMOVE") == "1":
                self._drop(fields["FDNAME"])
            for fd in fds:
                os.close(fd)
            if fields.get("READY") == "1":
                self.ready.set()
            if fields.get("STOPPING") == "1":
                self.stopping.set()

    def _drop(self, name: str) -> None:
        if name in self.fdstore:
            os.close(self.fdstore.pop(name))

    def spawn(self, argv: list[str], stderr: IO[bytes],
              env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        """Start argv with the fd store's descriptors as 3, 4, ... and $LISTEN_*."""
        names = list(self.fdstore)
        fds = [self.fdstore[name] for name in names]
        return subprocess.Popen(
            [sys.executable, str(LAUNCH), ",".join(map(str, fds)),
             ":".join(names), *argv],
            stderr=stderr, pass_fds=fds,
            env=os.environ | (env or {}) | {"NOTIFY_SOCKET": str(self.path)})

    def close(self) -> None:
        """After the service exited: no more notifications; the fd store stays."""
        self._done.set()
        self._reader.join()
        self.sock.close()
