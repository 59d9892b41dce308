"""Log events as journal entries: one field per key, so that journalctl can pick one job's."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from pullbackd import logs


def test_each_key_is_a_field_and_the_message_reads_as_a_line() -> None:
    entry = logs.fields({"event": "backup started", "level": "info", "timestamp": "t",
                         "job": "0123456789ab", "domain": "lab1", "consumer": "c1",
                         "disks": {"vda": "full"}, "weird-key": 3})
    assert entry == {
        "MESSAGE": 'backup started job=0123456789ab domain=lab1 consumer=c1 '
                   'disks={"vda": "full"} weird-key=3',
        "PRIORITY": "6",
        "PULLBACKD_JOB": "0123456789ab",
        "PULLBACKD_DOMAIN": "lab1",
        "PULLBACKD_CONSUMER": "c1",
        "PULLBACKD_DISKS": '{"vda": "full"}',
        "PULLBACKD_WEIRD_KEY": "3",
    }


def test_levels_become_syslog_priorities_and_tracebacks_follow_the_message() -> None:
    assert logs.fields({"event": "x", "level": "warning"})["PRIORITY"] == "4"
    assert logs.fields({"event": "x", "level": "debug"})["PRIORITY"] == "7"
    entry = logs.fields({"event": "cannot end", "level": "error", "job": "j",
                         "exception": "Traceback...\nLibvirtError: stuck"})
    assert entry["PRIORITY"] == "3"
    assert entry["MESSAGE"] == "cannot end job=j\nTraceback...\nLibvirtError: stuck"


def test_the_journal_only_when_stderr_is_systemds_stream(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    assert not logs.journal_stream()
    with (tmp_path / "stderr").open("w") as stream:
        monkeypatch.setattr(sys, "stderr", stream)
        stat = os.fstat(stream.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{stat.st_dev}:{stat.st_ino}")
        assert logs.journal_stream()
        monkeypatch.setenv("JOURNAL_STREAM", f"{stat.st_dev}:{stat.st_ino + 1}")
        assert not logs.journal_stream()  # inherited by a child whose stderr went elsewhere
        monkeypatch.setenv("JOURNAL_STREAM", "garbage")
        assert not logs.journal_stream()


def test_every_event_about_a_job_names_its_domain_and_consumer() -> None:
    known = {"0123456789ab": {"domain": "lab1", "consumer": "nightly"}}
    logs.name_jobs(lambda job_id: known.get(job_id, {}))
    try:
        event = logs._add_job_fields(None, "info", {"event": "nbd session opened",
                                                     "job": "0123456789ab", "session": 1})
        assert (event["domain"], event["consumer"]) == ("lab1", "nightly")
        # What the event says itself stays; a job nobody knows gets nothing.
        said = logs._add_job_fields(None, "info", {"event": "x", "job": "0123456789ab",
                                                   "domain": "other"})
        assert (said["domain"], said["consumer"]) == ("other", "nightly")
        assert logs._add_job_fields(None, "info", {"event": "x", "job": "ffffffffffff"}) \
            == {"event": "x", "job": "ffffffffffff"}
    finally:
        logs.name_jobs(None)
