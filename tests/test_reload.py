"""`systemctl reload` (reload.py): the live keys change what the daemon does next, every
other key is named as needing a restart, and a configuration that does not load changes
nothing. Against the job machinery of test_jobs.py (the fake source); the host lab test
reloads the installed service for real."""

from __future__ import annotations

import dataclasses
import os
import signal
from pathlib import Path

import anyio
import pytest
from structlog.testing import capture_logs

from pullbackd import api, config, reload, service, stream
from pullbackd.model import JobState, StartRequest
from pullbackd.rebuild import Rebuilder
from pullbackd.repository import Repository
from pullbackd.roles import Role
from pullbackd.sdnotify import Notifier

from .fakes import FakeSource, FakeVirt
from .test_jobs import Rig, filling, ready, running, three_pulls, until


@pytest.fixture
def source(tmp_path: Path) -> FakeSource:
    (tmp_path / "source").mkdir()
    return FakeSource(FakeVirt(), tmp_path / "source")


def tunables(rig: Rig, tmp_path: Path) -> reload.Tunables:
    repository = Repository(tmp_path / "repo", tmp_path / "nbd", 1 << 20)
    rebuilder = Rebuilder(repository, rig.source.virt, tmp_path / "libvirt", "tss",
                          stream.Tuning(), rig.jobs.did_not_complete)
    parts = api.Parts(rig.jobs, rig.migrations, rig.chains, repository, rebuilder,
                      stream.Tuning())
    return reload.Tunables(api.service(parts), rig.exports, rig.chains, rig.serving,
                           rig.scratch, rig.jobs, rig.migrations)


@pytest.mark.asyncio
async def test_the_live_keys_apply_at_once_and_the_rest_wait_for_a_restart(
        tmp_path: Path, source: FakeSource) -> None:
    started = config.load(None)
    started = dataclasses.replace(started, jobs=dataclasses.replace(started.jobs, max_active=1))
    path = tmp_path / "pullbackd.toml"
    path.write_text("[jobs]\nmax_active = 1\n")
    (tmp_path / "pullbackd.toml.d").mkdir()
    (tmp_path / "pullbackd.toml.d" / "10-night.toml").write_text(
        '[jobs]\nmax_active = 2\n[roles]\ndefault = "look"\n[chains]\nkeep = 3\n'
        "[exports]\nconnections = 3\nidle_timeout = 60.0\n[scratch]\nreserve = 5\n"
        "[stream]\nrequest_size = 1048576\n")
    async with running(tmp_path, source, max_active=1) as rig:
        live = tunables(rig, tmp_path)
        first = await rig.jobs.start(StartRequest("d1"))
        second = await rig.jobs.start(StartRequest("d2"))
        assert (first.state, second.state) == (JobState.READY, JobState.QUEUED)
        with capture_logs() as logged:
            effective = await reload.reload(path, started, live)
        # A place more: the queued job starts now, not at the next job's end.
        await until(rig.jobs, second.id, lambda j: j.state == JobState.READY)
        assert live.service.roles.default == rig.exports.roles.default == Role.LOOK
        assert (rig.chains.keep, rig.exports.limit, rig.scratch.reserve) == (3, 3, 5)
        assert rig.serving.limits.idle_timeout == 60.0
        assert [e for e in logged if e["event"].startswith("reloaded")] == [{
            "event": "reloaded; these keys change only at a restart (systemctl restart "
                     "pullbackd)",
            "log_level": "warning",
            "applied": ["roles.default", "exports.connections", "exports.idle_timeout",
                        "scratch.reserve", "jobs.max_active", "chains.keep"],
            "restart_needed": ["stream.request_size"]}]
        # In effect: the live keys as read now, the others as at start.
        assert (effective.jobs.max_active, effective.stream.request_size) == (
            2, started.stream.request_size)

        async def refused(drop_in: bytes) -> str:
            """The error of a reload with `drop_in` added, which must change nothing."""
            (tmp_path / "pullbackd.toml.d" / "20-typo.toml").write_bytes(drop_in)
            with capture_logs() as logged:
                assert await reload.reload(path, effective, live) is effective
            # (The jobs log on meanwhile: only the reload's own events count here.)
            told = [e for e in logged if e["event"].startswith("reload")]
            assert [e["event"] for e in told] == [
                "reload failed: the configuration does not load; nothing changed"]
            assert rig.chains.keep == 3 and rig.jobs.get(first.id).state == JobState.READY
            return str(told[0]["error"])

        assert "chains.keep" in await refused(b"[chains]\nkeep = -1\n")
        # A file that is not UTF-8 (a Latin-1 comment) ended the daemon, every reader cut.
        assert "20-typo.toml: not UTF-8" in await refused(b"# r\xe9serve\n[chains]\nkeep = 4\n")


