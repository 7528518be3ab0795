"""Message kinds, the header frame, per-direction kind sets and the flags byte.

Every kvroute message starts with a 5-byte header frame: the signature ``b"KVR"``, one version
byte and one kind byte. The broker routes on the header and the routing frames alone, so the kind
sets below are what it checks per message; they are frozensets of :class:`Kind` (an ``IntEnum``),
so ``header[4] in CLIENT_KINDS`` works on the raw byte without building an enum member.
"""

from __future__ import annotations

from enum import IntEnum

SIGNATURE: bytes = b"KVR"
"""First three bytes of every header frame."""

VERSION: int = 1
"""Protocol version; a peer that sees another version answers ERROR ``bad_version``."""

HEADER_LEN: int = len(SIGNATURE) + 2


class Kind(IntEnum):
    """One byte naming what a message is. Grouped by who sends it (see ``kvroute.proto``)."""

    # client -> broker (TURN, CANCEL, RESET, CLOSE are forwarded to the owning worker)
    TURN = 0x01
    CANCEL = 0x02
    RESET = 0x03
    CLOSE = 0x04
    PING = 0x05  # answered by the broker itself
    LOOKUP = 0x06  # answered by the broker: which session holds a transcript (FOUND)
    INDEX = 0x07  # answered by the broker: a session holds a transcript (INDEX_OK)
    STATUS = 0x08  # answered by the broker: the fleet view (FLEET)
    # worker -> broker -> client (BUSY, ERROR, SESSION_LOST, RESET_OK, CLOSE_OK, PONG also
    # originate in the broker)
    TOKEN = 0x10
    END = 0x11
    OVERFLOW = 0x12
    ERROR = 0x13
    SESSION_LOST = 0x14
    BUSY = 0x15
    RESET_OK = 0x16
    CLOSE_OK = 0x17
    PONG = 0x18
    FOUND = 0x19  # only from the broker (answers LOOKUP)
    INDEX_OK = 0x1A  # only from the broker (answers INDEX)
    FLEET = 0x1B  # only from the broker (answers STATUS)
    # worker <-> broker control (ERROR is also control when it answers a control message)
    READY = 0x20
    HEARTBEAT = 0x21
    DISCONNECT = 0x22


KIND_BY_BYTE: dict[int, Kind] = {int(k): k for k in Kind}
"""Byte -> Kind without the cost of ``Kind(b)`` (an enum lookup that raises on misses)."""

HEADERS: dict[Kind, bytes] = {k: SIGNATURE + bytes((VERSION, k)) for k in Kind}
"""Prebuilt header frame for each kind (senders never build headers per message)."""

CLIENT_KINDS: frozenset[Kind] = frozenset(
    {
        Kind.TURN,
        Kind.CANCEL,
        Kind.RESET,
        Kind.CLOSE,
        Kind.PING,
        Kind.LOOKUP,
        Kind.INDEX,
        Kind.STATUS,
    }
)
"""Kinds a client may send to the broker's frontend."""

SESSIONLESS_KINDS: frozenset[Kind] = frozenset(
    {Kind.PING, Kind.PONG, Kind.LOOKUP, Kind.FOUND, Kind.STATUS, Kind.FLEET}
)
"""Kinds whose session id frame may be empty (they are about no session, or about finding one)."""

FORWARDED_KINDS: frozenset[Kind] = frozenset({Kind.TURN, Kind.CANCEL, Kind.RESET, Kind.CLOSE})
"""Client kinds the broker forwards to the session's worker (PING is answered by the broker)."""


REPLY_KINDS: frozenset[Kind] = frozenset(
    {
        Kind.TOKEN,
        Kind.END,
        Kind.OVERFLOW,
        Kind.ERROR,
        Kind.SESSION_LOST,
        Kind.BUSY,
        Kind.RESET_OK,
        Kind.CLOSE_OK,
    }
)
"""Kinds a worker may send with a routing envelope, in answer to a forwarded request."""

TERMINAL_KINDS: frozenset[Kind] = REPLY_KINDS - {Kind.TOKEN}
"""Replies that end a request: exactly one per TURN / RESET / CLOSE, after zero or more TOKEN."""

CLIENT_REPLY_KINDS: frozenset[Kind] = REPLY_KINDS | {
    Kind.PONG,
    Kind.FOUND,
    Kind.INDEX_OK,
    Kind.FLEET,
}
"""Kinds a client may receive."""

WORKER_CONTROL_KINDS: frozenset[Kind] = frozenset(
    {Kind.READY, Kind.HEARTBEAT, Kind.DISCONNECT, Kind.ERROR}
)
"""Kinds a worker may send without an envelope (two frames: header, body)."""

BROKER_CONTROL_KINDS: frozenset[Kind] = frozenset({Kind.HEARTBEAT, Kind.DISCONNECT, Kind.ERROR})
"""Kinds the broker sends a worker without an envelope."""

FLAG_WORKER_LOST: int = 0x01
"""Flags bit 0 on a forwarded request: the session's previous owner was lost. The worker must
drop any state it holds for the session and report the turn cold with reason ``worker_lost``."""

FLAG_BYTES: tuple[bytes, ...] = tuple(bytes((i,)) for i in range(256))
"""Prebuilt one-byte flags frames."""
