"""pullbackctl against a stand-in pullbackd: what a script gets from it, its exit status and
its output, whatever the daemon answers (no lab needed: the daemon's answers are given)."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import select
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pullbackd import cli
from pullbackd.control.client import Client
from pullbackd.control.codec import Decoder, Reply, decode, encode, parse_call


@contextlib.contextmanager
def answering(tmp_path: Path, replies: dict[str, Reply],
              slow: dict[str, float] | None = None) -> Iterator[Path]:
    """A varlink socket that answers each call of a method in `replies` (by its short
    name) with its reply, and any other with MethodNotFound; a method in `slow` after
    that many seconds (the time it takes: a long Verify). Its path."""
    path = tmp_path / "control.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen()

    def serve(conn: socket.socket) -> None:
        decoder = Decoder()
        with conn, contextlib.suppress(ConnectionError):  # hung up before the answer
            while data := conn.recv(65536):
                for frame in decoder.feed(data):
                    call = parse_call(decode(frame))
                    threading.Event().wait((slow or {}).get(call.member, 0))
                    reply = replies.get(call.member, Reply(
                        {"method": call.method}, "org.varlink.service.MethodNotFound"))
                    conn.sendall(encode(reply.to_message()))

    def accept() -> None:
        with contextlib.suppress(OSError):  # closed: the test is over
            while True:
                threading.Thread(target=serve, args=(listener.accept()[0],),
                                 daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield path
    finally:
        listener.shutdown(socket.SHUT_RDWR)
        listener.close()
        thread.join(10)


def pullbackctl(sock: Path, capsys: pytest.CaptureFixture[str], *args: str
                ) -> tuple[int, str, str]:
    """Its exit status, standard output and standard error."""
    status = cli.main(["--socket", str(sock), *args])
    out, err = capsys.readouterr()
    return status, out, err


DAMAGED: dict[str, Any] = {"checked": 3,
                           "problems": ["0002.qcow2: 1048576 bytes at 1048576 differ"]}
WHOLE: dict[str, Any] = {"checked": 3, "problems": []}
NONE: dict[str, Any] = {"checked": 0, "problems": []}


@pytest.mark.parametrize("json_output", [False, True], ids=["table", "json"])
def test_verify_exits_1_when_it_finds_a_problem_whatever_it_prints(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], json_output: bool) -> None:
    """A monitoring script runs `pullbackctl --json verify` and checks its status: it
    exited 0 with damaged backups (only the table's output set it)."""
    given = ["--json"] if json_output else []
    for reply, status in ((DAMAGED, 1), (WHOLE, 0)):
        with answering(tmp_path, {"Verify": Reply(reply)}) as sock:
            done, out, _ = pullbackctl(sock, capsys, *given, "verify", "vm1")
        assert done == status, out
        if json_output:
            assert json.loads(out) == reply
        else:
            assert out.splitlines()[-1] == f"3 backups checked, {len(reply['problems'])} problems"
        (tmp_path / "control.sock").unlink()


@pytest.mark.parametrize("json_output", [False, True], ids=["table", "json"])
def test_verify_that_found_no_backup_to_check_does_not_pass(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], json_output: bool) -> None:
    """A domain or consumer misspelt (or whose backups are all gone) has nothing to
    verify: that exited 0, "0 backups checked, 0 problems", and a check that never
    checked anything passed every night."""
    given = ["--json"] if json_output else []
    with answering(tmp_path, {"Verify": Reply(NONE)}) as sock:
        status, out, err = pullbackctl(sock, capsys, *given, "verify", "vm1", "--consumer",
                                       "nightyl")
    assert status == 1
    assert "no backup of vm1 (consumer nightyl) in the repository" in err
    if json_output:
        assert json.loads(out) == NONE


