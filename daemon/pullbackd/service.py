"""The daemon: wiring, logging, signals and readiness.

One root task group holds everything that runs: the control socket, the libvirt
event follower, the watchdog. SIGTERM or SIGINT cancels it, once the control socket
answered the calls its callers had sent (control/server.py). Backups that are
ready when the daemon stops are left running in libvirt, so appliances keep
reading; the next start adopts them from the state database.
"""

from __future__ import annotations

import argparse
import functools
import os
import signal
import socket
import sys
from pathlib import Path

import anyio
import structlog
from anyio.abc import SocketListener

from . import api, config, logs, names, reload, sdnotify, stream
from .admission import Admission
from .chain import Chains
from .control import server
from .control.server import Service, bind
from .domainfiles import Reader
from .errors import PullbackError
from .exports import Exports
from .jobs import Jobs
from .migration import Migrations
from .names import Layout
from .offline import OfflineSource
from .rebuild import Rebuilder
from .reload import Tunables
from .remote import Remote, tls_context
from .repository import Repository
from .scratch import ScratchSpace
from .sdnotify import Notifier
from .serving import Limits, Serving
from .source import THAW_WAIT, LibvirtSource
from .sources import Sources
from .state import StateDamaged, Store
from .virt import Virt

log = structlog.get_logger()

DEFAULT_CONFIG = Path("/etc/pullbackd/pullbackd.toml")
#: Seconds to let the appliances' sessions reach a point where they can be handed over;
#: a session that has not by then is cut (alone).
HANDOFF_TIMEOUT = 5.0
#: Seconds the control socket's callers get, at a stop, for the calls they already sent
#: (control/server.py); a call that runs longer (a Verify) is cut.
STOP_GRACE = 5.0


def config_file(given: Path | None) -> Path | None:
    """The configuration file: `given` (--config), else DEFAULT_CONFIG if it exists now;
    None: there is none, and every setting is its default."""
    if given is None and DEFAULT_CONFIG.exists():
        return DEFAULT_CONFIG
    return given


async def run(cfg: config.Config, notifier: Notifier, path: Path | None = None) -> int:
    """Serve until a signal (exit status 0) or until libvirt is lost (1: let systemd restart
    us). `path`: the configuration file, read again at SIGHUP (reload.py); None if there
    was none, and a reload looks for one (config_file)."""
    exports = _folders(cfg)
    inherited = sdnotify.listen_fds()
    activated = inherited.pop(names.CONTROL_FD, None)  # pullbackd.socket's, if it started us
    store = Store(cfg.state.dir / names.DATABASE)
    virt = Virt(cfg.libvirt.uri)
    status = 0
    repository = Repository(cfg.repository.dir, names.repository_sockets(cfg.exports.dir),
                            cfg.repository.write_behind)
    try:
        exports.inherit(inherited, store.take_handoff())
        await virt.connect()
        # What a crash of the last run left: its NBD servers, its half-written files.
        await anyio.to_thread.run_sync(repository.recover)
        remote, remote_base = _remote(cfg, exports)
        parts, tunables = _assemble(cfg, virt, store, exports, repository, remote_base)
        jobs = parts.jobs
        logs.name_jobs(jobs.log_fields)
        async with anyio.create_task_group() as tg:

            async def follow_libvirt(
                    *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
            ) -> None:
                nonlocal status
                await jobs.follow_events(functools.partial(_libvirt_lost, notifier, jobs),
                                         task_status=task_status)
                status = 1
                tg.cancel_scope.cancel()

            tg.start_soon(_stop_on_signal, tg.cancel_scope, notifier, jobs, tunables.service)
            # Events flow before recovery: ending a leftover job waits for libvirt's event.
            await tg.start(follow_libvirt)
            if remote is not None:
                await tg.start(remote.serve)
            # Each step of recovery may wait for a thaw and for libvirt to end a backup,
            # and then some: the start may take that much more from each step on.
            step = THAW_WAIT + 2 * cfg.jobs.end_timeout + 60
            await jobs.recover(functools.partial(notifier.extend, step))
            # The sockets handed over are ours now: systemd's copies can go.
            notifier.remove_fds(list(inherited))
            exports.release()
            await _ready(tg, cfg, activated, path, tunables, notifier)
    finally:
        # Shielded: close the repository's files, libvirt and the database cleanly.
        with anyio.CancelScope(shield=True):
            await repository.close()
            await virt.close()
            store.close()
    return status


