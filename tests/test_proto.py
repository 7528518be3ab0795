"""The wire protocol: round trips of every kind and body, and every rejection."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any

import msgpack
import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvroute.proto import (
    EMPTY_BODY,
    CachePath,
    ChatMessage,
    ColdReason,
    Delivery,
    Disconnect,
    ErrorCode,
    ErrorReply,
    FinishReason,
    Heartbeat,
    Kind,
    LostReason,
    Overflow,
    ProtocolViolation,
    Ready,
    Resident,
    Role,
    SessionLost,
    Token,
    TurnEnd,
    TurnRequest,
    TurnStats,
    control_frames,
    decode_empty,
    parse_delivery,
    parse_reply,
    reply_frames,
    reply_sha256,
    request_frames,
)
from kvroute.proto import limits as L
from kvroute.proto.fields import Body
from kvroute.proto.frames import (
    WorkerControl,
    WorkerReply,
    client_frames,
    delivery_frames,
    parse_backend,
    parse_frontend,
    parse_header,
)
from kvroute.proto.kinds import (
    CLIENT_KINDS,
    CLIENT_REPLY_KINDS,
    FORWARDED_KINDS,
    HEADERS,
    REPLY_KINDS,
    SIGNATURE,
    VERSION,
)
from kvroute.proto.reference import BODY_TYPES, current_block, reference_markdown, splice

DESIGN = Path(__file__).resolve().parent.parent / "docs" / "design.md"
# prompt, cached, prefill, generated, path, cold_reason, ttft_ms, decode_ms, worker
STATS = TurnStats(40, 30, 10, 5, CachePath.TEXT_PREFIX, None, 12.5, 80.0, "w0")
HISTORY = (ChatMessage(Role.SYSTEM, "be brief"), ChatMessage(Role.USER, "héllo ✓"))
TURN = TurnRequest(HISTORY, max_tokens=64, temperature=0.7, top_p=0.9, top_k=40, seed=2**64 - 1)
_DELETE = object()  # marks a field to remove in turn_map()
BODIES: list[Body] = [
    TURN,
    TurnRequest(messages=[ChatMessage(Role.USER, "")], max_tokens=1),  # defaults, seed nil
    Token(seq=0, text="hé", ids=(1, 2, 49151)),
    Token(seq=7, text="", ids=()),
    TurnEnd(seq=3, finish_reason=FinishReason.STOP, reply_sha256=reply_sha256("abc"), stats=STATS),
    TurnEnd(
        seq=0,
        finish_reason=FinishReason.CANCELLED,
        reply_sha256=reply_sha256(""),
        stats=TurnStats(10, 0, 10, 0, CachePath.COLD, ColdReason.WORKER_LOST, 0, 0, "w1"),
    ),
    Overflow(prompt_tokens=2000, max_tokens=100, n_ctx=2048),
    ErrorReply(ErrorCode.NO_WORKER, "no live worker"),
    SessionLost("w0", LostReason.HEARTBEAT_TIMEOUT, retryable=True),
    Ready("w0", pid=1234, epoch=1_700_000_000_000_000_000, capacity=8, model="m", n_ctx=2048),
    Heartbeat(load=2, sessions=10, kv_bytes=123456789),
    Disconnect("unknown worker"),
]


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def violation(fn: Any, *args: Any) -> ProtocolViolation:
    with pytest.raises(ProtocolViolation) as info:
        fn(*args)
    return info.value


def turn_map(**changes: Any) -> dict[str, Any]:
    body = TURN.to_map()
    body.update(changes)
    return {k: v for k, v in body.items() if v is not _DELETE}


# --- round trips ----------------------------------------------------------------------------


@pytest.mark.parametrize("body", BODIES, ids=lambda b: type(b).__name__)
def test_body_round_trip(body: Body) -> None:
    frame = body.encode()
    again = type(body).decode(frame)
    assert again == type(body).decode(pack(body.to_map()))
    assert type(body).decode(again.encode()) == again  # ints in float fields come back floats
    for name in body.to_map():
        left, right = getattr(again, name), getattr(body, name)
        assert left == right or tuple(left) == tuple(right)


def test_empty_bodies() -> None:
    decode_empty(EMPTY_BODY, "PING")
    assert violation(decode_empty, pack({"x": 1}), "PING").code is ErrorCode.BAD_BODY


def test_turn_helpers() -> None:
    assert TURN.message_dicts()[1] == {"role": "user", "content": "héllo ✓"}
    assert Overflow(2000, 100, 2048).needed == 2100
    assert reply_sha256("") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


@pytest.mark.parametrize("kind", sorted(CLIENT_KINDS))
def test_client_to_broker_round_trip(kind: Kind) -> None:
    sid = b"" if kind is Kind.PING else b"s" * L.MAX_SESSION_ID_BYTES
    frames = request_frames(kind, sid, b"r" * L.MAX_REQUEST_ID_BYTES, b"\x80")
    req = parse_frontend([b"client-id", *frames])
    assert (req.client, req.kind, req.session_id, req.body) == (b"client-id", kind, sid, b"\x80")
    assert req.header == HEADERS[kind] == SIGNATURE + bytes((VERSION, kind))


@pytest.mark.parametrize("kind", sorted(FORWARDED_KINDS))
@pytest.mark.parametrize("flags", [0, 1])
def test_broker_to_worker_round_trip(kind: Kind, flags: int) -> None:
    frames = delivery_frames(b"W", HEADERS[kind], b"C", b"sess", b"req", flags, b"\x80")
    assert frames[0] == b"W"  # the ROUTER strips it; the worker's DEALER gets the rest
    d = parse_delivery(frames[1:])
    assert d == Delivery(kind, b"C", b"sess", b"req", flags, b"\x80")
    assert d.worker_lost is bool(flags)


@pytest.mark.parametrize("kind", sorted(REPLY_KINDS))
def test_worker_reply_round_trip(kind: Kind) -> None:
    msg = parse_backend([b"W", *reply_frames(kind, b"C", b"sess", b"req", b"\x80")])
    assert msg == WorkerReply(b"W", kind, b"C", b"sess", b"req", HEADERS[kind], b"\x80")


@pytest.mark.parametrize("kind", [Kind.READY, Kind.HEARTBEAT, Kind.DISCONNECT, Kind.ERROR])
def test_control_round_trips(kind: Kind) -> None:
    msg = parse_backend([b"W", *control_frames(kind, b"\x80")])
    assert msg == WorkerControl(b"W", kind, b"\x80")
    if kind is not Kind.READY:  # the broker sends these three to workers too
        assert parse_delivery(control_frames(kind)).kind is kind


@pytest.mark.parametrize("kind", sorted(CLIENT_REPLY_KINDS))
def test_broker_to_client_round_trip(kind: Kind) -> None:
    frames = client_frames(b"C", kind, b"sess", b"req", b"\x80")
    assert parse_reply(frames[1:]).kind is kind


# --- frame rejections -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "code"),
    [
        (b"", ErrorCode.BAD_FRAME),
        (b"KVR\x01", ErrorCode.BAD_FRAME),
        (b"KVR\x01\x01\x00", ErrorCode.BAD_FRAME),
        (b"XYZ\x01\x01", ErrorCode.BAD_FRAME),
        (b"KVR\x02\x01", ErrorCode.BAD_VERSION),
        (b"KVR\x00\x01", ErrorCode.BAD_VERSION),
        (b"KVR\x01\x7f", ErrorCode.UNKNOWN_KIND),
        (HEADERS[Kind.TOKEN], ErrorCode.UNKNOWN_KIND),  # a reply kind sent by a client
        (HEADERS[Kind.READY], ErrorCode.UNKNOWN_KIND),
    ],
)
def test_bad_header(header: bytes, code: ErrorCode) -> None:
    exc = violation(parse_frontend, [b"C", header, b"sess", b"req", EMPTY_BODY])
    assert exc.code is code
    assert (exc.session_id, exc.request_id) == (b"sess", b"req")  # so the ERROR can be routed


@pytest.mark.parametrize(
    ("frames", "code"),
    [
        ([b"C"], ErrorCode.BAD_FRAME),
        ([b"C", HEADERS[Kind.TURN], b"s", b"r"], ErrorCode.BAD_FRAME),
        ([b"C", HEADERS[Kind.TURN], b"s", b"r", b"o", b"\x80", b"extra"], ErrorCode.BAD_FRAME),
        # an owner frame (5-frame form) must be a token: 1..255 bytes, first byte not zero
        ([b"C", HEADERS[Kind.TURN], b"s", b"r", b"", b"\x80"], ErrorCode.BAD_FRAME),
        ([b"C", HEADERS[Kind.TURN], b"s", b"r", b"\x00tok", b"\x80"], ErrorCode.BAD_FRAME),
        ([b"C", HEADERS[Kind.TURN], b"s", b"r", b"t" * 256, b"\x80"], ErrorCode.BAD_FRAME),
        ([b"C", HEADERS[Kind.TURN], b"", b"r", b"\x80"], ErrorCode.BAD_FRAME),
        ([b"C", HEADERS[Kind.TURN], b"s" * 65, b"r", b"\x80"], ErrorCode.BAD_FRAME),
        ([b"C", HEADERS[Kind.TURN], b"s", b"", b"\x80"], ErrorCode.BAD_FRAME),
        ([b"C", HEADERS[Kind.TURN], b"s", b"r" * 33, b"\x80"], ErrorCode.BAD_FRAME),
        (
            [b"C", HEADERS[Kind.TURN], b"s", b"r", b"x" * (L.MAX_BODY_BYTES + 1)],
            ErrorCode.TOO_LARGE,
        ),
    ],
)
def test_bad_frontend_frames(frames: list[bytes], code: ErrorCode) -> None:
    assert violation(parse_frontend, frames).code is code


def test_owner_frame_round_trip() -> None:
    frames = request_frames(Kind.TURN, b"s", b"r", b"\x80", b"token")
    assert frames == [HEADERS[Kind.TURN], b"s", b"r", b"token", b"\x80"]
    req = parse_frontend([b"C", *frames])
    assert (req.client, req.owner, req.body) == (b"C", b"token", b"\x80")
    assert parse_frontend([b"C", *request_frames(Kind.TURN, b"s", b"r", b"\x80")]).owner == b""
    exc = violation(parse_frontend, [b"C", HEADERS[Kind.CLOSE], b"s", b"r", b"\x00", b"\x80"])
    assert (exc.code, exc.session_id, exc.request_id) == (ErrorCode.BAD_FRAME, b"s", b"r")
    assert violation(request_frames, Kind.PING, b"", b"r", b"\x80", b"\x00").code is (
        ErrorCode.BAD_FRAME
    )


def test_oversize_ids_are_not_echoed() -> None:
    exc = violation(parse_frontend, [b"C", b"junk", b"s" * 100, b"r", b"\x80"])
    assert (exc.session_id, exc.request_id) == (b"", b"")


def test_bad_backend_frames() -> None:
    assert violation(parse_backend, [b"W"]).code is ErrorCode.BAD_FRAME
    assert (
        violation(parse_backend, [b"W", HEADERS[Kind.TOKEN], b"x"]).code is ErrorCode.UNKNOWN_KIND
    )
    four = [b"W", HEADERS[Kind.TOKEN], b"C", b"s", b"r"]
    assert violation(parse_backend, four).code is ErrorCode.BAD_FRAME
    turn = [b"W", HEADERS[Kind.TURN], b"C", b"s", b"r", b"\x80"]
    assert violation(parse_backend, turn).code is ErrorCode.UNKNOWN_KIND
    big = [b"W", HEADERS[Kind.READY], b"x" * (L.MAX_BODY_BYTES + 1)]
    assert violation(parse_backend, big).code is ErrorCode.TOO_LARGE


def test_bad_worker_side_frames() -> None:
    assert violation(parse_delivery, [HEADERS[Kind.TURN]]).code is ErrorCode.BAD_FRAME
    bad_flags = [HEADERS[Kind.TURN], b"C", b"s", b"r", b"", b"\x80"]
    assert violation(parse_delivery, bad_flags).code is ErrorCode.BAD_FRAME
    assert violation(parse_delivery, control_frames(Kind.READY)).code is ErrorCode.UNKNOWN_KIND
    assert violation(parse_reply, [HEADERS[Kind.TURN], b"s", b"r", b"\x80"]).code is (
        ErrorCode.UNKNOWN_KIND
    )
    assert violation(parse_reply, [HEADERS[Kind.END]]).code is ErrorCode.BAD_FRAME


def test_builders_refuse_wrong_direction() -> None:
    assert violation(request_frames, Kind.TOKEN, b"s", b"r").code is ErrorCode.UNKNOWN_KIND
    assert violation(reply_frames, Kind.TURN, b"C", b"s", b"r", b"").code is ErrorCode.UNKNOWN_KIND
    assert violation(control_frames, Kind.TURN).code is ErrorCode.UNKNOWN_KIND
    assert violation(request_frames, Kind.TURN, b"", b"r").code is ErrorCode.BAD_FRAME
    assert parse_header(HEADERS[Kind.PING], CLIENT_KINDS) is Kind.PING


# --- body rejections ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "frame",
    [
        b"",
        b"\xc1",  # never used byte
        b"\x81\xa1a",  # truncated map
        b"\x80\x80",  # trailing data
        b"\x90",  # an array, not a map
        b"\xa3abc",  # a string
        b"\x81\x01\x02",  # int key
        b"\x81\xc4\x01k\x01",  # bytes key
        b"\x81\xa1k\xa2\xff\xfe",  # invalid UTF-8 value
        b"\x81\xa2\xc3\x28\x01",  # invalid UTF-8 key
        b"\x81\xa1k\xd6\xff\x00\x00\x00\x00",  # timestamp extension
        b"\x91" * 100_000,  # nesting deeper than msgpack's stack
    ],
)
def test_undecodable_body(frame: bytes) -> None:
    assert violation(TurnRequest.decode, frame).code is ErrorCode.BAD_BODY


@pytest.mark.parametrize(
    ("changes", "code"),
    [
        ({"max_tokens": "5"}, ErrorCode.BAD_BODY),
        ({"max_tokens": True}, ErrorCode.BAD_BODY),
        ({"max_tokens": 5.0}, ErrorCode.BAD_BODY),
        ({"max_tokens": 0}, ErrorCode.OUT_OF_RANGE),
        ({"max_tokens": 10**9}, ErrorCode.OUT_OF_RANGE),
        ({"temperature": math.nan}, ErrorCode.OUT_OF_RANGE),
        ({"temperature": math.inf}, ErrorCode.OUT_OF_RANGE),
        ({"temperature": -0.1}, ErrorCode.OUT_OF_RANGE),
        ({"temperature": 101.0}, ErrorCode.OUT_OF_RANGE),
        ({"temperature": "hot"}, ErrorCode.BAD_BODY),
        ({"temperature": None}, ErrorCode.BAD_BODY),
        ({"top_p": 0.0}, ErrorCode.OUT_OF_RANGE),
        ({"top_p": 1.5}, ErrorCode.OUT_OF_RANGE),
        ({"top_k": -1}, ErrorCode.OUT_OF_RANGE),
        ({"top_k": 1.5}, ErrorCode.BAD_BODY),
        ({"seed": -1}, ErrorCode.OUT_OF_RANGE),
        ({"seed": "42"}, ErrorCode.BAD_BODY),
        ({"messages": "hi"}, ErrorCode.BAD_BODY),
        ({"messages": []}, ErrorCode.OUT_OF_RANGE),
        ({"messages": ["hi"]}, ErrorCode.BAD_BODY),
        ({"messages": [{"role": "user"}]}, ErrorCode.BAD_BODY),
        ({"messages": [{"role": 1, "content": "x"}]}, ErrorCode.BAD_BODY),
        ({"messages": [{"role": "robot", "content": "x"}]}, ErrorCode.OUT_OF_RANGE),
        ({"messages": [{"role": "user", "content": b"x"}]}, ErrorCode.BAD_BODY),
        ({"messages": [{"role": "user", "content": "x", "name": "bob"}]}, ErrorCode.BAD_BODY),
        ({"messages": [{"role": "assistant", "content": "x"}]}, ErrorCode.OUT_OF_RANGE),
        ({"messages": [{"role": "user", "content": "x"}] * 1025}, ErrorCode.TOO_LARGE),
        ({"messages": [{"role": "user", "content": "x" * (256 * 1024 + 1)}]}, ErrorCode.TOO_LARGE),
        (
            {"messages": [{"role": "user", "content": "x" * 200_000}] * 2},
            ErrorCode.TOO_LARGE,  # each fits, the total does not
        ),
        ({"extra": 1}, ErrorCode.BAD_BODY),
        ({"messages": _DELETE}, ErrorCode.BAD_BODY),
        ({"max_tokens": _DELETE}, ErrorCode.BAD_BODY),
        ({"temperature": _DELETE}, ErrorCode.BAD_BODY),
        ({"top_p": _DELETE}, ErrorCode.BAD_BODY),
        ({"top_k": _DELETE}, ErrorCode.BAD_BODY),
        ({"seed": _DELETE}, ErrorCode.BAD_BODY),
    ],
)
def test_bad_turn(changes: dict[str, Any], code: ErrorCode) -> None:
    frame = msgpack.packb(turn_map(**changes))
    exc = violation(TurnRequest.decode, frame)
    assert exc.code is code, exc.message


def test_text_over_body_limit() -> None:
    frame = msgpack.packb({"messages": [{"role": "user", "content": "x" * L.MAX_BODY_BYTES}]})
    assert violation(TurnRequest.decode, frame).code is ErrorCode.TOO_LARGE


@pytest.mark.parametrize(
    ("body", "changes", "code"),
    [
        (Token(0, "a", (1,)), {"ids": [-1]}, ErrorCode.OUT_OF_RANGE),
        (Token(0, "a", (1,)), {"ids": [True]}, ErrorCode.BAD_BODY),  # a bool is not an id
        (Token(0, "a", (1,)), {"ids": [L.MAX_TOKEN_ID + 1]}, ErrorCode.OUT_OF_RANGE),
        (Token(0, "a", (1,)), {"ids": [1] * 4097}, ErrorCode.TOO_LARGE),
        (Token(0, "a", (1,)), {"seq": -1}, ErrorCode.OUT_OF_RANGE),
        (Token(0, "a", (1,)), {"text": None}, ErrorCode.BAD_BODY),
        (BODIES[4], {"finish_reason": "bogus"}, ErrorCode.OUT_OF_RANGE),
        (BODIES[4], {"reply_sha256": "ABC"}, ErrorCode.OUT_OF_RANGE),
        (BODIES[4], {"stats": []}, ErrorCode.BAD_BODY),
        (BODIES[4], {"stats": {**STATS.to_map(), "cached_tokens": 31}}, ErrorCode.OUT_OF_RANGE),
        (BODIES[4], {"stats": {**STATS.to_map(), "cold_reason": "new"}}, ErrorCode.OUT_OF_RANGE),
        (BODIES[4], {"stats": {**STATS.to_map(), "path": "cold"}}, ErrorCode.OUT_OF_RANGE),
        (BODIES[4], {"stats": {**STATS.to_map(), "ttft_ms": math.nan}}, ErrorCode.OUT_OF_RANGE),
        (BODIES[4], {"stats": {**STATS.to_map(), "extra": 0}}, ErrorCode.BAD_BODY),
        (Overflow(2000, 100, 2048), {"prompt_tokens": 10}, ErrorCode.OUT_OF_RANGE),
        (ErrorReply(ErrorCode.INTERNAL, "x"), {"code": "oops"}, ErrorCode.OUT_OF_RANGE),
        (ErrorReply(ErrorCode.INTERNAL, "x"), {"message": "x" * 1025}, ErrorCode.TOO_LARGE),
        (BODIES[8], {"retryable": 1}, ErrorCode.BAD_BODY),
        (BODIES[9], {"capacity": 0}, ErrorCode.OUT_OF_RANGE),
        (BODIES[9], {"worker": ""}, ErrorCode.OUT_OF_RANGE),
        (BODIES[10], {"kv_bytes": -1}, ErrorCode.OUT_OF_RANGE),
    ],
)
def test_bad_reply_and_control_bodies(body: Body, changes: dict[str, Any], code: ErrorCode) -> None:
    frame = msgpack.packb({**body.to_map(), **changes})
    assert violation(type(body).decode, frame).code is code


def test_encode_validates() -> None:
    nan = TurnRequest([ChatMessage(Role.USER, "x")], temperature=math.nan)
    assert violation(nan.encode).code is ErrorCode.OUT_OF_RANGE
    surrogate = TurnRequest([ChatMessage(Role.USER, "\ud800")])
    assert violation(surrogate.encode).code is ErrorCode.BAD_BODY
    # Within every text limit, but 4-byte characters make the body exceed MAX_BODY_BYTES.
    huge = TurnRequest((ChatMessage(Role.USER, "\U0001f600" * L.MAX_TEXT_CHARS),))
    assert violation(huge.encode).code is ErrorCode.TOO_LARGE
    assert violation(Token(0, "x", (-1,)).encode).code is ErrorCode.OUT_OF_RANGE
    assert violation(Token(0, 7, ()).encode).code is ErrorCode.BAD_BODY  # type: ignore[arg-type]
    assert violation(
        Ready("w", 1, 1, 1, "m", 1, (Resident(b"s", b"o", 1, 0.0, 1),) * 2).encode
    ).code is (
        ErrorCode.BAD_BODY  # a session announced twice
    )


def test_violations_name_the_field() -> None:
    bad_role = pack(turn_map(messages=[{"role": "robot", "content": "x"}]))
    assert violation(TurnRequest.decode, bad_role).message.startswith("TURN.messages[0].role: ")
    end = pack({**BODIES[4].to_map(), "stats": {**STATS.to_map(), "ttft_ms": -1}})
    assert violation(TurnEnd.decode, end).message.startswith("END.stats.ttft_ms: ")


def test_a_missing_field_is_reported_before_other_faults() -> None:
    # msgspec meets the bad value first; the answer names the missing field whatever the order.
    exc = violation(TurnRequest.decode, pack({"max_tokens": 10**9}))
    assert exc.code is ErrorCode.BAD_BODY and "missing field 'messages'" in exc.message


@pytest.mark.parametrize("body", BODIES, ids=lambda b: type(b).__name__)
def test_every_field_is_required_on_the_wire(body: Body) -> None:
    """Sender defaults never fill a field a peer left out; READY's sessions is the one
    optional field (left out when empty, so a READY without it is the same as before it)."""
    full = body.to_map()
    for name in full:
        frame = pack({k: v for k, v in full.items() if k != name})
        assert violation(type(body).decode, frame).code is ErrorCode.BAD_BODY, name
    ready = Ready("w0", 1, 2, 3, "m", 64)
    assert "sessions" not in ready.to_map()
    assert Ready.decode(ready.encode()) == ready


def test_the_reference_in_the_docs_is_generated() -> None:
    text = DESIGN.read_text()
    assert current_block(text) == reference_markdown(), (
        "run: python -m kvroute.proto.reference --write docs/design.md"
    )
    assert current_block(splice(text, "x\n")) == "x\n"


def test_the_reference_lists_every_kind_and_field() -> None:
    md = reference_markdown()
    for kind in Kind:
        assert f"| {kind.name} | `0x{kind.value:02x}` |" in md
    for cls in BODY_TYPES.values():
        assert f"body: {cls.__name__}" in md
        for name in msgspec.structs.fields(cls):
            assert f"| `{name.encode_name}` |" in md
    assert "| `top_p` | float (an int is accepted) | 0 < x ≤ 1, finite | required" in md
    assert "| `sessions` | array of array Resident | ≤ 2048 items" in md
    assert "the last message is from the user" in md  # TurnRequest.check's rule


def test_error_reply_clips_long_messages() -> None:
    exc = ProtocolViolation(ErrorCode.INTERNAL, "x" * 5000)
    assert len(ErrorReply.of(exc).message) == L.MAX_ERROR_MESSAGE_CHARS
    ErrorReply.of(exc).encode()


# --- fuzz: anything at all gets ProtocolViolation, never another exception -------------------

msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=256))
def test_fuzz_random_bytes(frame: bytes) -> None:
    for cls in (TurnRequest, TurnEnd, Ready):
        with contextlib.suppress(ProtocolViolation):
            cls.decode(frame)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from([*TURN.to_map(), "x"]), msgpack_values, max_size=8))
def test_fuzz_turn_maps(body: dict[str, Any]) -> None:
    with contextlib.suppress(ProtocolViolation):
        TurnRequest.decode(msgpack.packb(body))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=80), max_size=7))
def test_fuzz_frames(frames: list[bytes]) -> None:
    for parse in (parse_frontend, parse_backend, parse_delivery, parse_reply):
        with contextlib.suppress(ProtocolViolation):
            parse(frames)
