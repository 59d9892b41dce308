"""pullbackd's configuration: a TOML file over documented defaults.

The defaults follow systemd's `RuntimeDirectory=pullbackd` (sockets, nothing
that must survive a reboot) and `StateDirectory=pullbackd` (the state database,
scratch files). `config/pullbackd.toml` in the source tree lists every key.
"""

from __future__ import annotations

import dataclasses
import grp
import json
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .names import Layout


class ConfigError(ValueError):
    """The configuration cannot be used; the message names the key."""


@dataclass(frozen=True)
class Libvirt:
    #: libvirt connection URI.
    uri: str = "qemu:///system"
    #: libvirt's state folder (/var/lib/libvirt) as pullbackd sees it: where it reads
    #: domains' NVRAM and TPM state (domainfiles.py).
    state_dir: Path = Path("/var/lib/libvirt")
    #: libvirt's swtpm_user (qemu.conf): a restored TPM state is given to it.
    swtpm_user: str = "tss"


@dataclass(frozen=True)
class Control:
    #: The varlink control socket.
    socket: Path = Path("/run/pullbackd/control.sock")
    #: Its permissions, an octal string.
    mode: str = "0660"
    #: Its group (who may reach it; what each may do: [roles]); empty: the daemon's group.
    group: str = ""
    #: Connections open at once from users other than root, in all and per user.
    connections: int = 256
    connections_per_user: int = 32
    #: Seconds a connection may wait between calls saying nothing before it is closed.
    idle_timeout: float = 60.0


@dataclass(frozen=True)
class Roles:
    """Who may do what on the control socket (see roles.py): user names, and groups as
    "@group". Root is admin."""

    #: Everything: also Migrate, DeleteChain, Prune, Restore.
    admin: tuple[str, ...] = ()
    #: Start, Finish, Abort, and what `look` may.
    backup: tuple[str, ...] = ()
    #: Get, List, Watch, ListCheckpoints, Verify.
    look: tuple[str, ...] = ()
    #: The role of whoever reaches the socket and is in no list: none, look, backup, admin.
    default: str = "backup"


@dataclass(frozen=True)
class Exports:
    #: Per-job NBD endpoints, `<dir>/<job-id>.sock`; QEMU's own sockets are in
    #: `<dir>/.qemu`, for pullbackd and the QEMU user alone.
    dir: Path = Path("/run/pullbackd/exports")
    #: The endpoints' permissions, an octal string, and group (empty: the daemon's).
    mode: str = "0660"
    group: str = ""
    #: The group QEMU runs as (qemu.conf `group`): `<dir>/.qemu` is the daemon's and this
    #: group's, so QEMU binds its NBD sockets there; empty: the daemon's own group.
    qemu_group: str = ""
    #: Sessions one job may have open at once.
    connections: int = 8
    #: Seconds a new session may take to open an export (an NBD_OPT_GO QEMU accepted)
    #: before it is cut.
    handshake_timeout: float = 5.0
    #: Seconds Finish waits for open sessions to close.
    drain_timeout: float = 30.0
    #: Seconds a pull job may go without any session before it expires; 0: never.
    idle_timeout: float = 3600.0
    #: Seconds a pull job may run at most; 0: no limit.
    max_lifetime: float = 0.0
    #: "host:port" of the TCP endpoint for remote appliances (every job's disks on one
    #: port, TLS only); empty: none.
    tcp_listen: str = ""
    #: The host name in the nbds:// URIs handed out; empty: this machine's name.
    tcp_host: str = ""
    #: A folder with server-cert.pem, server-key.pem and ca-cert.pem.
    tls_certificates: str = ""
    #: Ask remote appliances for a certificate signed by ca-cert.pem.
    tls_verify_clients: bool = False
    #: Connections to the TCP endpoint that may be in their handshake at once (nobody
    #: authenticated yet), in all and from one address; one more is closed at once.
    tcp_handshakes: int = 64
    tcp_handshakes_per_address: int = 8
    #: Allow the TCP endpoint without TLS. Backups are people's data: only on a network
    #: nobody else can see.
    insecure_tcp: bool = False


