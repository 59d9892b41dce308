"""Fuzzing, as the trusted systems do it: hypothesis writes what broken and hostile clients
send, to the varlink codec, to the NBD handshake the relay reads, to the live control
socket and to the live TCP endpoint before TLS.

The sans-IO parsers must raise nothing but their protocol error and hold no more than
their bounds. The daemon, after every batch of messages, must still answer GetInfo, still
serve a running backup byte for byte, and stay within a bound of memory.

    PULLBACKD_FUZZ_EXAMPLES=10000 pytest tests/test_fuzz.py    # the full run (scripts/fuzz)

`scripts/test` runs a short one (the default, 200 examples a target).
"""

from __future__ import annotations

import json
import os
import socket
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pullbackd.control.client import Client
from pullbackd.control.codec import Decoder, ProtocolError, decode, encode, parse_call
from pullbackd.handshake import (
    IHAVEOPT,
    MAX_OPTION,
    OPT_GO,
    OPT_INFO,
    OPT_STARTTLS,
    OPTION,
    REPLY,
    REPLY_MAGIC,
    Refusal,
    Sniffer,
    greeting,
)
from pullbackd.model import nbd_url

from .conftest import Daemon, Lab, serving
from .images import MiB, connect
from .test_remote import free_port
from .test_streaming import pki  # noqa: F401 (a fixture)

EXAMPLES = int(os.environ.get("PULLBACKD_FUZZ_EXAMPLES", "200"))
#: How many examples between two checks that the daemon is whole.
CHECK_EVERY = 50
#: The daemon's resident memory may not grow past this, whatever it was sent.
RSS_LIMIT = 160 << 20
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=12), inner,
                                                                 max_size=6),
    max_leaves=24)
#: Methods the live daemon is sent: every read, and the changes that cannot touch what
#: the rest of the suite keeps (Start and Abort of names that do not exist; none of
#: Restore, Prune, DeleteChain, Migrate, which a lucky name could make real).
METHODS = st.sampled_from([
    "org.varlink.service.GetInfo", "org.varlink.service.GetInterfaceDescription",
    "org.pullbackd.Backup.Get", "org.pullbackd.Backup.List", "org.pullbackd.Backup.Watch",
    "org.pullbackd.Backup.ListCheckpoints", "org.pullbackd.Backup.Verify",
    "org.pullbackd.Backup.Finish", "org.pullbackd.Backup.Abort", "org.pullbackd.Backup.Nope",
    "org.nowhere.X", "x", ""])
PARAMETER_NAMES = st.sampled_from(["id", "domain", "consumer", "state", "more", "success",
                                   "interface", "disks", "mode", "since"]) | st.text(max_size=8)
CALLS = st.fixed_dictionaries(
    {"method": METHODS},
    optional={"parameters": st.dictionaries(PARAMETER_NAMES, JSON, max_size=4) | JSON,
              "more": st.booleans() | JSON, "oneway": st.booleans(), "upgrade": st.booleans()})


def deep(depth: int) -> bytes:
    return b'{"method":"org.pullbackd.Backup.Get","parameters":{"id":' + b"[" * depth + \
        b"]" * depth + b"}}"


#: What a varlink client may send: calls, mangled calls, raw bytes, deep nesting.
MESSAGES = st.one_of(
    CALLS.map(lambda c: json.dumps(c).encode()),
    CALLS.map(lambda c: json.dumps(c).encode()).flatmap(
        lambda m: st.integers(0, max(len(m) - 1, 0)).map(lambda i: m[:i] + b"\xff" + m[i + 1:])),
    st.binary(max_size=300).filter(lambda b: b"\0" not in b),
    st.integers(1000, 100_000).map(deep),
    st.integers(4300, 20_000).map(lambda n: b'{"method":"x.Y","parameters":{"n":' + b"9" * n
                                  + b"}}"),
)


# The parsers, without sockets.

@FUZZ
@given(st.lists(MESSAGES, max_size=5), st.integers(1, 64))
def test_the_varlink_decoder_raises_nothing_but_protocol_errors(
        messages: list[bytes], cut: int) -> None:
    stream = b"".join(m + b"\0" for m in messages)
    decoder = Decoder(limit=64 << 10)
    for start in range(0, len(stream), cut):
        try:
            frames = decoder.feed(stream[start:start + cut])
        except ProtocolError:
            decoder = Decoder(limit=64 << 10)
            continue
        assert decoder.pending <= 64 << 10
        for frame in frames:
            try:
                call = parse_call(decode(frame))
            except ProtocolError:
                continue
            assert isinstance(call.parameters, dict) and "." in call.method


#: NBD client traffic: the flags, then options of any code and length (some with a length
#: that lies), a GO now and then, and bytes of anything.
def _option(code: int, data: bytes, length: int | None) -> bytes:
    return OPTION.pack(IHAVEOPT, code, len(data) if length is None else length) + data


OPTIONS = st.builds(
    _option,
    st.sampled_from([OPT_GO, OPT_INFO, OPT_STARTTLS, 1, 2, 3, 8, 9, 10])
    | st.integers(0, 2**32 - 1),
    st.binary(max_size=64) | st.text(max_size=20).map(
        lambda name: struct.pack(">I", len(name.encode())) + name.encode() + b"\0\0"),
    st.none() | st.integers(0, 2**32 - 1))
NBD = st.tuples(st.binary(min_size=4, max_size=4),
                st.lists(OPTIONS | st.binary(max_size=40), max_size=8)).map(
    lambda t: t[0] + b"".join(t[1]))


