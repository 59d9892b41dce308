"""Trust, tried by real users who are not root: roles on the control socket, and
files nobody but root may read.

Three users reach the socket through [control] group: one listed as `look`, one
in a group listed as `admin`, and one listed nowhere, who gets [roles] default
(`backup`). Each calls beyond its role through pullbackctl and through the raw
protocol; every such call is refused with PermissionDenied, and nothing changes.
"""

from __future__ import annotations

import hashlib
import json
import pwd
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pullbackd.accepting import BACKOFF
from pullbackd.model import nbd_url

from .conftest import Daemon, Lab, serving
from .images import assert_same, read_export

GROUP = "pbtest"
LOOK, BACKUP, ADMIN = "pbtest-look", "pbtest-backup", "pbtest-admin"
ADMINS = "pbtest-admins"
#: The test daemon's [control] idle_timeout, and [exports] handshake_timeout.
IDLE = 3.0
HANDSHAKE = 1.0
#: The only place the test daemon may send its copies to.
APPLIANCES = "/var/tmp/pbtest-appliances"


def ensure_user(name: str, *groups: str) -> None:
    for group in groups:
        subprocess.run(["groupadd", "-f", "--system", group], check=True)
    if subprocess.run(["getent", "passwd", name], capture_output=True,
                      check=False).returncode != 0:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell",
                        "/usr/sbin/nologin", name], check=True)
    subprocess.run(["usermod", "-a", "-G", ",".join(groups), name], check=True)