@pytest.mark.asyncio
async def test_a_reserve_raised_over_the_free_space_ends_no_backup(
        tmp_path: Path, source: FakeSource, monkeypatch: pytest.MonkeyPatch) -> None:
    """Raised over what is free, [scratch] reserve is missing through no backup's doing
    (their scratch files hold nothing): ending one would give nothing back, and cut its
    appliance off. The operator is told instead, once."""
    async with running(tmp_path, source) as rig:
        live = tunables(rig, tmp_path)
        jobs = await three_pulls(rig, (0, 0, 0))
        fs = filling(rig, monkeypatch)
        path = tmp_path / "pullbackd.toml"
        path.write_text(f"[scratch]\nreserve = {fs.free() + (1 << 30)}\n")
        with capture_logs() as logged:
            await reload.reload(path, config.load(None), live)
            await fs.looked(5)
        assert ready(rig, jobs) == ["d1", "d2", "d3"], [rig.jobs.get(j.id).error for j in jobs]
        assert [e["reserve"] for e in logged
                if e["event"].startswith("scratch space is under")] == [rig.scratch.reserve]


class Reloads(Notifier):
    """What the daemon tells systemd, as far as a reload goes: each reload's end."""

    def __init__(self) -> None:
        super().__init__({})
        self.send, self.told = anyio.create_memory_object_stream[str](8)

    def ready(self, status: str) -> None:
        self.send.send_nowait(status)


@pytest.mark.asyncio
async def test_a_reload_reads_the_default_file_made_since_the_start(
        tmp_path: Path, source: FakeSource, monkeypatch: pytest.MonkeyPatch) -> None:
    """Started with no configuration file (no --config, and no DEFAULT_CONFIG: every
    setting its default), the daemon read none at a reload either, once the file was
    written: `systemctl reload pullbackd` said "reloaded" and applied nothing. A reload
    looks for DEFAULT_CONFIG as the start does; once read, it is the file reloads read
    (gone, it changes nothing, as a file given with --config)."""
    default = tmp_path / "etc" / "pullbackd.toml"
    monkeypatch.setattr(service, "DEFAULT_CONFIG", default)
    assert service.config_file(None) is None
    started = config.load(None)
    async with running(tmp_path, source) as rig:
        live = tunables(rig, tmp_path)
        notifier, keep = Reloads(), rig.chains.keep
        await rig.tg.start(service._reload_on_signal, None, started, live, notifier)

        async def reloaded() -> list[str]:
            with capture_logs() as logged, anyio.fail_after(10):
                os.kill(os.getpid(), signal.SIGHUP)
                assert await notifier.told.receive() == "reloaded"
            return [e["event"] for e in logged if e["event"].startswith("reload")]

        assert await reloaded() == [  # nothing to read yet: it says so
            "reload: no configuration file; every setting stays its default"]
        assert rig.chains.keep == keep
        default.parent.mkdir()
        default.write_text("[chains]\nkeep = 3\n")
        assert await reloaded() == ["reloaded"]
        assert rig.chains.keep == 3
        default.write_text("[chains]\nkeep = 4\n")
        await reloaded()
        assert rig.chains.keep == 4
        default.unlink()
        assert await reloaded() == [
            "reload failed: the configuration does not load; nothing changed"]
        assert rig.chains.keep == 4


def test_every_key_is_known_and_the_live_ones_exist() -> None:
    keys = {f"{s.name}.{k.name}" for s in dataclasses.fields(config.Config)
            for k in dataclasses.fields(getattr(config.Config(), s.name))}
    sections = {k.partition(".")[0] for k in keys}
    for key in reload.LIVE:
        section, _, name = key.partition(".")
        assert (name == "*" and section in sections) or key in keys, key
    assert reload.is_live("roles.admin") and not reload.is_live("libvirt.uri")