#: A server's side: the greeting, then answers to options of any code, of any type and
#: length (some that lie), and bytes of anything.
ANSWERS = st.tuples(
    st.just(greeting()) | st.binary(max_size=18),
    st.lists(st.builds(
        lambda code, reply, data, length: REPLY.pack(
            REPLY_MAGIC, code, reply, len(data) if length is None else length) + data,
        st.sampled_from([OPT_GO, OPT_INFO, OPT_STARTTLS, 8]) | st.integers(0, 2**32 - 1),
        st.sampled_from([1, 3, (1 << 31) + 1, (1 << 31) + 6]) | st.integers(0, 2**32 - 1),
        st.binary(max_size=40), st.none() | st.integers(0, 2**32 - 1))
        | st.binary(max_size=40), max_size=8)).map(lambda t: t[0] + b"".join(t[1]))


@FUZZ
@given(NBD, ANSWERS, st.integers(1, 40))
def test_the_sniffer_and_the_refusal_hold_no_more_than_their_bounds(
        traffic: bytes, answers: bytes, cut: int) -> None:
    sniffer, refusal = Sniffer(), Refusal("no room")
    for start in range(0, max(len(traffic), len(answers)), cut):
        chunk = traffic[start:start + cut]
        sniffer.feed(chunk)
        sniffer.answer(answers[start:start + cut])
        state = sniffer.state()
        assert len(state["buffer"]) // 2 <= MAX_OPTION + OPTION.size + 32
        assert len(state["answers"]) // 2 < REPLY.size and len(state["asked"]) <= 64
        if not refusal.done:
            refusal.feed(chunk)


# The daemon, live.

@pytest.fixture(scope="module")
def daemon(lab: Lab, pki: Path,  # noqa: F811
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    with serving(tmp_path_factory.mktemp("pullbackd"), lab.uri, exports=(
            f'tcp_listen = "127.0.0.1:{free_port()}"\ntcp_host = "localhost"\n'
            f'tls_certificates = "{pki}"\n')) as d:
        yield d


@pytest.fixture(scope="module")
def backup(daemon: Daemon) -> Iterator[tuple[dict[str, Any], bytes]]:
    """A running backup, and the first MiB of its disk as QEMU serves it."""
    job = daemon.ctl.job("Start", domain="lab2", disks=["vda"], consumer="fuzz")
    [disk] = job["disks"]
    h = connect(nbd_url(daemon.exports / ".qemu" / f"{job['id']}.sock", disk["export"]))
    expected = h.pread(MiB, 0)
    h.shutdown()
    yield job, expected
    daemon.ctl.call("Abort", id=job["id"])


class Whole:
    """Checks, every CHECK_EVERY examples and at the end, that the daemon is whole."""

    def __init__(self, daemon: Daemon, backup: tuple[dict[str, Any], bytes]) -> None:
        self.daemon, (self.job, self.expected) = daemon, backup
        self.count = 0

    def step(self) -> None:
        self.count += 1
        if self.count % CHECK_EVERY == 0:
            self.check()

    def check(self) -> None:
        assert self.daemon.proc.poll() is None, self.daemon.log_text()[-4000:]
        with Client(self.daemon.socket, timeout=30) as client:
            assert client.call("org.varlink.service.GetInfo")["vendor"] == "pullbackd"
        h = connect(self.job["disks"][0]["url"])
        assert h.pread(MiB, 0) == self.expected
        h.shutdown()
        rss = int(next(line.split()[1] for line in
                       Path(f"/proc/{self.daemon.proc.pid}/status").read_text().splitlines()
                       if line.startswith("VmRSS:"))) * 1024
        assert rss < RSS_LIMIT, rss


def exchange(address: str | tuple[str, int], data: bytes) -> None:
    """Send `data` and nothing more, read what comes back until the other side is done
    (or a moment passed), hang up."""
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    with socket.socket(family) as s:
        s.settimeout(0.2)
        s.connect(address)
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            while s.recv(65536):
                pass
        except (TimeoutError, ConnectionError):
            pass


def test_the_control_socket_survives_what_clients_send(
        daemon: Daemon, backup: tuple[dict[str, Any], bytes]) -> None:
    whole = Whole(daemon, backup)

    @FUZZ
    @given(st.lists(MESSAGES, min_size=1, max_size=3))
    def send(messages: list[bytes]) -> None:
        exchange(str(daemon.socket), b"".join(m + b"\0" for m in messages))
        whole.step()

    send()
    whole.check()
    assert "call crashed" not in daemon.log_text()


def test_the_tcp_endpoint_survives_what_clients_send_before_tls(
        daemon: Daemon, backup: tuple[dict[str, Any], bytes]) -> None:
    whole = Whole(daemon, backup)
    url = backup[0]["disks"][0]["remote_url"]
    port = int(url.split(":")[2].split("/")[0])

    @FUZZ
    @given(NBD)
    def send(traffic: bytes) -> None:
        exchange(("127.0.0.1", port), traffic)
        whole.step()

    send()
    whole.check()


def test_encode_round_trips_what_the_decoder_accepts() -> None:
    """The fuzzers' own premise: a call encoded and decoded is the same call."""
    call = {"method": "a.B", "parameters": {"x": [1, {"y": None}]}}
    [frame] = Decoder().feed(encode(call))
    assert parse_call(decode(frame)).parameters == call["parameters"]
