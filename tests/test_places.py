"""Where a client may have pullbackd write (places.py), against the fake source: a push's
target_dir is used as it was checked, whatever a client re-points afterwards; the folders
below a push dir must be root's or pullbackd's, and not writable by group or others; a
queued push is checked again as its turn comes. (A client's symlinks and folders are made
here by root, the tests' user, and given to `nobody` where it matters.)
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import anyio
import pytest

from pullbackd import errors
from pullbackd.model import Job, JobState, StartRequest
from pullbackd.places import Places

from .fakes import FakeSource, FakeVirt
from .test_jobs import files, running, until

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
