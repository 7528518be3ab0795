"""Bodies of the turn path: the TURN request and the replies streamed for it.

A TURN is answered by zero or more TOKEN, then exactly one terminal: END, OVERFLOW, ERROR,
SESSION_LOST or BUSY. Each class here encodes with ``.encode()`` and decodes with
``Cls.decode(frame)``; both apply the same checks (see :class:`kvroute.proto.fields.Body`).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, ClassVar

from . import limits as L
from .errors import ErrorCode, ProtocolViolation
from .fields import Body, BodyReader


class Role(StrEnum):
    """Author of a chat message. The worker renders messages with the model's chat template."""

    SYSTEM = "system"
    USER = "user"
    ASSISTANT = "assistant"


class FinishReason(StrEnum):
    """Why generation stopped (END ``finish_reason``)."""

    STOP = "stop"  # an end-of-turn / eos id declared by the model
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
    RESET = "reset"  # the client sent RESET
    DIVERGED = "diverged"  # history shares no token with the cache
    WORKER_LOST = "worker_lost"  # the previous owner died (flags bit 0 was set)


@dataclass(frozen=True, slots=True)
class ChatMessage:
    """One chat message of a TURN's history."""

    role: Role
    content: str


@dataclass(frozen=True, slots=True)
class TurnRequest(Body):
    """TURN body: the whole chat history plus sampling settings.

    Every key is required on the wire (the defaults here are for senders). Limits: 1 to
    :data:`~kvroute.proto.limits.MAX_MESSAGES` messages, the last one from the user, at most
    :data:`~kvroute.proto.limits.MAX_TEXT_CHARS` characters of content in total;
    ``1 <= max_tokens <= MAX_MAX_TOKENS``; ``temperature`` finite in [0, MAX_TEMPERATURE]
    (0 = greedy); ``0 < top_p <= 1``; ``0 <= top_k <= MAX_TOP_K`` (0 = off); ``seed`` in
    [0, 2**64 - 1] or nil. The worker answers OVERFLOW if prompt + max_tokens exceed its n_ctx.
    """

    WHAT: ClassVar[str] = "TURN"
    messages: Sequence[ChatMessage]
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    def message_dicts(self) -> list[dict[str, str]]:
        """The history as ``[{"role": ..., "content": ...}]`` (what chat templates take)."""
        return [{"role": str(m.role), "content": m.content} for m in self.messages]

    def to_map(self) -> dict[str, Any]:
        return {
            "messages": self.message_dicts(),
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "seed": self.seed,
        }

    @classmethod
    def read(cls, r: BodyReader) -> TurnRequest:
        items = r.get_list("messages", L.MAX_MESSAGES, min_len=1)
        messages = []
        total = 0
        for i, item in enumerate(items):
            m = BodyReader.nested(item, f"TURN.messages[{i}]")
            msg = ChatMessage(m.get_enum("role", Role), m.get_str("content", L.MAX_TEXT_CHARS))
            m.finish()
            total += len(msg.content)
            messages.append(msg)
        if total > L.MAX_TEXT_CHARS:
            raise ProtocolViolation(
                ErrorCode.TOO_LARGE, f"TURN.messages: {total} chars > {L.MAX_TEXT_CHARS}"
            )
        if messages[-1].role != Role.USER:
            # The worker appends the assistant prompt after the history; anything but a user
            # message last would make it answer itself.
            raise ProtocolViolation(
                ErrorCode.OUT_OF_RANGE, "TURN.messages: the last message must be from the user"
            )
        return cls(
            messages=tuple(messages),
            max_tokens=r.get_int("max_tokens", 1, L.MAX_MAX_TOKENS),
            temperature=r.get_float("temperature", 0.0, L.MAX_TEMPERATURE),
            top_p=r.get_float("top_p", 0.0, 1.0, lo_open=True),
            top_k=r.get_int("top_k", 0, L.MAX_TOP_K),
            seed=r.get_int("seed", 0, L.MAX_SEED, optional=True),
        )


@dataclass(frozen=True, slots=True)
class Token(Body):
    """TOKEN body: one or more generated tokens.

    ``seq`` counts TOKEN frames of this request from 0 without gaps (a gap means loss). ``text`` is
    whole UTF-8 characters only (a worker holds back a token that ends mid-character, so ``text``
    may be empty while ``ids`` is not); special tokens never appear in it.
    """

    WHAT: ClassVar[str] = "TOKEN"
    seq: int
    text: str
    ids: Sequence[int]

    def to_map(self) -> dict[str, Any]:
        return {"seq": self.seq, "text": self.text, "ids": list(self.ids)}

    @classmethod
    def read(cls, r: BodyReader) -> Token:
        seq = r.get_int("seq", 0, L.MAX_SEQ)
        text = r.get_str("text", L.MAX_TOKEN_TEXT_CHARS)
        ids = r.get_list("ids", L.MAX_TOKEN_IDS)
        for i in ids:
            if type(i) is not int or not 0 <= i <= L.MAX_TOKEN_ID:
                raise ProtocolViolation(
                    ErrorCode.OUT_OF_RANGE, f"TOKEN.ids: {i!r:.40} is not a token id"
                )
        return cls(seq=seq, text=text, ids=tuple(ids))


