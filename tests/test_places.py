"""Where a client may have pullbackd write (places.py), against the fake source: a push's
target_dir is used as it was checked, whatever a client re-points afterwards; the folders
below a push dir must be root's or pullbackd's, and not writable by group or others; a
queued push is checked again as its turn comes. (A client's symlinks and folders are made
here by root, the tests' user, and given to `nobody` where it matters.)

A streamed job's destination socket is reached as it was checked (stream.py, `_pinned`):
appliances are real users who are not root, each serving its own folder with nbdkit, and
the one that attacks swaps its socket for a link, as itself, once Start checked it, or
between two connections of the copy; what the link leads to receives nothing.
"""

from __future__ import annotations

import hashlib
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import anyio
import nbd
import pytest

from pullbackd import errors, stream
from pullbackd.model import Job, JobState, StartRequest
from pullbackd.places import Places

from .fakes import FakeSource, FakeVirt
from .images import MiB
from .test_jobs import NbdkitSource, Rig, ended, files, running, until

pytestmark = pytest.mark.asyncio

NOBODY = 65534


@pytest.fixture
def source(tmp_path: Path) -> FakeSource:
    (tmp_path / "source").mkdir()
    return FakeSource(FakeVirt(), tmp_path / "source")


@pytest.fixture
def push(tmp_path: Path) -> Path:
    """A `[push] dirs` folder, and `victim` beside it stands for /etc."""
    (tmp_path / "push").mkdir()
    (tmp_path / "victim").mkdir()
    return tmp_path / "push"


def repoint(link: Path, to: Path) -> None:
    """As an attacker would: atomically."""
    new = link.with_name(link.name + ".new")
    new.symlink_to(to)
    os.replace(new, link)


async def test_a_push_writes_where_it_was_checked_whatever_a_link_points_to_later(
        tmp_path: Path, source: FakeSource, push: Path) -> None:
    link = tmp_path / "link"  # a client's, in a folder it may write (/dev/shm, say)
    link.symlink_to(push)
    async with running(tmp_path, source) as rig:
        rig.jobs.reconfigure(max_active=0, keep_finished=3600, places=Places((push,), None))
        stall = source.stall("plan")  # libvirt's lookups take a while...
        started: list[Job] = []
        done = anyio.Event()

        async def start() -> None:
            started.append(await rig.jobs.start(
                StartRequest("d1", disks=["vda"], target_dir=str(link))))
            done.set()
        rig.tg.start_soon(start)
        with anyio.fail_after(10):
            await stall.reached.wait()
        repoint(link, tmp_path / "victim")  # ...and the client re-points its link
        stall.release()
        with anyio.fail_after(10):
            await done.wait()
        job = rig.jobs.get(started[0].id)
        assert job.state == JobState.RUNNING
        # What both sources (libvirt's and the offline one) write into.
        assert job.target_dir == str(push)
        assert files(tmp_path / "victim") == []
        assert files(push) == [f"{job.id}.vda.qcow2"]


@pytest.mark.parametrize(("owner", "mode", "target", "reason"), [
    (NOBODY, 0o755, "sub", "belongs to nobody"),
    # Root's own folder in theirs: they could move it away and put a link in its place.
    (NOBODY, 0o755, "sub/ours", "belongs to nobody"),
    (0, 0o775, "sub", "is writable by its group or others"),
    (0, 0o1777, "sub/ours", "is writable by its group or others"),
], ids=["others-folder", "in-others-folder", "writable-by-group", "in-a-folder-others-write"])
async def test_a_target_others_could_move_is_refused(
        tmp_path: Path, source: FakeSource, push: Path, owner: int, mode: int, target: str,
        reason: str) -> None:
    (push / "sub" / "ours").mkdir(parents=True)
    os.chown(push / "sub", owner, owner)
    (push / "sub").chmod(mode)
    async with running(tmp_path, source) as rig:
        rig.jobs.reconfigure(max_active=0, keep_finished=3600, places=Places((push,), None))
        source.calls.clear()  # recovery's
        with pytest.raises(errors.TargetNotWritable) as e:
            await rig.jobs.start(StartRequest("d1", target_dir=str(push / target)))
        assert e.value.parameters["target_dir"] == str(push / target)
        assert e.value.parameters["reason"].startswith(f"{push}/sub {reason}, who could replace")
        assert "have the host's administrator" in e.value.parameters["reason"]
        assert source.calls == [] and rig.jobs.all() == []


async def test_the_push_dir_itself_is_the_operators_choice(
        tmp_path: Path, source: FakeSource, push: Path) -> None:
    os.chmod(push, 0o1777)  # as /tmp is
    (push / "ours").mkdir(mode=0o700)
    async with running(tmp_path, source) as rig:
        rig.jobs.reconfigure(max_active=0, keep_finished=3600, places=Places((push,), None))
        for target in (push, push / "ours"):
            job = await rig.jobs.start(StartRequest("d1", disks=["vda"], target_dir=str(target)))
            assert f"{job.id}.vda.qcow2" in files(target)
            await rig.jobs.abort(job.id)


