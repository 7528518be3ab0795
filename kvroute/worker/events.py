"""What the I/O-free worker core reports; the socket adapter turns each into one frame."""

from __future__ import annotations

from dataclasses import dataclass

from kvroute.proto.errors import ErrorCode
from kvroute.proto.messages import FinishReason, Overflow, TurnStats


@dataclass(frozen=True)
class TokenEvent:
    """A streamed piece: whole UTF-8 characters only (may be empty mid-character)."""

    request_id: bytes
    session_id: bytes
    seq: int  # 0, 1, 2, ... per request; END takes the next number
    text: str
    token_ids: tuple[int, ...]


@dataclass(frozen=True)
class EndEvent:
    """The turn finished and was committed."""

    request_id: bytes
    session_id: bytes
    seq: int  # TOKEN events sent before it
    finish_reason: FinishReason
    stats: TurnStats
    reply_sha256: str  # sha256 of the whole streamed reply text, for end-to-end checks


@dataclass(frozen=True)
class OverflowEvent:
    """The turn does not fit in n_ctx; nothing was changed. ``overflow`` is the OVERFLOW body."""

    request_id: bytes
    session_id: bytes
    overflow: Overflow


@dataclass(frozen=True)
class BusyEvent:
    """The session already has a turn in flight; this one was refused."""

    request_id: bytes
    session_id: bytes


@dataclass(frozen=True)
class ErrorEvent:
    """The request was refused or failed; ``code`` is a protocol error code."""

    request_id: bytes
    session_id: bytes
    code: ErrorCode
    message: str


Event = TokenEvent | EndEvent | OverflowEvent | BusyEvent | ErrorEvent
