"""systemd's readiness protocol, sd_notify(3): datagrams to $NOTIFY_SOCKET.

A no-op when the daemon was not started by systemd (no NOTIFY_SOCKET).
"""

from __future__ import annotations

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

    def notify(self, *fields: str) -> None:
        if not self._address:
            return
        # Like sd_notify(3), a failure is reported, never fatal: the service
        # manager going away must not take the daemon with it.
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto("\n".join(fields).encode(), self._address)
        except OSError as e:
            log.warning("sd_notify failed", socket=self._address, error=str(e))

    def ready(self, status: str) -> None:
        self.notify("READY=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        self.notify(f"STATUS={status}")

    def stopping(self) -> None:
        self.notify("STOPPING=1", "STATUS=stopping")

    async def watchdog(self) -> None:
        """Ping the watchdog at half its interval, as sd_watchdog_enabled(3) advises."""
        if not self.watchdog_enabled:
            return
        while True:
            self.notify("WATCHDOG=1")
            await anyio.sleep(self._watchdog_usec / 2e6)
