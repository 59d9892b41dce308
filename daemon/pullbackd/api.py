"""`org.pullbackd.Backup`: the varlink methods, mapped onto the job manager."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import Any

import anyio

from . import __version__
from .chain import DEFAULT_CONSUMER, check_consumer
from .control import idl
from .control.server import Handler, Service
from .errors import BackupInProgress, InvalidParameter
from .jobs import Jobs, StartRequest

INTERFACE = "org.pullbackd.Backup"


def interface(name: str) -> idl.Interface:
    """One of the interface definitions shipped in the package."""
    return idl.parse(files(__package__).joinpath(f"{name}.varlink").read_text())


def backup_handlers(jobs: Jobs) -> dict[str, Handler]:
    async def start(domain: str, disks: list[str] | None = None, mode: str | None = None,
                    since: str | None = None, consumer: str | None = None,
                    target_dir: str | None = None,
                    destination: str | None = None) -> dict[str, Any]:
        request = StartRequest(domain, disks, mode or "full", since,
                               DEFAULT_CONSUMER if consumer is None else consumer, target_dir,
                               destination)
        return {"job": (await jobs.start(request)).to_record()}

    async def get(id: str) -> dict[str, Any]:
        return {"job": jobs.get(id).to_record()}

    async def list_() -> dict[str, Any]:
        return {"jobs": [job.to_record() for job in jobs.all()]}

    async def finish(id: str, success: bool | None = None) -> dict[str, Any]:
        return {"job": (await jobs.finish(id, success is not False)).to_record()}

    async def abort(id: str) -> dict[str, Any]:
        return {"job": (await jobs.abort(id)).to_record()}

    async def list_checkpoints(domain: str, consumer: str | None = None) -> dict[str, Any]:
        if consumer is not None:
            check_consumer(consumer)
        return {"checkpoints": [c.to_record() for c in jobs.chains.of(domain, consumer)]}

    async def delete_chain(domain: str, consumer: str) -> dict[str, Any]:
        return {"deleted": await jobs.delete_chain(domain, consumer)}

    async def restore(domain: str, disk: str, to: str, consumer: str | None = None,
                      at: str | None = None, format: str | None = None) -> dict[str, Any]:
        consumer = check_consumer(DEFAULT_CONSUMER if consumer is None else consumer)
        target = Path(to)
        if not target.is_absolute():
            raise InvalidParameter("to", "not an absolute path")
        if await anyio.Path(target).exists():
            raise InvalidParameter("to", "exists; restore never overwrites a file")
        manifest = await anyio.to_thread.run_sync(
            jobs.repository.at, domain, consumer, disk, at)
        await jobs.repository.restore(manifest, target, format or "raw")
        return {"file": str(target), "checkpoint": manifest.checkpoint}

    async def verify(domain: str, consumer: str | None = None) -> dict[str, Any]:
        checked, problems = 0, []
        root = anyio.Path(jobs.repository.root / domain)
        for name in await consumers_of(domain, consumer):
            async for disk in (root / name).iterdir():
                manifests = await anyio.to_thread.run_sync(
                    jobs.repository.manifests, domain, name, disk.name)
                for manifest in manifests:
                    problems += await jobs.repository.verify(manifest)
                    checked += 1
        return {"checked": checked, "problems": problems}

    async def prune(domain: str, keep: int, consumer: str | None = None) -> dict[str, Any]:
        if keep < 1:
            raise InvalidParameter("keep", "at least 1: the newest backup is the chain's base")
        dropped: list[str] = []
        for name in await consumers_of(domain, consumer):
            if (job_id := jobs.active(domain)) is not None and \
                    jobs.get(job_id).destination == "local":
                raise BackupInProgress(domain, job_id)  # it writes into the same chains
            async for disk in anyio.Path(jobs.repository.root / domain / name).iterdir():
                for m in await jobs.repository.prune(domain, name, disk.name, keep):
                    if m.checkpoint not in dropped:
                        dropped.append(m.checkpoint)
        return {"dropped": dropped}

    async def consumers_of(domain: str, consumer: str | None) -> list[str]:
        """The consumers with backups of the domain in the repository (or just the one)."""
        root = anyio.Path(jobs.repository.root / domain)
        if consumer is not None:
            names = [check_consumer(consumer)]
        else:
            names = [p.name async for p in root.iterdir()] if await root.is_dir() else []
        return [n for n in names if await (root / n).is_dir()]

    return {"Start": start, "Get": get, "List": list_, "Finish": finish, "Abort": abort,
            "ListCheckpoints": list_checkpoints, "DeleteChain": delete_chain,
            "Restore": restore, "Verify": verify, "Prune": prune}


def service(jobs: Jobs) -> Service:
    svc = Service(
        vendor="pullbackd",
        product="pullbackd",
        version=__version__,
        url="",
        internal_error=f"{INTERFACE}.InternalError",
    )
    svc.add_service_interface(interface("org.varlink.service"))
    svc.add(interface(INTERFACE), backup_handlers(jobs))
    return svc
