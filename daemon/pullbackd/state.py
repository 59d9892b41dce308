"""pullbackd's own state: a SQLite database under `[state] dir`.

Together with what libvirt reports, it is enough to rebuild every job after a
crash: a job is written before libvirt is asked to start it, and again at each
change of state. Writes are durable before the caller hears of the change.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import anyio

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

    async def save_job(self, job: Job) -> None:
        await anyio.to_thread.run_sync(self._save_job, job, limiter=self._limiter)

    def _save_job(self, job: Job) -> None:
        self._db.execute(
            "INSERT INTO jobs (id, domain, state, created, record) VALUES (?, ?, ?, ?, ?)"
            " ON CONFLICT (id) DO UPDATE SET state = excluded.state, record = excluded.record",
            (job.id, job.domain, job.state, job.created, json.dumps(job.to_record())),
        )
