"""Accept loops that outlive running out of file descriptors.

accept() fails with EMFILE when the process has no descriptor left (a flood of
connections, on any of our sockets). The connection then waits in the kernel's
backlog: the loop backs off, says so in the log (at most once a second), and
accepts again once descriptors are free. Nothing else is harmed, and nothing a
client does ends the loop.
"""

from __future__ import annotations

import errno
import time
from collections.abc import AsyncIterator

import anyio
import structlog
from anyio.abc import SocketListener, SocketStream

log = structlog.get_logger()

#: accept() errors that say the process or the system is out of something.
EXHAUSTED = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
#: Seconds to wait before accepting again after that.
BACKOFF = 0.5


class Refusals:
    """Connections refused (or not accepted) on one socket, logged at most once a second
    with how many there were: a flood must not flood the journal too."""

    def __init__(self, socket: str, event: str = "refusing connections") -> None:
        self._socket, self._event = socket, event
        self._at = 0.0
        self._count = 0

    def note(self, reason: str, **details: object) -> None:
        self._count += 1
        now = time.monotonic()
        if now - self._at >= 1.0:
            log.warning(self._event, socket=self._socket, reason=reason,
                        refused=self._count, **details)
            self._at, self._count = now, 0


def exhausted(error: BaseException | None) -> OSError | None:
    """The error, if it says that descriptors or memory ran out."""
    return error if isinstance(error, OSError) and error.errno in EXHAUSTED else None


async def backing_off(error: OSError, refusals: Refusals) -> None:
    refusals.note(f"cannot accept: {error.strerror}")
    await anyio.sleep(BACKOFF)


async def accepted(listener: SocketListener, refusals: Refusals
                   ) -> AsyncIterator[SocketStream]:
    """Each connection `listener` accepts, for ever (until cancelled)."""
    while True:
        try:
            stream = await listener.accept()
        except (anyio.BrokenResourceError, OSError) as e:
            # accept()'s OSError, as it is (anyio's TCP listener) or wrapped (its others)
            if (cause := exhausted(e if isinstance(e, OSError) else e.__cause__)) is None:
                raise
            await backing_off(cause, refusals)
            continue
        yield stream
