"""pullbackd's own state: a SQLite database under `[state] dir`.

Together with what libvirt reports, it is enough to rebuild every job after a
crash: a job is written before libvirt is asked to start it, and again at each
change of state. Writes are durable before the caller hears of the change.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from pathlib import Path
from typing import Any

import anyio

from .chain import Checkpoint, CheckpointState
from .exports import Handed, Session
from .jobs import Job

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    domain TEXT NOT NULL,
    state TEXT NOT NULL,
    created TEXT NOT NULL,
    record TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_domain ON jobs (domain);
CREATE TABLE IF NOT EXISTS requests (
    id TEXT PRIMARY KEY,
    record TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS handoff (
    job TEXT NOT NULL,
    record TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS checkpoints (
    name TEXT PRIMARY KEY,
    domain TEXT NOT NULL,
    consumer TEXT NOT NULL,
    job TEXT NOT NULL,
    created TEXT NOT NULL,
    state TEXT NOT NULL,
    disks TEXT NOT NULL,
    xml TEXT
);
"""


class Store:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # One connection, used from one worker thread at a time (the limiter).
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode = WAL")
        self._db.execute("PRAGMA synchronous = FULL")
        self._db.executescript(SCHEMA)
        self._limiter = anyio.CapacityLimiter(1)

    def close(self) -> None:
        self._db.close()

    def load_jobs(self) -> list[Job]:
        rows = self._db.execute("SELECT record FROM jobs ORDER BY created, rowid")
        return [Job.from_record(json.loads(record)) for (record,) in rows]

    def load_checkpoints(self) -> list[Checkpoint]:
        rows = self._db.execute(
            "SELECT name, domain, consumer, job, created, state, disks, xml FROM checkpoints"
            " ORDER BY created, rowid")
        return [Checkpoint(name, domain, consumer, job, created, CheckpointState(state),
                           tuple(json.loads(disks)), xml)
                for name, domain, consumer, job, created, state, disks, xml in rows]

    async def save_checkpoint(self, c: Checkpoint) -> None:
        await self._write(
            "INSERT INTO checkpoints (name, domain, consumer, job, created, state, disks, xml)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (name) DO UPDATE SET"
            " state = excluded.state, xml = excluded.xml",
            (c.name, c.domain, c.consumer, c.job, c.created, c.state, json.dumps(c.disks), c.xml))

    async def save_handoff(self, handed: list[Handed]) -> None:
        """What the next run needs to resume the sessions whose sockets systemd keeps."""
        for h in handed:
            await self._write("INSERT INTO handoff (job, record) VALUES (?, ?)",
                              (h.job, json.dumps(dataclasses.asdict(h))))

    def take_handoff(self) -> list[Handed]:
        """The sessions the previous run handed over, once: they are deleted here."""
        rows = self._db.execute("SELECT record FROM handoff ORDER BY rowid").fetchall()
        self._db.execute("DELETE FROM handoff")
        records = [json.loads(record) for (record,) in rows]
        return [Handed(r["job"], Session(**r["session"]), r["sniffer"]) for r in records]

    async def save_request(self, job_id: str, request: dict[str, Any]) -> None:
        """What a queued job asked for, to start it later (even after a restart)."""
        await self._write("INSERT INTO requests (id, record) VALUES (?, ?)",
                          (job_id, json.dumps(request)))

    async def delete_request(self, job_id: str) -> None:
        await self._write("DELETE FROM requests WHERE id = ?", (job_id,))

    def load_requests(self) -> dict[str, dict[str, Any]]:
        return {job_id: json.loads(record)
                for job_id, record in self._db.execute("SELECT id, record FROM requests")}

    async def forget_jobs(self, ids: list[str]) -> None:
        for job_id in ids:
            await self._write("DELETE FROM jobs WHERE id = ?", (job_id,))

    async def delete_checkpoint(self, name: str) -> None:
        await self._write("DELETE FROM checkpoints WHERE name = ?", (name,))

    async def _write(self, sql: str, args: tuple[object, ...]) -> None:
        await anyio.to_thread.run_sync(self._db.execute, sql, args, limiter=self._limiter)

    async def save_job(self, job: Job) -> None:
        await self._write(
            "INSERT INTO jobs (id, domain, state, created, record) VALUES (?, ?, ?, ?, ?)"
            " ON CONFLICT (id) DO UPDATE SET state = excluded.state, record = excluded.record",
            (job.id, job.domain, job.state, job.created, json.dumps(job.to_record())))
