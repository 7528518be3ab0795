"""What the I/O-free worker core reports; the socket adapter turns each into one frame."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from kvroute.proto.errors import ErrorCode


@dataclass(frozen=True)
class TurnStats:
    """Per-turn figures sent in END (DESIGN §2)."""

    prompt_tokens: int  # tokens of the rendered prompt (cached + prefilled)
    cached_tokens: int  # prompt tokens whose KV was reused
    prefill_tokens: int  # prompt tokens computed this turn
    generated_tokens: int  # tokens streamed (the stop token excluded)
    path: str  # cold | text_prefix | token_prefix
    cold_reason: str | None  # new | evicted | reset | diverged | worker_lost (path cold only)
    ttft_ms: float  # turn accepted -> first token sampled, on the worker
    decode_ms: float  # first token -> end
    finish_reason: str  # stop | length | cancelled

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for msgpack."""
        return asdict(self)


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
    seq: int
    stats: TurnStats
    reply_sha256: str  # sha256 of the whole streamed reply text, for end-to-end checks


@dataclass(frozen=True)
class OverflowEvent:
    """The turn does not fit in n_ctx; nothing was changed."""

    request_id: bytes
    session_id: bytes
    prompt_tokens: int
    max_tokens: int
    n_ctx: int


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