async def _ready(tg: anyio.abc.TaskGroup, cfg: config.Config, activated: int | None,
                 path: Path | None, tunables: Tunables, notifier: Notifier) -> None:
    """Once recovered: serve the control socket (systemd's descriptor `activated`, if it
    started us), follow reloads, the watchdog and the scratch space, in `tg`; then say we
    are ready."""
    listener, socket_path = await _control_listener(cfg, activated)
    tg.start_soon(_serve, listener, tunables.service, None if activated else socket_path)
    tg.start_soon(_reload_on_signal, path, cfg, tunables, notifier)
    tg.start_soon(notifier.watchdog)
    tg.start_soon(tunables.jobs.watch_scratch)
    active = sum(not j.state.final for j in tunables.jobs.all())
    notifier.ready(f"serving {socket_path}; {active} backups running")
    log.info("ready", socket=str(socket_path), running=active, activated=activated is not None)


def _folders(cfg: config.Config) -> Exports:
    """The exports folder, prepared, and the scratch folder, made if missing."""
    exports = Exports(cfg.exports.dir, mode=cfg.exports_mode, group=cfg.exports.group,
                      handshake_timeout=cfg.exports.handshake_timeout,
                      qemu_group=cfg.exports.qemu_group, limit=cfg.exports.connections,
                      roles=reload.roles_of(cfg))
    exports.prepare()
    if not cfg.scratch.dir.is_dir():
        cfg.scratch.dir.mkdir(parents=True)
        # QEMU opens its scratch files there by name, as whatever user it runs as.
        cfg.scratch.dir.chmod(0o711)
    return exports


def _assemble(cfg: config.Config, virt: Virt, store: Store, exports: Exports,
              repository: Repository, remote: str | None) -> tuple[api.Parts, Tunables]:
    """The jobs and what acts on them, as the configuration has them; and what holds the
    settings a reload changes."""
    tuning = stream.Tuning(request_size=cfg.stream.request_size,
                           connections=cfg.stream.connections, in_flight=cfg.stream.in_flight,
                           buffers=stream.BufferPool(cfg.stream.memory,
                                                     cfg.stream.request_size),
                           tls_certificates=cfg.stream.tls_certificates or None,
                           connect_timeout=cfg.stream.connect_timeout)
    limits = Limits(drain_timeout=cfg.exports.drain_timeout,
                    idle_timeout=cfg.exports.idle_timeout,
                    max_lifetime=cfg.exports.max_lifetime)
    layout = Layout(cfg.exports.dir, cfg.scratch.dir)
    files = Reader(virt, cfg.libvirt.state_dir)
    offline = OfflineSource(virt, layout, files, cfg.offline.unit)
    source = Sources(virt, LibvirtSource(virt, layout, cfg.jobs.end_timeout, files,
                                         cfg.exports.qemu_group, cfg.jobs.agent_timeout),
                     offline)
    chains = Chains(virt, store, offline.forget, cfg.chains.keep)
    admission = Admission(cfg.jobs.max_active)
    serving = Serving(exports, source, limits, remote)
    scratch = ScratchSpace(layout, cfg.scratch.reserve)
    jobs = Jobs(source, store, chains, serving, scratch, repository,
                admission=admission, tuning=tuning, keep_finished=cfg.jobs.keep_finished,
                places=reload.places(cfg))
    migrations = Migrations(jobs, admission, virt, cfg.migration.grace,
                            cfg.migration.drain_timeout)
    rebuilder = Rebuilder(repository, virt, cfg.libvirt.state_dir, cfg.libvirt.swtpm_user,
                          tuning, jobs.did_not_complete)
    parts = api.Parts(jobs, migrations, chains, repository, rebuilder, tuning,
                      tuple(Path(d) for d in cfg.restore.dirs))
    return parts, Tunables(_control(cfg, parts), exports, chains, serving, scratch, jobs,
                           migrations)


def _control(cfg: config.Config, parts: api.Parts) -> Service:
    """The control socket's service, with its roles and limits."""
    return api.service(
        parts,
        reload.roles_of(cfg),
        server.Limits(cfg.control.connections, cfg.control.connections_per_user,
                      cfg.control.idle_timeout))


def _remote(cfg: config.Config, exports: Exports) -> tuple[Remote | None, str | None]:
    """The TCP endpoint for remote appliances, and the base of its URIs, if configured."""
    if not cfg.exports.tcp_listen:
        return None, None
    host, port = config.parse_listen(cfg.exports.tcp_listen)
    tls = None if cfg.exports.insecure_tcp else tls_context(
        Path(cfg.exports.tls_certificates), cfg.exports.tls_verify_clients)
    base = f"{'nbd' if tls is None else 'nbds'}://{cfg.exports.tcp_host or socket.getfqdn()}:{port}"
    return Remote(exports, host, port, tls, cfg.exports.tcp_handshakes,
                  cfg.exports.tcp_handshakes_per_address), base


