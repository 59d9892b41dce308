"""pullbackctl against a stand-in pullbackd: what a script gets from it, its exit status and
its output, whatever the daemon answers (no lab needed: the daemon's answers are given)."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pullbackd import cli
from pullbackd.control.codec import Decoder, Reply, decode, encode, parse_call


@contextlib.contextmanager
def answering(tmp_path: Path, replies: dict[str, Reply]) -> Iterator[Path]:
    """A varlink socket that answers each call of a method in `replies` (by its short
    name) with its reply, and any other with MethodNotFound; its path."""
    path = tmp_path / "control.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen()

    def serve(conn: socket.socket) -> None:
        decoder = Decoder()
        with conn:
            while data := conn.recv(65536):
                for frame in decoder.feed(data):
                    call = parse_call(decode(frame))
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
