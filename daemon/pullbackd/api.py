"""`org.pullbackd.Backup`: the varlink methods, mapped onto the job manager."""

from __future__ import annotations

from importlib.resources import files
from typing import Any

from . import __version__
from .control import idl
from .control.server import Handler, Service
from .jobs import Jobs

INTERFACE = "org.pullbackd.Backup"


def interface(name: str) -> idl.Interface:
    """One of the interface definitions shipped in the package."""
    return idl.parse(files(__package__).joinpath(f"{name}.varlink").read_text())


def backup_handlers(jobs: Jobs) -> dict[str, Handler]:
    async def start(domain: str, disks: list[str] | None = None) -> dict[str, Any]:
        return {"job": (await jobs.start(domain, disks)).to_record()}

    async def get(id: str) -> dict[str, Any]:
        return {"job": jobs.get(id).to_record()}

    async def list_() -> dict[str, Any]:
        return {"jobs": [job.to_record() for job in jobs.all()]}

    async def finish(id: str) -> dict[str, Any]:
        return {"job": (await jobs.finish(id)).to_record()}

    async def abort(id: str) -> dict[str, Any]:
        return {"job": (await jobs.abort(id)).to_record()}

    return {"Start": start, "Get": get, "List": list_, "Finish": finish, "Abort": abort}


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
