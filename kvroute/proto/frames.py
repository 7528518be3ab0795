"""Frame layouts, hop by hop: build and parse multipart messages without decoding bodies.

Parsers check the frame count, the header (signature, version, kind allowed on this hop) and the
sizes of the routing frames, and raise :class:`ProtocolViolation` carrying whatever session and
request ids could be read, so the ERROR goes back on the right stream. They never decode the body
(the broker forwards it as is); the body's consumer calls ``Cls.decode(msg.body)``.

Layouts (identity frames are added/removed by the ROUTER sockets):

=====================  ===========================================================================
client -> broker       [header, session_id, request_id, body]
                       [header, session_id, request_id, owner, body]
broker -> worker       [header, client, session_id, request_id, flags, body]
                       [header, client, session_id, request_id, flags, principal, body]
worker -> broker       [header, client, session_id, request_id, body]      (replies)
worker <-> broker      [header, body]                                      (control)
broker -> client       [header, session_id, request_id, body]
=====================  ===========================================================================

The 7-frame delivery carries the session's owner (*principal*) when it is not the ``client``
frame itself, i.e. when the broker runs CURVE and the owner is the client's public key, or when
the client presented an owner token. Without either, the owner is the client's routing id, so
the 6 frames say it already. A worker keeps the owner with the session and announces it in
READY when it registers again.

The 5-frame client request carries an *owner token* (1..255 bytes, first byte not zero): without
CURVE it is the principal instead of the client's routing id, so several connections (several
gateways) that present the same token share sessions. A broker running CURVE refuses it
(``bad_frame``): there the authenticated key is the principal.
"""

from __future__ import annotations

from typing import NamedTuple

from .errors import ErrorCode, ProtocolViolation
from .fields import EMPTY_BODY
from .kinds import (
    BROKER_CONTROL_KINDS,
    CLIENT_KINDS,
    CLIENT_REPLY_KINDS,
    FLAG_BYTES,
    FLAG_WORKER_LOST,
    FORWARDED_KINDS,
    HEADER_LEN,
    HEADERS,
    KIND_BY_BYTE,
    REPLY_KINDS,
    SESSIONLESS_KINDS,
    SIGNATURE,
    VERSION,
    WORKER_CONTROL_KINDS,
    Kind,
)
from .limits import MAX_BODY_BYTES, MAX_OWNER_BYTES, MAX_REQUEST_ID_BYTES, MAX_SESSION_ID_BYTES


class ClientRequest(NamedTuple):
    """A client message as the broker's frontend ROUTER receives it."""

    client: bytes  # routing id the ROUTER assigned to the client's DEALER
    kind: Kind
    session_id: bytes
    request_id: bytes
    header: bytes  # forwarded to the worker as is
    body: bytes
    owner: bytes = b""  # the owner token the client presented (5-frame form), else empty


class Delivery(NamedTuple):
    """A forwarded request as the worker's DEALER receives it. Echo ``client``, ``session_id``
    and ``request_id`` in every reply (see :func:`reply_frames`).

    (The frame records are NamedTuples: immutable like frozen dataclasses, and several times
    cheaper to build, which matters on the broker's per-message path.)"""

    kind: Kind
    client: bytes
    session_id: bytes
    request_id: bytes
    flags: int
    body: bytes
    principal: bytes = b""  # the session's owner, when it is not ``client`` (7-frame form)

    @property
    def worker_lost(self) -> bool:
        """Flags bit 0: drop any state held for the session; the turn is cold, worker_lost."""
        return bool(self.flags & FLAG_WORKER_LOST)

    @property
    def owner(self) -> bytes:
        """The session's owner as the broker knows it (keep it to announce in READY)."""
        return self.principal or self.client


class Control(NamedTuple):
    """A two-frame control message (HEARTBEAT, DISCONNECT, ERROR, READY)."""

    kind: Kind
    body: bytes


