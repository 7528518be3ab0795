"""The answers the protocol documents for hostile messages on both broker hops (an oracle).

The rules of :mod:`kvroute.proto` (frame counts, header, routing-frame sizes, limits) are written
out again here, independently of the parsers in :mod:`kvroute.proto.frames`; only body validity is
delegated to the proto decoders, the single owner of those rules. The generators in
:mod:`fuzz_frames` claim the code each structured mutation must get, and that claim is checked
against this oracle as cases are built, so the two check each other.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvroute.proto import (
    EMPTY_BODY,
    ErrorCode,
    ErrorReply,
    Heartbeat,
    Index,
    Kind,
    Lookup,
    ProtocolViolation,
    Ready,
    TurnRequest,
)
from kvroute.proto import limits as L
from kvroute.proto.kinds import CLIENT_KINDS, REPLY_KINDS, WORKER_CONTROL_KINDS

E = ErrorCode


@dataclass(frozen=True)
class Expect:
    """What a message must be answered with.

    ``kinds`` are the acceptable answer kinds (empty: no answer at all). When ERROR is
    acceptable, its code must be in ``codes``. ``echo`` is the request id the answer must carry
    (None: not checked, e.g. when the request id frame itself was unreadable). ``optional``: the
    answer may also not come at all (it depends on a race the sender cannot see).
    """

    kinds: frozenset[Kind]
    codes: frozenset[ErrorCode] = frozenset()
    echo: bytes | None = None
    optional: bool = False

    @property
    def silent(self) -> bool:
        return not self.kinds


def error(*codes: ErrorCode, echo: bytes | None = None) -> Expect:
    return Expect(frozenset({Kind.ERROR}), frozenset(codes), echo)


SILENT = Expect(frozenset())
TURN_RAN = frozenset({Kind.END, Kind.OVERFLOW})
"""A valid TURN runs: END, or OVERFLOW when prompt + max_tokens exceed the tiny n_ctx."""


def cancel_racing_end(rid: bytes) -> Expect:
    """A CANCEL sent while its turn may still run: unanswered if it reached the turn in flight
    (the turn's END answers it), else ERROR not_in_flight, after the END it raced."""
    return Expect(frozenset({Kind.ERROR}), frozenset({E.NOT_IN_FLIGHT}), rid, optional=True)


def _ack_or_bad_body(kind: Kind, body: bytes, echo: bytes) -> Expect:
    """RESET / CLOSE / PING / STATUS: the answer for an empty map, ERROR bad_body for any other
    body (the broker compares the bytes before routing)."""
    if body == EMPTY_BODY:
        return Expect(frozenset({kind}), echo=echo)
    return Expect(frozenset({Kind.ERROR}), frozenset({E.BAD_BODY}), echo)


# --- the oracle -----------------------------------------------------------------------------


def _header_code(header: bytes, allowed: frozenset[Kind]) -> ErrorCode | None:
    if len(header) != 5 or header[:3] != b"KVR":
        return E.BAD_FRAME
    if header[3] != 1:
        return E.BAD_VERSION
    if header[4] not in allowed:
        return E.UNKNOWN_KIND
    return None


def turn_body_expect(body: bytes, echo: bytes) -> Expect:
    """A TURN body's answer: the code the proto decoder raises, else the turn runs."""
    try:
        TurnRequest.decode(body)
    except ProtocolViolation as exc:
        return error(exc.code, echo=echo)
    return Expect(TURN_RAN, echo=echo)


def _body_expect(cls: type[Lookup] | type[Index], body: bytes, answer: Expect) -> Expect:
    """A LOOKUP / INDEX body's answer: the code the proto decoder raises, else ``answer``."""
    try:
        cls.decode(body)
    except ProtocolViolation as exc:
        return error(exc.code, echo=answer.echo)
    return answer


def expect_frontend(frames: list[bytes]) -> Expect:
    """What the service answers a client DEALER that sent ``frames`` (oracle, from the docs)."""
    if len(frames) not in (4, 5):
        # With at least three frames the broker still echoes frames 1 and 2 as the ids.
        ok = len(frames) >= 3 and len(frames[1]) <= 64 and len(frames[2]) <= 32
        return error(E.BAD_FRAME, echo=frames[2] if ok else b"")
    header, sid, rid = frames[:3]
    body = frames[-1]
    owner = frames[3] if len(frames) == 5 else None  # an owner token: another principal
    # The ERROR echoes the ids only if both fit their limits (else empty frames).
    echo = rid if len(sid) <= L.MAX_SESSION_ID_BYTES and len(rid) <= L.MAX_REQUEST_ID_BYTES else b""
    code = _header_code(header, CLIENT_KINDS)
    if code is not None:
        return error(code, echo=echo)
    kind = Kind(header[4])
    if not 1 <= len(rid) <= L.MAX_REQUEST_ID_BYTES:
        return error(E.BAD_FRAME, echo=b"")
    min_sid = 0 if kind in (Kind.PING, Kind.LOOKUP, Kind.STATUS) else 1
    if not min_sid <= len(sid) <= L.MAX_SESSION_ID_BYTES:
        return error(E.BAD_FRAME, echo=rid)
    if len(body) > L.MAX_BODY_BYTES:
        return error(E.TOO_LARGE, echo=rid)
    if owner is not None and not (0 < len(owner) <= L.MAX_OWNER_BYTES and owner[0] != 0):
        return error(E.BAD_FRAME, echo=rid)
    if kind is Kind.LOOKUP:  # nothing indexed for the attacker: nil (or its own session)
        return _body_expect(Lookup, body, Expect(frozenset({Kind.FOUND}), echo=rid))
    if kind is Kind.INDEX:  # its session (or nobody's), or one its owner frame does not own
        ok_or_not_owner = Expect(
            frozenset({Kind.INDEX_OK, Kind.ERROR}), frozenset({E.NOT_OWNER}), rid
        )
        return _body_expect(Index, body, ok_or_not_owner)
    if kind is Kind.TURN:
        expect = turn_body_expect(body, rid)
        if owner is not None:
            # The broker checks ownership before the worker reads the body: the attacker's
            # session, seen by another principal, is not_owner whatever the body.
            return Expect(expect.kinds | {Kind.ERROR}, expect.codes | {E.NOT_OWNER}, rid)
        return expect
    if kind is Kind.CANCEL:
        # No request of this client is in flight here: an empty CANCEL gets its terminal,
        # not_in_flight; any other body is dropped unanswered.
        if body != EMPTY_BODY:
            return SILENT
        return (
            error(E.NOT_IN_FLIGHT, E.NOT_OWNER, echo=rid)
            if owner
            else error(E.NOT_IN_FLIGHT, echo=rid)
        )
    ack = {
        Kind.RESET: Kind.RESET_OK,
        Kind.CLOSE: Kind.CLOSE_OK,
        Kind.PING: Kind.PONG,
        Kind.STATUS: Kind.FLEET,  # the broker's fleet view: about no session, owned by nobody
    }[kind]
    expect = _ack_or_bad_body(ack, body, rid)
    if owner is not None and kind not in (Kind.PING, Kind.STATUS) and expect.kinds == {ack}:
        return Expect(frozenset({ack, Kind.ERROR}), frozenset({E.NOT_OWNER}), rid)
    return expect


def expect_backend(frames: list[bytes]) -> Expect:
    """What the broker answers an *unregistered* DEALER on its backend that sent ``frames``.

    Answers are control messages ([header, body]), so there is no request id to echo.
    """
    n = len(frames)
    if n == 5:  # a reply: header, client, session, request, body
        header, _, sid, rid, body = frames
        code = _header_code(header, REPLY_KINDS)
        if code is not None:
            return error(code)
        if not 1 <= len(rid) <= L.MAX_REQUEST_ID_BYTES or not 1 <= len(sid) <= 64:
            return error(E.BAD_FRAME)
        if len(body) > L.MAX_BODY_BYTES:
            return error(E.TOO_LARGE)
        return Expect(frozenset({Kind.DISCONNECT}))  # "unknown worker: register again"
    if n != 2:
        return error(E.BAD_FRAME)
    header, body = frames
    code = _header_code(header, WORKER_CONTROL_KINDS)
    if code is not None:
        return error(code)
    if len(body) > L.MAX_BODY_BYTES:
        return error(E.TOO_LARGE)
    kind = Kind(header[4])
    decoder: type[Ready] | type[Heartbeat] | type[ErrorReply] | None = {
        Kind.READY: Ready,
        Kind.HEARTBEAT: Heartbeat,
        Kind.ERROR: ErrorReply,
    }.get(kind)
    if decoder is None:
        return SILENT  # DISCONNECT from a stranger: nothing to forget, nothing to say
    try:
        decoder.decode(body)
    except ProtocolViolation as exc:
        return error(exc.code)
    if kind is Kind.READY:
        raise AssertionError("a valid READY would register the rogue; generators avoid it")
    if kind is Kind.HEARTBEAT:
        return Expect(frozenset({Kind.DISCONNECT}))
    return SILENT  # a well-formed ERROR from a worker is only logged
