"""Bodies of the turn path: the TURN request and the replies streamed for it.

A TURN is answered by zero or more TOKEN, then exactly one terminal: END, OVERFLOW, ERROR,
SESSION_LOST or BUSY. Each class here is the one declaration of its body: it encodes with
``.encode()`` and decodes with ``Cls.decode(frame)``, both applying the same checks (see
:class:`kvroute.proto.fields.Body`).
"""

from __future__ import annotations

import hashlib
from enum import StrEnum
from typing import Annotated, ClassVar

import msgspec
from msgspec import Meta

from . import limits as L
from .errors import ErrorCode, ProtocolViolation
from .fields import Body, Count, MaxTokens, Millis, NCtx, Seq, WorkerId


class Role(StrEnum):
    """Author of a chat message. The worker renders messages with the model's chat template."""

    SYSTEM = "system"
    USER = "user"
    ASSISTANT = "assistant"


class FinishReason(StrEnum):
    """Why generation stopped (END ``finish_reason``)."""

    STOP = "stop"  # an end-of-turn / eos id declared by the model, or a stop string
    LENGTH = "length"  # max_tokens generated
    CANCELLED = "cancelled"  # CANCEL received (or the broker cancelled for a vanished client)


class CachePath(StrEnum):
    """How the worker reused the session's KV cache (END ``stats.path``)."""

    COLD = "cold"  # nothing reused: full prefill
    TEXT_PREFIX = "text_prefix"  # new prompt text extends the committed text: suffix tokenized
    TOKEN_PREFIX = "token_prefix"  # fallback: longest common token prefix with the cache


class ColdReason(StrEnum):
    """Why a turn was cold (END ``stats.cold_reason``; nil unless ``path`` is cold)."""

    NEW = "new"  # the worker never saw the session
    EVICTED = "evicted"  # the worker evicted it to stay in its KV budget
    RESET = "reset"  # the client sent RESET (or the worker reset it after an internal error)
    CANCELLED = "cancelled"  # the previous turn was cancelled before anything could be kept
    DIVERGED = "diverged"  # history shares no token with the cache
    WORKER_LOST = "worker_lost"  # the previous owner died (flags bit 0 was set)
    SPILL_INVALID = "spill_invalid"  # its spill or checkpoint file was unusable (and deleted)


class KvSource(StrEnum):
    """Where a turn's reused KV came from (END ``stats.kv_source``)."""

    HOT = "hot"  # resident float32 in the worker's RAM (or nothing was reused)
    REST = "rest"  # the worker's RAM, compressed at rest: decoded before the prefill
    DISK = "disk"  # a spill file the worker wrote when it needed the RAM
    CHECKPOINT = "checkpoint"  # a checkpoint a worker that died left in the shared spill dir