class WorkerReply(NamedTuple):
    """A reply as the broker's backend ROUTER receives it."""

    worker: bytes  # routing id of the worker's DEALER
    kind: Kind
    client: bytes
    session_id: bytes
    request_id: bytes
    header: bytes  # forwarded to the client as is
    body: bytes


class WorkerControl(NamedTuple):
    """A control message as the broker's backend ROUTER receives it."""

    worker: bytes
    kind: Kind
    body: bytes


class Reply(NamedTuple):
    """A message as the client's DEALER receives it."""

    kind: Kind
    session_id: bytes
    request_id: bytes
    body: bytes


_KIND_BY_HEADER: dict[bytes, Kind] = {h: k for k, h in HEADERS.items()}


def parse_header(
    frame: bytes,
    allowed: frozenset[Kind],
    *,
    session_id: bytes = b"",
    request_id: bytes = b"",
) -> Kind:
    """Check a header frame and return its kind.

    Raises
    ------
    ProtocolViolation
        ``bad_frame`` (length or signature), ``bad_version``, or ``unknown_kind`` (unknown byte,
        or a kind not in ``allowed`` for this hop).
    """
    # Fast path: one dict lookup on the whole frame; the checks below only name the error.
    kind = _KIND_BY_HEADER.get(frame)
    if kind is not None and kind in allowed:
        return kind
    if len(frame) != HEADER_LEN or frame[:3] != SIGNATURE:
        raise ProtocolViolation(
            ErrorCode.BAD_FRAME,
            f"header {frame[:8]!r} is not {SIGNATURE!r} + version + kind",
            session_id=session_id,
            request_id=request_id,
        )
    if frame[3] != VERSION:
        raise ProtocolViolation(
            ErrorCode.BAD_VERSION,
            f"protocol version {frame[3]} not supported (this side speaks {VERSION})",
            session_id=session_id,
            request_id=request_id,
        )
    # Signature and version are right, so the kind is unknown or not allowed on this hop.
    known = KIND_BY_BYTE.get(frame[4])
    name = known.name if known is not None else f"0x{frame[4]:02x}"
    raise ProtocolViolation(
        ErrorCode.UNKNOWN_KIND,
        f"kind {name} not accepted here",
        session_id=session_id,
        request_id=request_id,
    )


def _ids_for_echo(session_id: bytes, request_id: bytes) -> tuple[bytes, bytes]:
    """Routing ids safe to echo in an ERROR (oversize ones are replaced by empty frames)."""
    ok = len(session_id) <= MAX_SESSION_ID_BYTES and len(request_id) <= MAX_REQUEST_ID_BYTES
    return (session_id, request_id) if ok else (b"", b"")


def check_routing(kind: Kind, session_id: bytes, request_id: bytes, body: bytes) -> None:
    """Check the sizes of the routing and body frames of a request or reply.

    Raises
    ------
    ProtocolViolation
        ``bad_frame`` for an empty or oversize session id (empty allowed for
        :data:`~.kinds.SESSIONLESS_KINDS` only) or
        request id; ``too_large`` for a body above :data:`MAX_BODY_BYTES`.
    """
    if (
        0 < len(session_id) <= MAX_SESSION_ID_BYTES
        and 0 < len(request_id) <= MAX_REQUEST_ID_BYTES
        and len(body) <= MAX_BODY_BYTES
    ):
        return  # the common case, in three comparisons
    if len(request_id) > MAX_REQUEST_ID_BYTES or not request_id:
        raise ProtocolViolation(
            ErrorCode.BAD_FRAME, f"request id must be 1..{MAX_REQUEST_ID_BYTES} bytes"
        )
    min_session = 0 if kind in SESSIONLESS_KINDS else 1
    if not min_session <= len(session_id) <= MAX_SESSION_ID_BYTES:
        raise ProtocolViolation(
            ErrorCode.BAD_FRAME,
            f"session id must be {min_session}..{MAX_SESSION_ID_BYTES} bytes",
            request_id=request_id,
        )
    if len(body) > MAX_BODY_BYTES:
        raise ProtocolViolation(
            ErrorCode.TOO_LARGE,
            f"body of {len(body)} bytes > {MAX_BODY_BYTES}",
            session_id=session_id,
            request_id=request_id,
        )


