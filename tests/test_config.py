import json
import subprocess
import sys
from pathlib import Path

import pytest

from pullbackd import config


def test_defaults_follow_systemd_directories() -> None:
    cfg = config.load(None)
    assert cfg.control.socket == Path("/run/pullbackd/control.sock")
    assert cfg.control_mode == 0o660
    assert cfg.state.dir == Path("/var/lib/pullbackd")


def test_shipped_config_is_the_defaults(pytestconfig: pytest.Config) -> None:
    """config/pullbackd.toml documents every key with its default value."""
    shipped = pytestconfig.rootpath / "config" / "pullbackd.toml"
    assert config.load(shipped) == config.load(None)
    text = shipped.read_text()
    for section, values in json.loads(config.load(None).to_json()).items():
        assert f"[{section}]" in text
        for key in values:
            assert f"\n{key} = " in text, f"{section}.{key} is not documented"


@pytest.mark.parametrize(("toml", "message"), [
    ("[control]\nsockett = '/x'", "unknown key control.sockett"),
    ("[nope]\n", "unknown key nope"),
    ("[control]\nsocket = 'relative'", "control.socket must be an absolute path"),
    ("[control]\nmode = '9'", "octal"),
    ("[control]\ngroup = 'no-such-group-here'", "no group"),
    ("[jobs]\nend_timeout = -1", "positive"),
    ("[jobs]\nend_timeout = nan", "jobs.end_timeout must be a positive number$"),
    ("[exports]\ndrain_timeout = 0", "exports.drain_timeout must be a positive number$"),
    ("[exports]\nidle_timeout = -0.5", "exports.idle_timeout must be a positive number or 0"),
    ("[exports]\nidle_timeout = true", "exports.idle_timeout must be a positive number or 0"),
    ("[exports]\nmax_lifetime = '1h'", "exports.max_lifetime must be a positive number or 0"),
    ("[exports]\nmax_lifetime = inf", "exports.max_lifetime must be a positive number or 0"),
    ("[stream]\nconnections = 0", "stream.connections must be at least 1"),
    ("[scratch]\nreserve = -5", "scratch.reserve must be a whole number"),
    ("[stream]\nin_flight = 2.5", "stream.in_flight must be a whole number"),
    ("[libvirt]\nuri = 5", "libvirt.uri must be a str"),
    ("[log]\nlevel = 'loud'", "log.level"),
    ("control = 1", r"\[control\] must be a table"),
    ("[control", "pullbackd.toml"),
    (f"[exports]\ndir = '/{'x' * 80}'", "exports.dir is too long by 6 bytes"),
    ("[exports]\nmode = '0999'", "exports.mode must be an octal"),
    ("[exports]\nqemu_group = 'no-such-group-here'", "exports.qemu_group: no group"),
    ("[exports]\nconnections = 0", "exports.connections must be at least 1"),
    # 0 closed every connection but root's (an appliance's Start, Finish) at once.
    ("[control]\nconnections = 0", "control.connections must be at least 1"),
    ("[control]\nconnections_per_user = 0", "control.connections_per_user must be at least 1"),
    ("[exports]\ntcp_handshakes = 0", "exports.tcp_handshakes must be at least 1"),
    ("[exports]\ntcp_handshakes_per_address = 0",
     "exports.tcp_handshakes_per_address must be at least 1"),
    ("[exports]\ntcp_listen = 'nope'", "exports.tcp_listen must be"),
    ("[exports]\ntcp_listen = ':10809'", "exports.tls_certificates: no server-cert.pem"),
])
def test_bad_config_names_the_key(tmp_path: Path, toml: str, message: str) -> None:
    path = tmp_path / "pullbackd.toml"
    path.write_text(toml)
    with pytest.raises(config.ConfigError, match=message):
        config.load(path)


@pytest.mark.parametrize(("toml", "message"), [
    (b"[jobs]\n# caf\xe9\nmax_active = 2\n", r"pullbackd.toml: not UTF-8 \(byte 12\)"),
    (b'[control]\ngroup = "wheel\\u0000x"\n', "control.group must not hold a NUL character"),
    (b'[push]\ndirs = ["/srv/\\u0000"]\n', "push.dirs must not hold a NUL character"),
])
def test_a_file_that_cannot_be_used_is_a_config_error(
        tmp_path: Path, toml: bytes, message: str) -> None:
    """Not UTF-8 (a comment in Latin-1), or a NUL in a name: refused with the file or the key,
    as ConfigError, which is what a reload (reload.py) and the start catch; anything else
    ended the daemon at a reload."""
    path = tmp_path / "pullbackd.toml"
    path.write_bytes(toml)
    with pytest.raises(config.ConfigError, match=message):
        config.load(path)


def test_seconds_may_be_fractions(tmp_path: Path) -> None:
    """Every timeout is in seconds, a TOML integer or float; 0 turns the expiries off."""
    path = tmp_path / "pullbackd.toml"
    path.write_text("[exports]\nidle_timeout = 0.5\nmax_lifetime = 2\ndrain_timeout = 0.25\n"
                    "[migration]\ngrace = 0.1\n")
    cfg = config.load(path)
    assert (cfg.exports.idle_timeout, cfg.exports.max_lifetime, cfg.exports.drain_timeout,
            cfg.migration.grace) == (0.5, 2.0, 0.25, 0.1)
    assert type(cfg.exports.max_lifetime) is float
    path.write_text("[exports]\nidle_timeout = 0\nmax_lifetime = 0.0\n")
    cfg = config.load(path)
    assert (cfg.exports.idle_timeout, cfg.exports.max_lifetime) == (0.0, 0.0)


def test_show_config(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[libvirt]\nuri = 'qemu:///x'\n[jobs]\nend_timeout = 5\n")
    out = subprocess.run([sys.executable, "-m", "pullbackd.service", "--config", str(path),
                          "--show-config"], check=True, capture_output=True, text=True).stdout
    shown = json.loads(out)
    assert shown["libvirt"]["uri"] == "qemu:///x"
    assert shown["jobs"]["end_timeout"] == 5.0
    assert shown["control"]["socket"] == "/run/pullbackd/control.sock"


def test_bad_config_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[x]\n")
    proc = subprocess.run([sys.executable, "-m", "pullbackd.service", "--config", str(path)],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 2
    assert "unknown key x" in proc.stderr


def test_drop_ins_replace_keys_in_the_order_of_their_names(tmp_path: Path) -> None:
    path = tmp_path / "pullbackd.toml"
    path.write_text('[roles]\ndefault = "admin"\nlook = ["ann"]\n[jobs]\nmax_active = 4\n')
    drop_ins = tmp_path / "pullbackd.toml.d"
    drop_ins.mkdir()
    (drop_ins / "20-late.toml").write_text('[roles]\nlook = ["cid"]\n')
    (drop_ins / "10-early.toml").write_text('[roles]\ndefault = "look"\nlook = ["bob", "x"]\n')
    (drop_ins / "not-toml.conf").write_text("ignored: not *.toml")
    cfg = config.load(path)
    assert (cfg.roles.default, cfg.roles.look, cfg.jobs.max_active) == ("look", ("cid",), 4)
    (drop_ins / "30-bad.toml").write_text("[roles\n")
    with pytest.raises(config.ConfigError, match=r"30-bad\.toml"):
        config.load(path)
