"""Error codes carried by ERROR messages, and the exception that validation raises."""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    """The ``code`` field of an ERROR body. Clients map codes to typed exceptions."""

    BAD_FRAME = "bad_frame"
    """Wrong number of frames, bad signature, or a routing frame of the wrong size."""
    BAD_VERSION = "bad_version"
    """Header version byte is not :data:`kvroute.proto.kinds.VERSION`."""
    UNKNOWN_KIND = "unknown_kind"
    """Kind byte unknown, or not accepted in this direction (e.g. a client sending TOKEN)."""
    BAD_BODY = "bad_body"
    """Body is not a msgpack map, or a field is missing, unknown or of the wrong type."""
    OUT_OF_RANGE = "out_of_range"
    """A field has the right type but a forbidden value (NaN, max_tokens 10**9, bad enum...)."""
    TOO_LARGE = "too_large"
    """A frame, text or list is above its limit (see :mod:`kvroute.proto.limits`)."""
    NO_WORKER = "no_worker"
    """No live worker can take a new session (retry later; client: ServiceUnavailable)."""
    OVERLOADED = "overloaded"
    """The session's worker cannot accept more messages right now (its queue is full)."""
    SLOW_CONSUMER = "slow_consumer"
    """The client did not read its stream fast enough; the turn was cancelled on the worker."""
    SHUTTING_DOWN = "shutting_down"
    """The broker or worker is stopping; the request did not complete."""
    NOT_OWNER = "not_owner"
    """The session belongs to another client identity; nothing was changed (client: NotOwner)."""
    LIMIT = "limit"
    """A per-client limit (sessions, requests in flight) was reached; the request was not run
    (client: LimitReached)."""
    NOT_IN_FLIGHT = "not_in_flight"
    """A CANCEL named a request of the caller's that the broker has no record of in flight: it
    already ended (its terminal reply, if it could be delivered, went out before this one), it
    was never run, or it was in flight at a broker that restarted since. This ERROR is the
    terminal reply of that request id, so a client still waiting for the request's end stops
    waiting; one that already saw its end drops this one. Nothing was changed, and a CANCEL sent
    again gets the same answer (not retryable)."""
    INTERNAL = "internal"
    """A bug on the answering side; the message says what."""


RETRYABLE_CODES: frozenset[ErrorCode] = frozenset(
    {ErrorCode.NO_WORKER, ErrorCode.OVERLOADED, ErrorCode.SHUTTING_DOWN}
)
"""Codes after which sending the same request again may succeed: the one table of them (the
client raises ServiceUnavailable for these)."""


class ProtocolViolation(Exception):
    """Raised when bytes from the network (or a body about to be sent) break the protocol.

    The receiving edge answers the sender with an ERROR built from ``code`` and ``message``.

    Parameters
    ----------
    code
        The ERROR code to report.
    message
        Human-readable detail: which field, which value, which limit.
    session_id, request_id
        Routing ids of the offending message when they could be read, so the ERROR reaches the
        right stream; empty otherwise.
    """

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        *,
        session_id: bytes = b"",
        request_id: bytes = b"",
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.code: ErrorCode = code
        self.message: str = message
        self.session_id: bytes = session_id
        self.request_id: bytes = request_id
