"""What the I/O-free worker core reports; the socket adapter turns each into one frame.

Every event carries its full address (``reply_to``: the client frame the broker gave with the
request, plus session and request id), so the adapter keeps no table from requests to clients.
"""

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
    reply_to: bytes = b""  # the client frame to answer (b"": in-process use)


@dataclass(frozen=True)
class EndEvent:
    """The turn finished and was committed."""

    request_id: bytes
    session_id: bytes
    seq: int  # TOKEN events sent before it
    finish_reason: FinishReason
    stats: TurnStats
    reply_sha256: str  # sha256 of the whole streamed reply text, for end-to-end checks
    reply_to: bytes = b""  # the client frame to answer (b"": in-process use)


@dataclass(frozen=True)
class OverflowEvent:
    """The turn does not fit in n_ctx; nothing was changed. ``overflow`` is the OVERFLOW body."""

    request_id: bytes
    session_id: bytes
    overflow: Overflow
    reply_to: bytes = b""  # the client frame to answer (b"": in-process use)


@dataclass(frozen=True)
class BusyEvent:
    """The session already has a turn in flight; this one was refused."""

    request_id: bytes
    session_id: bytes
    reply_to: bytes = b""  # the client frame to answer (b"": in-process use)


@dataclass(frozen=True)
class ErrorEvent:
    """The request was refused or failed; ``code`` is a protocol error code."""

    request_id: bytes
    session_id: bytes
    code: ErrorCode
    message: str
    reply_to: bytes = b""  # the client frame to answer (b"": in-process use)


Event = TokenEvent | EndEvent | OverflowEvent | BusyEvent | ErrorEvent
