import pytest

from pullbackd.control.codec import (
    Call,
    Decoder,
    ProtocolError,
    Reply,
    decode,
    encode,
    parse_call,
    parse_reply,
)


def test_messages_split_and_joined_across_reads() -> None:
    wire = encode({"method": "a.B"}) + encode({"method": "a.C", "parameters": {"x": "\0"}})
    decoder = Decoder()
    got = []
    for i in range(len(wire)):  # one byte at a time: the worst a socket can do
        got += [decode(frame) for frame in decoder.feed(wire[i:i + 1])]
    assert got == [{"method": "a.B"}, {"method": "a.C", "parameters": {"x": "\0"}}]
    assert decoder.pending == 0
    assert [decode(frame) for frame in Decoder().feed(wire)] == got


def test_partial_message_is_kept() -> None:
    decoder = Decoder()
    assert decoder.feed(b'{"method": "a.') == []
    assert decoder.pending == 14
    assert decoder.feed(b'B"}\0') == [b'{"method": "a.B"}']


@pytest.mark.parametrize("raw", [
    b"{not json\0", b"[1, 2]\0", b"\xff\xfe\0", b'"str"\0',
    b'{"method": "a.B", "parameters": {"id": ' + b"[" * 100_000 + b"]" * 100_000 + b"}}\0",
    b'{"method": "a.B", "parameters": {"id": ' + b"9" * 5000 + b"}}\0",
], ids=["not-json", "array", "not-utf8", "string", "deep", "huge-int"])
def test_not_an_object_is_a_protocol_error(raw: bytes) -> None:
    [frame] = Decoder().feed(raw)
    with pytest.raises(ProtocolError):
        decode(frame)


def test_oversized_message_is_refused_before_its_end_arrives() -> None:
    decoder = Decoder(limit=1024)
    decoder.feed(b"x" * 1024)
    with pytest.raises(ProtocolError, match="over 1024"):
        decoder.feed(b"x")


def test_a_bad_message_does_not_take_the_good_ones_before_it() -> None:
    frames = Decoder().feed(encode({"method": "a.B"}) + b"{nope\0")
    assert decode(frames[0]) == {"method": "a.B"}
    with pytest.raises(ProtocolError):
        decode(frames[1])


def test_oversized_complete_message_is_refused() -> None:
    with pytest.raises(ProtocolError):
        Decoder(limit=10).feed(b'{"method": "a.Bcdefgh"}\0')


def test_call_round_trip() -> None:
    call = Call("org.example.Ping", {"n": 1}, more=True)
    assert parse_call(call.to_message()) == call
    assert call.interface == "org.example" and call.member == "Ping"
    assert parse_call({"method": "a.B", "parameters": None}) == Call("a.B")


@pytest.mark.parametrize("message", [
    {}, {"method": 1}, {"method": "nodot"}, {"method": "a.B", "parameters": []},
    {"method": "a.B", "more": "yes"},
])
def test_malformed_calls(message: dict[str, object]) -> None:
    with pytest.raises(ProtocolError):
        parse_call(message)


def test_reply_round_trip() -> None:
    reply = Reply({"a": 1}, error="x.Y", continues=True)
    assert parse_reply(reply.to_message()) == reply
    assert Reply({}).to_message() == {"parameters": {}}
