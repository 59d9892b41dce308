"""What one caller can hold of the daemon, and for how long: streams of replies end
with their caller, a reader that falls behind gets a typed error, a role taken away
counts from the next call, and replies stay under varlink's 1 MiB whatever the jobs
hold. Only a role that reads backups reads a job's disks through its endpoint (before
qemu-nbd standing in for QEMU), or is shown its export names.

The varlink server (control/server.py) serves the real API on a real socket, over the
job machinery of test_jobs.py (the fake source). A caller the limits must count is
not root: it runs as `nobody`, in a process of its own.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import aclosing, asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from structlog.testing import capture_logs

from pullbackd import api, errors, stream
from pullbackd.control.client import Client, VarlinkError
from pullbackd.control.codec import Call, Decoder, decode, encode
from pullbackd.control.server import HANGUP_POLL, Limits, Service
from pullbackd.exports import Exports
from pullbackd.model import LOCAL, LONGEST, LONGEST_ERROR, JobState, StartRequest
from pullbackd.rebuild import Rebuilder
from pullbackd.records import WATCH_BUFFER
from pullbackd.repository import Repository
from pullbackd.roles import Role, Roles

from .fakes import FakeSource, FakeVirt
from .test_jobs import ELSEWHERE, Rig, running, until

pytestmark = pytest.mark.asyncio

NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]


@pytest.fixture
def source(tmp_path: Path) -> FakeSource:
    (tmp_path / "source").mkdir()
    return FakeSource(FakeVirt(), tmp_path / "source")


@pytest.fixture
def folder() -> Iterator[Path]:
    """A folder `nobody` may enter, for the control socket (tmp_path is root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="pbcallers-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


@asynccontextmanager
async def served(rig: Rig, tmp_path: Path, folder: Path,
                 limits: Limits | None = None) -> AsyncIterator[tuple[Service, Path]]:
    """The API on a control socket anyone may reach, served in the rig's task group."""
    repository = Repository(tmp_path / "repo", tmp_path / "nbd", 1 << 20)
    rebuilder = Rebuilder(repository, rig.source.virt, tmp_path / "libvirt", "tss",
                          stream.Tuning(), rig.jobs.did_not_complete)
    parts = api.Parts(rig.jobs, rig.migrations, rig.chains, repository, rebuilder,
                      stream.Tuning())
    service = api.service(parts, Roles(default=Role.ADMIN), limits)
    path = folder / "control.sock"
    listener = await anyio.create_unix_listener(path, mode=0o666)
    rig.tg.start_soon(service.serve, listener, f"{api.INTERFACE}.ProtocolViolation")
    yield service, path


async def call(path: Path, method: str, **parameters: Any) -> dict[str, Any]:
    def blocking() -> dict[str, Any]:
        with Client(path, timeout=30) as client:
            return client.call(f"{api.INTERFACE}.{method}", **parameters)
    return await anyio.to_thread.run_sync(blocking)


def as_nobody(code: str, *args: str) -> subprocess.Popen[str]:
    """Python `code` as nobody (sys.argv[1:] = args), its stdin and stdout piped."""
    return subprocess.Popen([*NOBODY, sys.executable, "-c", code, *args], text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)


def message(method: str, **fields: Any) -> bytes:
    return encode({"method": f"{api.INTERFACE}.{method}", **fields})


async def test_a_stream_whose_caller_hung_up_holds_nothing(
        tmp_path: Path, source: FakeSource, folder: Path) -> None:
    """nobody may hold 2 connections. It watches on both (one `oneway`), with no job to
    tell of, and exits: its places come back at once, not at an event that may never
    come (they were held for good, and nobody could connect again)."""
    watch_and_go = (
        "import socket, sys, time\n"
        "for msg in sys.argv[2:]:\n"
        "    s = socket.socket(socket.AF_UNIX)\n"
        "    s.connect(sys.argv[1])\n"
        "    s.sendall(msg.encode() + b'\\0')\n"
        "    globals().setdefault('held', []).append(s)\n"
        "time.sleep(0.5)\n")
    come_back = (
        "import sys, time\n"
        "from pullbackd.control.client import Client\n"
        "deadline = time.monotonic() + 10\n"
        "while True:\n"
        "    try:\n"
        "        with Client(sys.argv[1], timeout=5) as c:\n"
        "            c.call('org.varlink.service.GetInfo')\n"
        "            c.call('org.pullbackd.Backup.List')\n"
        "        print(round(time.monotonic() - deadline + 10, 1)); break\n"
        "    except ConnectionError:\n"
        "        if time.monotonic() > deadline:\n"
        "            print('refused'); break\n"
        "        time.sleep(0.2)\n")
    limits = Limits(connections=8, per_user=2, idle_timeout=60)
    async with running(tmp_path, source) as rig, served(rig, tmp_path, folder, limits) as (
            _, path):
        watch = json.dumps({"method": f"{api.INTERFACE}.Watch", "more": True})
        oneway = json.dumps({"method": f"{api.INTERFACE}.Watch", "more": True, "oneway": True})
        watcher = as_nobody(watch_and_go, str(path), watch, oneway)
        assert (await anyio.to_thread.run_sync(watcher.communicate))[0] == ""
        again = as_nobody(come_back, str(path))
        out = (await anyio.to_thread.run_sync(again.communicate))[0].strip()
        assert out != "refused", "nobody is still locked out, 10 s after it hung up"
        assert float(out) < 5


async def test_a_migration_whose_caller_hung_up_while_draining_changes_nothing(
        tmp_path: Path, source: FakeSource, folder: Path) -> None:
    async with running(tmp_path, source, drain_timeout=600) as rig, \
            served(rig, tmp_path, folder) as (_, path):
        rig.migrations.grace = 600  # the backup holds the drain
        job = await rig.jobs.start(StartRequest("d1"))
        with socket.socket(socket.AF_UNIX) as sock:
            await anyio.to_thread.run_sync(sock.connect, str(path))
            sock.sendall(message("Migrate", more=True, parameters={
                "domain": "d1", "destination": ELSEWHERE}))
            [first] = await anyio.to_thread.run_sync(lambda: Decoder().feed(sock.recv(65536)))
            assert decode(first)["parameters"]["step"]["state"] == "draining"
        # The drain ends with its caller: another may begin.
        with anyio.fail_after(10):
            while True:
                try:
                    async with aclosing(rig.migrations.migrate("d1", ELSEWHERE)) as steps:
                        assert (await anext(steps)).state == "draining"
                    break
                except errors.MigrationPending:
                    await anyio.sleep(0.1)
        assert rig.jobs.get(job.id).state == JobState.READY
        assert source.virt.migrated == []


async def test_a_watcher_that_falls_behind_hears_so(
        tmp_path: Path, source: FakeSource, folder: Path) -> None:
    """A caller that does not read while jobs change gets, once it reads, every event it
    was sent and then WatchTooSlow (it was an internal error), and the daemon serves on."""
    async with running(tmp_path, source) as rig, served(rig, tmp_path, folder) as (_, path):
        with socket.socket(socket.AF_UNIX) as sock:
            await anyio.to_thread.run_sync(sock.connect, str(path))
            sock.sendall(message("Watch", more=True))
            await anyio.sleep(0.2)
            # Enough changes to fill the socket, and the watcher's buffer behind it.
            while len(rig.jobs.all()) < 2 * WATCH_BUFFER // 3:
                job = await rig.jobs.start(StartRequest("d1"))
                await rig.jobs.abort(job.id)

            def read_all() -> list[dict[str, Any]]:
                decoder, replies = Decoder(), list[dict[str, Any]]()
                sock.settimeout(30)
                while not replies or replies[-1].get("continues"):
                    replies += [decode(f) for f in decoder.feed(sock.recv(1 << 16))]
                return replies

            replies = await anyio.to_thread.run_sync(read_all)
        *events, last = replies
        assert last == {"error": f"{api.INTERFACE}.WatchTooSlow",
                        "parameters": {"events": WATCH_BUFFER}}
        assert len(events) > WATCH_BUFFER
        assert all(e["continues"] and "event" in e["parameters"] for e in events)
        assert (await call(path, "List", limit=1))["jobs"]


async def test_a_role_taken_away_counts_from_the_next_call(
        tmp_path: Path, source: FakeSource, folder: Path) -> None:
    caller = (
        "import json, sys\n"
        "from pullbackd.control.client import Client, VarlinkError\n"
        "with Client(sys.argv[1], timeout=30) as c:\n"
        "    for line in sys.stdin:\n"
        "        try:\n"
        "            c.call('org.pullbackd.Backup.' + line.strip(), domain='d1')\n"
        "            print('ok', flush=True)\n"
        "        except VarlinkError as e:\n"
        "            print(e.short_name, flush=True)\n")
    async with running(tmp_path, source) as rig, served(rig, tmp_path, folder) as (
            service, path):
        nobody = as_nobody(caller, str(path))
        assert nobody.stdin is not None and nobody.stdout is not None

        async def ask(method: str) -> str:
            assert nobody.stdin is not None and nobody.stdout is not None
            nobody.stdin.write(method + "\n")
            nobody.stdin.flush()
            return (await anyio.to_thread.run_sync(nobody.stdout.readline)).strip()

        try:
            assert await ask("ListCheckpoints") == "ok"
            service.roles = Roles(default=Role.NONE)  # what a reload does
            assert await ask("ListCheckpoints") == "PermissionDenied"
            assert await ask("Start") == "PermissionDenied"
        finally:
            nobody.stdin.close()
            await anyio.to_thread.run_sync(nobody.wait)
        assert rig.jobs.all() == []


async def test_replies_stay_under_one_mib_whatever_the_jobs_hold(
        tmp_path: Path, source: FakeSource, folder: Path) -> None:
    """Jobs with the longest destination Start takes, and long errors: each keeps at most
    LONGEST_ERROR characters of its error (the journal has it all), and List pages by
    size too (120 such jobs are 1.5 MiB), so that every page can be read."""
    source.errors["begin"] = errors.LibvirtError(1, "x" * 20_000)
    destination = "nbd+unix:///{disk}?socket=/run/a.sock&"
    destination += "x" * (LONGEST["destination"] - len(destination))
    async with running(tmp_path, source) as rig, served(rig, tmp_path, folder) as (_, path):
        for _ in range(120):
            with pytest.raises(errors.LibvirtError):
                await rig.jobs.start(StartRequest("d1", destination=destination))
        failed = rig.jobs.all()
        assert len(failed) == 120 and all(j.state == JobState.FAILED for j in failed)
        assert all(len(j.error or "") <= LONGEST_ERROR for j in failed)
        assert (failed[0].error or "").endswith("characters more in the journal)")

        def pages() -> list[list[str]]:
            seen, after = [], None
            with Client(path, timeout=30) as client:
                while True:
                    sizes = []
                    reply = client.call(f"{api.INTERFACE}.List", after=after)
                    sizes.append(len(json.dumps(reply)))
                    seen.append([j["id"] for j in reply["jobs"]])
                    assert max(sizes) < 1 << 20
                    if (after := reply["next"]) is None:
                        return seen

        listed = await anyio.to_thread.run_sync(pages)
        assert [i for page in listed for i in page] == [
            j.id for j in sorted(failed, key=lambda j: (j.created, j.id))]
        assert len(listed) > 1


@pytest.mark.parametrize(("parameter", "request_"), [
    ("destination", StartRequest("d1", destination="nbd+unix:///{disk}?socket=/run/a.sock&"
                                                   + "x" * 9000)),
    ("target_dir", StartRequest("d1", target_dir="/" + "d" * 5000)),
    ("domain", StartRequest("d" * 2000)),
    ("since", StartRequest("d1", mode="differential", since="é" * 300)),
])
async def test_start_refuses_texts_longer_than_a_job_keeps(
        tmp_path: Path, source: FakeSource, parameter: str, request_: StartRequest) -> None:
    async with running(tmp_path, source, max_active=1) as rig:
        await rig.jobs.start(StartRequest("d2"))  # and the next one waits in line
        with pytest.raises(errors.InvalidParameter) as e:
            await rig.jobs.start(request_)
        assert e.value.parameters == {"parameter": parameter}
        assert [j.domain for j in rig.jobs.all()] == ["d2"]


async def test_a_call_that_does_not_stream_runs_to_its_end_when_its_caller_hangs_up(
        tmp_path: Path, source: FakeSource, folder: Path) -> None:
    """Start called with `more`, its caller gone while libvirt begins the backup: the job
    is made whole all the same (only a stream of replies ends with its caller)."""
    async with running(tmp_path, source) as rig, served(rig, tmp_path, folder) as (_, path):
        stall = source.stall("begin")
        with socket.socket(socket.AF_UNIX) as sock:
            await anyio.to_thread.run_sync(sock.connect, str(path))
            sock.sendall(encode(Call(f"{api.INTERFACE}.Start", {"domain": "d1"},
                                     more=True).to_message()))
            with anyio.fail_after(5):
                await stall.reached.wait()
        await anyio.sleep(2 * HANGUP_POLL)  # a stream would have seen the hang-up
        stall.release()
        job = await until(rig.jobs, rig.jobs.all()[0].id, lambda j: j.state == JobState.READY)
        assert rig.endpoint(job).exists()


#: As nobody: `holding` connections to the endpoint at sys.argv[2] (what each received
#: before it closed: NBD's greeting, or nothing), then a read of the whole disk at the URI
#: sys.argv[1] with libnbd; holds the connections until its stdin closes.
READER = r"""
import hashlib, json, socket, sys, nbd
url, path, holding = sys.argv[1], sys.argv[2], int(sys.argv[3])
held = []
for _ in range(holding):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(60)
    s.connect(path)
    held.append(s)
out = {"received": [len(s.recv(4096)) for s in held]}
h = nbd.NBD()
try:
    h.connect_uri(url)
    out["sha256"] = hashlib.sha256(h.pread(h.get_size(), 0)).hexdigest()
    h.shutdown()
except nbd.Error as e:
    out["error"] = str(e)
print(json.dumps(out), flush=True)
sys.stdin.read()
"""
DISK = bytes(range(256)) * 4096  # 1 MiB


@asynccontextmanager
async def qemu_nbd(image: Path, export: str, sock: Path) -> AsyncIterator[None]:
    """qemu-nbd serving `image` read-only as `export` on `sock` (where QEMU's NBD server
    for a job listens), once it listens."""
    qemu = await anyio.open_process(["qemu-nbd", "-r", "-t", "-x", export, "-k", str(sock),
                                     "-f", "raw", str(image)], stdout=None, stderr=None)
    try:
        with anyio.fail_after(30):
            while not await anyio.Path(sock).exists():
                assert qemu.returncode is None, "qemu-nbd did not start"
                await anyio.sleep(0.01)
        yield
    finally:
        qemu.terminate()
        await qemu.wait()


@asynccontextmanager
async def reading(url: str, endpoint: Path, holding: int) -> AsyncIterator[dict[str, Any]]:
    """READER as nobody: what it saw, while it holds its connections."""
    reader = as_nobody(READER, url, str(endpoint), str(holding))
    assert reader.stdin is not None and reader.stdout is not None
    try:
        line = await anyio.to_thread.run_sync(reader.stdout.readline)
        assert line, "the reader failed (its error is above)"
        yield json.loads(line)
    finally:
        reader.stdin.close()
        await anyio.to_thread.run_sync(reader.wait)


async def test_only_a_role_that_reads_backups_reads_the_disks(
        tmp_path: Path, source: FakeSource, folder: Path) -> None:
    """nobody reaches the job's endpoint (its group is nobody's), as the control socket's
    group reaches both under the packaged units. As `look`, then with no role, its
    connections are closed before NBD's greeting, libnbd cannot open the disk, and none
    of the job's places is taken: Finish ends the job while nobody holds as many
    connections as the job has places. As `backup` (a reload later) it reads the disk.
    (Without the check on the endpoint, look and none read it all and held the places.)"""
    exports = Exports(folder / "exports", group="nogroup")
    exports.roles = Roles(look=("nobody",), default=Role.NONE)
    image = tmp_path / "disk.raw"
    image.write_bytes(DISK)
    async with running(tmp_path, source, exports=exports) as rig:
        job = await rig.jobs.start(StartRequest("d1", disks=["vda"]))
        [disk] = job.disks
        assert disk.url is not None
        path = exports.endpoint_path(job.id)
        async with qemu_nbd(image, str(disk.export), exports.qemu_path(job.id)):
            endpoint = exports.get(job.id)
            assert endpoint is not None
            with capture_logs() as logged:
                async with reading(disk.url, path, 1) as look:
                    assert look["received"] == [0], "look was relayed to QEMU"
                    assert "error" in look and "sha256" not in look
                    assert (endpoint.active, endpoint.total) == (0, 0)
            refusal = [e for e in logged if e["log_level"] == "warning"]
            assert refusal and refusal[0]["event"].startswith("nbd connection refused")
            assert (refusal[0]["uid"], refusal[0]["role"]) == (65534, "look")
            assert refusal[0]["pid"] > 0

            exports.roles = Roles(backup=("nobody",), default=Role.NONE)  # what a reload does
            async with reading(disk.url, path, 0) as backup:
                assert backup == {"received": [],
                                  "sha256": hashlib.sha256(DISK).hexdigest()}
            await until(rig.jobs, job.id, lambda j: j.appliance is not None and
                        j.appliance.bytes_read == len(DISK) and not j.appliance.active)

            exports.roles = Roles(default=Role.NONE)  # nobody has no role at all
            async with reading(disk.url, path, exports.limit) as none:
                assert none["received"] == [0] * exports.limit, "none was relayed to QEMU"
                assert "error" in none and "sha256" not in none
                assert (endpoint.active, endpoint.total) == (0, 1)
                finished = await rig.jobs.finish(job.id, True)
                assert finished.state == JobState.COMPLETED


async def test_export_names_are_shown_only_to_a_role_that_reads_backups(
        tmp_path: Path, source: FakeSource, folder: Path) -> None:
    """On the TCP endpoint an export's name is what lets a client in: Get, List and Watch
    show a pull job's export names and URIs to `backup`, not to `look`."""
    shown = (
        "import json, sys\n"
        "from pullbackd.control.client import Client\n"
        "with Client(sys.argv[1], timeout=30) as c:\n"
        "    got = c.call('org.pullbackd.Backup.Get', id=sys.argv[2])['job']\n"
        "    listed = c.call('org.pullbackd.Backup.List')['jobs'][0]\n"
        "    events = c.stream('org.pullbackd.Backup.Watch', id=sys.argv[2])\n"
        "    watched = next(iter(events))['event']['job']\n"
        "print(json.dumps([[d[k] for d in j['disks'] for k in ('export', 'url', 'remote_url')]\n"
        "                  for j in (got, listed, watched)]))\n")
    async with running(tmp_path, source, remote="nbds://backup-host:10809") as rig, \
            served(rig, tmp_path, folder) as (service, path):
        job = await rig.jobs.start(StartRequest("d1", disks=["vda"]))
        [disk] = job.disks
        assert disk.export and disk.url and disk.remote_url

        async def seen() -> list[list[str | None]]:
            proc = await anyio.run_process([*NOBODY, sys.executable, "-c", shown, str(path),
                                            job.id])
            result: list[list[str | None]] = json.loads(proc.stdout)
            return result

        service.roles = Roles(look=("nobody",), default=Role.NONE)
        assert await seen() == [[None, None, None]] * 3
        service.roles = Roles(backup=("nobody",), default=Role.NONE)
        assert await seen() == [[disk.export, disk.url, disk.remote_url]] * 3


async def test_a_prune_while_a_start_of_the_domain_is_under_way_is_refused_as_busy(
        tmp_path: Path, source: FakeSource, folder: Path) -> None:
    """A Start holds its domain before its job is recorded, and may be streaming into the
    repository: a Prune then got NoSuchJob, naming a job nobody had asked about, not
    BackupInProgress. Nothing changed, and the Start goes on."""
    async with running(tmp_path, source) as rig, served(rig, tmp_path, folder) as (_, path):
        stall = source.stall("plan")
        rig.tg.start_soon(rig.jobs.start, StartRequest("d1", destination=LOCAL))
        with anyio.fail_after(5):
            await stall.reached.wait()
        held = rig.jobs.active("d1")
        try:
            with pytest.raises(VarlinkError) as refused:
                await call(path, "Prune", domain="d1", keep=1)
        finally:
            stall.release()
        assert held is not None
        assert (refused.value.name, refused.value.parameters) == (
            f"{api.INTERFACE}.BackupInProgress", {"domain": "d1", "id": held})
        await rig.jobs.started("d1")
        assert rig.jobs.get(held).local
        await rig.jobs.abort(held)


async def test_a_stop_answers_the_calls_already_sent_and_takes_no_more(
        tmp_path: Path, source: FakeSource, folder: Path) -> None:
    """systemd stops or restarts the daemon: a call written on a connection the daemon had
    accepted, and not read yet, is answered before the connection closes (it was closed
    unread, and its caller got ECONNRESET: a call lost in a restart, which
    tests/test_host.py saw once in 40); a stream of replies ends; a connection not
    accepted yet is left in the socket, for the next run."""
    async with running(tmp_path, source) as rig, \
            served(rig, tmp_path, folder) as (service, path):
        job = await rig.jobs.start(StartRequest("d1"))
        waiting, watching, late = (socket.socket(socket.AF_UNIX) for _ in range(3))
        with waiting, watching, late:
            for s in (waiting, watching):
                s.settimeout(10)
                s.connect(str(path))
            watching.sendall(message("Watch", more=True))
            event = decode((await received(watching, 65536))[:-1])["parameters"]["event"]
            assert event["kind"] == "state"
            waiting.sendall(message("Get", parameters={"id": job.id}))
            assert "job" in decode((await received(waiting, 65536))[:-1])["parameters"]
            # Its next call is in its socket, not yet read, as the stop comes.
            waiting.sendall(message("Get", parameters={"id": job.id}))
            with anyio.fail_after(30):  # far short of the grace: nothing holds it
                await service.stop(grace=600)
            reply = await received(waiting, 65536)
            assert decode(reply[:-1])["parameters"]["job"]["id"] == job.id
            assert await received(waiting, 1) == b""
            while await received(watching, 1 << 20):  # the events it had, then the end
                pass
            late.settimeout(0.5)
            late.connect(str(path))
            late.sendall(message("List"))
            with pytest.raises(TimeoutError):
                await received(late, 1)  # nobody takes it: the next run will


async def test_a_stop_answers_a_call_accepted_as_it_came(
        tmp_path: Path, source: FakeSource, folder: Path) -> None:
    """A connection the accept loop takes as the stop comes (its accept was ready to run,
    so the stop's cancel let it finish) is answered before the stop returns. The stop
    counted only the connections open when it began, found none, and the daemon exited
    with this call unread (its caller got ECONNRESET: a call lost in a restart)."""
    async with running(tmp_path, source) as rig, \
            served(rig, tmp_path, folder) as (service, path):
        with socket.socket(socket.AF_UNIX) as late:
            await anyio.sleep(0.1)  # the accept loop waits
            late.connect(str(path))
            late.sendall(message("List"))
            # One turn of the loop sees the connection (its accept is then ready to run);
            # the stop comes in the next, before the accept ran.
            await anyio.lowlevel.checkpoint()
            await anyio.lowlevel.checkpoint()
            with anyio.fail_after(30):
                await service.stop(grace=600)
            late.setblocking(False)
            assert "jobs" in decode(late.recv(65536)[:-1])["parameters"]


async def received(sock: socket.socket, size: int) -> bytes:
    """`sock.recv`, off the event loop (the server runs there)."""
    return await anyio.to_thread.run_sync(sock.recv, size)
