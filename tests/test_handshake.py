"""The relay's reading of the NBD protocol, without sockets."""

from __future__ import annotations

import struct

from pullbackd.handshake import (
    CMD_DISC,
    CMD_READ,
    CMD_WRITE,
    EXTENDED_REQUEST_MAGIC,
    IHAVEOPT,
    NBDMAGIC,
    OPT_ABORT,
    OPT_EXPORT_NAME,
    OPT_GO,
    OPT_INFO,
    OPT_STARTTLS,
    OPT_STRUCTURED_REPLY,
    REP_ACK,
    REP_ERR_POLICY,
    REP_ERR_UNKNOWN,
    REPLY_MAGIC,
    REQUEST_MAGIC,
    Phase,
    Refusal,
    Sniffer,
    greeting,
    option_reply,
)

FLAGS = struct.pack(">I", 3)


def option(code: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", IHAVEOPT, code, len(data)) + data


def go(name: str, code: int = OPT_GO) -> bytes:
    encoded = name.encode()
    return option(code, struct.pack(">I", len(encoded)) + encoded + struct.pack(">H", 0))


def request(command: int, offset: int, length: int, payload: bytes = b"") -> bytes:
    return struct.pack(">IHHQQI", REQUEST_MAGIC, 0, command, 7, offset, length) + payload


def opened(name: str) -> Sniffer:
    """A sniffer that saw the server accept a GO of `name`."""
    sniffer = Sniffer()
    sniffer.answer(greeting())
    sniffer.feed(FLAGS + go(name))
    sniffer.answer(option_reply(OPT_GO, REP_ACK))
    return sniffer


def test_follows_a_session_fed_a_byte_at_a_time() -> None:
    handshake = FLAGS + option(8) + go("vdb")
    answers = greeting() + option_reply(8, REP_ACK) + info() + option_reply(OPT_GO, REP_ACK)
    requests = (request(CMD_READ, 0, 4096) + request(CMD_WRITE, 0, 5, b"hello")
                + request(CMD_READ, 1 << 20, 1 << 20) + request(CMD_DISC, 0, 0))
    sniffer = Sniffer()
    for i in range(len(handshake)):
        sniffer.feed(handshake[i:i + 1])
    for i in range(len(answers)):
        sniffer.answer(answers[i:i + 1])
    for i in range(len(requests)):
        sniffer.feed(requests[i:i + 1])
    assert sniffer.export == "vdb"
    assert sniffer.read == 4096 + (1 << 20)
    assert sniffer.requests == 4
    assert sniffer.phase == Phase.CLOSED


def test_a_write_payload_that_looks_like_a_request_is_not_counted() -> None:
    fake = request(CMD_READ, 0, 1 << 30)
    sniffer = opened("vda")
    sniffer.feed(request(CMD_WRITE, 0, len(fake))[:-3])
    sniffer.feed(request(CMD_WRITE, 0, len(fake))[-3:] + fake[:10])
    sniffer.feed(fake[10:] + request(CMD_READ, 0, 512))
    assert sniffer.read == 512


def test_export_name_starts_transmission_at_once() -> None:
    sniffer = Sniffer()
    sniffer.feed(FLAGS + option(OPT_EXPORT_NAME, b"vda") + request(CMD_READ, 0, 100))
    assert (sniffer.export, sniffer.read, sniffer.phase) == ("vda", 100, Phase.TRANSMISSION)


def test_extended_headers_are_read_too() -> None:
    sniffer = opened("vda")
    sniffer.feed(struct.pack(">IHHQQQ", EXTENDED_REQUEST_MAGIC, 0, CMD_READ, 1, 0, 1 << 33))
    assert sniffer.read == 1 << 33


REP_INFO = 3


def info(option: int = OPT_GO) -> bytes:
    """A server's NBD_REP_INFO (NBD_INFO_EXPORT: size, flags) to `option`."""
    return option_reply(option, REP_INFO, struct.pack(">HQH", 0, 1 << 30, 1))


def test_an_export_is_open_once_the_server_acknowledged_go() -> None:
    sniffer = Sniffer()
    sniffer.answer(greeting())
    sniffer.feed(FLAGS + option(OPT_STRUCTURED_REPLY) + go("vda"))
    sniffer.answer(option_reply(OPT_STRUCTURED_REPLY, REP_ACK) + info())
    assert (sniffer.opened, sniffer.export, sniffer.answering) == (False, None, True)
    sniffer.answer(option_reply(OPT_GO, REP_ACK))
    assert (sniffer.opened, sniffer.export, sniffer.answering) == (True, "vda", False)


def test_info_or_a_refused_go_opens_nothing() -> None:
    """Either names an export; neither opens it (the handshake deadline cuts such a
    client, and its name, which may be anything, is no session's disk)."""
    sniffer = Sniffer()
    sniffer.answer(greeting())
    sniffer.feed(FLAGS + go("vda", OPT_INFO) + go("nonsense"))
    # One byte at a time: an answer's header and data split anywhere.
    for byte in (info(OPT_INFO) + option_reply(OPT_INFO, REP_ACK)
                 + option_reply(OPT_GO, REP_ERR_UNKNOWN, b"no such export")):
        sniffer.answer(bytes([byte]))
    assert (sniffer.opened, sniffer.export, sniffer.answering) == (False, None, True)
    sniffer.feed(go("vda"))
    sniffer.answer(info() + option_reply(OPT_GO, REP_ACK))
    assert (sniffer.opened, sniffer.export) == (True, "vda")


def test_a_refused_starttls_is_followed_by_the_session_in_the_clear() -> None:
    sniffer = Sniffer()
    sniffer.answer(greeting())
    sniffer.feed(FLAGS + option(OPT_STARTTLS))
    sniffer.answer(option_reply(OPT_STARTTLS, REP_ERR_POLICY, b"TLS not configured"))
    sniffer.feed(go("vda"))
    sniffer.answer(option_reply(OPT_GO, REP_ACK))
    sniffer.feed(request(CMD_READ, 0, 4096))
    assert (sniffer.export, sniffer.read, sniffer.phase) == ("vda", 4096, Phase.TRANSMISSION)


def test_requests_before_the_server_accepted_a_go_open_nothing() -> None:
    """Four bytes of a request's magic would have opened an export: the client then had
    no handshake deadline, and its 'reads' (which QEMU refused) counted to the disk."""
    for first in (b"", go("vda")):
        sniffer = Sniffer()
        sniffer.answer(greeting())
        sniffer.feed(FLAGS + first)
        if first:
            sniffer.answer(option_reply(OPT_GO, REP_ERR_UNKNOWN))
        sniffer.feed(request(CMD_READ, 0, 1 << 30) * 3)
        assert (sniffer.opened, sniffer.export, sniffer.read) == (False, None, 0)


def test_a_request_shows_an_open_export_when_the_answers_are_not_followed() -> None:
    """A server's bytes it cannot read (or none at all, from an earlier version's
    state): the first request still shows the GO accepted."""
    sniffer = Sniffer()
    sniffer.answer(b"\x00" * 18)
    assert not sniffer.answering
    sniffer.feed(FLAGS + go("vda"))
    assert not sniffer.opened
    sniffer.feed(request(CMD_READ, 0, 512))
    assert (sniffer.opened, sniffer.export, sniffer.read) == (True, "vda", 512)


def test_after_starttls_or_garbage_it_only_passes_bytes() -> None:
    tls = Sniffer()
    tls.feed(FLAGS + option(OPT_STARTTLS) + b"\x16\x03\x01 random TLS bytes")
    assert tls.phase == Phase.OPAQUE and tls.read == 0
    garbage = Sniffer()
    garbage.feed(FLAGS + go("vda") + b"\xde\xad\xbe\xef" * 10)
    assert garbage.phase == Phase.OPAQUE


def test_state_carries_a_half_read_request_to_another_process() -> None:
    whole = request(CMD_READ, 0, 2048)
    sniffer = opened("vda")
    sniffer.feed(request(CMD_READ, 0, 1024) + whole[:11])
    resumed = Sniffer.from_state(sniffer.state())
    resumed.feed(whole[11:])
    assert (resumed.export, resumed.read, resumed.requests) == ("vda", 3072, 2)


def test_state_carries_a_half_read_answer_to_another_process() -> None:
    sniffer = Sniffer()
    sniffer.answer(greeting())
    sniffer.feed(FLAGS + go("vda"))
    sniffer.answer(info()[:7])
    resumed = Sniffer.from_state(sniffer.state())
    resumed.answer(info()[7:] + option_reply(OPT_GO, REP_ACK))
    resumed.feed(request(CMD_READ, 0, 2048))
    assert (resumed.opened, resumed.export, resumed.read) == (True, "vda", 2048)


def test_state_from_a_version_that_did_not_follow_the_server() -> None:
    old = {"phase": "OPTIONS", "export": "vda", "read": 0, "requests": 0, "buffer": "",
           "skip": 0}
    resumed = Sniffer.from_state(old)
    # Its export was the last named: maybe by an INFO or a GO refused. The first
    # request tells.
    assert (resumed.opened, resumed.export, resumed.answering) == (False, None, False)
    resumed.feed(request(CMD_READ, 0, 100))
    assert (resumed.opened, resumed.export, resumed.read) == (True, "vda", 100)
    past = Sniffer.from_state(dict(old, phase="TRANSMISSION"))
    assert (past.opened, past.export) == (True, "vda")


def test_refusal_answers_every_option_with_its_reason_and_acks_abort() -> None:
    refusal = Refusal("too many")
    magic, opt, flags = struct.unpack(">QQH", refusal.greeting())
    assert (magic, opt) == (NBDMAGIC, IHAVEOPT) and flags & 1
    out = refusal.feed(FLAGS + go("vda")[:5])
    assert out == b"" and not refusal.done
    out = refusal.feed(go("vda")[5:])
    assert struct.unpack(">QIII", out[:20]) == (REPLY_MAGIC, OPT_GO, REP_ERR_POLICY, 8)
    assert out[20:] == b"too many"
    out = refusal.feed(option(OPT_ABORT))
    assert struct.unpack(">QIII", out) == (REPLY_MAGIC, OPT_ABORT, REP_ACK, 0)
    assert refusal.done


def test_refusal_hangs_up_on_export_name() -> None:
    refusal = Refusal("too many")
    assert refusal.feed(FLAGS + option(OPT_EXPORT_NAME, b"vda")) == b""
    assert refusal.done


def test_an_option_the_sniffer_does_not_read_passes_unheld() -> None:
    """32 MiB of an unknown option held per session took the daemon to 366 MiB once."""
    sniffer = Sniffer()
    sniffer.answer(greeting())
    huge = 32 << 20
    sniffer.feed(FLAGS + struct.pack(">QII", IHAVEOPT, 98, huge))
    for _ in range(huge // (1 << 20)):
        sniffer.feed(b"\xff" * (1 << 20))
        assert len(sniffer.state()["buffer"]) < 2 * 8192  # hex: two characters a byte
    # Past it, the client goes on as usual.
    sniffer.feed(go("vda"))
    sniffer.answer(option_reply(98, REP_ERR_POLICY) + option_reply(OPT_GO, REP_ACK))
    sniffer.feed(request(CMD_READ, 0, 4096))
    assert (sniffer.export, sniffer.phase, sniffer.read) == ("vda", Phase.TRANSMISSION, 4096)


def test_a_go_with_many_information_requests_still_names_its_export() -> None:
    """QEMU takes a GO of any length; past 8 KiB it opened an export named None (its
    session counted for no disk)."""
    name = b"vda"
    requests = struct.pack(">H", 6000) + b"\x00\x03" * 6000
    sniffer = Sniffer()
    sniffer.answer(greeting())
    data = FLAGS + option(OPT_GO, struct.pack(">I", len(name)) + name + requests)
    for at in range(0, len(data), 1000):
        sniffer.feed(data[at:at + 1000])
        assert len(sniffer.state()["buffer"]) < 2 * 10000
    sniffer.answer(option_reply(OPT_GO, REP_ACK))
    sniffer.feed(request(CMD_READ, 0, 4096))
    assert (sniffer.opened, sniffer.export, sniffer.read) == (True, "vda", 4096)


def test_a_refused_client_cannot_make_us_hold_a_huge_option() -> None:
    refusal = Refusal("no room")
    assert refusal.feed(FLAGS + struct.pack(">QII", IHAVEOPT, OPT_GO, 32 << 20)) == b""
    assert refusal.done
