"""Golden wire bytes: every kind's frames and bodies, and how odd or hostile bodies are answered.

``tests/data/golden_frames.json`` holds the bytes (hex) these cases encoded to, and the ERROR code
each hostile body got, when they were captured from the hand-written codec that preceded the
declared (msgspec) one. ``test_golden_frames.py`` checks that today's code produces and accepts
exactly those bytes and answers exactly those codes. Regenerate the file
(``python tests/golden_frames.py --write``) only for a deliberate wire change, which is a new
protocol version.

Hostile bodies are built from the valid ones with plain msgpack (not with the codec under test):
each field in turn is deleted, replaced by probe values of every msgpack type and at every
limit, and a stranger field is added; nested maps and arrays are walked the same way.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack

from kvroute.proto import (
    EMPTY_BODY,
    CachePath,
    ChatMessage,
    ColdReason,
    Disconnect,
    ErrorCode,
    ErrorReply,
    FinishReason,
    Heartbeat,
    Kind,
    KvSource,
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
    error_body,
    reply_frames,
    reply_sha256,
    request_frames,
)
from kvroute.proto import limits as L
from kvroute.proto.frames import client_frames, delivery_frames
from kvroute.proto.status import (
    BrokerCounters,
    Fleet,
    TurnOutcome,
    WorkerCounters,
    WorkerGauges,
    WorkerView,
)
from kvroute.proto.transcripts import Found, Index, Lookup

DATA = Path(__file__).parent / "data" / "golden_frames.json"

BODY_TYPES: dict[Kind, Any] = {
    Kind.TURN: TurnRequest,
    Kind.TOKEN: Token,
    Kind.END: TurnEnd,
    Kind.OVERFLOW: Overflow,
    Kind.ERROR: ErrorReply,
    Kind.SESSION_LOST: SessionLost,
    Kind.READY: Ready,
    Kind.HEARTBEAT: Heartbeat,
    Kind.DISCONNECT: Disconnect,
    Kind.FLEET: Fleet,
    Kind.LOOKUP: Lookup,
    Kind.INDEX: Index,
    Kind.FOUND: Found,
}
"""The body class of each kind that has fields; every other kind carries EMPTY_BODY."""

NON_ASCII = "héllo ✓ 日本語 \U0001f600 \u202e"
STATS = TurnStats(40, 30, 10, 5, CachePath.TEXT_PREFIX, None, 12.5, 80.0, "w0")
COLD = TurnStats(10, 0, 10, 0, CachePath.COLD, ColdReason.WORKER_LOST, 0.0, 0.0, "wörker-1")
HISTORY = (
    ChatMessage(Role.SYSTEM, "be brief"),
    ChatMessage(Role.USER, NON_ASCII),
    ChatMessage(Role.ASSISTANT, "ok"),
    ChatMessage(Role.USER, "again"),
)
RESIDENTS = (
    Resident(b"s1", b"owner-token", 123, 4.5, 1_700_000_000_000_000_000),
    Resident(b"\x00\xff" * 32, b"K" * 40, 0, 0.0, 0),
    Resident(b"s3", b"o" * L.MAX_OWNER_BYTES, L.MAX_COUNT, L.MAX_IDLE_MS, L.MAX_COUNT),
)


def valid_bodies() -> dict[str, tuple[Kind, Any]]:
    """Named body values of every kind with fields: optional fields present and absent, every
    enum value, values at their limits, and text in several scripts."""
    user = (ChatMessage(Role.USER, "hi"),)
    cases: dict[str, tuple[Kind, Any]] = {
        "TURN/full": (
            Kind.TURN,
            TurnRequest(HISTORY, max_tokens=64, temperature=0.7, top_p=0.9, top_k=40, seed=7),
        ),
        "TURN/defaults": (Kind.TURN, TurnRequest((ChatMessage(Role.USER, ""),))),
        "TURN/limits": (
            Kind.TURN,
            TurnRequest(
                user,
                max_tokens=L.MAX_MAX_TOKENS,
                temperature=L.MAX_TEMPERATURE,
                top_p=1e-300,
                top_k=L.MAX_TOP_K,
                seed=L.MAX_SEED,
            ),
        ),
        "TURN/seed_zero": (Kind.TURN, TurnRequest(user, max_tokens=1, seed=0, top_p=1.0)),
        "TURN/int_floats": (Kind.TURN, TurnRequest(user, temperature=1, top_p=1)),
        "TURN/subnormal": (Kind.TURN, TurnRequest(user, temperature=5e-324)),
        "TURN/long_text": (
            Kind.TURN,
            TurnRequest((ChatMessage(Role.USER, "x" * 300 + "é" * 40_000),)),
        ),
        "TURN/special_text": (
            Kind.TURN,
            TurnRequest((ChatMessage(Role.USER, "\x00<|im_end|>\r\n{{ 7 * 7 }}\ufffd\ufeff"),)),
        ),
        "TOKEN/basic": (Kind.TOKEN, Token(seq=0, text="hé", ids=(1, 2, 49151))),
        "TOKEN/empty": (Kind.TOKEN, Token(seq=7, text="", ids=())),
        "TOKEN/limits": (
            Kind.TOKEN,
            Token(seq=L.MAX_SEQ, text="\U0001f600" * 3, ids=(0, L.MAX_TOKEN_ID) * 8),
        ),
        "TOKEN/held_back": (Kind.TOKEN, Token(seq=3, text="", ids=(200, 201))),
        "OVERFLOW/basic": (Kind.OVERFLOW, Overflow(prompt_tokens=2000, max_tokens=100, n_ctx=2048)),
        "OVERFLOW/limits": (Kind.OVERFLOW, Overflow(L.MAX_COUNT, L.MAX_MAX_TOKENS, L.MAX_N_CTX)),
        "ERROR/empty_message": (Kind.ERROR, ErrorReply(ErrorCode.INTERNAL, "")),
        "ERROR/non_ascii": (Kind.ERROR, ErrorReply(ErrorCode.BAD_BODY, NON_ASCII)),
        "ERROR/longest": (
            Kind.ERROR,
            ErrorReply(ErrorCode.TOO_LARGE, "é" * L.MAX_ERROR_MESSAGE_CHARS),
        ),
        "READY/no_sessions": (
            Kind.READY,
            Ready(
                "w0", pid=1234, epoch=1_700_000_000_000_000_000, capacity=8, model="m", n_ctx=2048
            ),
        ),
        "READY/sessions": (
            Kind.READY,
            Ready("wörker", 1, 2, L.MAX_CAPACITY, "SmolLM2.gguf", L.MAX_N_CTX, RESIDENTS),
        ),
        "READY/one_session": (
            Kind.READY,
            Ready("w1", 9, 9, 4, "m", 256, (Resident(b"s1", b"own", 5, 1.5, 9),)),
        ),
        "READY/limits": (
            Kind.READY,
            Ready("w" * L.MAX_NAME_CHARS, L.MAX_COUNT, L.MAX_COUNT, 1, "", 1),
        ),
        "HEARTBEAT/defaults": (Kind.HEARTBEAT, Heartbeat()),
        "HEARTBEAT/values": (Kind.HEARTBEAT, Heartbeat(load=2, sessions=10, kv_bytes=2**40 + 3)),
        "DISCONNECT/default": (Kind.DISCONNECT, Disconnect()),
        "DISCONNECT/reason": (Kind.DISCONNECT, Disconnect("unknown worker ✓")),
    }
    for i, finish in enumerate(FinishReason):
        for path, stats in (("warm", STATS), ("cold", COLD)):
            end = TurnEnd(i * 1000, finish, reply_sha256(f"reply {i}"), stats)
            cases[f"END/{finish.value}/{path}"] = (Kind.END, end)
    for path in CachePath:
        for reason in ColdReason if path is CachePath.COLD else (None,):
            cached = 0 if path is CachePath.COLD else 300
            stats = TurnStats(
                2**20 + cached, cached, 2**20, 70_000, path, reason, 1234.5678, 1e9, "w-9"
            )
            name = f"END/stats/{path.value}/{reason.value if reason else 'nil'}"
            cases[name] = (Kind.END, TurnEnd(L.MAX_SEQ, FinishReason.STOP, reply_sha256(""), stats))
    for source in KvSource:
        stats = TurnStats(40, 30, 10, 5, CachePath.TEXT_PREFIX, None, 9.5, 2.0, "w0", 3.25, source)
        cases[f"END/kv_source/{source.value}"] = (
            Kind.END,
            TurnEnd(7, FinishReason.STOP, reply_sha256(""), stats),
        )
    for code in ErrorCode:
        cases[f"ERROR/{code.value}"] = (Kind.ERROR, ErrorReply(code, f"because {code.value}"))
    for reason in LostReason:
        for retryable in (True, False):
            lost = SessionLost("w0", reason, retryable=retryable)
            cases[f"SESSION_LOST/{reason.value}/{retryable}"] = (Kind.SESSION_LOST, lost)
    cases["SESSION_LOST/default"] = (Kind.SESSION_LOST, SessionLost("", LostReason.EXITED))
    cases.update(fleet_bodies())
    cases.update(transcript_bodies())
    return cases


DIGEST = bytes(range(16))


def transcript_bodies() -> dict[str, tuple[Kind, Any]]:
    """TURN with stop strings (an optional field, absent from every other TURN case), and the
    LOOKUP / FOUND / INDEX bodies of the transcript index."""
    return {
        "TURN/stop": (
            Kind.TURN,
            TurnRequest(HISTORY, max_tokens=64, seed=7, stop=("\n\n", "User:", "é✓", "<|x|>")),
        ),
        "TURN/stop_limits": (
            Kind.TURN,
            TurnRequest(
                (ChatMessage(Role.USER, "hi"),),
                stop=tuple(c * L.MAX_STOP_CHARS for c in "aé日\U0001f600"[: L.MAX_STOP]),
            ),
        ),
        "TURN/stop_one_char": (
            Kind.TURN,
            TurnRequest((ChatMessage(Role.USER, "hi"),), stop=(".",)),
        ),
        "LOOKUP/basic": (Kind.LOOKUP, Lookup(DIGEST)),
        "LOOKUP/longest": (Kind.LOOKUP, Lookup(b"\xff" * L.MAX_DIGEST_BYTES)),
        "INDEX/basic": (Kind.INDEX, Index(DIGEST)),
        "FOUND/session": (Kind.FOUND, Found("sessión-1".encode())),
        "FOUND/nil": (Kind.FOUND, Found(None)),
        "FOUND/longest": (Kind.FOUND, Found(b"\x00\xff" * 32)),
    }


COUNTERS = WorkerCounters(
    {CachePath.COLD: 3, CachePath.TEXT_PREFIX: 40, CachePath.TOKEN_PREFIX: 2},
    {ColdReason.NEW: 2, ColdReason.EVICTED: 1},
    12_000,
    10_500,
    1_500,
    3_000,
    1,
)
GAUGES = WorkerGauges("hôst-1", 1_700_000_000_000_000_000, 512 << 20, 3, COUNTERS)


def fleet_bodies() -> dict[str, tuple[Kind, Any]]:
    """HEARTBEAT with gauges and FLEET: empty, one or two workers (one without gauges), at
    limits."""
    broker = BrokerCounters(
        1_700_000_000_000_000_000,
        123_456,
        2,
        7,
        1,
        {TurnOutcome.END: 40, TurnOutcome.BUSY: 1, TurnOutcome.ERROR: 2},
        {ErrorCode.NO_WORKER: 1, ErrorCode.LIMIT: 1},
    )
    w0 = WorkerView("w0", 4242, 7, "SmolLM2", 2048, 16, 250.5, 2, 5, 2, 4, 3 << 20, GAUGES)
    w1 = WorkerView("wörker-1", 4243, 8, "SmolLM2", 2048, 16, 0.0, 0, 0, 0, 0, 0, None)
    empty = WorkerCounters({}, {}, 0, 0, 0, 0, 0)
    widest = WorkerView(
        "w" * L.MAX_NAME_CHARS,
        L.MAX_COUNT,
        L.MAX_COUNT,
        "m" * L.MAX_NAME_CHARS,
        L.MAX_N_CTX,
        L.MAX_CAPACITY,
        L.MAX_IDLE_MS,
        L.MAX_COUNT,
        L.MAX_COUNT,
        L.MAX_COUNT,
        L.MAX_COUNT,
        L.MAX_COUNT,
        WorkerGauges("h" * L.MAX_NAME_CHARS, L.MAX_COUNT, L.MAX_COUNT, L.MAX_COUNT, empty),
    )
    return {
        "HEARTBEAT/gauges": (Kind.HEARTBEAT, Heartbeat(2, 10, 3 << 20, GAUGES)),
        "HEARTBEAT/gauges_empty": (
            Kind.HEARTBEAT,
            Heartbeat(gauges=WorkerGauges("", 0, 0, 0, empty)),
        ),
        "FLEET/empty": (
            Kind.FLEET,
            Fleet(BrokerCounters(0, 0, 0, 0, 0, {}, {}), (), 0, empty),
        ),
        "FLEET/two_workers": (Kind.FLEET, Fleet(broker, (w0, w1), 0, COUNTERS)),
        "FLEET/one_worker": (
            Kind.FLEET,
            Fleet(BrokerCounters(1, 2, 0, 0, 0, {}, {}), (w1,), 1, empty),
        ),
        "FLEET/limits": (Kind.FLEET, Fleet(broker, (widest,), L.MAX_COUNT, empty)),
    }


def frame_cases() -> dict[str, list[bytes]]:
    """Every kind's frames on every hop it travels, built by the frame builders."""
    bodies = valid_bodies()
    body_of = {kind: value.encode() for kind, value in (bodies[n] for n in _FRAME_BODY)}
    sid, rid = "sessión-1".encode(), b"r-0001"
    cases: dict[str, list[bytes]] = {"EMPTY_BODY": [EMPTY_BODY]}
    for kind in (Kind.TURN, Kind.CANCEL, Kind.RESET, Kind.CLOSE, Kind.PING):
        body = body_of.get(kind, EMPTY_BODY)
        cases[f"request/{kind.name}"] = request_frames(
            kind, b"" if kind is Kind.PING else sid, rid, body
        )
        if kind is not Kind.PING:
            for flags in (0, 1):
                cases[f"delivery/{kind.name}/{flags}"] = delivery_frames(
                    b"W", HEADERS_OF[kind], b"C", sid, rid, flags, body
                )
            cases[f"delivery/{kind.name}/principal"] = delivery_frames(
                b"W", HEADERS_OF[kind], b"C", sid, rid, 1, body, b"K" * 40
            )
    for kind in (
        Kind.TOKEN,
        Kind.END,
        Kind.OVERFLOW,
        Kind.ERROR,
        Kind.SESSION_LOST,
        Kind.BUSY,
        Kind.RESET_OK,
        Kind.CLOSE_OK,
    ):
        body = body_of.get(kind, EMPTY_BODY)
        cases[f"reply/{kind.name}"] = reply_frames(kind, b"C", sid, rid, body)
        cases[f"client/{kind.name}"] = client_frames(b"C", kind, sid, rid, body)
    cases["client/PONG"] = client_frames(b"C", Kind.PONG, b"", rid)
    cases["request/STATUS"] = request_frames(Kind.STATUS, b"", rid)
    owner = b"owner-token-0123456789"
    cases["request/TURN/owner"] = request_frames(Kind.TURN, sid, rid, body_of[Kind.TURN], owner)
    cases["request/CANCEL/owner"] = request_frames(Kind.CANCEL, sid, rid, owner=owner)
    lookup, index = bodies["LOOKUP/basic"][1].encode(), bodies["INDEX/basic"][1].encode()
    cases["request/LOOKUP"] = request_frames(Kind.LOOKUP, b"", rid, lookup)
    cases["request/LOOKUP/owner"] = request_frames(Kind.LOOKUP, b"", rid, lookup, owner)
    cases["request/INDEX"] = request_frames(Kind.INDEX, sid, rid, index)
    cases["request/INDEX/owner"] = request_frames(Kind.INDEX, sid, rid, index, owner)
    found = bodies["FOUND/session"][1].encode()
    cases["client/FOUND"] = client_frames(b"C", Kind.FOUND, b"", rid, found)
    cases["client/INDEX_OK"] = client_frames(b"C", Kind.INDEX_OK, sid, rid)
    fleet = bodies["FLEET/two_workers"][1].encode()
    cases["client/FLEET"] = client_frames(b"C", Kind.FLEET, b"", rid, fleet)
    gauges = bodies["HEARTBEAT/gauges"][1].encode()
    cases["control/HEARTBEAT/gauges"] = control_frames(Kind.HEARTBEAT, gauges)
    for kind in (Kind.READY, Kind.HEARTBEAT, Kind.DISCONNECT, Kind.ERROR):
        cases[f"control/{kind.name}"] = control_frames(kind, body_of[kind])
    cases["control/HEARTBEAT/broker"] = control_frames(Kind.HEARTBEAT)
    for code in (ErrorCode.BAD_FRAME, ErrorCode.NOT_OWNER):
        cases[f"error_body/{code.value}"] = [error_body(code, "x" * 2000)]
    return cases


