"""The qemu-nbd process: an image served on a Unix socket, and stopped again.

Every qemu-nbd pullbackd runs on a socket it names is a `Server`: the
repository's (a backup being written, both sides of a restore), the benchmark's
targets, and the tests' images; and so is the qemu-storage-daemon of a Verify
(verifying.py), which serves many images at once. `start` returns once qemu-nbd really serves
(`wait_serving`), `stop` once it closed the image. A server is tied to the
thread that started it (`tied`, see TIED): the kernel kills it when that thread
dies, so none outlives a `kill -9` of the daemon.

One kind of qemu-nbd is not a Server: a reader private to one libnbd handle
(`connect`; the repository rescans a flattened backup so). libnbd's
`connect_systemd_socket_activation` is the better tool there: libnbd binds the
socket, in a folder of its own, and hands it to qemu-nbd already listening, so
there is no socket to name or remove and nothing to wait for; and a qemu-nbd
without --persistent exits when its one client goes, the handle's `shutdown`
or the death of the daemon (the kernel closes the connection), so there is
nothing to stop either. Both build their command line with `command`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import IO, Any

import anyio
import nbd

#: glibc's malloc gave each freed request buffer back to the kernel (nbdcopy's
#: 256 KiB ones as our 1 MiB ones), so qemu-nbd took a page fault on every page of
#: every write: a third of its CPU.
#: Buffers up to NBD's largest request (32 MiB) stay on the heap, and freed heap
#: memory waits there for the next request.
ENV = {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=33554432:"
                         "glibc.malloc.trim_threshold=134217728"}

#: Run before qemu-nbd: the kernel sends it SIGKILL when the thread that started it
#: dies (PR_SET_PDEATHSIG, set by setpriv and kept across its exec of qemu-nbd),
#: so a server of ours does not outlive a `kill -9` of the daemon. The signal follows
#: the *thread* that forked, not the process: start it from a thread that lives as
#: long as the process. The daemon does: `Server.astart` spawns from the thread that
#: calls it, the event loop's (the main thread, which runs `anyio.run`), never from
#: a worker thread, which could end while qemu-nbd serves. A daemon killed between
#: the fork and setpriv's prctl leaves its qemu-nbd untied: `Repository.recover`
#: ends it.
TIED = ("setpriv", "--pdeathsig", "KILL", "--")

#: How long qemu-nbd may take to serve (it takes milliseconds), and how often we look.
SERVE_TIMEOUT = 30.0
_SERVE_POLL = 0.01
#: How long qemu-nbd may take to close its image after SIGTERM (qcow2 metadata to
#: write), and then to die after SIGKILL.
STOP_TIMEOUT = 30.0
#: Bytes of qemu-nbd's error output quoted when it exits instead of serving.
_QUOTED = 2000


class ServeError(Exception):
    """qemu-nbd did not serve `image`: it exited (`reason` quotes why), or did not
    greet a client in time. Nothing of it is left running; starting again may work
    if what it complained of (a lock, a missing file) is gone."""

    def __init__(self, image: Path, reason: str) -> None:
        super().__init__(f"{image}: {reason}")
        self.image = image
        self.reason = reason


def command(image: Path, fmt: str, *, sock: Path | None = None, read_only: bool = False,
            shared: int | None = None, cache: str | None = None, persistent: bool = False,
            tied: bool = False) -> list[str]:
    """The qemu-nbd command line that serves `image` (of format `fmt`).

    `sock`: the Unix socket to bind; None for the socket systemd socket activation
    passes (libnbd's `connect_systemd_socket_activation`). `shared`: clients at
    once (qemu-nbd's default: one); `cache`: qemu-nbd's --cache (its default:
    writeback); `persistent`: serve on after the last client left; `tied`: run
    under TIED. Raises nothing.
    """
    return [*(TIED if tied else ()), "qemu-nbd", "--format", fmt,
            *(["--socket", str(sock)] if sock is not None else []),
            *(["--shared", str(shared)] if shared is not None else []),
            *(["--cache", cache] if cache is not None else []),
            *(["--persistent"] if persistent else []),
            *(["--read-only"] if read_only else []),
            str(image)]


class Server:
    """One qemu-nbd serving one image on a Unix socket, from `start` to `stop`.

    Use it as a context manager (`with`, or `async with` in the daemon), or call
    `start`/`astart` and `stop`/`astop`. The options are qemu-nbd's (see `command`),
    with defaults for a server several connections of one copy share. qemu-nbd's
    error output is kept to explain a start that fails, and otherwise dropped
    (each wait's probe connection makes it complain once).
    """

    def __init__(self, image: Path, fmt: str, sock: Path, *, read_only: bool = False,
                 shared: int = 16, cache: str = "writeback", persistent: bool = True,
                 tied: bool = True, timeout: float = SERVE_TIMEOUT,
                 program: list[str] | None = None) -> None:
        """`timeout`: seconds qemu-nbd may take to serve. `program`: the command line
        of another NBD server to run instead, serving on `sock` (the options before it
        are then unused; verifying.py's qemu-storage-daemon); `image` names what it
        serves in errors. Raises nothing."""
        self.image = image
        self.fmt = fmt
        self.socket = sock
        self.timeout = timeout
        self.command = program or command(image, fmt, sock=sock, read_only=read_only,
                                          shared=shared, cache=cache, persistent=persistent,
                                          tied=tied)
        self._process: subprocess.Popen[bytes] | None = None
        self._errors: IO[bytes] | None = None

    @property
    def url(self) -> str:
        """The NBD URI of the export (qemu-nbd's only one, the default name)."""
        return f"nbd+unix:///?socket={self.socket}"

    @property
    def pid(self) -> int | None:
        """The process's id once started (that of setpriv, then qemu-nbd, when tied)."""
        return None if self._process is None else self._process.pid

    @property
    def returncode(self) -> int | None:
        """qemu-nbd's exit status once it exited (and was reaped), else None."""
        return None if self._process is None else self._process.poll()

    def start(self) -> None:
        """Start qemu-nbd and return once it serves; sleeps while it waits.

        Tied servers die with the calling thread (see TIED). Raises ServeError if
        qemu-nbd exits or does not serve within `timeout` (it is stopped then),
        OSError if it cannot be run, RuntimeError if started before.
        """
        self._spawn()
        try:
            with contextlib.closing(self._waiting()) as waiting:
                for pause in waiting:
                    time.sleep(pause)
        except BaseException:
            self.stop()
            raise

    async def astart(self) -> None:
        """`start` for the event loop: spawns from the calling thread (the loop's, so a
        tied server lives as long as the daemon), and waits without blocking it.
        Raises as `start` does; cancelled, it stops qemu-nbd first."""
        self._spawn()
        try:
            with contextlib.closing(self._waiting()) as waiting:
                for pause in waiting:
                    await anyio.sleep(pause)
        except BaseException:
            await self.astop()
            raise

    def stop(self) -> None:
        """Stop qemu-nbd and return once it closed the image (its qcow2 metadata
        written) and exited, then remove its socket. SIGTERM, then SIGKILL after
        STOP_TIMEOUT. Stopping a server again, or one never started, does nothing.
        Raises OSError only if the socket cannot be removed."""
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._stopped()

    async def astop(self) -> None:
        """`stop` for the event loop: waits in a worker thread. Shielded: a server
        stopped halfway would leave an image open that its caller is about to
        rename, sync or delete, and a process nobody reaps."""
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(self.stop)

    def __enter__(self) -> Server:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def __aenter__(self) -> Server:
        await self.astart()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.astop()

    def _spawn(self) -> None:
        if self._process is not None:
            raise RuntimeError(f"qemu-nbd for {self.image} was started before")
        self.socket.unlink(missing_ok=True)  # a crash's leftover: qemu-nbd would fail
        self._errors = tempfile.TemporaryFile()  # noqa: SIM115 (lives as long as the process)
        try:
            self._process = subprocess.Popen(
                self.command, env=os.environ | ENV, stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=self._errors)
        except BaseException:
            self._errors.close()
            self._errors = None
            raise

    def _waiting(self) -> Generator[float]:
        """`_serving` for this server, with qemu-nbd's own words when it exited. Once
        it serves, its error output is dropped."""
        try:
            yield from _serving(self.socket, self.image, lambda: self.returncode,
                                self.timeout)
        except ServeError as e:
            if self.returncode is not None and (said := self._said()):
                raise ServeError(self.image, f"{e.reason}: {said}") from None
            raise
        self._close_errors()

    def _said(self) -> str:
        """The end of what qemu-nbd wrote to its stderr."""
        if self._errors is None:
            return ""
        self._errors.seek(0)
        return self._errors.read().decode(errors="replace").strip()[-_QUOTED:]

    def _stopped(self) -> None:
        self._close_errors()
        self.socket.unlink(missing_ok=True)

    def _close_errors(self) -> None:
        if self._errors is not None:
            self._errors.close()
            self._errors = None


@contextlib.contextmanager
def connect(image: Path, fmt: str) -> Iterator[Any]:
    """A libnbd handle (`nbd.NBD`) reading `image` through a qemu-nbd of its own
    (read-only, through the backing chain), shut down at the end; see the module's
    docstring. Blocks: run it in a worker thread. Raises nbd.Error if qemu-nbd
    cannot be run or cannot open the image."""
    h = nbd.NBD()
    h.connect_systemd_socket_activation(command(image, fmt, read_only=True))
    try:
        yield h
    finally:
        h.shutdown()


def wait_serving(sock: Path, image: Path, returncode: Callable[[], int | None],
                 timeout: float) -> None:
    """Return once the qemu-nbd serving `image` on `sock` serves it; sleeps.

    `returncode` is the process's (None while it runs): an exit fails the wait at
    once. Raises ServeError when it exits or `timeout` seconds pass first."""
    for pause in _serving(sock, image, returncode, timeout):
        time.sleep(pause)


def _serving(sock: Path, image: Path, returncode: Callable[[], int | None],
             timeout: float) -> Generator[float]:
    """The wait of `wait_serving`, for a synchronous or an asynchronous caller: the
    pauses to sleep between looks.

    Neither the socket file nor a connection is a sign: qemu-nbd binds the socket,
    then listens (a connection in between is refused), then opens the image, and may
    fail there and exit (a connection it queued meanwhile is dropped; the socket file
    stays). It greets a client (NBD's first bytes) only once it serves the image. So
    we connect, and wait on that connection for the greeting; then we close it.
    qemu-nbd shrugs off a client gone before the handshake (with --persistent it
    serves on, and the closed connection frees its place among the --shared ones).
    Everything non-blocking, so that an asynchronous caller never blocks its loop.
    """
    deadline = time.monotonic() + timeout
    probe: socket.socket | None = None
    try:
        while True:
            if probe is None:
                probe = _connect(sock)
            if probe is not None:
                greeted = _greeted(probe)
                if greeted:
                    return
                if greeted is not None:  # closed on us: try again (or see it exited)
                    probe.close()
                    probe = None
            if (code := returncode()) is not None:
                raise ServeError(image, f"qemu-nbd exited with {code}")
            if time.monotonic() > deadline:
                raise ServeError(image, f"qemu-nbd not serving on {sock} after {timeout:g} s")
            yield _SERVE_POLL
    finally:
        if probe is not None:
            probe.close()


def _connect(sock: Path) -> socket.socket | None:
    """A non-blocking connection to the Unix socket `sock`, or None if nobody listens
    there (yet). A connection to a Unix socket completes or fails at once."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
    try:
        probe.connect(str(sock))
    except (FileNotFoundError, ConnectionRefusedError, BlockingIOError):
        # BlockingIOError: its backlog is full, as good as not listening yet.
        probe.close()
        return None
    except BaseException:
        probe.close()
        raise
    return probe


def _greeted(probe: socket.socket) -> bool | None:
    """Whether the server sent something on `probe` (True), closed it (False), or
    neither yet (None)."""
    try:
        return bool(probe.recv(1))
    except BlockingIOError:
        return None
    except ConnectionResetError:
        return False
