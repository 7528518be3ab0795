"""What a finished turn reports: the worker's END (stats, finish reason) plus client-side facts."""

from __future__ import annotations

from dataclasses import dataclass

from kvroute.proto import CachePath, ColdReason, FinishReason, TurnEnd, TurnStats

_REPR_REPLY_CHARS = 60  # a reply longer than this is shortened in repr()


@dataclass(frozen=True, slots=True, repr=False)
class TurnResult:
    """One finished turn, as ``session.last``.

    The worker's numbers live in :attr:`end` (proto's :class:`~kvroute.proto.TurnEnd` and its
    :class:`~kvroute.proto.TurnStats`); the properties below expose them flat, so
    ``session.last.cached_tokens`` reads naturally. ``str()`` is one line for people (cache
    reuse, time to first token, speed, worker, path); ``repr()`` lists the figures by name.

    Attributes
    ----------
    end
        The END body as received (seq, finish reason, reply hash, stats).
    reply
        The reply text exactly as streamed (what was appended to the history).
    dropped
        Messages dropped from the history by ``on_overflow="drop_oldest"`` for this turn.
    client_ttft_ms
        Client-side time from sending the TURN to the first non-empty piece (None if none).
    elapsed_ms
        Client-side time from sending the (last) TURN to its END.
    """

    end: TurnEnd
    reply: str
    dropped: int = 0
    client_ttft_ms: float | None = None
    elapsed_ms: float = 0.0

    @property
    def stats(self) -> TurnStats:
        """The worker's turn stats."""
        return self.end.stats

    @property
    def finish_reason(self) -> FinishReason:
        """``stop`` (end of turn), ``length`` (max_tokens) or ``cancelled``."""
        return self.end.finish_reason

    @property
    def prompt_tokens(self) -> int:
        """Tokens in the rendered prompt."""
        return self.end.stats.prompt_tokens

    @property
    def cached_tokens(self) -> int:
        """Prompt tokens reused from the session's KV cache."""
        return self.end.stats.cached_tokens

    @property
    def prefill_tokens(self) -> int:
        """Prompt tokens computed for this turn (``prompt_tokens - cached_tokens``)."""
        return self.end.stats.prefill_tokens

    @property
    def generated_tokens(self) -> int:
        """Tokens generated (the stop token excluded)."""
        return self.end.stats.generated_tokens

    @property
    def path(self) -> CachePath:
        """How the cache was reused: ``cold``, ``text_prefix`` or ``token_prefix``."""
        return self.end.stats.path

    @property
    def cold_reason(self) -> ColdReason | None:
        """Why the turn was cold (None unless ``path`` is cold)."""
        return self.end.stats.cold_reason

    @property
    def ttft_ms(self) -> float:
        """Worker-side time from receiving the TURN to the first token."""
        return self.end.stats.ttft_ms

    @property
    def decode_ms(self) -> float:
        """Worker-side time from the first token to the last."""
        return self.end.stats.decode_ms

    @property
    def worker(self) -> str:
        """Id of the worker that served the turn."""
        return self.end.stats.worker

    @property
    def tokens_per_s(self) -> float | None:
        """Worker-side decode speed (tokens after the first per second), None if unmeasurable."""
        n, ms = self.generated_tokens - 1, self.decode_ms
        return n * 1000.0 / ms if n > 0 and ms > 0 else None

    def __str__(self) -> str:
        ttft = f"TTFT {self.ttft_ms:.0f} ms (worker)"
        if self.client_ttft_ms is not None:
            ttft = f"TTFT {self.client_ttft_ms:.0f} ms (worker {self.ttft_ms:.0f} ms)"
        parts = [
            f"{self.finish_reason}",
            f"{self.generated_tokens} tokens",
            f"cached {self.cached_tokens}/{self.prompt_tokens} prompt tokens",
            ttft,
        ]
        if self.tokens_per_s is not None:
            parts.append(f"{self.tokens_per_s:.0f} tok/s")
        parts.append(f"worker {self.worker}")
        cold = self.cold_reason
        parts.append(f"cold ({cold})" if cold is not None else str(self.path))
        if self.dropped:
            parts.append(f"dropped {self.dropped} old messages")
        return " · ".join(parts)

    def __repr__(self) -> str:
        reply = self.reply
        if len(reply) > _REPR_REPLY_CHARS:
            reply = reply[: _REPR_REPLY_CHARS - 1] + "…"

        def ms(v: float | None) -> str:
            return "None" if v is None else f"{v:.1f}"

        cold = None if self.cold_reason is None else str(self.cold_reason)
        fields = [
            f"reply={reply!r}",
            f"finish_reason={str(self.finish_reason)!r}",
            f"prompt_tokens={self.prompt_tokens}",
            f"cached_tokens={self.cached_tokens}",
            f"prefill_tokens={self.prefill_tokens}",
            f"generated_tokens={self.generated_tokens}",
            f"path={str(self.path)!r}",
            f"cold_reason={cold!r}",
            f"worker={self.worker!r}",
            f"ttft_ms={ms(self.ttft_ms)}",
            f"client_ttft_ms={ms(self.client_ttft_ms)}",
            f"decode_ms={ms(self.decode_ms)}",
            f"elapsed_ms={ms(self.elapsed_ms)}",
            f"dropped={self.dropped}",
        ]
        return f"TurnResult({', '.join(fields)})"