@pytest.fixture(scope="module")
def daemon(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    ensure_user(LOOK, GROUP)
    ensure_user(BACKUP, GROUP)
    ensure_user(ADMIN, GROUP, ADMINS)
    base = tmp_path_factory.mktemp("pullbackd")
    # A folder the users may enter (the tests' own are root's alone).
    folder = Path(tempfile.gettempdir()) / \
        f"pbc-{hashlib.sha1(str(base).encode()).hexdigest()[:10]}"
    folder.mkdir(mode=0o755, exist_ok=True)
    with serving(base, lab.uri, socket=folder / "control.sock",
                 exports=f"handshake_timeout = {HANDSHAKE}",
                 stream=f'destinations = ["nbd+unix:///?socket={APPLIANCES}"]',
                 control=f'group = "{GROUP}"\nconnections = 12\n'
                         f'connections_per_user = 8\nidle_timeout = {IDLE}',
                 extra_config=f'[roles]\nadmin = ["@{ADMINS}"]\nlook = ["{LOOK}"]\n') as d:
        yield d


def as_user(user: str, d: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    """pullbackctl as `user`, with that user's groups."""
    return subprocess.run(
        ["setpriv", f"--reuid={user}", f"--regid={GROUP}", "--init-groups",
         sys.executable, "-m", "pullbackd.cli", "--socket", str(d.socket), "--json", *args],
        capture_output=True, text=True, timeout=120, check=False)


def call_as(user: str, d: Daemon, method: str, **params: Any) -> dict[str, Any]:
    """One varlink call as `user`: the reply's parameters, or {"error": ..., ...}."""
    code = ("import json, sys\n"
            "from pullbackd.control.client import Client, VarlinkError\n"
            "try:\n"
            "    with Client(sys.argv[1], timeout=60) as c:\n"
            "        print(json.dumps(c.call(sys.argv[2], **json.loads(sys.argv[3]))))\n"
            "except VarlinkError as e:\n"
            "    print(json.dumps({'error': e.short_name, **e.parameters}))\n")
    proc = subprocess.run(
        ["setpriv", f"--reuid={user}", f"--regid={GROUP}", "--init-groups",
         sys.executable, "-c", code, str(d.socket), f"org.pullbackd.Backup.{method}",
         json.dumps(params)], capture_output=True, text=True, timeout=120, check=True)
    reply: dict[str, Any] = json.loads(proc.stdout)
    return reply


def test_look_may_read_and_nothing_else(daemon: Daemon) -> None:
    before = daemon.ctl.call("List")
    assert call_as(LOOK, daemon, "List") == before
    refusals: list[tuple[str, dict[str, Any]]] = [
        ("Start", {"domain": "lab1"}), ("Abort", {"id": "x"}),
        ("DeleteChain", {"domain": "lab1", "consumer": "default"}),
        ("Prune", {"domain": "lab1", "keep": 1}), ("Verify", {"domain": "lab1"})]
    for method, params in refusals:
        assert call_as(LOOK, daemon, method, **params) == {
            "error": "PermissionDenied", "method": method, "role": "look"}
    refused = as_user(LOOK, daemon, "backup", "start", "lab1")
    assert refused.returncode == 1
    assert "your role (look) does not allow Start" in refused.stderr
    assert daemon.ctl.call("List") == before


def test_backup_runs_backups_but_does_not_administer(daemon: Daemon, tmp_path: Path) -> None:
    job = call_as(BACKUP, daemon, "Start", domain="lab1", disks=["vda"], consumer="roles")["job"]
    assert job["state"] == "ready"
    assert call_as(BACKUP, daemon, "Finish", id=job["id"])["job"]["state"] == "completed"
    chain = daemon.ctl.call("ListCheckpoints", domain="lab1", consumer="roles")
    assert [c["name"] for c in chain["checkpoints"]] == [job["checkpoint"]]
    assert call_as(BACKUP, daemon, "DeleteChain", domain="lab1", consumer="roles") == {
        "error": "PermissionDenied", "method": "DeleteChain", "role": "backup"}
    target = tmp_path / "restored.raw"
    assert call_as(BACKUP, daemon, "Restore", domain="lab1", disk="vda", to=str(target)) == {
        "error": "PermissionDenied", "method": "Restore", "role": "backup"}
    assert not target.exists()
    assert daemon.ctl.call("ListCheckpoints", domain="lab1", consumer="roles") == chain
    # What changed is on record: who, and what they asked for.
    calls = [json.loads(line) for line in daemon.log_text().splitlines()
             if '"event": "call"' in line and '"level": "info"' in line]
    starts = [c for c in calls if c["method"].endswith(".Start")]
    assert starts and starts[-1]["role"] == "backup" and starts[-1]["uid"] > 0
    assert starts[-1]["parameters"]["consumer"] == "roles"


def test_a_chain_and_a_job_are_their_starters(daemon: Daemon) -> None:
    """Nobody else, admin or root, backs up a user's chain (their backup would join it,
    and its owner's next incremental would miss what changed before it) or finishes a
    user's job; an admin may abort it. Each refusal changes nothing."""
    first = call_as(BACKUP, daemon, "Start", domain="lab1", disks=["vda"],
                    consumer="owned")["job"]
    assert first["owner"] == pwd.getpwnam(BACKUP).pw_uid
    call_as(BACKUP, daemon, "Finish", id=first["id"])
    chain = daemon.ctl.call("ListCheckpoints", domain="lab1", consumer="owned")
    assert [c["owner"] for c in chain["checkpoints"]] == [first["owner"]]
    jobs = daemon.ctl.call("List", domain="lab1")
    refused = {"error": "ChainOfAnother", "domain": "lab1", "consumer": "owned",
               "owner": BACKUP}
    for mode in ("full", "incremental"):
        assert call_as(ADMIN, daemon, "Start", domain="lab1", disks=["vda"], mode=mode,
                       consumer="owned") == refused
    assert daemon.ctl.error("Start", domain="lab1", disks=["vda"],
                            consumer="owned").parameters == {
        k: v for k, v in refused.items() if k != "error"}
    cli = as_user(ADMIN, daemon, "backup", "start", "lab1", "--consumer", "owned")
    assert cli.returncode == 1 and "ChainOfAnother" in cli.stderr
    assert f'"owner": "{BACKUP}"' in cli.stderr
    assert daemon.ctl.call("ListCheckpoints", domain="lab1", consumer="owned") == chain
    assert daemon.ctl.call("List", domain="lab1") == jobs
    second = call_as(BACKUP, daemon, "Start", domain="lab1", disks=["vda"],
                     mode="incremental", consumer="owned")["job"]
    assert second["since"] == first["checkpoint"]
    assert call_as(ADMIN, daemon, "Finish", id=second["id"]) == {
        "error": "JobOfAnother", "id": second["id"], "owner": BACKUP}
    assert daemon.ctl.error("Finish", id=second["id"]).short_name == "JobOfAnother"
    assert daemon.ctl.call("Get", id=second["id"])["job"]["state"] == "ready"
    assert call_as(ADMIN, daemon, "Abort", id=second["id"])["job"]["state"] == "aborted"
    assert daemon.ctl.call("ListCheckpoints", domain="lab1", consumer="owned") == chain
    daemon.ctl.call("DeleteChain", domain="lab1", consumer="owned")


def test_admin_by_group_administers(daemon: Daemon) -> None:
    job = daemon.ctl.job("Start", domain="lab1", disks=["vda"], consumer="admin")
    daemon.ctl.call("Finish", id=job["id"])
    assert call_as(ADMIN, daemon, "DeleteChain", domain="lab1", consumer="admin") == {
        "deleted": [job["checkpoint"]]}
    assert daemon.ctl.call("ListCheckpoints", domain="lab1", consumer="admin") == {
        "checkpoints": []}


def test_what_pullbackd_writes_is_roots_alone(daemon: Daemon, tmp_path: Path) -> None:
    job = daemon.ctl.job("Start", domain="lab1", disks=["vda"], consumer="private",
                         destination="local")
    assert daemon.ctl.wait(job["id"])["state"] == "completed"
    restored = tmp_path / "restored.raw"
    daemon.ctl.call("Restore", domain="lab1", disk="vda", consumer="private", to=str(restored))
    state = daemon.log.parent / "state" / "state.db"
    stored = sorted((daemon.repository / "lab1" / "private" / "vda").iterdir())
    assert stored and all(p.name.endswith((".qcow2", ".json")) for p in stored)
    for path in [state, *stored, restored, daemon.repository]:
        assert path.stat().st_mode & 0o077 == 0, (path, oct(path.stat().st_mode))
    # What others must reach still lets them: the socket, and the endpoints' folder.
    assert daemon.exports.stat().st_mode & 0o755 == 0o755
    assert call_as(LOOK, daemon, "Get", id=job["id"])["job"]["state"] == "completed"


def test_names_and_paths_from_clients_stay_where_they_belong(daemon: Daemon) -> None:
    """What a member of the control group tried: repository paths built from names with
    "..", a restore outside [restore] dirs, and one through a planted symlink."""
    def invalid(parameter: str) -> dict[str, str]:
        return {"error": "InvalidParameter", "parameter": parameter}

    job = daemon.ctl.job("Start", domain="lab1", disks=["vda"], consumer="paths",
                         destination="local")
    assert daemon.ctl.wait(job["id"])["state"] == "completed"

    assert call_as(BACKUP, daemon, "Verify", domain="../../../tmp") == invalid("domain")
    assert call_as(ADMIN, daemon, "Prune", domain="..", keep=1) == invalid("domain")
    folder = Path(tempfile.mkdtemp(prefix="pbt-"))
    folder.chmod(0o777)  # the attacker's own folder, inside [restore] dirs
    assert call_as(ADMIN, daemon, "Restore", domain="lab1", disk="../../../etc",
                   to=str(folder / "a.raw")) == invalid("disk")
    assert call_as(ADMIN, daemon, "Restore", domain="lab1", disk="vda", consumer="paths",
                   to="/etc/pbtest-restored.raw") == invalid("to")
    assert not Path("/etc/pbtest-restored.raw").exists()
    victim = Path("/etc/pbtest-victim")
    (folder / "b.raw").symlink_to(victim)
    assert call_as(ADMIN, daemon, "Restore", domain="lab1", disk="vda", consumer="paths",
                   to=str(folder / "b.raw")) == invalid("to")
    assert not victim.exists()
    assert call_as(ADMIN, daemon, "Restore", domain="lab1", disk="vda", consumer="paths",
                   to=str(folder / "c.raw"))["file"] == str(folder / "c.raw")


HOLD = """
import socket, sys, time
held = []
for _ in range(int(sys.argv[2])):
    s = socket.socket(socket.AF_UNIX)
    s.connect(sys.argv[1])
    held.append(s)
def closed():
    count = 0
    for s in held:
        s.setblocking(False)
        try:
            count += s.recv(1) == b""
        except BlockingIOError:
            pass
    return count
time.sleep(1)
print(closed(), flush=True)
time.sleep(float(sys.argv[3]))
print(closed(), flush=True)
"""


def hold(user: str, d: Daemon, count: int, then: float) -> subprocess.Popen[str]:
    """`count` connections as `user`, saying nothing: prints how many the daemon closed
    after a second, and again `then` seconds later."""
    return subprocess.Popen(
        ["setpriv", f"--reuid={user}", f"--regid={GROUP}", "--init-groups",
         sys.executable, "-c", HOLD, str(d.socket), str(count), str(then)],
        stdout=subprocess.PIPE, text=True)


def test_connections_are_capped_per_user_and_idle_ones_closed(daemon: Daemon) -> None:
    job = daemon.ctl.job("Start", domain="lab1", disks=["vda"], consumer="flood")
    flood = hold(BACKUP, daemon, 40, IDLE + 2)
    assert flood.stdout is not None
    assert int(flood.stdout.readline()) == 40 - 8  # its own 8, no more
    other = hold(LOOK, daemon, 8, IDLE + 2)
    assert other.stdout is not None
    assert int(other.stdout.readline()) == 8 - 4  # what is left of the 12 in all
    # Root always gets in, and a running backup keeps being served.
    assert daemon.ctl.job("Get", id=job["id"])["state"] == "ready"
    # Saying nothing for [control] idle_timeout, they are closed.
    assert int(flood.stdout.readline()) == 40
    assert int(other.stdout.readline()) == 8
    assert flood.wait(30) == 0 and other.wait(30) == 0
    assert daemon.ctl.job("Abort", id=job["id"])["state"] == "aborted"
    assert "refusing connections" in daemon.log_text()


def test_running_out_of_descriptors_does_not_stop_the_daemon(daemon: Daemon) -> None:
    """Floods of connections to the control socket and to a job's endpoint while the
    daemon has no descriptor to spare: it backs off, then serves both again."""
    job = daemon.ctl.job("Start", domain="lab1", disks=["vda"], consumer="fds")
    [disk] = job["disks"]
    pid = daemon.proc.pid
    fds = len(list(Path(f"/proc/{pid}/fd").iterdir()))
    soft, hard = subprocess.run(["prlimit", f"--pid={pid}", "--nofile", "--raw", "--noheadings",
                                 "--output=SOFT,HARD"], check=True, capture_output=True,
                                text=True).stdout.split()
    # The soft limit only: lowering the hard one could not be undone here.
    subprocess.run(["prlimit", f"--pid={pid}", f"--nofile={fds + 8}:{hard}"], check=True)
    try:
        held = []
        endpoint = daemon.exports / f"{job['id']}.sock"
        for path in [daemon.socket] * 30 + [endpoint] * 30:  # root: only descriptors limit it
            s = socket.socket(socket.AF_UNIX)
            s.connect(str(path))
            held.append(s)
        time.sleep(2)
        for s in held:
            s.close()
    finally:
        subprocess.run(["prlimit", f"--pid={pid}", f"--nofile={soft}:{hard}"], check=True)
    time.sleep(2 * BACKOFF)
    assert daemon.proc.poll() is None
    assert daemon.ctl.job("Get", id=job["id"])["state"] == "ready"
    qemu = nbd_url(daemon.exports / ".qemu" / f"{job['id']}.sock", disk["export"])
    assert_same(read_export(disk["url"]), read_export(qemu))  # through the relay, exactly
    daemon.ctl.call("Abort", id=job["id"])
    assert "Too many open files" in daemon.log_text()


def test_silent_clients_do_not_hold_a_jobs_places(daemon: Daemon) -> None:
    """As many clients as the job has places connect and say nothing: each is cut after
    [exports] handshake_timeout, and an appliance then reads."""
    job = daemon.ctl.job("Start", domain="lab1", disks=["vda"], consumer="silent")
    [disk] = job["disks"]
    silent = []
    for _ in range(8):  # [exports] connections
        s = socket.socket(socket.AF_UNIX)
        s.connect(str(daemon.exports / f"{job['id']}.sock"))
        silent.append(s)
    time.sleep(HANDSHAKE + 1)
    for s in silent:
        s.settimeout(5)
        while s.recv(65536):  # the greeting, then the end
            pass
        s.close()
    qemu = nbd_url(daemon.exports / ".qemu" / f"{job['id']}.sock", disk["export"])
    assert_same(read_export(disk["url"]), read_export(qemu))
    assert daemon.ctl.job("Finish", id=job["id"])["state"] == "completed"
    assert "no export opened in time" in daemon.log_text()


def test_push_targets_and_destinations_only_where_the_configuration_says(
        daemon: Daemon) -> None:
    """pullbackd writes and connects as root: a member of the control group must not
    point it at /etc, or at another service's socket."""
    before = daemon.ctl.call("List")
    refused = call_as(BACKUP, daemon, "Start", domain="lab1", target_dir="/etc")
    assert refused["error"] == "TargetNotWritable" and "[push] dirs" in refused["reason"]
    refused = call_as(BACKUP, daemon, "Start", domain="lab1", disks=["vda"],
                      destination="nbd+unix:///?socket=/run/libvirt/libvirt-sock")
    assert refused == {"error": "InvalidParameter", "parameter": "destination"}
    assert "not allowed by [stream] destinations" in daemon.log_text()  # why, for the operator
    sneaky = f"nbd+unix:///?socket={APPLIANCES}/../../run/x.sock"
    assert call_as(BACKUP, daemon, "Start", domain="lab1", disks=["vda"],
                   destination=sneaky)["error"] == "InvalidParameter"
    # We checked the first socket, libnbd connected to the last.
    twice = f"nbd+unix:///?socket={APPLIANCES}/a.sock&socket=/run/libvirt/libvirt-sock"
    assert call_as(BACKUP, daemon, "Start", domain="lab1", disks=["vda"],
                   destination=twice)["error"] == "InvalidParameter"
    # Nothing said of a folder outside [push] dirs: not even whether it exists.
    for hidden in ("/root", "/root/no-such-folder"):
        refused = call_as(BACKUP, daemon, "Start", domain="lab1", target_dir=hidden)
        assert refused["error"] == "TargetNotWritable" and "[push] dirs" in refused["reason"]
    assert daemon.ctl.call("List") == before