@dataclass(frozen=True)
class Scratch:
    #: Per-job scratch files, `<dir>/<job-id>.<disk>.qcow2`: QEMU copies the old
    #: contents of blocks the guest overwrites during a backup here. Keep it on
    #: a real disk, not tmpfs: a busy guest can fill it up to the disks' size.
    dir: Path = Path("/var/lib/pullbackd/scratch")
    #: Bytes of the scratch file system never promised to backups (the host needs some
    #: too); running backups are warned about at twice this, and ended under it.
    reserve: int = 1 << 30


@dataclass(frozen=True)
class State:
    #: The state database, `<dir>/state.db`.
    dir: Path = Path("/var/lib/pullbackd")


@dataclass(frozen=True)
class Repository:
    #: The embedded repository: <dir>/<domain>/<consumer>/<disk>/NNNN.qcow2 and .json.
    dir: Path = Path("/var/lib/pullbackd/repository")
    #: On a filesystem without O_DIRECT (elsewhere backups skip the page cache): bytes a
    #: copy writes into a backup file between two requests to the kernel to write the
    #: file back to disk and drop it from the page cache; 0: never (the commit's fsync
    #: then writes it all, and the page cache holds it until evicted).
    write_behind: int = 64 << 20


@dataclass(frozen=True)
class Restore:
    #: Folders Restore may write into (a new file, never through a symlink), as the
    #: daemon's user; a Restore anywhere else is refused.
    dirs: tuple[str, ...] = ("/var/lib/pullbackd/restore",)


@dataclass(frozen=True)
class Push:
    #: Folders a push backup's target_dir may be in (the daemon's user writes there, QEMU's
    #: passes through).
    dirs: tuple[str, ...] = ("/var/lib/pullbackd/push",)


@dataclass(frozen=True)
class Stream:
    #: Bytes per request of pullbackd's own copy (measured defaults: see README).
    request_size: int = 512 << 10
    #: Connection pairs per disk, when the source allows several.
    connections: int = 2
    #: Requests in flight per connection pair.
    in_flight: int = 8
    #: Bytes of buffers all copies together may hold. One copy at full speed uses
    #: connections x in_flight x request_size (8 MiB); 24 MiB keeps the daemon
    #: under 80 MiB however many copies run.
    memory: int = 24 << 20
    #: NBD servers pullbackd's own copy may write to: "nbd+unix:///?socket=FOLDER" (a
    #: socket in FOLDER), "nbds://HOST:PORT" (any export there), with the daemon's rights.
    #: "local" (the repository) is always allowed.
    destinations: tuple[str, ...] = ()
    #: Seconds a connection of pullbackd's own copy may take, its NBD handshake included
    #: (a destination that accepts and never answers fails the job then).
    connect_timeout: float = 30.0
    #: For nbds:// destinations: a folder with ca-cert.pem (and client-cert.pem and
    #: client-key.pem if the appliance checks clients). Empty: libnbd's default.
    tls_certificates: str = ""


@dataclass(frozen=True)
class Jobs:
    #: Seconds to wait for libvirt to confirm a job has ended after Finish or Abort.
    end_timeout: float = 30.0
    #: Seconds the guest agent may take to answer a freeze or a thaw of the filesystems
    #: as a backup begins (libvirt's own wait is for ever: quiesce.py).
    agent_timeout: float = 60.0
    #: Seconds an ended job stays queryable (Get, List) before it is forgotten.
    keep_finished: float = 7 * 24 * 3600.0
    #: Jobs that may run at once; more wait in a queue. 0: no limit.
    max_active: int = 16


@dataclass(frozen=True)
class Chains:
    #: Checkpoints of each consumer's chain kept per disk, the newest; also kept: the
    #: newest where the disk was backed up in full (where differentials start). Older
    #: ones are deleted as new ones join: every checkpoint costs QEMU work on each
    #: guest write. 0: keep every checkpoint.
    keep: int = 1


