"""Bad input on the control socket: a typed error, nothing changed, the daemon keeps serving."""

from __future__ import annotations

import contextlib
import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
import varlink

from pullbackd import api
from pullbackd.control.codec import Decoder, decode, encode

from .conftest import Daemon


@pytest.fixture(autouse=True)
def still_serving(daemon: Daemon) -> Iterator[None]:
    """After every test here: the daemon answers, and no job was left half-made."""
    before = daemon.ctl.call("List")["jobs"]
    yield
    assert daemon.proc.poll() is None, daemon.log_text()
    after = daemon.ctl.call("List")["jobs"]
    assert [j for j in after if j["state"] == "starting"] == []
    assert len(after) >= len(before)


def raw_exchange(daemon: Daemon, payload: bytes, expect: int) -> tuple[list[dict[str, Any]], bool]:
    """Send bytes, read `expect` replies; return them and whether the daemon then hung up."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(str(daemon.socket))
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(payload)
        decoder, replies = Decoder(), list[dict[str, Any]]()
        while len(replies) < expect:
            data = sock.recv(65536)
            if not data:
                return replies, True
            replies += [decode(frame) for frame in decoder.feed(data)]
        sock.settimeout(0.5)
        try:
            return replies, sock.recv(1) == b""
        except TimeoutError:
            return replies, False
        except ConnectionResetError:
            return replies, True


def error_of(reply: dict[str, Any]) -> str:
    return str(reply.get("error", "")).rpartition(".")[2]


def test_unknown_domain(daemon: Daemon) -> None:
    e = daemon.ctl.error("Start", domain="no-such-domain")
    assert e.short_name == "NoSuchDomain" and e.parameters == {"domain": "no-such-domain"}


def test_a_shut_off_domain_is_checked_too(daemon: Daemon) -> None:
    """lab3 is shut off: its backups are pullbackd's own (test_offline.py), and a request
    they cannot serve is refused the same way."""
    e = daemon.ctl.error("Start", domain="lab3", disks=["vda", "vdz"])
    assert e.short_name == "NoSuchDisk" and e.parameters == {"domain": "lab3", "disk": "vdz"}


def test_unknown_disk(daemon: Daemon) -> None:
    e = daemon.ctl.error("Start", domain="lab1", disks=["vda", "vdz"])
    assert e.short_name == "NoSuchDisk" and e.parameters == {"domain": "lab1", "disk": "vdz"}


@pytest.mark.parametrize(("disks", "parameter"), [([], "disks"), (["vda", "vda"], "disks")])
def test_bad_disk_lists(daemon: Daemon, disks: list[str], parameter: str) -> None:
    e = daemon.ctl.error("Start", domain="lab1", disks=disks)
    assert e.name == "org.varlink.service.InvalidParameter"
    assert e.parameters == {"parameter": parameter}


def test_second_backup_of_a_domain_is_refused_at_once(daemon: Daemon) -> None:
    job = daemon.ctl.job("Start", domain="lab1")
    try:
        e = daemon.ctl.error("Start", domain="lab1", disks=["vdb"])
        assert e.short_name == "BackupInProgress"
        assert e.parameters == {"domain": "lab1", "id": job["id"]}
        assert daemon.ctl.job("Get", id=job["id"])["state"] == "ready"
    finally:
        daemon.ctl.call("Finish", id=job["id"])


def test_unknown_job(daemon: Daemon) -> None:
    for method in ("Get", "Finish", "Abort"):
        e = daemon.ctl.error(method, id="0123456789ab")
        assert e.short_name == "NoSuchJob" and e.parameters == {"id": "0123456789ab"}


def test_finish_and_abort_are_idempotent(daemon: Daemon) -> None:
    job = daemon.ctl.job("Start", domain="lab1")
    finished = daemon.ctl.job("Finish", id=job["id"])
    assert finished["state"] == "completed"
    assert daemon.ctl.job("Finish", id=job["id"]) == finished
    assert daemon.ctl.job("Abort", id=job["id"]) == finished  # ended is ended

    job = daemon.ctl.job("Start", domain="lab1")
    aborted = daemon.ctl.job("Abort", id=job["id"])
    assert aborted["state"] == "aborted"
    assert daemon.ctl.job("Abort", id=job["id"]) == aborted
    assert daemon.ctl.job("Finish", id=job["id"]) == aborted


MALFORMED = {
    "not-json": b"{this is not json\0", "array": b"[1,2,3]\0", "method-type": b'{"method": 5}\0',
    "flag-type": b'{"method": "x.Y", "more": 3}\0',
    # Each of these took the whole daemon down once: nested 100,000 deep, 5,000 digits.
    "deep": b'{"method": "org.pullbackd.Backup.Get", "parameters": {"id": ' + b"[" * 100_000
    + b"]" * 100_000 + b"}}\0",
    "huge-int": b'{"method": "org.pullbackd.Backup.Get", "parameters": {"id": ' + b"9" * 5000
    + b"}}\0",
}
#: A Start of lab1 cut off before its end: no call at all.
HALF_A_START = b'{"method": "org.pullbackd.Backup.Start", "parameters": {"domain": "lab1"'


@pytest.mark.parametrize("payload", list(MALFORMED.values()), ids=list(MALFORMED))
def test_malformed_messages_get_an_error_and_the_connection_closes(
        daemon: Daemon, payload: bytes) -> None:
    replies, closed = raw_exchange(daemon, payload, 1)
    assert [error_of(r) for r in replies] == ["ProtocolViolation"]
    assert replies[0]["error"] == f"{api.INTERFACE}.ProtocolViolation"
    assert closed
    assert daemon.proc.poll() is None
    daemon.ctl.call("List")  # still serving (a dead daemon fails the call)


def test_calls_before_a_malformed_one_are_answered(daemon: Daemon) -> None:
    payload = encode({"method": "org.varlink.service.GetInfo"}) + b"{oops\0"
    replies, closed = raw_exchange(daemon, payload, 2)
    assert replies[0]["parameters"]["vendor"] == "pullbackd"
    assert error_of(replies[1]) == "ProtocolViolation"
    assert closed


def test_message_over_one_mib_is_refused(daemon: Daemon) -> None:
    huge = encode({"method": f"{api.INTERFACE}.Get", "parameters": {"id": "x" * (1 << 20)}})
    replies, closed = raw_exchange(daemon, huge, 1)
    assert [error_of(r) for r in replies] == ["ProtocolViolation"]
    assert "over" in replies[0]["parameters"]["reason"]
    assert closed


@pytest.mark.parametrize(("method", "params", "error", "parameters"), [
    ("org.example.Nope.Get", {}, "org.varlink.service.InterfaceNotFound",
     {"interface": "org.example.Nope"}),
    (f"{api.INTERFACE}.Explode", {}, "org.varlink.service.MethodNotFound",
     {"method": f"{api.INTERFACE}.Explode"}),
    (f"{api.INTERFACE}.Start", {"domain": 5}, "org.varlink.service.InvalidParameter",
     {"parameter": "domain"}),
    (f"{api.INTERFACE}.Start", {"domain": "lab1", "disks": "vda"},
     "org.varlink.service.InvalidParameter", {"parameter": "disks"}),
    (f"{api.INTERFACE}.Start", {"domain": "lab1", "disks": ["vda", 1]},
     "org.varlink.service.InvalidParameter", {"parameter": "disks[1]"}),
    (f"{api.INTERFACE}.Start", {}, "org.varlink.service.InvalidParameter",
     {"parameter": "domain"}),
    (f"{api.INTERFACE}.Get", {"id": "x", "extra": True}, "org.varlink.service.InvalidParameter",
     {"parameter": "extra"}),
    ("org.varlink.service.GetInterfaceDescription", {"interface": "org.example.Nope"},
     "org.varlink.service.InterfaceNotFound", {"interface": "org.example.Nope"}),
])
def test_unknown_or_mistyped_calls_keep_the_connection(
        daemon: Daemon, method: str, params: dict[str, Any], error: str,
        parameters: dict[str, Any]) -> None:
    call = encode({"method": method, "parameters": params})
    then = encode({"method": f"{api.INTERFACE}.List"})
    replies, closed = raw_exchange(daemon, call + then, 2)
    assert replies[0] == {"error": error, "parameters": parameters}
    assert "jobs" in replies[1]["parameters"], "the same connection still serves"
    assert not closed


def test_oneway_gets_no_reply_and_pipelined_calls_answer_in_order(daemon: Daemon) -> None:
    calls = (encode({"method": f"{api.INTERFACE}.List", "oneway": True})
             + encode({"method": f"{api.INTERFACE}.Get", "parameters": {"id": "a"}})
             + encode({"method": "org.varlink.service.GetInfo"}))
    replies, closed = raw_exchange(daemon, calls, 2)
    assert error_of(replies[0]) == "NoSuchJob"
    assert replies[1]["parameters"]["vendor"] == "pullbackd"
    assert not closed


def dropped_halves(daemon: Daemon) -> int:
    """How many connections the daemon saw end in the middle of HALF_A_START."""
    events = (json.loads(line) for line in daemon.log_text().splitlines()
              if '"disconnected"' in line)
    return sum(1 for e in events
               if e.get("event") == "disconnected" and e.get("unread") == len(HALF_A_START))


def send_half_a_start(daemon: Daemon) -> None:
    """Connect, send HALF_A_START, hang up; return once the daemon dropped the connection."""
    seen = dropped_halves(daemon)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(daemon.socket))
        sock.sendall(HALF_A_START)
    deadline = time.monotonic() + 30
    while dropped_halves(daemon) == seen:  # bounded: the daemon logs it at once
        assert time.monotonic() < deadline, "the daemon did not see the client go"
        time.sleep(0.05)


def test_client_gone_mid_message(daemon: Daemon) -> None:
    known = [j["id"] for j in daemon.ctl.call("List")["jobs"]]
    send_half_a_start(daemon)
    # The half call started nothing, and the daemon serves on.
    assert daemon.proc.poll() is None
    assert [j["id"] for j in daemon.ctl.call("List")["jobs"]] == known


def test_client_gone_before_its_reply_still_gets_a_whole_job(daemon: Daemon) -> None:
    known = {j["id"] for j in daemon.ctl.call("List")["jobs"]}
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(daemon.socket))
        sock.sendall(encode({"method": f"{api.INTERFACE}.Start",
                             "parameters": {"domain": "lab1"}}))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # bounded: the Start takes well under a second
        new = [j for j in daemon.ctl.call("List")["jobs"] if j["id"] not in known]
        if new and new[0]["state"] != "starting":
            break
        time.sleep(0.1)
    assert [j["state"] for j in new] == ["ready"]
    assert daemon.ctl.job("Finish", id=new[0]["id"])["state"] == "completed"


def test_reference_varlink_client(daemon: Daemon) -> None:
    """The reference implementation talks to us: GetInfo, the interface text, a call."""
    daemon.ctl.call("Finish", id=daemon.ctl.job("Start", domain="lab1")["id"])
    with varlink.Client(address=f"unix:{daemon.socket}") as client:
        assert set(client.get_interfaces()) == {"org.varlink.service", api.INTERFACE}
        assert client.info["vendor"] == "pullbackd"
        iface = client.get_interface(api.INTERFACE)
        assert iface.name == api.INTERFACE
        with client.open(api.INTERFACE, namespaced=False) as backup:
            jobs = backup.List()["jobs"]
    # The reference client leaves out fields that are null; so does the comparison.
    assert jobs == without_nulls(daemon.ctl.call("List")["jobs"])
    assert jobs


def without_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [without_nulls(v) for v in value]
    return value


def test_list_filters(daemon: Daemon) -> None:
    daemon.ctl.call("Finish", id=daemon.ctl.job("Start", domain="lab1")["id"])
    everything = daemon.ctl.call("List")["jobs"]
    lab1 = daemon.ctl.call("List", domain="lab1")["jobs"]
    assert lab1 == [j for j in everything if j["domain"] == "lab1"] and lab1
    completed = daemon.ctl.call("List", domain="lab1", state="completed")["jobs"]
    assert completed == [j for j in lab1 if j["state"] == "completed"] and completed
    assert daemon.ctl.call("List", domain="no-such-domain") == {"jobs": [], "next": None}
    e = daemon.ctl.error("List", state="finished")
    assert (e.name, e.parameters) == ("org.varlink.service.InvalidParameter",
                                      {"parameter": "state"})


def test_domains_stay_usable_after_bad_input(daemon: Daemon) -> None:
    """After every kind of malformed message and a Start cut off mid-message, a normal
    backup of the domain that Start named works."""
    for payload in MALFORMED.values():
        replies, closed = raw_exchange(daemon, payload, 1)
        assert [error_of(r) for r in replies] == ["ProtocolViolation"] and closed
    send_half_a_start(daemon)
    job = daemon.ctl.job("Start", domain="lab1")
    assert job["state"] == "ready"
    assert daemon.ctl.job("Finish", id=job["id"])["state"] == "completed"


def test_list_pages_and_its_replies_stay_small(daemon: Daemon) -> None:
    for _ in range(3):
        daemon.ctl.call("Abort", id=daemon.ctl.job("Start", domain="lab1")["id"])
    everything = daemon.ctl.call("List")["jobs"]
    assert len(everything) >= 3
    first = daemon.ctl.call("List", limit=2)
    assert [j["id"] for j in first["jobs"]] == [j["id"] for j in everything[:2]]
    assert first["next"] is not None
    rest = daemon.ctl.call("List", after=first["next"], limit=200)
    assert [j["id"] for j in first["jobs"] + rest["jobs"]] == [j["id"] for j in everything]
    assert rest["next"] is None
    assert all(not j["appliance"] or j["appliance"]["sessions"] == [] for j in everything)
    assert daemon.ctl.error("List", limit=201).parameters == {"parameter": "limit"}
    assert daemon.ctl.error("List", after="nope").short_name == "NoSuchJob"
