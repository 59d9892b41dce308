"""`org.pullbackd.Backup`: the varlink methods, mapped onto the job manager.

Each method of `BackupAPI` is the varlink method of the same name: it takes the
call's parameters and returns the reply's (or, for Watch, yields one reply per
event). Checking the parameters' types is the server's job (from the
interface definition); what is left here is meaning.
"""

from __future__ import annotations

import base64
import dataclasses
import json
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

import anyio
import structlog

from . import __version__, domainfiles, names, stream
from .chain import DEFAULT_CONSUMER, Chains, check_consumer
from .control import idl
from .control.server import Handler, Last, Limits, Service
from .errors import BackupInProgress, InvalidParameter, WatchTooSlow
from .jobs import Jobs
from .migration import Migrations
from .model import Change, Job, JobState, Session, StartRequest, plain
from .rebuild import Rebuilder
from .records import WATCH_BUFFER
from .repository import Repository, restorable
from .roles import Role, Roles

log = structlog.get_logger()

INTERFACE = "org.pullbackd.Backup"
#: Jobs in one List reply, at most (about 3 KiB each)...
PAGE = 200
#: ...and their JSON, at most: some jobs are larger (a long destination, a long error:
#: model.LONGEST), and a reply must stay under varlink's 1 MiB.
PAGE_BYTES = 512 << 10
#: What joins a List cursor's `created` and id: in neither (an RFC 3339 time, hex digits).
CURSOR = "/"
#: Problems in one Verify reply, at most (and at most PAGE_BYTES of them).
PROBLEMS = 1000
#: Progress events of a running job: at most one a second.
PROGRESS_INTERVAL = 1.0


def interface(name: str) -> idl.Interface:
    """One of the interface definitions shipped in the package."""
    return idl.parse(files(__package__).joinpath(f"{name}.varlink").read_text())


def _job(job: Job, role: Role = Role.ADMIN) -> dict[str, Any]:
    """A job as the varlink `Job` type, as a caller of `role` sees it."""
    record: dict[str, Any] = plain(job)
    if not Roles.reads_disks(role):
        # Export names let whoever knows them read the disks on the TCP endpoint
        # (names.export_token): not for a caller who may not read them.
        for disk in record["disks"]:
            disk["export"] = disk["url"] = disk["remote_url"] = None
    return record


def _listed(job: Job, role: Role) -> dict[str, Any]:
    """A job as List shows it: its appliance's totals, without the sessions."""
    record = _job(job, role)
    if record["appliance"] is not None:
        record["appliance"]["sessions"] = []
    return record


def _place(job: Job) -> tuple[str, str]:
    """A job's place in List's order, oldest first: by `created`, then by id. It never
    changes, and it needs no other job: a job forgotten takes no other's place."""
    return job.created, job.id


def _cursor(job: Job) -> str:
    """List's `next` after `job`: its place, which stays a place once the job is gone."""
    return f"{job.created}{CURSOR}{job.id}"


def _fitting(items: list[Any], most: int) -> int:
    """How many of `items`, from the first, go in one reply: at most `most`, and no more
    than PAGE_BYTES of JSON (but one at least)."""
    size = 0
    for n, item in enumerate(items[:most]):
        size += len(json.dumps(item))
        if n and size > PAGE_BYTES:
            return n
    return min(len(items), most)


def _event(kind: str, job: Job, role: Role, message: str | None = None,
           session: Session | None = None) -> dict[str, Any]:
    return {"event": {"kind": kind, "job": _job(job, role), "message": message,
                      "session": plain(session) if session else None}}


@dataclass(frozen=True)
class Parts:
    """What the methods act on."""

    jobs: Jobs
    migrations: Migrations
    chains: Chains
    repository: Repository
    #: What RestoreDomain does.
    rebuilder: Rebuilder
    tuning: stream.Tuning
    #: The folders Restore may write into ([restore] dirs).
    restore_dirs: tuple[Path, ...] = ()