@dataclass(frozen=True, slots=True)
class TurnStats(Body):
    """END ``stats``: what the turn cost and how the cache was used.

    Invariants (checked): ``prompt_tokens == cached_tokens + prefill_tokens``; ``cold_reason`` is
    set exactly when ``path`` is cold, and a cold turn reused nothing (``cached_tokens == 0``).
    ``ttft_ms`` is worker-side, from receiving the TURN to the first token; ``decode_ms`` the
    time from the first token to the last. ``worker`` is the id READY announced.
    """

    WHAT: ClassVar[str] = "END.stats"
    prompt_tokens: int
    cached_tokens: int
    prefill_tokens: int
    generated_tokens: int
    path: CachePath
    cold_reason: ColdReason | None
    ttft_ms: float
    decode_ms: float
    worker: str

    def to_map(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens,
            "prefill_tokens": self.prefill_tokens,
            "generated_tokens": self.generated_tokens,
            "path": self.path,
            "cold_reason": self.cold_reason,
            "ttft_ms": self.ttft_ms,
            "decode_ms": self.decode_ms,
            "worker": self.worker,
        }

    @classmethod
    def read(cls, r: BodyReader) -> TurnStats:
        s = cls(
            prompt_tokens=r.get_int("prompt_tokens", 0, L.MAX_COUNT),
            cached_tokens=r.get_int("cached_tokens", 0, L.MAX_COUNT),
            prefill_tokens=r.get_int("prefill_tokens", 0, L.MAX_COUNT),
            generated_tokens=r.get_int("generated_tokens", 0, L.MAX_COUNT),
            path=r.get_enum("path", CachePath),
            cold_reason=r.get_enum("cold_reason", ColdReason, optional=True),
            ttft_ms=r.get_float("ttft_ms", 0.0, L.MAX_MS),
            decode_ms=r.get_float("decode_ms", 0.0, L.MAX_MS),
            worker=r.get_str("worker", L.MAX_NAME_CHARS, min_chars=1),
        )
        if s.cached_tokens + s.prefill_tokens != s.prompt_tokens:
            raise ProtocolViolation(
                ErrorCode.OUT_OF_RANGE,
                f"END.stats: cached {s.cached_tokens} + prefill {s.prefill_tokens}"
                f" != prompt {s.prompt_tokens}",
            )
        if (s.path == CachePath.COLD) != (s.cold_reason is not None):
            raise ProtocolViolation(
                ErrorCode.OUT_OF_RANGE, "END.stats: cold_reason must be set iff path is cold"
            )
        if s.path == CachePath.COLD and s.cached_tokens:
            raise ProtocolViolation(ErrorCode.OUT_OF_RANGE, "END.stats: a cold turn reused tokens")
        return s


_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def reply_sha256(text: str) -> str:
    """Hex SHA-256 of a reply's UTF-8 text: END ``reply_sha256`` (clients check their stream)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True, slots=True)
class TurnEnd(Body):
    """END body: the turn finished and was committed (or rolled back, if cancelled).

    ``seq`` is the number of TOKEN frames sent before it, so a client can tell it lost none.
    ``reply_sha256`` is :func:`reply_sha256` of the reply text the worker committed: the
    concatenated TOKEN texts must hash to it, and it is what the client echoes next turn.
    """

    WHAT: ClassVar[str] = "END"
    seq: int
    finish_reason: FinishReason
    reply_sha256: str
    stats: TurnStats

    def to_map(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "finish_reason": self.finish_reason,
            "reply_sha256": self.reply_sha256,
            "stats": self.stats.to_map(),
        }

    @classmethod
    def read(cls, r: BodyReader) -> TurnEnd:
        seq = r.get_int("seq", 0, L.MAX_SEQ)
        finish = r.get_enum("finish_reason", FinishReason)
        digest = r.get_str("reply_sha256", 64)
        if not _SHA256_HEX.fullmatch(digest):
            raise ProtocolViolation(
                ErrorCode.OUT_OF_RANGE, "END.reply_sha256: expected 64 lowercase hex digits"
            )
        stats_reader = r.get_map("stats")
        stats = TurnStats.read(stats_reader)
        stats_reader.finish()
        return cls(seq=seq, finish_reason=finish, reply_sha256=digest, stats=stats)


@dataclass(frozen=True, slots=True)
class Overflow(Body):
    """OVERFLOW body: prompt + max_tokens would not fit the worker's context; nothing changed.

    Checked: ``prompt_tokens + max_tokens > n_ctx`` (otherwise it is not an overflow).
    """

    WHAT: ClassVar[str] = "OVERFLOW"
    prompt_tokens: int
    max_tokens: int
    n_ctx: int

    @property
    def needed(self) -> int:
        """Context positions the turn would need."""
        return self.prompt_tokens + self.max_tokens

    def to_map(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "max_tokens": self.max_tokens,
            "n_ctx": self.n_ctx,
        }

    @classmethod
    def read(cls, r: BodyReader) -> Overflow:
        o = cls(
            prompt_tokens=r.get_int("prompt_tokens", 0, L.MAX_COUNT),
            max_tokens=r.get_int("max_tokens", 1, L.MAX_MAX_TOKENS),
            n_ctx=r.get_int("n_ctx", 1, L.MAX_N_CTX),
        )
        if o.needed <= o.n_ctx:
            raise ProtocolViolation(
                ErrorCode.OUT_OF_RANGE, f"OVERFLOW: {o.needed} tokens fit in n_ctx {o.n_ctx}"
            )
        return o
