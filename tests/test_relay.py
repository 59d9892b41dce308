"""The relay of one session (exports.py), alone: no lab."""

from __future__ import annotations

import os
import socket

import pytest

from pullbackd.exports import _Relay
from pullbackd.handshake import Sniffer

pytestmark = pytest.mark.asyncio


async def test_a_relay_that_ended_is_told_nothing() -> None:
    """A hand-off may reach a session whose relay just ended, before the session leaves
    its endpoint's list: pause and stop must not write to the relay's closed eventfd, whose
    number may be another file's by then (found by the stress run: EBADF ended pullbackd at
    a SIGTERM)."""
    client, peer = socket.socketpair()
    qemu, qemu_peer = socket.socketpair()
    relay = _Relay(client, qemu, Sniffer())
    peer.close()  # the client went: the relay ends at once
    qemu_peer.close()
    await relay.run()
    reused = os.eventfd(0, os.EFD_NONBLOCK)  # likely the number the relay's eventfd had
    try:
        relay.pause()
        relay.stop()
        with pytest.raises(BlockingIOError):
            os.eventfd_read(reused)  # nothing was written to it
    finally:
        os.close(reused)
        client.close()
        qemu.close()