@pytest.mark.parametrize("change", ["opened to others", "given away", "link", "reloaded"])
async def test_a_queued_push_is_checked_again_as_its_turn_comes(
        tmp_path: Path, source: FakeSource, push: Path, change: str) -> None:
    (push / "ours").mkdir()
    target = push / "ours"
    async with running(tmp_path, source, max_active=1) as rig:
        places = Places((push,), None)
        rig.jobs.reconfigure(max_active=1, keep_finished=3600, places=places)
        first = await rig.jobs.start(StartRequest("d2"))
        queued = await rig.jobs.start(StartRequest("d1", disks=["vda"], target_dir=str(target)))
        assert queued.state == JobState.QUEUED
        if change == "opened to others":
            target.chmod(0o777)
        elif change == "given away":
            os.chown(target, NOBODY, NOBODY)
        elif change == "link":  # a folder made a link by whoever may (here root)
            target.rename(push / "moved")
            target.symlink_to(tmp_path / "victim")
        else:
            rig.jobs.reconfigure(max_active=1, keep_finished=3600,
                                 places=Places((tmp_path / "victim",), None))
        await rig.jobs.abort(first.id)
        job = await until(rig.jobs, queued.id,
                          lambda j: j.state not in (JobState.QUEUED, JobState.STARTING))
        assert job.state == JobState.FAILED
        assert job.error is not None and job.error.startswith(
            f"the backup could not start: cannot write push backups into {target}: "), job.error
        assert source.called("begin") == ["d2"]
        assert files(tmp_path / "victim") == [] and files(target) == []


async def test_a_destinations_socket_is_used_as_checked(tmp_path: Path) -> None:
    allowed = tmp_path / "appliances and more"
    allowed.mkdir()
    link = tmp_path / "link"  # a client's
    link.symlink_to(allowed)
    places = Places(None, (f"nbd+unix:///?socket={allowed}",))
    given = f"nbd+unix:///{{disk}}?socket={link}/{{disk}}.sock"
    checked = places.check(StartRequest("d1", destination=given))
    u = urlsplit(str(checked.destination))
    assert (u.scheme, u.path) == ("nbd+unix", "/{disk}")
    assert parse_qsl(u.query) == [("socket", f"{allowed}/{{disk}}.sock")]
    # Resolved already: as it was given.
    resolved = f"nbd+unix:///x?socket={allowed}/x.sock"
    assert places.check(StartRequest("d1", destination=resolved)).destination == resolved
    assert places.check(StartRequest("d1", destination="local")).destination == "local"


# A streamed job's destination: the appliance swaps its socket for a link once checked.

#: Two appliances' users: the one that attacks, and another one.
APPLIANCE, OTHER = "pbtest-appliance", "pbtest-other"
SIZE = 4 * MiB


def ensure_user(name: str) -> tuple[int, int]:
    """A system user of its own group, made if missing: its uid and gid."""
    if subprocess.run(["getent", "passwd", name], capture_output=True,
                      check=False).returncode != 0:
        subprocess.run(["useradd", "--system", "--user-group", "--no-create-home",
                        "--shell", "/usr/sbin/nologin", name], check=True)
    user = pwd.getpwnam(name)
    return user.pw_uid, user.pw_gid


def as_user(name: str, *command: str) -> list[str]:
    uid, gid = ensure_user(name)
    return ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", *command]


@pytest.fixture
def appliances(tmp_path: Path) -> Iterator[Path]:
    """`[stream] destinations`' folder (root's), where appliances' users may enter (the
    tests' own folders are root's alone); removed afterwards."""
    top = Path(tempfile.gettempdir()) / \
        f"pbs-{hashlib.sha1(str(tmp_path).encode()).hexdigest()[:10]}"
    (top / "appliances").mkdir(mode=0o755, parents=True)
    top.chmod(0o755)
    try:
        yield top / "appliances"
    finally:
        shutil.rmtree(top)


def appliance_folder(appliances: Path, user: str, backup: bytes) -> Path:
    """`user`'s folder in `appliances`, theirs, holding their last backup (vda.img)."""
    uid, gid = ensure_user(user)
    folder = appliances / user
    folder.mkdir(mode=0o755)
    (folder / "vda.img").write_bytes(backup)
    for path in (folder, folder / "vda.img"):
        os.chown(path, uid, gid)
    return folder


