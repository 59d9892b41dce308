"""`systemctl reload pullbackd` (SIGHUP): the configuration read again, what may change
while backups run applied, the rest named in the journal.

The live keys (LIVE) are limits, timeouts and lists that pullbackd reads when it uses them:
a new value applies from its next use (a session opened, a job started, a timer set), never
to what runs already (a ready job keeps the idle timeout it started with). Every other key
shapes something built at start (sockets, folders, the libvirt connection, buffers): it
changes at the next restart, and the reload says so. A configuration that does not load
changes nothing; the reload logs why and the daemon serves on as it was.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import anyio
import structlog

from . import config, roles
from .chain import Chains
from .control import server
from .control.server import Service
from .exports import Exports
from .jobs import Jobs
from .migration import Migrations
from .places import Places
from .scratch import ScratchSpace
from .serving import Limits, Serving

log = structlog.get_logger()

#: "section.key" of every key that a reload applies; "section.*": all of its keys.
LIVE = frozenset({
    "roles.*",
    "control.connections", "control.connections_per_user", "control.idle_timeout",
    "exports.connections", "exports.handshake_timeout", "exports.drain_timeout",
    "exports.idle_timeout", "exports.max_lifetime",
    "scratch.reserve",
    "jobs.max_active", "jobs.keep_finished",
    "chains.keep",
    "migration.grace", "migration.drain_timeout",
    "push.dirs", "stream.destinations",
})


def differences(old: config.Config, new: config.Config) -> list[str]:
    """The keys whose values differ, as "section.key"."""
    changed = []
    for section in dataclasses.fields(old):
        before, after = getattr(old, section.name), getattr(new, section.name)
        changed += [f"{section.name}.{key.name}" for key in dataclasses.fields(before)
                    if getattr(before, key.name) != getattr(after, key.name)]
    return changed


def is_live(key: str) -> bool:
    return key in LIVE or f"{key.partition('.')[0]}.*" in LIVE


@dataclass(frozen=True)
class Tunables:
    """What holds the live settings, as the service built it."""

    service: Service
    exports: Exports
    chains: Chains
    serving: Serving
    scratch: ScratchSpace
    jobs: Jobs
    migrations: Migrations

    def apply(self, cfg: config.Config) -> None:
        # One for both: who may call and who may read backups change together.
        self.service.roles = self.exports.roles = roles_of(cfg)
        self.service.limits = server.Limits(cfg.control.connections,
                                            cfg.control.connections_per_user,
                                            cfg.control.idle_timeout)
        self.exports.limit = cfg.exports.connections
        self.exports.handshake_timeout = cfg.exports.handshake_timeout
        self.serving.limits = Limits(drain_timeout=cfg.exports.drain_timeout,
                                     idle_timeout=cfg.exports.idle_timeout,
                                     max_lifetime=cfg.exports.max_lifetime)
        self.scratch.reserve = cfg.scratch.reserve
        self.chains.keep = cfg.chains.keep
        self.migrations.grace = cfg.migration.grace
        self.migrations.drain_timeout = cfg.migration.drain_timeout
        self.jobs.reconfigure(max_active=cfg.jobs.max_active,
                              keep_finished=cfg.jobs.keep_finished, places=places(cfg))


def roles_of(cfg: config.Config) -> roles.Roles:
    """[roles]: for the control socket and the jobs' endpoints."""
    return roles.Roles(cfg.roles.admin, cfg.roles.backup, cfg.roles.look,
                       roles.parse(cfg.roles.default))


def places(cfg: config.Config) -> Places:
    return Places(tuple(Path(d) for d in cfg.push.dirs), cfg.stream.destinations)


async def reload(path: Path | None, running: config.Config,
                 tunables: Tunables) -> config.Config:
    """Read `path` again and apply its live keys; the configuration now in effect (the
    running one, with the live keys of the new one)."""
    try:
        # A read of files and of the user and group databases (NSS): not on the loop.
        new = await anyio.to_thread.run_sync(config.load, path)
    except config.ConfigError as e:
        log.error("reload failed: the configuration does not load; nothing changed",
                  error=str(e))
        return running
    changed = differences(running, new)
    applied = [key for key in changed if is_live(key)]
    pending = [key for key in changed if not is_live(key)]
    tunables.apply(new)
    # The settings in effect: every live key as read now, every other as at start.
    effective = running
    for key in applied:
        section, _, name = key.partition(".")
        effective = dataclasses.replace(effective, **{section: dataclasses.replace(
            getattr(effective, section), **{name: getattr(getattr(new, section), name)})})
    if pending:
        log.warning("reloaded; these keys change only at a restart (systemctl restart "
                    "pullbackd)", applied=applied, restart_needed=pending)
    else:
        log.info("reloaded", applied=applied)
    return effective