_FRAME_BODY = (
    "TURN/full",
    "TOKEN/basic",
    "END/stop/warm",
    "OVERFLOW/basic",
    "ERROR/non_ascii",
    "SESSION_LOST/exited/True",
    "READY/sessions",
    "HEARTBEAT/values",
    "DISCONNECT/reason",
)
HEADERS_OF = {kind: b"KVR\x01" + bytes((kind,)) for kind in Kind}


# --- hostile and odd bodies -----------------------------------------------------------------

EXT = msgpack.ExtType(5, b"ext")
TIMESTAMP = msgpack.Timestamp(1, 0)
PROBES: tuple[tuple[str, Any], ...] = (
    ("nil", None),
    ("true", True),
    ("int0", 0),
    ("int1", 1),
    ("neg1", -1),
    ("int_max", 2**63 - 1),
    ("uint64_max", 2**64 - 1),
    ("int64_min", -(2**63)),
    ("float", 1.5),
    ("float_int", 5.0),
    ("neg_zero", -0.0),
    ("nan", math.nan),
    ("inf", math.inf),
    ("neg_inf", -math.inf),
    ("empty_str", ""),
    ("str", "x"),
    ("str_129", "é" * 129),
    ("str_1025", "y" * 1025),
    ("bytes", b"\xff\x00"),
    ("list", [1]),
    ("empty_list", []),
    ("map", {"k": 1}),
    ("ext", EXT),
    ("timestamp", TIMESTAMP),
)


