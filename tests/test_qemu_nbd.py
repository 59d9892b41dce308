"""qemu_nbd.Server and the wait for a qemu-nbd to serve, against real qemu-nbd (no lab)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import anyio
import nbd
import pytest

from pullbackd import qemu_nbd
from pullbackd.qemu_nbd import ServeError, Server, wait_serving

MiB = 1 << 20


def qcow2(path: Path, size: int = 4 * MiB) -> Path:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(size)],
                   check=True)
    return path


def alive(pid: int) -> bool:
    """Whether the process runs (a zombie serves nothing any more)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def test_a_server_serves_until_stopped(tmp_path: Path) -> None:
    image, sock = qcow2(tmp_path / "image.qcow2"), tmp_path / "image.sock"
    data = os.urandom(MiB)
    with Server(image, "qcow2", sock) as server:
        assert server.returncode is None and server.pid is not None
        assert Path(f"/proc/{server.pid}/cmdline").read_bytes().split(b"\0")[0] == b"qemu-nbd"
        h = nbd.NBD()
        h.connect_uri(server.url)
        try:
            h.pwrite(data, MiB)
            h.flush()
        finally:
            h.shutdown()
    assert server.returncode is not None and not sock.exists()
    server.stop()  # again: nothing
    with qemu_nbd.connect(image, "qcow2") as h:
        assert h.pread(MiB, MiB) == data
        assert h.pread(MiB, 0) == bytes(MiB)
        assert h.is_read_only()


def test_a_read_only_server_refuses_writes_and_serves_several_clients(tmp_path: Path) -> None:
    image = qcow2(tmp_path / "image.qcow2")
    with Server(image, "qcow2", tmp_path / "s.sock", read_only=True, shared=2) as server:
        handles = [nbd.NBD() for _ in range(2)]
        for h in handles:
            h.connect_uri(server.url)
        try:
            assert all(h.is_read_only() for h in handles)
            with pytest.raises(nbd.Error):
                handles[0].pwrite(b"x" * 512, 0)
        finally:
            for h in handles:
                h.shutdown()


def test_a_server_that_cannot_serve_says_why_at_once(tmp_path: Path) -> None:
    image, sock = tmp_path / "image.qcow2", tmp_path / "s.sock"
    image.write_bytes(b"not a qcow2 at all")
    server = Server(image, "qcow2", sock)
    started = time.monotonic()
    with pytest.raises(ServeError, match=r"qemu-nbd exited with 1: .*qcow2") as raised:
        server.start()  # "exited", not "not serving after 30 s": it was not waited for
    assert time.monotonic() - started < 5
    assert raised.value.image == image
    assert server.returncode == 1 and not sock.exists()
    with pytest.raises(RuntimeError, match="started before"):
        server.start()


def test_the_async_server_serves_and_stops_when_cancelled(tmp_path: Path) -> None:
    image, sock = qcow2(tmp_path / "image.qcow2"), tmp_path / "s.sock"

    async def main() -> None:
        async with Server(image, "qcow2", sock) as server:
            assert server.returncode is None
            h = nbd.NBD()
            h.connect_uri(server.url)
            assert h.get_size() == 4 * MiB
            h.shutdown()
        assert server.returncode is not None and not sock.exists()
        # Cancelled while it waits for a server that never greets: stopped.
        waiting = Server(image, "qcow2", sock)
        waiting.command = [sys.executable, "-c", "import time; time.sleep(60)"]
        with anyio.move_on_after(0.2) as scope:
            await waiting.astart()
        assert scope.cancelled_caught
        assert waiting.returncode is not None

    anyio.run(main)


def test_a_tied_server_dies_with_the_thread_that_started_it(tmp_path: Path) -> None:
    """The kernel's parent-death signal follows the thread (see qemu_nbd.TIED)."""
    image = qcow2(tmp_path / "image.qcow2")
    tied = Server(image, "qcow2", tmp_path / "tied.sock", read_only=True)
    untied = Server(image, "qcow2", tmp_path / "untied.sock", read_only=True, tied=False)

    def start() -> None:
        tied.start()
        untied.start()

    thread = threading.Thread(target=start)
    thread.start()
    thread.join()
    try:
        assert tied.pid is not None and untied.pid is not None
        deadline = time.monotonic() + 5
        while alive(tied.pid):
            assert time.monotonic() < deadline, "a tied qemu-nbd outlived its thread"
            time.sleep(0.01)
        assert alive(untied.pid)
    finally:
        tied.stop()
        untied.stop()


def test_the_command_line() -> None:
    image, sock = Path("/i.qcow2"), Path("/s.sock")
    assert qemu_nbd.command(image, "raw") == ["qemu-nbd", "--format", "raw", "/i.qcow2"]
    assert Server(image, "qcow2", sock).command == [
        *qemu_nbd.TIED, "qemu-nbd", "--format", "qcow2", "--socket", "/s.sock", "--shared",
        "16", "--cache", "writeback", "--persistent", "/i.qcow2"]
    assert Server(image, "qcow2", sock, read_only=True, shared=1, cache="unsafe",
                  persistent=False, tied=False).command == [
        "qemu-nbd", "--format", "qcow2", "--socket", "/s.sock", "--shared", "1", "--cache",
        "unsafe", "--read-only", "/i.qcow2"]


def test_a_server_counts_once_it_greets(tmp_path: Path) -> None:
    sock, image = tmp_path / "s.sock", tmp_path / "image.qcow2"

    def times_out(timeout: float) -> None:
        started = time.monotonic()
        with pytest.raises(ServeError, match="not serving"):
            wait_serving(sock, image, lambda: None, timeout)
        assert timeout <= time.monotonic() - started < timeout + 5

    times_out(0.1)  # no socket file
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(sock))  # what qemu-nbd does first
        times_out(0.2)
        started = time.monotonic()
        with pytest.raises(ServeError, match="qemu-nbd exited with 1"):
            wait_serving(sock, image, lambda: 1, 30)  # at once, not after 30 s
        assert time.monotonic() - started < 5
        server.listen()  # then it listens, and opens the image: connections wait
        times_out(0.2)
        server.settimeout(5)

        def greet() -> None:
            for _ in range(2):  # the last wait's connection (closed), then this one's
                client, _ = server.accept()
                with client, contextlib.suppress(BrokenPipeError):
                    client.sendall(b"NBDMAGIC")

        greeter = threading.Thread(target=greet)
        greeter.start()
        wait_serving(sock, image, lambda: None, 5)
        greeter.join()