class BackupAPI:
    def __init__(self, parts: Parts) -> None:
        self.jobs = parts.jobs
        self.migrations = parts.migrations
        self.chains = parts.chains
        self.repository = parts.repository
        self.tuning = parts.tuning
        self.restore_dirs = parts.restore_dirs
        self.rebuilder = parts.rebuilder
        # One Verify reads the repository at a time, the others wait their turn in order:
        # each holds a qemu-storage-daemon and a worker thread for as long as it reads
        # (hours, on a large repository), and a caller could start as many as the
        # control socket lets it make calls.
        self._verifying = anyio.Lock()

    def handlers(self) -> dict[str, Handler]:
        return {name: getattr(self, name) for name in interface(INTERFACE).methods}

    # Jobs.

    async def Start(self, domain: str, disks: list[str] | None = None,
                    mode: str | None = None, since: str | None = None,
                    consumer: str | None = None, target_dir: str | None = None,
                    destination: str | None = None,
                    allow_scratch_overcommit: bool | None = None,
                    queue: bool | None = None, quiesce: str | None = None,
                    mountpoints: list[str] | None = None, *, uid: int | None = None
                    ) -> dict[str, Any]:
        request = StartRequest(domain, disks, mode or "full", since,
                               DEFAULT_CONSUMER if consumer is None else consumer, target_dir,
                               destination, bool(allow_scratch_overcommit), queue is not False,
                               quiesce or "auto", mountpoints, owner=uid)
        return {"job": _job(await self.jobs.start(request))}

    async def Get(self, id: str, *, role: Role = Role.ADMIN) -> dict[str, Any]:
        return {"job": _job(await self.jobs.details(id), role)}

    async def List(self, domain: str | None = None, state: str | None = None,
                   after: str | None = None, limit: int | None = None,
                   *, role: Role = Role.ADMIN) -> dict[str, Any]:
        if state is not None and state not in {s.value for s in JobState}:
            raise InvalidParameter("state", f"one of {', '.join(s.value for s in JobState)}")
        limit = PAGE if limit is None else limit
        if not 1 <= limit <= PAGE:
            raise InvalidParameter("limit", f"from 1 to {PAGE}")
        jobs = sorted((job for job in self.jobs.all()
                       if domain in (None, job.domain) and state in (None, job.state)),
                      key=_place)
        if after is not None:
            position = self._position(after)
            jobs = [job for job in jobs if _place(job) > position]
        records = [_listed(job, role) for job in jobs[:limit]]
        page = records[:_fitting(records, limit)]
        return {"jobs": page,
                "next": _cursor(jobs[len(page) - 1]) if len(jobs) > len(page) else None}

    def _position(self, after: str) -> tuple[str, str]:
        """Where in List's order `after` is: a cursor (a page's `next`), whether its job is
        still known or not, or the id of a job known now (NoSuchJob if none is)."""
        created, slash, job_id = after.rpartition(CURSOR)
        if slash:
            return created, job_id
        return _place(self.jobs.get(after))

    async def Watch(self, id: str | None = None, *, role: Role = Role.ADMIN
                    ) -> AsyncGenerator[dict[str, Any] | Last, None]:
        watched = [self.jobs.get(id)] if id is not None else [
            j for j in self.jobs.all() if not j.state.final]
        with self.jobs.watch() as changes:
            if id is not None and watched[0].state.final:
                yield Last(_event("state", watched[0], role))
                return
            for job in watched:
                yield _event("state", job, role)
            # Progress goes out on a clock of its own, whatever else happens.
            tick = anyio.current_time() + PROGRESS_INTERVAL
            moved: dict[str, tuple[int, int]] = {}
            while True:
                change: Change | None = None
                with anyio.move_on_after(tick - anyio.current_time()):
                    try:
                        change = await changes.receive()
                    except anyio.EndOfStream:
                        raise WatchTooSlow(WATCH_BUFFER) from None
                if change is None:
                    tick = anyio.current_time() + PROGRESS_INTERVAL
                    for job in self.jobs.all():
                        if job.state.final or id not in (None, job.id):
                            continue
                        mark = (job.progress.done if job.progress else 0,
                                job.appliance.bytes_read if job.appliance else 0)
                        if mark != moved.get(job.id, (0, 0)):
                            moved[job.id] = mark
                            yield _event("progress", job, role)
                elif id in (None, change.job.id):
                    # The job as it was then: every transition is seen, in order.
                    event = _event(change.kind, change.job, role, change.message,
                                   change.session)
                    if id is not None and change.job.state.final:
                        yield Last(event)
                        return
                    yield event

    async def Finish(self, id: str, success: bool | None = None, *, uid: int | None = None
                     ) -> dict[str, Any]:
        return {"job": _job(await self.jobs.finish(id, success is not False, uid))}

    async def Abort(self, id: str, *, uid: int | None = None, role: Role = Role.ADMIN
                    ) -> dict[str, Any]:
        # An admin ends anyone's job: the operator's way out of a stuck one.
        return {"job": _job(await self.jobs.abort(id, None if role >= Role.ADMIN else uid))}

    async def Migrate(self, domain: str, destination: str, live: bool | None = None,
                      copy_storage: bool | None = None, unsafe: bool | None = None,
                      drain_timeout: int | None = None, force: bool | None = None
                      ) -> AsyncGenerator[dict[str, Any] | Last, None]:
        if drain_timeout is not None and drain_timeout < 0:
            raise InvalidParameter("drain_timeout", "seconds, at least 0")
        steps = self.migrations.migrate(
            domain, destination, live=live is not False, copy_storage=bool(copy_storage),
            unsafe=bool(unsafe), drain_timeout=drain_timeout, force=bool(force))
        async with aclosing(steps):
            async for step in steps:
                reply = {"step": dataclasses.asdict(step) | {"jobs": list(step.jobs)}}
                yield Last(reply) if step.state in ("completed", "failed") else reply

    # Chains.

    async def ListCheckpoints(self, domain: str,
                              consumer: str | None = None) -> dict[str, Any]:
        if consumer is not None:
            check_consumer(consumer)
        return {"checkpoints": [{"name": c.name, "consumer": c.consumer, "job": c.job,
                                 "created": c.created, "disks": list(c.disks),
                                 "owner": c.owner}
                                for c in self.chains.of(domain, consumer)]}

    async def DeleteChain(self, domain: str, consumer: str) -> dict[str, Any]:
        return {"deleted": await self.jobs.delete_chain(domain, consumer)}

    # The domain's own files.

    async def DomainFiles(self, id: str) -> dict[str, Any]:
        files = await self.jobs.files(id)
        return {"files": files.listing(), "missing": list(files.missing)}

    async def ReadDomainFile(self, id: str, name: str,
                             offset: int | None = None) -> dict[str, Any]:
        data = (await self.jobs.files(id)).files.get(name)
        if data is None:
            raise InvalidParameter("name", "not a file of this job's backup (DomainFiles "
                                           "lists them)")
        start = offset or 0
        if not 0 <= start <= len(data):
            raise InvalidParameter("offset", f"between 0 and the file's size, {len(data)}")
        end = min(start + domainfiles.CHUNK, len(data))
        return {"data": base64.b64encode(data[start:end]).decode(),
                "next": end if end < len(data) else None}

    # The local repository.

    async def Restore(self, domain: str, disk: str, to: str,
                      consumer: str | None = None, at: str | None = None,
                      format: str | None = None) -> dict[str, Any]:
        consumer = check_consumer(DEFAULT_CONSUMER if consumer is None else consumer)
        target = await self._restore_place("to", Path(to), Path(to).parent) / Path(to).name
        if await anyio.Path(target).exists() or await anyio.Path(target).is_symlink():
            raise InvalidParameter("to", "exists; restore never overwrites a file")
        repository = self.repository
        manifest = (await anyio.to_thread.run_sync(
            restorable, repository, domain, consumer, at, self.jobs.did_not_complete, disk))[disk]
        await repository.restore(manifest, target, format or "raw", self.tuning)
        return {"file": str(target), "checkpoint": manifest.checkpoint}

    async def RestoreDomain(self, domain: str, name: str, dir: str,
                            consumer: str | None = None, at: str | None = None,
                            format: str | None = None) -> dict[str, Any]:
        consumer = check_consumer(DEFAULT_CONSUMER if consumer is None else consumer)
        folder = await self._restore_place("dir", Path(dir), Path(dir))
        restored = await self.rebuilder.restore(domain, consumer, at, name, folder,
                                                format or "qcow2")
        return {"name": restored.name, "uuid": restored.uuid,
                "checkpoint": restored.checkpoint,
                "disks": [{"name": d, "file": str(p)} for d, p in restored.disks.items()],
                "nvram": None if restored.nvram is None else str(restored.nvram),
                "tpm": None if restored.tpm is None else str(restored.tpm),
                "dropped": list(restored.dropped), "missing": list(restored.missing)}

    async def _restore_place(self, parameter: str, path: Path, folder: Path) -> Path:
        """`folder` (`path`, or its folder) where it really is (no link on the way), if
        `path` is absolute and that is a folder Restore may write into; InvalidParameter
        naming `parameter` if not. The restore creates its files only there, and checks
        that it still is (repository._create_target)."""
        if not path.is_absolute():
            raise InvalidParameter(parameter, "not an absolute path")
        return await anyio.to_thread.run_sync(self._check_restore_folder, parameter, folder)

    def _check_restore_folder(self, parameter: str, folder: Path) -> Path:
        """Restores write only into [restore] dirs: pullbackd writes with its own rights,
        for whoever may call them."""
        try:
            folder = folder.resolve(strict=True)
        except OSError:
            raise InvalidParameter(parameter, "its folder does not exist") from None
        allowed = [d.resolve() for d in self.restore_dirs]
        if not any(folder == d or d in folder.parents for d in allowed):
            raise InvalidParameter(parameter, (
                f"not inside [restore] dirs ({', '.join(map(str, self.restore_dirs)) or 'none'});"
                " restore into one of them, or have the host's administrator add the folder"))
        return folder

    async def Verify(self, domain: str, consumer: str | None = None) -> dict[str, Any]:
        checked, problems = 0, []
        disks = await self._disks(domain, consumer)
        async with self._verifying:
            for name, disk in disks:
                count, found = await self.repository.verify_disk(domain, name, disk)
                checked += count
                problems += found
            for name in {name for name, _ in disks}:
                problems += await anyio.to_thread.run_sync(self.repository.verify_files,
                                                           domain, name)
        for problem in problems:
            log.warning("verify found a problem", domain=domain, problem=problem)
        if (listed := _fitting(problems, PROBLEMS - 1)) < len(problems):
            more = len(problems) - listed
            problems[listed:] = [f"{more} problems more (the journal has each one)"]
        return {"checked": checked, "problems": problems}

    async def Prune(self, domain: str, keep: int,
                    consumer: str | None = None) -> dict[str, Any]:
        if keep < 1:
            raise InvalidParameter("keep", "at least 1: the newest backup is the chain's base")
        if (job_id := self.jobs.writing_locally(domain)) is not None:
            raise BackupInProgress(domain, job_id)  # it writes into the same chains
        dropped: list[str] = []
        disks = await self._disks(domain, consumer)
        for m in await self.repository.prune_disks(domain, disks, keep):
            if m.checkpoint not in dropped:
                dropped.append(m.checkpoint)
        for name in {name for name, _ in disks}:
            await anyio.to_thread.run_sync(self.repository.drop_files, domain, name, dropped)
        return {"dropped": dropped}

    async def _disks(self, domain: str, consumer: str | None) -> list[tuple[str, str]]:
        """(consumer, disk) pairs with backups of the domain in the repository."""
        root = anyio.Path(self.repository.domain_folder(domain))
        if consumer is not None:
            consumers = [check_consumer(consumer)]
        else:
            consumers = [p.name async for p in root.iterdir()] if await root.is_dir() else []
        return [(name, disk.name) for name in consumers if await (root / name).is_dir()
                for disk in await anyio.to_thread.run_sync(names.disk_folders,
                                                           Path(root / name))]


def service(parts: Parts, roles: Roles | None = None, limits: Limits | None = None) -> Service:
    svc = Service(
        vendor="pullbackd",
        product="pullbackd",
        version=__version__,
        url="",
        internal_error=f"{INTERFACE}.InternalError",
        roles=roles or Roles(),
        limits=limits or Limits(),
    )
    svc.add_service_interface(interface("org.varlink.service"))
    svc.add(interface(INTERFACE), BackupAPI(parts).handlers())
    return svc