def _pack(obj: Any, **kw: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True, datetime=False, **kw)


def _unpack(frame: bytes) -> Any:
    return msgpack.unpackb(frame, raw=False, strict_map_key=False)


def _mutations(value: Any, path: str) -> Iterator[tuple[str, Any]]:
    """(path/probe, mutated copy of ``value``) for every field of ``value`` and below."""
    if isinstance(value, dict):
        for key in list(value):
            rest = {k: v for k, v in value.items() if k != key}
            yield f"{path}.{key}/missing", rest
            for name, probe in PROBES:
                yield f"{path}.{key}/{name}", {**value, key: probe}
            for sub, changed in _mutations(value[key], f"{path}.{key}"):
                yield sub, {**value, key: changed}
        yield f"{path}/unknown_field", {**value, "zz_unknown": 0}
    elif isinstance(value, list) and value:
        for i in range(len(value)):  # every item of a short array; nested ones below item 0
            for name, probe in PROBES:
                yield f"{path}[{i}]/{name}", [*value[:i], probe, *value[i + 1 :]]
        for sub, changed in _mutations(value[0], f"{path}[0]"):
            yield sub, [changed, *value[1:]]
        yield f"{path}/longer", [*value, value[-1]]
        yield f"{path}/shorter", value[:-1]