# --- client side ------------------------------------------------------------------------------


def request_frames(
    kind: Kind, session_id: bytes, request_id: bytes, body: bytes = EMPTY_BODY, owner: bytes = b""
) -> list[bytes]:
    """Frames a client sends on its DEALER: TURN, CANCEL (request id of the turn), RESET, CLOSE,
    PING, LOOKUP, INDEX; with ``owner`` (an owner token), the 5-frame form. Raises
    ProtocolViolation for a kind clients may not send or bad routing frames."""
    if kind not in CLIENT_KINDS:
        raise ProtocolViolation(ErrorCode.UNKNOWN_KIND, f"clients do not send {kind.name}")
    check_routing(kind, session_id, request_id, body)
    if owner:
        check_owner(owner)
        return [HEADERS[kind], session_id, request_id, owner, body]
    return [HEADERS[kind], session_id, request_id, body]


def check_owner(owner: bytes, session_id: bytes = b"", request_id: bytes = b"") -> None:
    """Check an owner token frame: 1..255 bytes, first byte not zero (ZeroMQ generates routing
    ids with a zero first byte; a token must never name one of those).

    Raises
    ------
    ProtocolViolation
        ``bad_frame`` (carrying the ids to echo).
    """
    if not 0 < len(owner) <= MAX_OWNER_BYTES or owner[0] == 0:
        raise ProtocolViolation(
            ErrorCode.BAD_FRAME,
            f"owner token must be 1..{MAX_OWNER_BYTES} bytes not starting with a zero byte",
            session_id=session_id,
            request_id=request_id,
        )


def parse_reply(frames: list[bytes]) -> Reply:
    """Parse what a client's DEALER received (4 frames). Raises ProtocolViolation."""
    if len(frames) != 4:
        raise ProtocolViolation(ErrorCode.BAD_FRAME, f"{len(frames)} frames, expected 4")
    header, session_id, request_id, body = frames
    kind = parse_header(header, CLIENT_REPLY_KINDS)
    return Reply(kind, session_id, request_id, body)


# --- broker side ------------------------------------------------------------------------------


def parse_frontend(frames: list[bytes]) -> ClientRequest:
    """Parse a message received on the frontend ROUTER ([client, header, sid, rid, body], or
    [client, header, sid, rid, owner, body]).

    Raises
    ------
    ProtocolViolation
        With the ids to echo when they were readable; the caller answers ERROR to ``frames[0]``.
    """
    n = len(frames)
    if n != 5 and n != 6:
        sid, rid = _ids_for_echo(*frames[2:4]) if n >= 4 else (b"", b"")
        raise ProtocolViolation(
            ErrorCode.BAD_FRAME,
            f"{n - 1} frames, expected 4 (header, session, request, body) or 5 (with an owner)",
            session_id=sid,
            request_id=rid,
        )
    client, header, session_id, request_id = frames[:4]
    body = frames[-1]
    sid, rid = _ids_for_echo(session_id, request_id)
    kind = parse_header(header, CLIENT_KINDS, session_id=sid, request_id=rid)
    check_routing(kind, session_id, request_id, body)
    if n == 5:
        return ClientRequest(client, kind, session_id, request_id, header, body)
    owner = frames[4]
    check_owner(owner, sid, rid)
    return ClientRequest(client, kind, session_id, request_id, header, body, owner)