@asynccontextmanager
async def nbd_server(command: list[str], sock: Path) -> AsyncIterator[None]:
    """`command` serving on `sock`, from once it listens."""
    server = await anyio.open_process(command, stderr=None)
    try:
        with anyio.fail_after(30):
            while not await anyio.Path(sock).exists():  # nbdkit tells no one
                assert server.returncode is None, command
                await anyio.sleep(0.01)
        yield
    finally:
        with suppress(ProcessLookupError):  # gone already
            server.terminate()
        await server.wait()


def serving_as(user: str | None, folder: Path) -> tuple[list[str], Path]:
    """nbdkit serving `folder`/vda.img on `folder`/vda.sock, as `user` (None: root, as
    pullbackd's own servers run here), and that socket."""
    command = ["nbdkit", "-f", "-U", str(folder / "vda.sock"), "file",
               str(folder / "vda.img")]
    return (as_user(user, *command) if user else command), folder / "vda.sock"


def swap_for_link(user: str, sock: Path, to: Path) -> None:
    """As `user` (the appliance): `sock` becomes a link to `to`, at once."""
    subprocess.run(as_user(user, sys.executable, "-c",
                           "import os, sys; os.symlink(sys.argv[2], sys.argv[1] + '.new');"
                           " os.replace(sys.argv[1] + '.new', sys.argv[1])",
                           str(sock), str(to)), check=True, timeout=60)
    assert sock.is_symlink()


def pattern() -> bytes:
    """nbdkit's pattern: each 8 bytes hold their own offset."""
    return b"".join(o.to_bytes(8, "big") for o in range(0, SIZE, 8))


@asynccontextmanager
async def served_apart(tmp_path: Path, appliances: Path, mine: Path,
                       other: tuple[str | None, Path]
                       ) -> AsyncIterator[tuple[Rig, NbdkitSource, Path, Path]]:
    """The jobs over a source serving nbdkit's pattern, copies allowed into
    `appliances`; the appliance's server on `mine`/vda.sock, and the other's (a user, or
    None: root, as pullbackd's own) on its folder's vda.sock: the rig, the source and the
    two sockets."""
    (tmp_path / "source").mkdir()
    source = NbdkitSource(FakeVirt(), tmp_path / "source", served=tmp_path / "qemu.sock")
    source.sizes = {"vda": SIZE}
    appliance, sock = serving_as(APPLIANCE, mine)
    theirs, other_sock = serving_as(*other)
    async with nbd_server(["nbdkit", "-f", "-U", str(source.served), "pattern",
                           f"size={SIZE}"], source.served), \
            nbd_server(appliance, sock), nbd_server(theirs, other_sock), \
            running(tmp_path, source) as rig:
        rig.jobs.reconfigure(max_active=0, keep_finished=3600, places=Places(
            None, (f"nbd+unix:///?socket={appliances}",)))
        yield rig, source, sock, other_sock


@pytest.mark.parametrize("victim", [OTHER, None], ids=["another-appliance", "pullbackds-own"])
async def test_a_destination_swapped_for_a_link_once_checked_gets_nothing_through_it(
        tmp_path: Path, appliances: Path, victim: str | None) -> None:
    """The appliance's own socket, checked at Start; then, as the appliance, swapped for
    a link to another appliance's server, or to one of pullbackd's own (as the
    repository's writers: pullbackd may reach it, the appliance may not). The job fails,
    naming the link and what to do, and the server the link leads to received nothing
    (libnbd followed the link: the VM's disk overwrote its image, and the job completed).
    Before, a job to the same socket unswapped completes, the disk in the appliance's
    image byte for byte."""
    theirs = os.urandom(SIZE)  # what the link leads to holds: another backup
    if victim is None:
        (tmp_path / "writer").mkdir(mode=0o700)
        (tmp_path / "writer" / "vda.img").write_bytes(theirs)
        target_folder = tmp_path / "writer"
    else:
        target_folder = appliance_folder(appliances, victim, theirs)
    mine = appliance_folder(appliances, APPLIANCE, b"\xee" * SIZE)
    async with served_apart(tmp_path, appliances, mine, (victim, target_folder)) as (
            rig, source, sock, other_sock):
        request = StartRequest("d1", disks=["vda"],
                               destination=f"nbd+unix:///?socket={sock}")
        first = await rig.jobs.start(request)
        assert (await ended(rig.jobs, first.id)).state == JobState.COMPLETED
        assert (mine / "vda.img").read_bytes() == pattern()
        (mine / "vda.img").write_bytes(b"\xee" * SIZE)

        stall = source.stall("plan")  # libvirt's lookups take a while...
        started: list[Job] = []
        done = anyio.Event()

        async def start() -> None:
            started.append(await rig.jobs.start(request))
            done.set()
        rig.tg.start_soon(start)
        with anyio.fail_after(10):
            await stall.reached.wait()  # checked: the socket is the appliance's own
        swap_for_link(APPLIANCE, sock, other_sock)  # ...and the appliance swaps it
        stall.release()
        with anyio.fail_after(10):
            await done.wait()
        job = await ended(rig.jobs, started[0].id)
    assert job.state == JobState.FAILED, job
    assert f"{sock} is a link (to '{other_sock}')" in (job.error or ""), job.error
    assert "start the backup again" in (job.error or ""), job.error
    assert (target_folder / "vda.img").read_bytes() == theirs
    assert (mine / "vda.img").read_bytes() == b"\xee" * SIZE