def _targeted() -> Iterator[tuple[str, Kind, bytes]]:
    """Rules that are not one field's type or limit, and encodings a sender may legally pick."""
    turn = _unpack(valid_bodies()["TURN/full"][1].encode())
    user = {"role": "user", "content": "x"}
    yield "TURN/too_many_messages", Kind.TURN, _pack({**turn, "messages": [user] * 1025})
    yield "TURN/most_messages", Kind.TURN, _pack({**turn, "messages": [user] * 1024})
    yield "TURN/no_messages", Kind.TURN, _pack({**turn, "messages": []})
    for role in ("assistant", "system"):
        msgs = [*turn["messages"][:-1], {"role": role, "content": "x"}]
        yield f"TURN/last_from_{role}", Kind.TURN, _pack({**turn, "messages": msgs})
    yield (
        "TURN/single_floats",
        Kind.TURN,
        _pack({**turn, "temperature": 0.5}, use_single_float=True),
    )
    reordered = dict(reversed(list(turn.items())))
    yield "TURN/keys_reordered", Kind.TURN, _pack(reordered)
    yield "TURN/duplicate_key", Kind.TURN, b"\x87" + _pack(turn)[1:] + b"\xa5top_k\x05"
    yield "TURN/str32_key", Kind.TURN, _pack(turn).replace(b"\xa5top_k", b"\xdb\0\0\0\x05top_k")
    yield (
        "TURN/uint64_small",
        Kind.TURN,
        _pack(turn).replace(b"\xa4seed\x07", b"\xa4seed\xcf" + bytes(7) + b"\x07"),
    )
    yield "TURN/bad_utf8_content", Kind.TURN, _pack(turn).replace(b"\xa2ok", b"\xa2\xff\xfe")
    yield "TURN/surrogate_content", Kind.TURN, _pack(turn).replace(b"\xa2ok", b"\xa3\xed\xa0\x80")
    yield "TURN/bytes_key", Kind.TURN, _pack({**turn, b"x": 1})
    yield "TURN/int_key", Kind.TURN, _pack({**turn, 1: 1})
    token = _unpack(valid_bodies()["TOKEN/basic"][1].encode())
    yield "TOKEN/too_many_ids", Kind.TOKEN, _pack({**token, "ids": [1] * (L.MAX_TOKEN_IDS + 1)})
    yield "TOKEN/most_ids", Kind.TOKEN, _pack({**token, "ids": [1] * L.MAX_TOKEN_IDS})
    yield "TOKEN/id_too_big", Kind.TOKEN, _pack({**token, "ids": [L.MAX_TOKEN_ID + 1]})
    end = _unpack(valid_bodies()["END/stop/warm"][1].encode())
    for name, digest in (("upper", "A" * 64), ("short", "a" * 63), ("long", "a" * 65)):
        yield f"END/sha_{name}", Kind.END, _pack({**end, "reply_sha256": digest})
    stats = end["stats"]
    for name, change in (
        ("sum_wrong", {"cached_tokens": 31}),
        ("reason_without_cold", {"cold_reason": "new"}),
        ("cold_without_reason", {"path": "cold"}),
        ("cold_reused", {"path": "cold", "cold_reason": "new"}),
        (
            "cold_ok",
            {"path": "cold", "cold_reason": "new", "cached_tokens": 0, "prefill_tokens": 40},
        ),
        ("ms_over", {"ttft_ms": L.MAX_MS * 2}),
    ):
        yield f"END/stats_{name}", Kind.END, _pack({**end, "stats": {**stats, **change}})
    overflow = _unpack(valid_bodies()["OVERFLOW/basic"][1].encode())
    yield "OVERFLOW/fits", Kind.OVERFLOW, _pack({**overflow, "prompt_tokens": 1948})
    yield "OVERFLOW/just_over", Kind.OVERFLOW, _pack({**overflow, "prompt_tokens": 1949})
    ready = _unpack(valid_bodies()["READY/sessions"][1].encode())
    twice = [ready["sessions"][0], ready["sessions"][0]]
    yield "READY/duplicate_session", Kind.READY, _pack({**ready, "sessions": twice})
    many = [[i.to_bytes(4, "big"), b"o", 1, 0.0, 1] for i in range(L.MAX_RESIDENT_SESSIONS + 1)]
    yield "READY/too_many_sessions", Kind.READY, _pack({**ready, "sessions": many})
    yield "READY/most_sessions", Kind.READY, _pack({**ready, "sessions": many[:-1]})
    yield "READY/empty_sessions", Kind.READY, _pack({**ready, "sessions": []})
    yield (
        "READY/long_owner",
        Kind.READY,
        _pack({**ready, "sessions": [[b"s", b"o" * (L.MAX_OWNER_BYTES + 1), 1, 0.0, 1]]}),
    )
    yield (
        "READY/long_session",
        Kind.READY,
        _pack({**ready, "sessions": [[b"s" * (L.MAX_SESSION_ID_BYTES + 1), b"o", 1, 0.0, 1]]}),
    )
    yield "READY/int_idle", Kind.READY, _pack({**ready, "sessions": [[b"s", b"o", 1, 7, 1]]})
    err = _unpack(valid_bodies()["ERROR/non_ascii"][1].encode())
    too_long = "é" * (L.MAX_ERROR_MESSAGE_CHARS + 1)
    yield "ERROR/message_too_long", Kind.ERROR, _pack({**err, "message": too_long})
    yield from _targeted_fleet()
    for kind in (Kind.CANCEL, Kind.RESET, Kind.PING, Kind.BUSY, Kind.HEARTBEAT):
        yield f"{kind.name}/empty", kind, EMPTY_BODY
        yield f"{kind.name}/field", kind, _pack({"x": 1})
        yield f"{kind.name}/not_a_map", kind, _pack([])
    for name, frame in (
        ("empty_frame", b""),
        ("never_used_byte", b"\xc1"),
        ("truncated_map", b"\x81\xa1a"),
        ("trailing", b"\x80\x80"),
        ("array", b"\x90"),
        ("string", b"\xa3abc"),
        ("bad_utf8_key", b"\x81\xa2\xc3\x28\x01"),
        ("timestamp_value", b"\x81\xa1k\xd6\xff\x00\x00\x00\x00"),
        ("deep_nesting", b"\x81\xa8messages" + b"\x91" * 20_000 + b"\xc0"),
        ("lying_length", b"\xdf\xff\xff\xff\xff"),
    ):
        for kind in (Kind.TURN, Kind.END, Kind.READY, Kind.CLOSE):
            yield f"{kind.name}/{name}", kind, frame


