"""pullbackd's own state: a SQLite database under `[state] dir`.

Together with what libvirt reports, it is enough to rebuild every job after a
crash: a job is written before libvirt is asked to start it, and again at each
change of state. Writes are durable before the caller hears of the change.

A job's end and its checkpoint's fate are one transaction (`save_job` with a
checkpoint): after a crash the database never holds a job that ended one way
and a checkpoint that went the other (see chain.py).

The NBD sessions handed over at a stop (exports.py) are recorded one by one,
each right after its sockets went to systemd's fd store, whatever becomes of
the others; the next start takes the records back once (`take_handoff` deletes
them). A session whose sockets have no record (a crash between the two) or
whose record has no sockets (systemd dropped them) is cut, never resumed
wrongly.

The jobs that may have frozen their guest (quiesce.py) are recorded before the freeze
and deleted once it is over (`save_freeze`, `delete_freeze`); a database of a version
that did not record them (no `freezes` table) counts every quiesced job still starting
as one, as that version thawed each at a restart.

A database that cannot be read is never replaced silently: `Store` raises
`StateDamaged`, which names the file and what the operator can do.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from pathlib import Path
from typing import Any

import anyio

from .model import (
    Appliance,
    Checkpoint,
    CheckpointState,
    Disk,
    Handed,
    Job,
    JobState,
    Progress,
    Session,
    Transition,
    plain,
)

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
    xml TEXT,
    full_disks TEXT NOT NULL DEFAULT '[]',
    owner INTEGER
);
CREATE TABLE IF NOT EXISTS domain_files (
    job TEXT PRIMARY KEY,
    record TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS thaws (
    domain TEXT PRIMARY KEY,
    job TEXT NOT NULL
);
"""
#: Created with what it holds at once (`_add_freezes`): a database without it is one of a
#: version that did not record freezes.
FREEZES = "CREATE TABLE freezes (job TEXT PRIMARY KEY, domain TEXT NOT NULL)"
#: Columns added since a table was first created: added to an older database at start.
COLUMNS = {"checkpoints": {"full_disks": "TEXT NOT NULL DEFAULT '[]'", "owner": "INTEGER"}}


class StateDamaged(Exception):
    """The daemon cannot start on this database (never a client's error: it does not
    cross the control socket)."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(
            f"the state database {path} cannot be used ({reason}); pullbackd will not guess "
            "its jobs and chains: restore the file from a backup, or move it aside to start "
            "afresh (running backups of pullbackd are then ended and every consumer's next "
            "backup is full, unless the domains' metadata carries their chains)")


class Store:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            # One connection, used from one worker thread at a time (the limiter).
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode = WAL")
            self._db.execute("PRAGMA synchronous = FULL")
            (result,) = self._db.execute("PRAGMA quick_check").fetchone()
            if result != "ok":
                raise sqlite3.DatabaseError(result)
            self._db.executescript(SCHEMA)
            for table, columns in COLUMNS.items():
                have = {row[1] for row in self._db.execute(f"PRAGMA table_info({table})")}
                for column, kind in columns.items():
                    if column not in have:
                        self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
            jobs = self.load_jobs()
            self.load_checkpoints()
            self._add_freezes(jobs)
        except (sqlite3.DatabaseError, ValueError, KeyError, TypeError) as e:
            raise StateDamaged(path, str(e) or type(e).__name__) from None
        self._limiter = anyio.CapacityLimiter(1)

    def _add_freezes(self, jobs: list[Job]) -> None:
        """The `freezes` table, if the database has none: with every job an earlier version
        left starting, quiesced and online (it thawed each at a restart), in the same
        transaction."""
        if self._db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = "
                            "'freezes'").fetchone() is not None:
            return
        self._transaction([(FREEZES, ())] + [
            ("INSERT INTO freezes (job, domain) VALUES (?, ?)", (j.id, j.domain))
            for j in jobs
            if j.state == JobState.STARTING and j.quiesce != "off" and not j.offline])

    def close(self) -> None:
        self._db.close()

    def load_jobs(self) -> list[Job]:
        rows = self._db.execute("SELECT record FROM jobs ORDER BY created, rowid")
        return [_job(json.loads(record)) for (record,) in rows]

    def load_checkpoints(self) -> list[Checkpoint]:
        rows = self._db.execute(
            "SELECT name, domain, consumer, job, created, state, disks, xml, full_disks,"
            " owner FROM checkpoints ORDER BY created, rowid")
        return [Checkpoint(name, domain, consumer, job, created, CheckpointState(state),
                           tuple(json.loads(disks)), xml, tuple(json.loads(full)), owner)
                for name, domain, consumer, job, created, state, disks, xml, full, owner
                in rows]

    async def save_checkpoint(self, c: Checkpoint) -> None:
        await self._write(_SAVE_CHECKPOINT, _checkpoint_row(c))

    async def save_handoff(self, handed: Handed) -> None:
        """What the next run needs to resume a session whose sockets systemd keeps."""
        await self._write("INSERT INTO handoff (job, record) VALUES (?, ?)",
                          (handed.job, json.dumps(dataclasses.asdict(handed))))

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

    async def delete_thaw(self, domain: str) -> None:
        await self._write("DELETE FROM thaws WHERE domain = ?", (domain,))

    def load_thaws(self) -> dict[str, str]:
        """The thaws owed (quiesce.Thaws; recorded by `delete_freeze`): domain -> job id."""
        return dict(self._db.execute("SELECT domain, job FROM thaws"))

    async def save_freeze(self, domain: str, job_id: str) -> None:
        """The job `job_id` may freeze the domain's guest from now on (quiesce.Thaws.freezing)."""
        await self._write("INSERT OR REPLACE INTO freezes (job, domain) VALUES (?, ?)",
                          (job_id, domain))

    async def delete_freeze(self, job_id: str, *, thaw: str | None = None) -> None:
        """The job's freeze is over: the guest thawed, or nothing frozen; with `thaw` (the
        job's domain), a thaw owed it instead, recorded in the same transaction."""
        writes: list[tuple[str, tuple[object, ...]]] = [
            ("DELETE FROM freezes WHERE job = ?", (job_id,))]
        if thaw is not None:
            writes.append(("INSERT OR REPLACE INTO thaws (domain, job) VALUES (?, ?)",
                           (thaw, job_id)))
        await anyio.to_thread.run_sync(self._transaction, writes, limiter=self._limiter)

    def load_freezes(self) -> dict[str, str]:
        """The jobs that may have frozen their guest: job id -> domain."""
        return dict(self._db.execute("SELECT job, domain FROM freezes"))

    async def forget_jobs(self, ids: list[str]) -> None:
        for job_id in ids:
            writes: list[tuple[str, tuple[object, ...]]] = [
                ("DELETE FROM domain_files WHERE job = ?", (job_id,)),
                ("DELETE FROM jobs WHERE id = ?", (job_id,))]
            await anyio.to_thread.run_sync(self._transaction, writes, limiter=self._limiter)

    async def load_files(self, job_id: str) -> str | None:
        def load() -> str | None:
            row = self._db.execute("SELECT record FROM domain_files WHERE job = ?",
                                   (job_id,)).fetchone()
            return None if row is None else str(row[0])

        return await anyio.to_thread.run_sync(load, limiter=self._limiter)

    async def delete_checkpoint(self, name: str) -> None:
        await self._write("DELETE FROM checkpoints WHERE name = ?", (name,))

    async def _write(self, sql: str, args: tuple[object, ...]) -> None:
        await anyio.to_thread.run_sync(self._db.execute, sql, args, limiter=self._limiter)

    async def save_job(self, job: Job, checkpoint: Checkpoint | None = None,
                       files: str | None = None) -> None:
        """Record a job; with `checkpoint`, the checkpoint's new state in the same
        transaction (a job's end and its checkpoint's fate are one decision); with `files`,
        the domain's files its backup began with (domainfiles.DomainFiles.to_record)."""
        writes: list[tuple[str, tuple[object, ...]]] = [
            (_SAVE_JOB, (job.id, job.domain, job.state, job.created,
                         json.dumps(_job_record(job))))]
        if checkpoint is not None:
            writes.append((_SAVE_CHECKPOINT, _checkpoint_row(checkpoint)))
        if files is not None:
            writes.append(("INSERT OR REPLACE INTO domain_files (job, record) VALUES (?, ?)",
                           (job.id, files)))
        await anyio.to_thread.run_sync(self._transaction, writes, limiter=self._limiter)

    def _transaction(self, writes: list[tuple[str, tuple[object, ...]]]) -> None:
        with self._db:  # commits, or rolls back on an exception
            self._db.execute("BEGIN IMMEDIATE")
            for sql, args in writes:
                self._db.execute(sql, args)


