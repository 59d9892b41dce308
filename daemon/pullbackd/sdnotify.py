"""systemd's readiness protocol, sd_notify(3): datagrams to $NOTIFY_SOCKET.

A no-op when the daemon was not started by systemd (no NOTIFY_SOCKET). Also
systemd's file descriptor store: sockets given to it with FDSTORE=1 come back
to the next run of the service as $LISTEN_FDS (sd_listen_fds_with_names(3)).
"""

from __future__ import annotations

import array
import os
import socket

import anyio
import structlog

log = structlog.get_logger()


class Notifier:
    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        # "@name" is a socket in the abstract namespace.
        self._address = "\0" + address[1:] if address.startswith("@") else address
        self._watchdog_usec = 0
        pid = env.get("WATCHDOG_PID")
        if env.get("WATCHDOG_USEC", "").isdigit() and (pid is None or pid == str(os.getpid())):
            self._watchdog_usec = int(env["WATCHDOG_USEC"])

    @property
    def watchdog_enabled(self) -> bool:
        return bool(self._address and self._watchdog_usec)

    @property
    def enabled(self) -> bool:
        return bool(self._address)

    def notify(self, *fields: str, fds: list[int] | None = None) -> None:
        if not self._address:
            return
        # Like sd_notify(3), a failure is reported, never fatal: the service
        # manager going away must not take the daemon with it.
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] \
                    if fds else []
                sock.sendmsg(["\n".join(fields).encode()], rights, 0, self._address)
        except OSError as e:
            log.warning("sd_notify failed", socket=self._address, error=str(e))

    def store_fds(self, name: str, fds: list[int]) -> None:
        """Have systemd keep `fds` (duplicates of them) for the next run, under `name`.

        Needs FileDescriptorStoreMax= in the unit; without it systemd drops them.
        """
        self.notify("FDSTORE=1", f"FDNAME={name}", fds=fds)

    def remove_fds(self, names: list[str]) -> None:
        for name in names:
            self.notify("FDSTOREREMOVE=1", f"FDNAME={name}")

    def ready(self, status: str) -> None:
        self.notify("READY=1", f"STATUS={status}")

    def reloading(self) -> None:
        """A reload began (READY=1 tells it ended)."""
        self.notify("RELOADING=1", "STATUS=reloading the configuration")

    def status(self, status: str) -> None:
        self.notify(f"STATUS={status}")

    def extend(self, seconds: float, status: str) -> None:
        """The start (or stop) in progress may take `seconds` more from now than its
        unit's timeout allows (EXTEND_TIMEOUT_USEC=); systemd ends it only if no
        word comes within them."""
        self.notify(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}", f"STATUS={status}")

    def stopping(self) -> None:
        self.notify("STOPPING=1", "STATUS=stopping")

    async def watchdog(self) -> None:
        """Ping the watchdog at half its interval, as sd_watchdog_enabled(3) advises."""
        if not self.watchdog_enabled:
            return
        while True:
            self.notify("WATCHDOG=1")
            await anyio.sleep(self._watchdog_usec / 2e6)


def listen_fds(environ: dict[str, str] | None = None) -> dict[str, int]:
    """The descriptors systemd passed to this process, by name (sd_listen_fds_with_names).

    They start at 3; the variables are removed so that children do not take them too.
    """
    env = os.environ if environ is None else environ
    try:
        if int(env.get("LISTEN_PID", "0")) != os.getpid():
            return {}
        count = int(env.get("LISTEN_FDS", "0"))
    except ValueError:
        return {}
    names = env.get("LISTEN_FDNAMES", "").split(":")
    for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        env.pop(key, None)
    fds = {}
    for i in range(count):
        fd = 3 + i
        os.set_inheritable(fd, False)
        fds[names[i] if i < len(names) and names[i] else f"unknown-{i}"] = fd
    return fds