def _targeted_fleet() -> Iterator[tuple[str, Kind, bytes]]:
    """STATUS bodies, and the FLEET and HEARTBEAT gauges rules that span fields."""
    for name, frame in (("empty", EMPTY_BODY), ("field", _pack({"x": 1})), ("array", b"\x90")):
        yield f"STATUS/{name}", Kind.STATUS, frame
    fleet = _unpack(valid_bodies()["FLEET/two_workers"][1].encode())
    w0 = fleet["workers"][0]
    yield "FLEET/duplicate_worker", Kind.FLEET, _pack({**fleet, "workers": [w0, w0]})
    many = [{**w0, "worker": f"w{i}"} for i in range(L.MAX_FLEET_WORKERS + 1)]
    yield "FLEET/too_many_workers", Kind.FLEET, _pack({**fleet, "workers": many})
    yield "FLEET/most_workers", Kind.FLEET, _pack({**fleet, "workers": many[:-1]})
    counters = fleet["totals"]
    for name, change in (
        ("cold_reasons_short", {"cold_reasons": {"new": 2}}),
        ("tokens_short", {"prefill_tokens": 1}),
        ("no_paths_but_reasons", {"paths": {}}),
        ("zero_counts", {"paths": {"cold": 0}, "cold_reasons": {}}),
    ):
        yield f"FLEET/totals_{name}", Kind.FLEET, _pack({**fleet, "totals": {**counters, **change}})
        gauges = {**w0["gauges"], "counters": {**counters, **change}}
        workers = [{**w0, "gauges": gauges}, fleet["workers"][1]]
        yield f"FLEET/worker_{name}", Kind.FLEET, _pack({**fleet, "workers": workers})
        beat = _unpack(valid_bodies()["HEARTBEAT/gauges"][1].encode())
        beat["gauges"]["counters"] = {**counters, **change}
        yield f"HEARTBEAT/gauges_{name}", Kind.HEARTBEAT, _pack(beat)
    beat = _unpack(valid_bodies()["HEARTBEAT/values"][1].encode())
    yield "HEARTBEAT/gauges_nil", Kind.HEARTBEAT, _pack({**beat, "gauges": None})


