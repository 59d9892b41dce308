"""Logging: structlog events, as journal entries under systemd, else JSON lines.

Under systemd, stderr is a stream to the journal, and systemd says so in
`$JOURNAL_STREAM` (the device and inode of that stream: systemd.exec(5)). Each
event then goes to the journal as an entry of its own (python3-systemd's
`journal.send`):
- MESSAGE is the event and its keys, readable as `journalctl -u pullbackd` prints it;
- PRIORITY is its level (syslog's numbers);
- every key is also a field of its own, upper-cased and prefixed: `job` becomes
  PULLBACKD_JOB, `domain` PULLBACKD_DOMAIN, `consumer` PULLBACKD_CONSUMER. So
  `journalctl -u pullbackd PULLBACKD_JOB=<id>` tells one job's story.

Every event that names a job (`job`) also names its domain and consumer, whichever
module logs it: `name_jobs` gives logging the way to look them up (jobs.py's).

Anywhere else (a terminal, the tests), or without python3-systemd, each event
is a JSON line on stderr.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import re
import sys
from collections.abc import Callable, Iterator, MutableMapping
from contextlib import contextmanager
from typing import Any

import structlog

#: journald's numbers for our levels (syslog's).
PRIORITY = {"debug": 7, "info": 6, "warning": 4, "error": 3, "critical": 2, "exception": 3}
#: What each key becomes as a field: journald accepts A-Z, 0-9 and _, not first.
PREFIX = "PULLBACKD_"
_NOT_FIELD = re.compile(r"[^A-Z0-9_]")

Send = Callable[..., None]
#: A job's id -> the fields every event about it carries besides (set by name_jobs).
JobFields = Callable[[str], dict[str, str]]


class _AddJobFields:
    """The processor that adds them."""

    lookup: JobFields | None = None

    def __call__(self, logger: Any, method: str, event: MutableMapping[str, Any]) -> Any:
        job, lookup = event.get("job"), self.lookup
        if isinstance(job, str) and lookup is not None:
            for key, value in lookup(job).items():
                event.setdefault(key, value)
        return event


_add_job_fields = _AddJobFields()


def name_jobs(job_fields: JobFields | None) -> None:
    """From now on events with a `job` also carry what `job_fields` says of it."""
    _add_job_fields.lookup = job_fields


def configure(level: str) -> None:
    """Log events from `level` up: to the journal under systemd, else to stderr."""
    send = _journal() if journal_stream() else None
    final: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if send is None else _to_journal(send))
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            _add_job_fields,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            final,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )


def journal_stream() -> bool:
    """Whether stderr is systemd's stream to the journal ($JOURNAL_STREAM)."""
    device, _, inode = os.environ.get("JOURNAL_STREAM", "").partition(":")
    try:
        stat = os.fstat(sys.stderr.fileno())
        return (stat.st_dev, stat.st_ino) == (int(device), int(inode))
    except (ValueError, OSError):
        return False


def _journal() -> Send | None:
    try:
        # Debian's python3-systemd (by name: the repository's systemd/ folder of unit
        # files would otherwise stand in for the package when type-checking).
        journal = importlib.import_module("systemd.journal")
    except ImportError:
        return None
    send: Send = journal.send
    return send


def fields(event: MutableMapping[str, Any]) -> dict[str, str]:
    """A structlog event as a journal entry's fields."""
    message = str(event.get("event", ""))
    rest = {k: v for k, v in event.items() if k not in ("event", "level", "timestamp")}
    text = " ".join(f"{k}={_value(v)}" for k, v in rest.items() if k != "exception")
    entry = {"MESSAGE": f"{message} {text}".rstrip() if text else message,
             "PRIORITY": str(PRIORITY.get(str(event.get("level", "info")), 6))}
    if "exception" in rest:
        entry["MESSAGE"] += "\n" + str(rest["exception"])
    for key, value in rest.items():
        name = _NOT_FIELD.sub("_", key.upper())
        entry[PREFIX + name] = _value(value)
    return entry


def _value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, default=str)


def _to_journal(send: Send) -> structlog.typing.Processor:
    def processor(logger: Any, method: str, event: MutableMapping[str, Any]) -> Any:
        entry = fields(event)
        send(entry.pop("MESSAGE"), **entry)
        raise structlog.DropEvent
    return processor


@contextmanager
def logged(message: str, **context: object) -> Iterator[None]:
    """An exception of the block logged with `message`, not raised: for what runs in the
    jobs' task group on nobody's behalf, where it would end every job."""
    try:
        yield
    except Exception:
        structlog.get_logger().exception(message, **context)