@dataclass(frozen=True)
class Migration:
    #: Seconds a pull job must have had no session before the gate counts it as done.
    grace: float = 10.0
    #: Seconds Migrate waits for the gate by default (Migrate's drain_timeout overrides).
    drain_timeout: float = 300.0


@dataclass(frozen=True)
class Offline:
    #: The systemd template unit (without "@") that runs a shut-off domain's
    #: qemu-storage-daemon as root (storage_unit.py); empty: pullbackd runs it itself.
    unit: str = ""


@dataclass(frozen=True)
class Log:
    #: debug, info, warning or error.
    level: str = "info"


@dataclass(frozen=True)
class Config:
    libvirt: Libvirt = field(default_factory=Libvirt)
    control: Control = field(default_factory=Control)
    roles: Roles = field(default_factory=Roles)
    exports: Exports = field(default_factory=Exports)
    scratch: Scratch = field(default_factory=Scratch)
    state: State = field(default_factory=State)
    repository: Repository = field(default_factory=Repository)
    restore: Restore = field(default_factory=Restore)
    push: Push = field(default_factory=Push)
    stream: Stream = field(default_factory=Stream)
    jobs: Jobs = field(default_factory=Jobs)
    chains: Chains = field(default_factory=Chains)
    migration: Migration = field(default_factory=Migration)
    offline: Offline = field(default_factory=Offline)
    log: Log = field(default_factory=Log)

    @property
    def control_mode(self) -> int:
        return int(self.control.mode, 8)

    @property
    def exports_mode(self) -> int:
        return int(self.exports.mode, 8)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), default=str, indent=2)


LEVELS = ("debug", "info", "warning", "error")
ROLES = ("none", "look", "backup", "admin")
#: The seconds settings where 0 turns the limit off; every other one must be positive.
ZERO_TURNS_OFF = frozenset({"exports.idle_timeout", "exports.max_lifetime"})


def load(path: Path | None) -> Config:
    """Read `path` (or nothing: all defaults), then its drop-ins, and check every value.

    The drop-ins are `<path>.d/*.toml`, read in the order of their names: a key in one
    replaces the same key read before it (a list is replaced whole)."""
    data: dict[str, Any] = {}
    for file in [] if path is None else [path, *drop_ins(path)]:
        try:
            # UTF-8, as TOML is, whatever the daemon's locale.
            read = tomllib.loads(file.read_bytes().decode())
        except UnicodeDecodeError as e:
            raise ConfigError(f"{file}: not UTF-8 (byte {e.start}); TOML files are") from None
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ConfigError(f"{file}: {e}") from None
        for section, table in read.items():
            if isinstance(table, dict) and isinstance(data.get(section), dict):
                data[section].update(table)
            else:
                data[section] = table
    config: Config = _build(Config, data, "")
    _validate(config)
    return config


def drop_ins(path: Path) -> list[Path]:
    """The drop-ins of the configuration file `path`, in the order they are read."""
    folder = path.with_name(path.name + ".d")
    return sorted(folder.glob("*.toml")) if folder.is_dir() else []