class ChatMessage(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One chat message of a TURN's history."""

    role: Role
    content: Annotated[str, Meta(max_length=L.MAX_TEXT_CHARS)]


class TurnRequest(Body, frozen=True):
    """TURN body: the whole chat history plus sampling settings.

    Every key is required on the wire (the defaults here are for senders). The history holds
    at most :data:`~kvroute.proto.limits.MAX_TEXT_CHARS` characters of content in total and
    ends with a user message (checked). ``temperature`` 0 is greedy, ``top_k`` 0 is off,
    ``seed`` nil lets the worker pick. The worker answers OVERFLOW if prompt + max_tokens
    exceed its n_ctx. ``stop`` (optional, left out when empty): strings that end the reply
    before their first occurrence; the match is neither streamed nor committed, and the turn
    ends with ``finish_reason`` stop.
    """

    WHAT: ClassVar[str] = "TURN"
    OPTIONAL: ClassVar[frozenset[str]] = frozenset({"stop"})
    messages: Annotated[tuple[ChatMessage, ...], Meta(min_length=1, max_length=L.MAX_MESSAGES)]
    max_tokens: MaxTokens = 256
    temperature: Annotated[float, Meta(ge=0.0, le=L.MAX_TEMPERATURE)] = 0.0
    top_p: Annotated[float, Meta(gt=0.0, le=1.0)] = 1.0
    top_k: Annotated[int, Meta(ge=0, le=L.MAX_TOP_K)] = 0
    # No upper bound here: msgpack's widest int is L.MAX_SEED (and msgspec bounds fit int64).
    seed: Annotated[int, Meta(ge=0)] | None = None
    stop: Annotated[
        tuple[Annotated[str, Meta(min_length=1, max_length=L.MAX_STOP_CHARS)], ...],
        Meta(max_length=L.MAX_STOP),
    ] = ()

    def message_dicts(self) -> list[dict[str, str]]:
        """The history as ``[{"role": ..., "content": ...}]`` (what chat templates take)."""
        return [{"role": str(m.role), "content": m.content} for m in self.messages]

    def check(self) -> None:
        """At most ``MAX_TEXT_CHARS`` characters of content in all messages together
        (``too_large``); the last message is from the user (``out_of_range``)."""
        total = sum(len(m.content) for m in self.messages)
        if total > L.MAX_TEXT_CHARS:
            raise ProtocolViolation(
                ErrorCode.TOO_LARGE, f"TURN.messages: {total} chars > {L.MAX_TEXT_CHARS}"
            )
        if self.messages[-1].role != Role.USER:
            # The worker appends the assistant prompt after the history; anything but a user
            # message last would make it answer itself.
            raise ProtocolViolation(
                ErrorCode.OUT_OF_RANGE, "TURN.messages: the last message must be from the user"
            )


class Token(Body, frozen=True):
    """TOKEN body: one or more generated tokens.

    ``seq`` counts TOKEN frames of this request from 0 without gaps (a gap means loss). ``text`` is
    whole UTF-8 characters only (a worker holds back a token that ends mid-character, so ``text``
    may be empty while ``ids`` is not); special tokens never appear in it.
    """

    WHAT: ClassVar[str] = "TOKEN"
    seq: Seq
    text: Annotated[str, Meta(max_length=L.MAX_TOKEN_TEXT_CHARS)]
    ids: Annotated[
        tuple[Annotated[int, Meta(ge=0, le=L.MAX_TOKEN_ID)], ...],
        Meta(max_length=L.MAX_TOKEN_IDS),
    ]


class TurnStats(Body, frozen=True, omit_defaults=True):
    """END ``stats``: what the turn cost and how the cache was used.

    Invariants (checked): ``prompt_tokens == cached_tokens + prefill_tokens``; ``cold_reason`` is
    set exactly when ``path`` is cold, and a cold turn reused nothing (``cached_tokens == 0``).
    ``ttft_ms`` is worker-side, from receiving the TURN to the first token; ``decode_ms`` the
    time from the first token to the last. ``worker`` is the id READY announced.

    ``restore_ms`` and ``kv_source`` (optional, left out at their defaults, so a turn that found
    its KV hot encodes as before): the time spent, within ``ttft_ms``, decoding the reused KV
    from where it was (:class:`KvSource`).
    """

    WHAT: ClassVar[str] = "END.stats"
    prompt_tokens: Count
    cached_tokens: Count
    prefill_tokens: Count
    generated_tokens: Count
    path: CachePath
    cold_reason: ColdReason | None
    ttft_ms: Millis
    decode_ms: Millis
    worker: WorkerId
    restore_ms: Millis = 0.0
    kv_source: KvSource = KvSource.HOT

    def check(self) -> None:
        """``prompt_tokens == cached_tokens + prefill_tokens``; ``cold_reason`` is set exactly
        when ``path`` is ``cold``, and a cold turn reused nothing (``cached_tokens == 0``).
        Each is ``out_of_range``."""
        if self.cached_tokens + self.prefill_tokens != self.prompt_tokens:
            raise ProtocolViolation(
                ErrorCode.OUT_OF_RANGE,
                f"END.stats: cached {self.cached_tokens} + prefill {self.prefill_tokens}"
                f" != prompt {self.prompt_tokens}",
            )
        if (self.path == CachePath.COLD) != (self.cold_reason is not None):
            raise ProtocolViolation(
                ErrorCode.OUT_OF_RANGE, "END.stats: cold_reason must be set iff path is cold"
            )
        if self.path == CachePath.COLD and self.cached_tokens:
            raise ProtocolViolation(ErrorCode.OUT_OF_RANGE, "END.stats: a cold turn reused tokens")


def reply_sha256(text: str) -> str:
    """Hex SHA-256 of a reply's UTF-8 text: END ``reply_sha256`` (clients check their stream)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class TurnEnd(Body, frozen=True):
    """END body: the turn finished and was committed (or rolled back, if cancelled).

    ``seq`` is the number of TOKEN frames sent before it, so a client can tell it lost none.
    ``reply_sha256`` is :func:`reply_sha256` of the reply text the worker committed: the
    concatenated TOKEN texts must hash to it (the client checks this before it commits the reply
    to its history; it echoes the text, never the hash).
    """

    WHAT: ClassVar[str] = "END"
    seq: Seq
    finish_reason: FinishReason
    reply_sha256: Annotated[str, Meta(max_length=64, pattern="^[0-9a-f]{64}$")]
    stats: TurnStats

    def check(self) -> None:
        """The rules of ``stats`` (see TurnStats)."""
        self.stats.check()


class Overflow(Body, frozen=True):
    """OVERFLOW body: prompt + max_tokens would not fit the worker's context; nothing changed.

    The worker's scheduler builds one for every turn and sends it when it does not
    :attr:`fit`; a receiver rejects one that fits (it is not an overflow).
    """

    WHAT: ClassVar[str] = "OVERFLOW"
    prompt_tokens: Count
    max_tokens: MaxTokens
    n_ctx: NCtx

    @property
    def needed(self) -> int:
        """Context positions the turn would need."""
        return self.prompt_tokens + self.max_tokens

    @property
    def fits(self) -> bool:
        """Whether the turn fits the context: the one statement of the overflow rule."""
        return self.needed <= self.n_ctx

    def check(self) -> None:
        """``prompt_tokens + max_tokens > n_ctx``: one that fits is ``out_of_range``."""
        if self.fits:
            raise ProtocolViolation(
                ErrorCode.OUT_OF_RANGE, f"OVERFLOW: {self.needed} tokens fit in n_ctx {self.n_ctx}"
            )