def parse_backend(frames: list[bytes]) -> WorkerReply | WorkerControl:
    """Parse a message received on the backend ROUTER: a 6-frame reply or a 3-frame control.

    ERROR is a reply when it has an envelope and control otherwise. Raises ProtocolViolation.
    """
    n = len(frames)
    if n < 3:
        raise ProtocolViolation(ErrorCode.BAD_FRAME, f"{n - 1} frames, expected 2 or 5")
    header = frames[1]
    if n == 6:
        kind = parse_header(header, REPLY_KINDS)
        worker, _, client, session_id, request_id, body = frames
        check_routing(kind, session_id, request_id, body)
        return WorkerReply(worker, kind, client, session_id, request_id, header, body)
    if n == 3:
        kind = parse_header(header, WORKER_CONTROL_KINDS)
        if len(frames[2]) > MAX_BODY_BYTES:
            raise ProtocolViolation(ErrorCode.TOO_LARGE, f"body > {MAX_BODY_BYTES} bytes")
        return WorkerControl(frames[0], kind, frames[2])
    raise ProtocolViolation(ErrorCode.BAD_FRAME, f"{n - 1} frames, expected 2 or 5")


def delivery_frames(
    worker: bytes,
    header: bytes,
    client: bytes,
    session_id: bytes,
    request_id: bytes,
    flags: int,
    body: bytes,
    principal: bytes | None = None,
) -> list[bytes]:
    """Frames the broker sends on its backend ROUTER to forward a request to ``worker``;
    with ``principal`` (the session's owner when it is not ``client``), the 7-frame form."""
    if principal is None:
        return [worker, header, client, session_id, request_id, FLAG_BYTES[flags], body]
    return [worker, header, client, session_id, request_id, FLAG_BYTES[flags], principal, body]


def client_frames(
    client: bytes, kind: Kind, session_id: bytes, request_id: bytes, body: bytes = EMPTY_BODY
) -> list[bytes]:
    """Frames the broker sends on its frontend ROUTER (its own replies: ERROR, BUSY, PONG...)."""
    return [client, HEADERS[kind], session_id, request_id, body]


# --- worker side ------------------------------------------------------------------------------


def parse_delivery(frames: list[bytes]) -> Delivery | Control:
    """Parse what a worker's DEALER received: a 6- or 7-frame delivery or a 2-frame control
    message (HEARTBEAT, DISCONNECT, ERROR). Raises ProtocolViolation."""
    n = len(frames)
    if n == 6 or n == 7:
        header, client, session_id, request_id, flags = frames[:5]
        body = frames[-1]
        kind = parse_header(header, FORWARDED_KINDS)
        check_routing(kind, session_id, request_id, body)
        if len(flags) != 1:
            raise ProtocolViolation(ErrorCode.BAD_FRAME, "flags frame must be 1 byte")
        if n == 6:
            return Delivery(kind, client, session_id, request_id, flags[0], body)
        principal = frames[5]
        if not 0 < len(principal) <= MAX_OWNER_BYTES:
            raise ProtocolViolation(
                ErrorCode.BAD_FRAME, f"principal frame must be 1..{MAX_OWNER_BYTES} bytes"
            )
        return Delivery(kind, client, session_id, request_id, flags[0], body, principal)
    if n == 2:
        return Control(parse_header(frames[0], BROKER_CONTROL_KINDS), frames[1])
    raise ProtocolViolation(ErrorCode.BAD_FRAME, f"{n} frames, expected 2, 6 or 7")


def reply_frames(
    kind: Kind, client: bytes, session_id: bytes, request_id: bytes, body: bytes
) -> list[bytes]:
    """Frames a worker sends to answer a :class:`Delivery` (echoing its routing frames)."""
    if kind not in REPLY_KINDS:
        raise ProtocolViolation(ErrorCode.UNKNOWN_KIND, f"{kind.name} is not a reply kind")
    return [HEADERS[kind], client, session_id, request_id, body]


def control_frames(kind: Kind, body: bytes = EMPTY_BODY) -> list[bytes]:
    """Frames of a control message: READY / HEARTBEAT / DISCONNECT / ERROR (worker side) or
    HEARTBEAT / DISCONNECT / ERROR (broker side, after the worker's routing id)."""
    if kind not in WORKER_CONTROL_KINDS | BROKER_CONTROL_KINDS:
        raise ProtocolViolation(ErrorCode.UNKNOWN_KIND, f"{kind.name} is not a control kind")
    return [HEADERS[kind], body]
