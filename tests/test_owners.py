"""A consumer's chain, and a job, are the user's who started them (chain.py, jobs.py):
against the fake source, with the uids the control socket gives (`StartRequest.owner`,
Finish's and Abort's `by`). tests/test_trust.py tries the same as real users, through
the socket."""

from __future__ import annotations

import dataclasses
import sqlite3
from pathlib import Path

import anyio
import pytest

from pullbackd import errors
from pullbackd.model import JobState, StartRequest
from pullbackd.roles import user_name
from pullbackd.state import Store

from .fakes import FakeSource
from .test_jobs import running, source

__all__ = ["source"]  # the fixture, used by name

A, B = 60001, 60002


@pytest.mark.asyncio
async def test_a_chain_is_backed_up_by_its_owner_alone(tmp_path: Path,
                                                       source: FakeSource) -> None:
    """Another user's backup would join the chain, and its owner's next incremental
    would start from a checkpoint whose backup the owner never read."""
    async with running(tmp_path, source) as rig:
        first = await rig.jobs.start(StartRequest("d1", consumer="c", owner=A))
        await rig.jobs.finish(first.id, by=A)
        assert rig.chains.owner("d1", "c") == A and first.owner == A
        chain, checkpoints, jobs = rig.chain(), rig.checkpoints(), rig.jobs.all()
        for mode in ("full", "incremental"):
            for who in (B, None):
                with pytest.raises(errors.ChainOfAnother) as refused:
                    await rig.jobs.start(StartRequest("d1", mode=mode, consumer="c",
                                                      owner=who))
                assert refused.value.parameters == {
                    "domain": "d1", "consumer": "c", "owner": user_name(A)}
        assert (rig.chain(), rig.checkpoints(), rig.jobs.all()) == (chain, checkpoints, jobs)
        assert source.called("begin") == ["d1"]
        # Another consumer of the same domain, or the same consumer on another domain.
        for domain, consumer in (("d1", "other"), ("d2", "c")):
            job = await rig.jobs.start(StartRequest(domain, consumer=consumer, owner=B))
            await rig.jobs.finish(job.id, by=B)
        mine = await rig.jobs.start(StartRequest("d1", mode="incremental", consumer="c",
                                                 owner=A))
        assert mine.since == first.checkpoint
        await rig.jobs.finish(mine.id, by=A)
        # Deleting the chain frees the consumer.
        await rig.jobs.delete_chain("d1", "c")
        theirs = await rig.jobs.start(StartRequest("d1", consumer="c", owner=B))
        await rig.jobs.finish(theirs.id, by=B)
        assert rig.chains.owner("d1", "c") == B
    # Kept across a restart (kill -9: a new Jobs over the same database).
    async with running(tmp_path, source) as rig:
        assert (rig.chains.owner("d1", "c"), rig.chains.owner("d1", "other")) == (B, B)
        with pytest.raises(errors.ChainOfAnother):
            await rig.jobs.start(StartRequest("d1", consumer="c", owner=A))


@pytest.mark.asyncio
async def test_a_job_is_finished_by_its_starter_and_aborted_by_them_or_an_admin(
        tmp_path: Path, source: FakeSource) -> None:
    async with running(tmp_path, source) as rig:
        job = await rig.jobs.start(StartRequest("d1", consumer="c", owner=A))
        for end in (rig.jobs.finish(job.id, by=B), rig.jobs.finish(job.id, False, by=B),
                    rig.jobs.abort(job.id, by=B)):
            with pytest.raises(errors.JobOfAnother) as refused:
                await end
            assert refused.value.parameters == {"id": job.id, "owner": user_name(A)}
        assert rig.jobs.get(job.id).state == JobState.READY
        assert (await rig.jobs.finish(job.id, by=A)).state == JobState.COMPLETED
        # An admin (the API gives `by` None for one) aborts anyone's job.
        other = await rig.jobs.start(StartRequest("d2", consumer="c", owner=A))
        assert (await rig.jobs.abort(other.id)).state == JobState.ABORTED
        assert rig.chain("d2") == []


def test_a_database_of_an_earlier_version_takes_owners_in(tmp_path: Path) -> None:
    """Its checkpoints table has no `owner` column: one is added, and its checkpoints
    are nobody's (their chains anyone's) until a new checkpoint of theirs is recorded."""
    db = sqlite3.connect(tmp_path / "state.db")
    db.execute("CREATE TABLE checkpoints (name TEXT PRIMARY KEY, domain TEXT NOT NULL, "
               "consumer TEXT NOT NULL, job TEXT NOT NULL, created TEXT NOT NULL, "
               "state TEXT NOT NULL, disks TEXT NOT NULL, xml TEXT, "
               "full_disks TEXT NOT NULL DEFAULT '[]')")
    db.execute("INSERT INTO checkpoints VALUES ('old', 'd1', 'c', 'j1', "
               "'2026-01-01T00:00:00.000Z', 'complete', '[\"vda\"]', NULL, '[]')")
    db.commit()
    db.close()
    store = Store(tmp_path / "state.db")
    try:
        [old] = store.load_checkpoints()
        assert old.owner is None
        anyio.run(store.save_checkpoint, dataclasses.replace(
            old, name="new", job="j2", created="2026-01-02T00:00:00.000Z", owner=A))
    finally:
        store.close()
    store = Store(tmp_path / "state.db")
    try:
        assert [(c.name, c.owner) for c in store.load_checkpoints()] == [("old", None),
                                                                         ("new", A)]
    finally:
        store.close()