async def _control_listener(cfg: config.Config, activated: int | None
                            ) -> tuple[SocketListener, Path]:
    """The control socket: pullbackd.socket's (its path, mode and group are the socket
    unit's; calls made while we restart wait in its queue), or one we bind ([control])."""
    if activated is None:
        listener = await bind(cfg.control.socket, cfg.control_mode, cfg.control.group or None)
        return listener, cfg.control.socket
    sock = socket.socket(fileno=activated)
    path = Path(os.fsdecode(sock.getsockname()))
    if path != cfg.control.socket:
        log.warning("the control socket systemd passed is not [control] socket; pullbackctl "
                    "needs --socket", passed=str(path), configured=str(cfg.control.socket))
    return await SocketListener.from_socket(sock), path


async def _serve(listener: SocketListener, service: Service, path: Path | None) -> None:
    """Serve the control socket; remove it at the end if we bound it (systemd's stays)."""
    try:
        await service.serve(listener, f"{api.INTERFACE}.ProtocolViolation")
    finally:
        with anyio.CancelScope(shield=True):  # the socket must go even when cancelled
            await listener.aclose()
            if path is not None:
                await anyio.Path(path).unlink(missing_ok=True)


async def _reload_on_signal(
        path: Path | None, cfg: config.Config, tunables: Tunables, notifier: Notifier, *,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
    """SIGHUP (`systemctl reload pullbackd`): read the configuration again (reload.py).
    With no file yet (`path` None), each reload looks for DEFAULT_CONFIG, as the start
    did: one written since is read, and from then on it is the file reloads read (gone,
    the reload fails and changes nothing, as with a file given with --config)."""
    with anyio.open_signal_receiver(signal.SIGHUP) as signals:
        task_status.started()
        async for _ in signals:
            notifier.reloading()
            path = await anyio.to_thread.run_sync(config_file, path)
            if path is None:
                log.warning("reload: no configuration file; every setting stays its default",
                            looked_for=str(DEFAULT_CONFIG))
            else:
                cfg = await reload.reload(path, cfg, tunables)
            notifier.ready("reloaded")


async def _stop_on_signal(scope: anyio.CancelScope, notifier: Notifier, jobs: Jobs,
                          service: Service) -> None:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("stopping; running backups stay up and are adopted at the next start",
                     signal=signal.Signals(signum).name)
            # The calls callers sent are answered, and no more taken: those wait in the
            # socket for the next run (systemd's, when it started us).
            await service.stop(STOP_GRACE)
            await _hand_off(notifier, jobs)
            scope.cancel()
            return


async def _libvirt_lost(notifier: Notifier, jobs: Jobs, reason: str) -> None:
    log.error("lost the libvirt connection; exiting so that a restart reconnects",
              reason=reason)
    await _hand_off(notifier, jobs)


async def _hand_off(notifier: Notifier, jobs: Jobs) -> None:
    """On the way down, for whatever reason (a signal, libvirt lost): appliances
    reading now keep their sessions, as systemd holds the sockets until the next
    run takes them back."""
    if notifier.enabled:
        await jobs.hand_off(notifier.store_fds, HANDOFF_TIMEOUT)
    notifier.stopping()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="pullbackd", description="Pull-mode backups of libvirt domains, driven over "
        "varlink (see pullbackd(8)); systemd runs it as pullbackd.service.")
    parser.add_argument("--config", type=Path,
                        help=f"TOML configuration file (default: {DEFAULT_CONFIG} if it exists)")
    parser.add_argument("--show-config", action="store_true",
                        help="print the effective configuration as JSON and exit")
    args = parser.parse_args(argv)
    path = config_file(args.config)
    try:
        cfg = config.load(path)
    except config.ConfigError as e:
        print(f"pullbackd: {e}", file=sys.stderr)
        return 2
    if args.show_config:
        print(cfg.to_json())
        return 0
    logs.configure(cfg.log.level)
    # What pullbackd writes is its user's alone (the state database holds export names, the
    # repository people's disks) unless it says otherwise: sockets and the folders
    # others must reach get their modes explicitly.
    os.umask(0o077)
    # A reload before we serve has nothing to do (the configuration was just read), and
    # SIGHUP's default would end the daemon: ignored until _reload_on_signal takes it.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        return anyio.run(run, cfg, Notifier(), path, backend="asyncio")
    except StateDamaged as e:
        # Not for a restart to fix: the unit does not restart on this status.
        log.error("cannot run", error=str(e))
        return 2
    except (PullbackError, OSError) as e:
        log.error("cannot run", error=str(e))
        return 1


if __name__ == "__main__":
    sys.exit(main())