def domain_files(data: bytes) -> dict[str, Reply]:
    """A job's domain files as pullbackd answers them: one file, its sha256 that of `data`."""
    return {"DomainFiles": Reply({"files": [{"name": "definition.xml", "size": len(data),
                                             "sha256": hashlib.sha256(data).hexdigest()}],
                                  "missing": []}),
            "ReadDomainFile": Reply({"data": base64.b64encode(data).decode(), "next": None})}


def test_backup_files_that_cannot_be_saved_here_is_not_an_unreachable_daemon(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """pullbackd answered; pullbackctl could not do its own part (the folder exists, a
    file's bytes do not match their checksum). It said "cannot talk to pullbackd on
    SOCKET" and exited 2, as if the daemon were down: it says what failed here, exits
    1, and a daemon that is down still exits 2."""
    folder = tmp_path / "files"
    folder.mkdir()
    with answering(tmp_path, domain_files(b"<domain/>")) as sock:
        status, out, err = pullbackctl(sock, capsys, "backup", "files", "5d0c9a1e2f3b",
                                       "--to", str(folder))
        assert (status, out) == (1, "")
        assert "cannot talk to pullbackd" not in err
        assert f"cannot create {folder}: File exists; name a new folder" in err
    (tmp_path / "control.sock").unlink()
    changed = domain_files(b"<domain/>") | {"ReadDomainFile": Reply(
        {"data": base64.b64encode(b"<domain>").decode(), "next": None})}
    with answering(tmp_path, changed) as sock:
        status, out, err = pullbackctl(sock, capsys, "backup", "files", "5d0c9a1e2f3b",
                                       "--to", str(tmp_path / "new"))
        assert (status, out) == (1, "")
        assert "definition.xml changed while it was read" in err
        assert "cannot talk to pullbackd" not in err
    status, _, err = pullbackctl(tmp_path / "control.sock", capsys, "backup", "files",
                                 "5d0c9a1e2f3b", "--to", str(tmp_path / "newer"))
    assert status == 2 and "cannot talk to pullbackd" in err


def test_a_socket_that_does_not_answer_varlink_is_said_so(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--socket names another service's socket: pullbackctl ended in a traceback."""
    path = tmp_path / "other.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))
        listener.listen()

        def answer() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.recv(65536)
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n\0")

        thread = threading.Thread(target=answer, daemon=True)
        thread.start()
        status, out, err = pullbackctl(path, capsys, "jobs")
        thread.join(10)
    assert (status, out) == (2, "")
    assert f"pullbackctl: cannot talk to pullbackd on {path}: it does not answer as " \
           "varlink" in err


@contextlib.contextmanager
def hung(tmp_path: Path, backlog: int = 8) -> Iterator[Path]:
    """A pullbackd that hangs: its control socket listens, and the kernel accepts
    connections into its backlog, but it never takes one, nor answers. Its path; once
    over, each connection made is reset."""
    path = tmp_path / "hung.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))
        listener.listen(backlog)
        yield path


def waited_for(sock: Path, capsys: pytest.CaptureFixture[str], *args: str
               ) -> tuple[int, str, str]:
    """pullbackctl's status and output, or AssertionError if it is still waiting after
    10 s (it is then cut off: the caller's socket goes away)."""
    done: list[tuple[int, str, str]] = []
    thread = threading.Thread(target=lambda: done.append(pullbackctl(sock, capsys, *args)),
                              daemon=True)
    thread.start()
    thread.join(10)
    assert done, f"pullbackctl {' '.join(args)} still waits for a daemon that never answers"
    return done[0]


def test_a_daemon_that_never_answers_is_said_so_within_the_timeout(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A hung pullbackd (the kernel accepts the connection; nothing answers it): every
    pullbackctl waited forever, a monitoring script's too. It waits --timeout seconds for
    an answer, then says what to look at and exits 2, whether the call only reads
    (`jobs`) or would change something (`backup abort`: nothing was sent for it), and
    when the socket's backlog is full (connections refused at once)."""
    monkeypatch.setattr(cli, "DEFAULT_TIMEOUT", 0.2, raising=False)  # 30 s, in a test
    for args in (["jobs"], ["--timeout", "0.2", "backup", "abort", "5d0c9a1e2f3b"],
                 ["--timeout", "0.2", "watch"]):
        with hung(tmp_path) as sock:
            status, out, err = waited_for(sock, capsys, *args)
        assert (status, out) == (2, ""), args
        assert err == (f"pullbackctl: pullbackd does not answer on {sock} (waited 0.2 s): "
                       "is it hung? see `systemctl status pullbackd` and `journalctl -u "
                       "pullbackd`; --timeout S waits longer (0: as long as it takes)\n")
        sock.unlink()
    with hung(tmp_path, backlog=0) as sock, socket.socket(socket.AF_UNIX) as queued:
        queued.connect(str(sock))  # the one place in the backlog
        status, _, err = waited_for(sock, capsys, "--timeout", "0.2", "jobs")
    assert status == 2 and "pullbackd does not answer on" in err


@contextlib.contextmanager
def restarting(folder: Path, first: str) -> Iterator[tuple[Path, list[str]]]:
    """A pullbackd whose run stops as a call comes: its first connection is closed with the
    call in it, unread (`first` "unread"), or once it read it ("read": a run that dies while
    doing it), or before it came ("closed"); the next one is answered (the next run). Its
    path (in the new `folder`), and what each connection got, in order: `first`, or the
    method answered."""
    folder.mkdir()
    path = folder / "control.sock"
    got: list[str] = []
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen()

    def serve() -> None:
        with contextlib.suppress(OSError):  # closed: the test is over
            with listener.accept()[0] as conn:
                if first != "closed":
                    select.select([conn], [], [], 10)  # the call is in it
                if first == "read":
                    conn.recv(65536)
            got.append(first)
            conn, _ = listener.accept()
            with conn:
                call = parse_call(decode(conn.recv(65536)[:-1]))
                got.append(call.member)
                conn.sendall(encode(Reply({"jobs": [], "next": None}).to_message()))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield path, got
    finally:
        listener.shutdown(socket.SHUT_RDWR)
        listener.close()
        thread.join(10)


def test_a_call_lost_in_a_restart_unread_is_sent_again(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """pullbackd stopping closed a connection with the call in it, unread: its caller got
    ECONNRESET, and the call failed though the next run would have answered it (seen in
    tests/test_host.py's restarts). On a Unix socket that error, or EPIPE as the call is
    sent, says the call was never read, so pullbackctl sends it again, on a new connection:
    the next run answers. A call that was read when the connection closed is not sent again
    (it may have been done: a Start, an Abort); pullbackctl says it could not talk to it."""
    with restarting(tmp_path / "a", "unread") as (sock, got):
        status, out, err = pullbackctl(sock, capsys, "--json", "jobs")
    assert (status, err) == (0, "")
    assert json.loads(out) == {"jobs": []}
    assert got == ["unread", "List"]
    with restarting(tmp_path / "b", "closed") as (sock, got), Client(sock, 10) as client:
        while not got:  # closed before the call is sent: EPIPE
            threading.Event().wait(0.01)
        assert client.call("org.pullbackd.Backup.List") == {"jobs": [], "next": None}
    assert got == ["closed", "List"]
    with restarting(tmp_path / "c", "read") as (sock, got):
        status, out, err = pullbackctl(sock, capsys, "--json", "jobs")
    assert (status, out) == (2, "")
    assert "cannot talk to pullbackd" in err and "closed the connection" in err
    assert got == ["read"]


def test_a_long_call_is_not_cut_off_by_the_timeout(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--timeout bounds how long pullbackd takes to answer, not how long a call that
    changes something or runs long takes once it answered (a Verify reads every backup,
    for hours; pullbackctl cut off would not know what was done); and a read takes as
    long as it takes with --timeout 0."""
    with answering(tmp_path, {"Verify": Reply(WHOLE), "List": Reply({"jobs": [], "next": None})},
                   slow={"Verify": 0.6, "List": 0.6}) as sock:
        status, out, _ = waited_for(sock, capsys, "--timeout", "0.2", "verify", "vm1")
        assert (status, out) == (0, "3 backups checked, 0 problems\n")
        status, out, err = waited_for(sock, capsys, "--timeout", "0.2", "jobs")
        assert status == 2 and "pullbackd does not answer on" in err
        status, out, _ = waited_for(sock, capsys, "--timeout", "0", "jobs")
        assert (status, out.split()) == (0, ["ID", "DOMAIN", "CONSUMER", "STATE", "MODE",
                                             "CREATED", "DISKS", "DONE"])


def test_backup_files_cut_off_says_where_what_was_saved_is(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A daemon that stops answering as `backup files` reads the files (here: slower than
    --timeout) leaves the new folder with what was saved so far: the message named the
    daemon alone, and the operator found a folder that is no backup of the files."""
    folder = tmp_path / "files"
    with answering(tmp_path, domain_files(b"<domain/>"), slow={"ReadDomainFile": 5}) as sock:
        status, out, err = pullbackctl(sock, capsys, "--timeout", "0.5", "backup", "files",
                                       "5d0c9a1e2f3b", "--to", str(folder))
    assert (status, out) == (2, "")
    assert "pullbackd does not answer" in err
    assert f"what was saved is in {folder}: remove it, and save again into a new folder" \
        in err
    assert folder.is_dir()


def test_an_error_says_what_it_means_and_what_to_do(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The daemon sends an error's name and parameters alone: pullbackctl printed those,
    and an operator refused a backup (another's chain) was not told why, nor what to do.
    The first line stays as scripts read it; an error of another interface has no second."""
    refused = Reply({"domain": "vm1", "consumer": "default", "owner": "appliance-a"},
                    "org.pullbackd.Backup.ChainOfAnother")
    strange = Reply({"what": 1}, "org.example.Strange")
    with answering(tmp_path, {"Start": refused, "Abort": strange}) as sock:
        status, _, err = pullbackctl(sock, capsys, "backup", "start", "vm1")
        assert status == 1
        first, second = err.splitlines()
        assert json.loads(first.removeprefix(
            "error: org.pullbackd.Backup.ChainOfAnother ")) == refused.parameters
        assert second.startswith("pullbackctl: the chain of consumer 'default' on 'vm1' is "
                                 "appliance-a's")
        assert "back up as a consumer of your own" in second
        status, _, err = pullbackctl(sock, capsys, "backup", "abort", "x")
        assert (status, err) == (1, 'error: org.example.Strange {"what": 1}\n')


def test_who_owns_a_chain_and_a_job_is_shown(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A Start refused with ChainOfAnother: `checkpoints` shows whose each chain is, and
    `show` who started a job (a uid the daemon sends, named here; none: "-")."""
    chain = [{"name": f"pullbackd.c.{n}", "consumer": "c", "job": n,
              "created": "2026-12-04T00:00:00.000Z", "disks": ["vda"], "owner": owner}
             for n, owner in (("a1", None), ("b2", 0))]
    job = {"id": "b2", "domain": "vm1", "state": "ready", "consumer": "c", "mode": "full",
           "disks": [], "owner": 0}
    with answering(tmp_path, {"ListCheckpoints": Reply({"checkpoints": chain}),
                              "Get": Reply({"job": job})}) as sock:
        _, out, _ = pullbackctl(sock, capsys, "checkpoints", "vm1")
        assert [line.split()[:3] for line in out.splitlines()] == [
            ["CHECKPOINT", "CONSUMER", "OWNER"], ["pullbackd.c.a1", "c", "-"],
            ["pullbackd.c.b2", "c", "root"]]
        _, out, _ = pullbackctl(sock, capsys, "show", "b2")
        assert "owner       root" in out.splitlines()