_SAVE_JOB = ("INSERT INTO jobs (id, domain, state, created, record) VALUES (?, ?, ?, ?, ?)"
             " ON CONFLICT (id) DO UPDATE SET state = excluded.state, record = excluded.record")
_SAVE_CHECKPOINT = (
    "INSERT INTO checkpoints (name, domain, consumer, job, created, state, disks, xml,"
    " full_disks, owner) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (name) DO UPDATE SET"
    " state = excluded.state, xml = excluded.xml, full_disks = excluded.full_disks")


def _checkpoint_row(c: Checkpoint) -> tuple[object, ...]:
    return (c.name, c.domain, c.consumer, c.job, c.created, c.state, json.dumps(c.disks), c.xml,
            json.dumps(c.full), c.owner)


#: What is shown of a job but never stored (records of earlier versions may hold
#: them: they are ignored).
_SHOWN_ONLY = ("position", "scratch")
_SHOWN_ONLY_DISK = ("scratch", "rate", "eta")


def _job_record(job: Job) -> dict[str, Any]:
    """A job as stored: its own record, not the varlink type (api.py shows that)."""
    record: dict[str, Any] = plain(job)
    for key in _SHOWN_ONLY:
        del record[key]
    for disk in record["disks"]:
        for key in _SHOWN_ONLY_DISK:
            del disk[key]
    return record


def _job(record: dict[str, Any]) -> Job:
    """A stored job. Raises KeyError, TypeError or ValueError for a record that is not one."""
    record = {k: v for k, v in record.items() if k not in _SHOWN_ONLY}
    progress = record.get("progress")
    appliance = record.get("appliance")
    return Job(**record | {
        "state": JobState(record["state"]),
        "disks": tuple(Disk(**{k: v for k, v in d.items() if k not in _SHOWN_ONLY_DISK})
                       for d in record["disks"]),
        "progress": Progress(**progress) if progress else None,
        "history": tuple(Transition(JobState(t["state"]), t["at"])
                         for t in record.get("history", ())),
        "appliance": Appliance(**appliance | {"sessions": tuple(
            Session(**s) for s in appliance["sessions"])}) if appliance else None,
    })