async def test_a_link_made_between_two_connections_of_a_copy_gets_nothing_through_it(
        tmp_path: Path, appliances: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The copy's first connection pair reached the appliance's socket; the appliance
    swaps it for a link to another appliance's server before the copy opens its second
    pair (both servers allow multi-conn). The copy fails with UncheckedDestination, and
    the other appliance's image is as it was (its server took the second pair's writes)."""
    theirs = os.urandom(SIZE)
    mine = appliance_folder(appliances, APPLIANCE, b"\xee" * SIZE)
    target_folder = appliance_folder(appliances, OTHER, theirs)
    appliance, sock = serving_as(APPLIANCE, mine)
    other, other_sock = serving_as(OTHER, target_folder)
    checked = Places(None, (f"nbd+unix:///?socket={appliances}",)).check(
        StartRequest("d1", disks=["vda"], destination=f"nbd+unix:///?socket={sock}"))
    connect: Callable[..., nbd.NBD] = stream._connect
    connected: list[str] = []

    def connect_then_swap(url: str, *args: object, **kwargs: object) -> nbd.NBD:
        h = connect(url, *args, **kwargs)
        if kwargs.get("name") is not None:  # the destination's
            connected.append(url)
            if len(connected) == 1:  # the first pair's, before the planner starts
                assert h.can_multi_conn()
                swap_for_link(APPLIANCE, sock, other_sock)
        return h
    monkeypatch.setattr(stream, "_connect", connect_then_swap)
    src = tmp_path / "qemu.sock"
    async with nbd_server(["nbdkit", "-f", "-U", str(src), "pattern", f"size={SIZE}"], src), \
            nbd_server(appliance, sock), nbd_server(other, other_sock):
        with pytest.raises(stream.UncheckedDestination, match=f"{sock} is a link"):
            await stream.stream(f"nbd+unix:///?socket={src}", str(checked.destination),
                                tuning=stream.Tuning(spread=MiB, connect_timeout=10),
                                pinned=stream.Pinned())
    assert len(connected) == 1, connected  # the second pair never connected
    assert (target_folder / "vda.img").read_bytes() == theirs


@pytest.mark.parametrize("named", ["directly", "as-a-disk"])
async def test_another_appliances_socket_gets_nothing_from_a_backup_it_did_not_start(
        tmp_path: Path, appliances: Path, named: str) -> None:
    """An appliance that may start backups names, inside [stream] destinations, another
    appliance's socket: directly (Start looks at it and refuses it), or as a `{disk}`
    socket Start cannot look at (the copy refuses it before it connects). Either way the
    other appliance's backup is as it was: pullbackd wrote this VM's disk over it, as the
    socket was in the allowed folder and pullbackd could reach it. Its own socket takes
    the backup, byte for byte."""
    theirs = os.urandom(SIZE)
    mine = appliance_folder(appliances, APPLIANCE, b"\xee" * SIZE)
    target_folder = appliance_folder(appliances, OTHER, theirs)
    me = ensure_user(APPLIANCE)[0]
    async with served_apart(tmp_path, appliances, mine, (OTHER, target_folder)) as (
            rig, _, sock, other_sock):
        own = await rig.jobs.start(StartRequest(
            "d1", disks=["vda"], destination=f"nbd+unix:///?socket={sock}", owner=me))
        assert (await ended(rig.jobs, own.id)).state == JobState.COMPLETED
        assert (mine / "vda.img").read_bytes() == pattern()
        if named == "directly":
            with pytest.raises(errors.InvalidParameter) as refused:
                await rig.jobs.start(StartRequest(
                    "d1", disks=["vda"], destination=f"nbd+unix:///?socket={other_sock}",
                    owner=me))
            assert refused.value.parameters == {"parameter": "destination"}
            assert f"{other_sock} is {OTHER}'s, not yours ({APPLIANCE})" in \
                str(refused.value)
        else:
            job = await rig.jobs.start(StartRequest(
                "d1", disks=["vda"], owner=me,
                destination=f"nbd+unix:///?socket={target_folder}/{{disk}}.sock"))
            job = await ended(rig.jobs, job.id)
            assert job.state == JobState.FAILED, job
            assert f"{other_sock} is {OTHER}'s, not {APPLIANCE}'s" in (job.error or ""), \
                job.error
    assert (target_folder / "vda.img").read_bytes() == theirs
