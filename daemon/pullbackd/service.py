"""The daemon: wiring, logging, signals and readiness.

One root task group holds everything that runs: the control socket, the libvirt
event follower, the watchdog. SIGTERM or SIGINT cancels it. Backups that are
ready when the daemon stops are left running in libvirt, so appliances keep
reading; the next start adopts them from the state database.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from functools import partial
from pathlib import Path

import anyio
import structlog

from . import api, config
from .control.server import bind
from .errors import PullbackError
from .jobs import Jobs
from .sdnotify import Notifier
from .state import Store
from .virt import Virt

log = structlog.get_logger()

DEFAULT_CONFIG = Path("/etc/pullbackd/pullbackd.toml")


def configure_logging(level: str) -> None:
    """structlog JSON lines on stderr: the journal keeps them, `jq` reads them."""
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )


async def run(cfg: config.Config, notifier: Notifier) -> None:
    cfg.exports.dir.mkdir(parents=True, exist_ok=True)
    cfg.scratch.dir.mkdir(parents=True, exist_ok=True)
    store = Store(cfg.state.dir / "state.db")
    virt = Virt(cfg.libvirt.uri)
    try:
        await virt.connect()
        jobs = Jobs(virt, store, cfg.exports.dir, cfg.scratch.dir, cfg.jobs.end_timeout)
        await jobs.recover()
        service = api.service(jobs)
        listener = await bind(cfg.control.socket, cfg.control_mode, cfg.control.group or None)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(_stop_on_signal, tg.cancel_scope, notifier)
                tg.start_soon(jobs.follow_events)
                tg.start_soon(notifier.watchdog)
                tg.start_soon(listener.serve, partial(
                    service.handle, protocol_error=f"{api.INTERFACE}.ProtocolViolation"))
                active = sum(not j.state.final for j in jobs.all())
                notifier.ready(f"serving {cfg.control.socket}; {active} backups running")
                log.info("ready", socket=str(cfg.control.socket), running=active)
        finally:
            with anyio.CancelScope(shield=True):  # the socket must go even when cancelled
                await listener.aclose()
                cfg.control.socket.unlink(missing_ok=True)
    finally:
        with anyio.CancelScope(shield=True):  # close libvirt and the database cleanly
            await virt.close()
            store.close()


async def _stop_on_signal(scope: anyio.CancelScope, notifier: Notifier) -> None:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("stopping; running backups stay up and are adopted at the next start",
                     signal=signal.Signals(signum).name)
            notifier.stopping()
            scope.cancel()
            return


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pullbackd", description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path,
                        help=f"TOML configuration file (default: {DEFAULT_CONFIG} if it exists)")
    parser.add_argument("--show-config", action="store_true",
                        help="print the effective configuration as JSON and exit")
    args = parser.parse_args(argv)
    path = args.config
    if path is None and DEFAULT_CONFIG.exists():
        path = DEFAULT_CONFIG
    try:
        cfg = config.load(path)
    except config.ConfigError as e:
        print(f"pullbackd: {e}", file=sys.stderr)
        return 2
    if args.show_config:
        print(cfg.to_json())
        return 0
    configure_logging(cfg.log.level)
    try:
        anyio.run(run, cfg, Notifier(), backend="asyncio")
    except (PullbackError, OSError) as e:
        log.error("cannot run", error=str(e))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
