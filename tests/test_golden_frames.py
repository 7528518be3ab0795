"""The wire format is pinned: today's codec produces and accepts the captured golden bytes, and
answers every captured hostile body with the same ERROR code (see :mod:`golden_frames`)."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from golden_frames import (
    DATA,
    MAX_HOSTILE_HEX_BYTES,
    answer,
    frame_cases,
    hostile_bodies,
    record,
    valid_bodies,
)

from kvroute.proto import HEADERS, Kind

GOLDEN: dict[str, Any] = json.loads(DATA.read_text())
BODIES = valid_bodies()
FRAMES = frame_cases()
HOSTILE = [pytest.param(kind, frame, id=name) for name, kind, frame in hostile_bodies()]


def test_every_case_was_captured() -> None:
    """A case added without capturing its bytes (or a captured one dropped) fails here."""
    assert set(BODIES) == set(GOLDEN["bodies"])
    assert set(FRAMES) == set(GOLDEN["frames"])
    assert {p.id for p in HOSTILE} == set(GOLDEN["hostile"])
    assert {kind for kind, _ in BODIES.values()} == {
        Kind.TURN,
        Kind.TOKEN,
        Kind.END,
        Kind.OVERFLOW,
        Kind.ERROR,
        Kind.SESSION_LOST,
        Kind.READY,
        Kind.HEARTBEAT,
        Kind.DISCONNECT,
        Kind.FLEET,
        Kind.LOOKUP,
        Kind.INDEX,
        Kind.FOUND,
    }
    headers = {HEADERS[k]: k for k in Kind}
    framed = {headers[f] for frames in FRAMES.values() for f in frames if f in headers}
    assert framed == set(Kind)  # every kind travels in some captured frame


@pytest.mark.parametrize("name", sorted(BODIES))
def test_body_encodes_to_golden_bytes(name: str) -> None:
    _, body = BODIES[name]
    assert record(body.encode()) == GOLDEN["bodies"][name]


@pytest.mark.parametrize("name", sorted(BODIES))
def test_golden_body_decodes_to_its_value(name: str) -> None:
    _, body = BODIES[name]
    stored = GOLDEN["bodies"][name]
    # A long body is stored as its digest; the previous test pins encode() to those bytes.
    frame = body.encode() if stored.startswith("sha256:") else bytes.fromhex(stored)
    assert record(frame) == stored
    decoded = type(body).decode(frame)
    assert decoded == body
    assert type(decoded) is type(body)


@pytest.mark.parametrize("name", sorted(FRAMES))
def test_frames_are_golden(name: str) -> None:
    assert [record(f) for f in FRAMES[name]] == GOLDEN["frames"][name]


# Where the declared codec answers differently from the captured one, on purpose: the old
# answers contradicted ErrorCode's own definitions (a value of the wrong type is bad_body, a
# value above its limit is too_large), which the declared codec applies to every field.
INT_PROBES = {"int0", "int1", "neg1", "int_max", "uint64_max", "int64_min"}
NUMBER_PROBES = INT_PROBES | {"float", "float_int", "neg_zero", "nan", "inf", "neg_inf"}
NUMERIC_ITEMS: dict[re.Pattern[str], set[str]] = {
    # A token id, or a resident's kv_bytes / last_turn_ns / idle_ms, whose probe is of another
    # type: out_of_range before, bad_body now (a right-typed value out of range stays
    # out_of_range).
    re.compile(r"TOKEN\.ids\[\d\]/"): INT_PROBES,
    re.compile(r"READY\.sessions\[0\]\[[24]\]/"): INT_PROBES,
    re.compile(r"READY\.sessions\[0\]\[3\]/"): NUMBER_PROBES,
}
CHANGED: dict[str, tuple[str, str]] = {
    # A session id or owner above its byte limit in READY.sessions.
    "READY/long_session": ("out_of_range", "too_large"),
    "READY/long_owner": ("out_of_range", "too_large"),
}


def expected_code(name: str, captured: str | None) -> str | None:
    """The captured code, except for the deliberate changes above."""
    if name in CHANGED:
        old, new = CHANGED[name]
        assert captured == old, name
        return new
    for pattern, right_type in NUMERIC_ITEMS.items():
        if pattern.match(name) and name.split("/")[-1] not in right_type:
            assert captured == "out_of_range", name
            return "bad_body"
    return captured


def test_deliberate_changes_are_few() -> None:
    changed = [n for n, v in GOLDEN["hostile"].items() if expected_code(n, v["code"]) != v["code"]]
    assert len(changed) < 0.1 * len(GOLDEN["hostile"])
    assert all(n.startswith(("TOKEN.ids", "READY")) for n in changed)


@pytest.mark.parametrize(("kind", "frame"), HOSTILE)
def test_hostile_body_gets_the_same_answer(
    request: pytest.FixtureRequest, kind: Kind, frame: bytes
) -> None:
    name = request.node.callspec.id
    want = GOLDEN["hostile"][name]
    assert (want["kind"], want["body"]) == (kind.name, record(frame, MAX_HOSTILE_HEX_BYTES))
    assert answer(kind, frame) == expected_code(name, want["code"])