def hostile_bodies() -> Iterator[tuple[str, Kind, bytes]]:
    """(name, kind, body) of every probe: most must be refused, a few are odd but valid."""
    seen: set[str] = set()
    for name, (kind, value) in valid_bodies().items():
        base = name.split("/")[0]
        if name not in _MUTATED:
            continue
        for sub, changed in _mutations(_unpack(value.encode()), base):
            if sub not in seen:
                seen.add(sub)
                yield sub, kind, _pack(changed)
    yield from _targeted()


_MUTATED = (
    "TURN/full",
    "TOKEN/basic",
    "END/stop/warm",
    "OVERFLOW/basic",
    "ERROR/non_ascii",
    "SESSION_LOST/exited/True",
    "READY/one_session",
    "HEARTBEAT/values",
    "DISCONNECT/reason",
    "HEARTBEAT/gauges",  # the gauges and counters, every map key
    "FLEET/one_worker",  # a worker's fields (its gauges are HEARTBEAT's)
    "TURN/stop",  # the optional stop strings (the other fields are TURN/full's)
    "LOOKUP/basic",
    "INDEX/basic",
    "FOUND/session",
)


def decoder(kind: Kind) -> Callable[[bytes], object]:
    """The function that validates a body of ``kind`` (an empty map for kinds without fields)."""
    cls = BODY_TYPES.get(kind)
    if cls is not None:
        decode: Callable[[bytes], object] = cls.decode
        return decode
    return lambda frame: decode_empty(frame, kind.name)