def _build(cls: Any, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"[{where}] must be a table")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(fields)
    if unknown:
        raise ConfigError(f"unknown key {where + '.' if where else ''}{sorted(unknown)[0]}")
    values = {}
    for name, value in data.items():
        key = f"{where}.{name}" if where else name
        f = fields[name]
        # A path, a name or a URI with a NUL in it fails wherever it is used (ValueError).
        if any(isinstance(v, str) and "\0" in v for v in
               (value if isinstance(value, list) else [value])):
            raise ConfigError(f"{key} must not hold a NUL character")
        default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
        if dataclasses.is_dataclass(default):
            values[name] = _build(type(default), value, key)
        elif isinstance(default, Path):
            if not isinstance(value, str) or not value.startswith("/"):
                raise ConfigError(f"{key} must be an absolute path")
            values[name] = Path(value)
        elif isinstance(default, int) and not isinstance(default, bool):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{key} must be a whole number")
            values[name] = value
        elif isinstance(default, tuple):
            if not isinstance(value, list) or not all(
                    isinstance(v, str) and v.strip("@") for v in value):
                raise ConfigError(f"{key} must be a list of names")
            values[name] = tuple(value)
        elif isinstance(default, float):  # seconds: a TOML integer or float
            off = key in ZERO_TURNS_OFF
            if isinstance(value, bool) or not isinstance(value, int | float) or \
                    not math.isfinite(value) or value < 0 or (value == 0 and not off):
                raise ConfigError(f"{key} must be a positive number" + (" or 0" if off else ""))
            values[name] = float(value)
        elif not isinstance(value, type(default)):
            raise ConfigError(f"{key} must be a {type(default).__name__}")
        else:
            values[name] = value
    return cls(**values)


def _validate(config: Config) -> None:
    for section in ("control", "exports"):
        try:
            mode = int(getattr(config, section).mode, 8)
        except ValueError:
            raise ConfigError(f"{section}.mode must be an octal string such as \"0660\"") \
                from None
        if not 0 <= mode <= 0o777:
            raise ConfigError(f"{section}.mode must be between 0000 and 0777")
        group = getattr(config, section).group
        if group:
            try:
                grp.getgrnam(group)
            except KeyError:
                raise ConfigError(f"{section}.group: no group {group!r}") from None
    if config.exports.qemu_group:
        try:
            grp.getgrnam(config.exports.qemu_group)
        except KeyError:
            raise ConfigError(f"exports.qemu_group: no group {config.exports.qemu_group!r}") \
                from None
    try:  # every socket under it fits in sun_path, the longest of all included
        Layout(config.exports.dir, config.scratch.dir).check()
    except ValueError as e:
        raise ConfigError(f"exports.dir is {e}") from None
    if config.exports.tcp_listen:
        try:
            parse_listen(config.exports.tcp_listen)
        except ValueError:
            raise ConfigError("exports.tcp_listen must be \"host:port\", e.g. \":10809\"") \
                from None
        if not config.exports.insecure_tcp:
            folder = Path(config.exports.tls_certificates or "/nonexistent")
            for name in ("server-cert.pem", "server-key.pem") + (
                    ("ca-cert.pem",) if config.exports.tls_verify_clients else ()):
                if not (folder / name).is_file():
                    raise ConfigError(f"exports.tls_certificates: no {name} in "
                                      f"{config.exports.tls_certificates!r} (the TCP endpoint "
                                      "is TLS only, unless exports.insecure_tcp)")
    # Limits on what is open at once: 0 would shut everyone but root out (the control
    # socket), or every appliance (the endpoints), where 0 elsewhere means no limit.
    for key in ("control.connections", "control.connections_per_user",
                "exports.connections", "exports.tcp_handshakes",
                "exports.tcp_handshakes_per_address"):
        section, _, name = key.partition(".")
        if getattr(getattr(config, section), name) < 1:
            raise ConfigError(f"{key} must be at least 1 (it is not turned off by 0)")
    for key in ("request_size", "connections", "in_flight", "memory"):
        if getattr(config.stream, key) < 1:
            raise ConfigError(f"stream.{key} must be at least 1")
    for key, folders in (("restore.dirs", config.restore.dirs),
                         ("push.dirs", config.push.dirs)):
        if not all(d.startswith("/") for d in folders):
            raise ConfigError(f"{key} must hold absolute paths")
    if config.roles.default not in ROLES:
        raise ConfigError(f"roles.default must be one of {', '.join(ROLES)}")
    if config.log.level not in LEVELS:
        raise ConfigError(f"log.level must be one of {', '.join(LEVELS)}")


def parse_listen(value: str) -> tuple[str, int]:
    """"host:port", "[v6]:port" or ":port" (every address)."""
    host, _, port = value.rpartition(":")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{value!r}: not host:port")
    return host.strip("[]"), int(port)