def answer(kind: Kind, frame: bytes) -> str | None:
    """The ERROR code a body gets from today's decoder, or None when it is accepted."""
    try:
        decoder(kind)(frame)
    except ProtocolViolation as exc:
        return str(exc.code)
    return None


MAX_HEX_BYTES = 512
"""Bodies longer than this are stored as their SHA-256 and length (the file stays small); the
test rebuilds them from the cases above and compares digests, which pins the same bytes.
Hostile bodies, derived from the valid ones by plain msgpack, are stored in hex only up to
:data:`MAX_HOSTILE_HEX_BYTES`."""
MAX_HOSTILE_HEX_BYTES = 48


def record(frame: bytes, max_hex: int = MAX_HEX_BYTES) -> str:
    """How a body is stored: its hex, or ``sha256:<digest, 16 hex digits>:<length>`` if long."""
    if len(frame) <= max_hex:
        return frame.hex()
    return f"sha256:{hashlib.sha256(frame).hexdigest()[:16]}:{len(frame)}"


def capture() -> dict[str, Any]:
    """Today's bytes and answers for every case (what ``--write`` stores)."""
    return {
        "bodies": {name: record(v.encode()) for name, (_, v) in valid_bodies().items()},
        "frames": {name: [record(f) for f in fr] for name, fr in frame_cases().items()},
        "hostile": {
            name: {
                "kind": kind.name,
                "body": record(frame, MAX_HOSTILE_HEX_BYTES),
                "code": answer(kind, frame),
            }
            for name, kind, frame in hostile_bodies()
        },
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help=f"Overwrite {DATA}.")
    args = ap.parse_args()
    data = capture()
    counts = {k: len(v) for k, v in data.items()}
    if args.write:
        DATA.write_text(json.dumps(data, indent=0, sort_keys=True) + "\n")
        print(f"wrote {DATA} {counts}")
    else:
        print(counts)


if __name__ == "__main__":
    main()
