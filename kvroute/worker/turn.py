"""One turn of one session: prefill what the cache lacks, generate, commit (I/O-free).

A `Turn` never calls the model itself: the scheduler batches ``pending`` ids of many turns into
one forward pass and hands each turn its logits. The turn samples, streams whole UTF-8 characters,
and at the end commits (T, K) so that they match the cache exactly:

- the stop token is neither fed nor streamed;
- a stop string (``params.stop``) ends the turn with ``finish_reason`` stop: text that could
  still begin one is held back (:class:`~kvroute.worker.stop.StopMatcher`), the match is never
  streamed, and the commit stops at a token boundary at or before the match start. The client
  echoes the reply as streamed, which starts with the committed reply, so the next turn takes
  the text-prefix path and re-feeds the characters between the two;
- a token sampled but never fed (the last one at ``length``, ``cancelled`` or a stop string) is
  not committed, and neither are trailing tokens that end mid-character: K stops at the last fed
  token after which the reply text is whole and no longer than the streamed text, T = prompt +
  that text. The client's echo of the full reply still starts with T, so the next turn takes the
  text-prefix path and re-feeds the few missing characters;
- a turn that ends before its prompt is all in (cancelled while prefilling) commits nothing: the
  session rolls back (`Session.rollback`).

The turn writes the session only through `Session.trim_to_keep`, `Session.commit` and
`Session.rollback`, which check the invariant.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from kvroute.engine.sampling import Sampler, SamplingParams
from kvroute.engine.tokenizer import StreamDecoder, Tokenizer
from kvroute.proto.messages import (
    CachePath,
    ColdReason,
    FinishReason,
    KvSource,
    TurnStats,
    reply_sha256,
)

from .events import EndEvent, TokenEvent
from .planner import PrefillPlan
from .sessions import Session
from .stop import StopMatcher


class Turn:
    """State of a turn in flight.

    Parameters
    ----------
    request_id, session:
        Who asked and which session's cache this turn extends (``session.in_flight`` is set).
    prompt:
        The rendered prompt text.
    plan:
        How much of the cache is reused (``planner.plan_prefill``); ``session.begin`` has been
        called with ``plan.keep``, and the cache is trimmed to it when the first ids are taken.
    params:
        Sampling parameters (max_tokens already checked against n_ctx) and stop strings.
    """

    def __init__(
        self,
        request_id: bytes,
        session: Session,
        prompt: str,
        plan: PrefillPlan,
        params: SamplingParams,
        tokenizer: Tokenizer,
        eot_ids: frozenset[int],
        worker_id: str = "worker",
        clock: Callable[[], float] = time.perf_counter,
        reply_to: bytes = b"",
    ) -> None:
        self.request_id = request_id
        self.reply_to = reply_to  # carried by every event of this turn
        self.session = session
        self.prompt = prompt
        self.plan = plan
        self.params = params
        self.worker_id = worker_id
        self._eot = eot_ids
        self._clock = clock
        self._sampler = Sampler(params)
        self._decoder = StreamDecoder(tokenizer)
        self._stop = StopMatcher(params.stop)
        self.streamed_chars = 0  # of the decoded text, what TOKEN frames carried so far
        self.pending: list[int] = plan.new_ids  # ids to feed next (prefill, then one token)
        self.generated: list[int] = []  # sampled and streamed (stop token excluded)
        self.fed_generated = 0  # of those, how many are in the cache
        self._boundaries: list[tuple[int, int]] = [(0, 0)]  # (tokens, chars) where text is whole
        self.seq = 0
        self.cancelled = False
        self.finish_reason: FinishReason | None = None
        self.t_start = clock()
        self.t_first: float | None = None
        # Where the reused KV comes from, and the time its decoding took (the first `take`).
        self.kv_source = session.kv_from if plan.keep and session.cache.parked else KvSource.HOT
        # A session read back from disk owes its reading time to this turn: it counts in
        # restore_ms and in ttft_ms.
        self.restore_ms = round(session.load_ms, 3) if self.kv_source is not KvSource.HOT else 0.0
        self.t_start -= session.load_ms / 1e3
        session.load_ms = 0.0
        if plan.path == CachePath.COLD:
            self.cold_reason: ColdReason | None = (
                session.cold_reason if not session.tokens else ColdReason.DIVERGED
            )
        else:
            self.cold_reason = None

    @property
    def prefilling(self) -> bool:
        """Still feeding prompt tokens (no token sampled yet)."""
        return self.t_first is None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def take(self, budget: int) -> list[int]:
        """The next ids to feed, at most ``budget`` (prefill is chunked by the scheduler).

        The caller feeds them to the model at once: the session's cache is trimmed to
        ``plan.keep`` first, so they land right after the reused positions.
        """
        if not self.session.feeding:
            t0 = self._clock()
            self.session.trim_to_keep(len(self.pending))
            if self.kv_source is not KvSource.HOT:
                self.restore_ms = round(self.restore_ms + (self._clock() - t0) * 1e3, 3)
        ids, self.pending = self.pending[:budget], self.pending[budget:]
        if not self.prefilling:
            self.fed_generated += len(ids)
        return ids

    def on_logits(self, logits: np.ndarray) -> TokenEvent | None:
        """Consume the logits of the last fed position; sample if the prompt is all in.

        Returns the streamed piece, or None (prefill chunk not last, or a stop token).
        """
        if self.pending:
            return None  # mid-prefill: these logits are not the prompt's last position
        if self.t_first is None:
            self.t_first = self._clock()
        tok = self._sampler(logits)
        if tok in self._eot and not self.params.ignore_eos:
            self.finish_reason = FinishReason.STOP
            return None
        self.generated.append(tok)
        text = self._decoder.push(tok)
        if self._decoder.at_boundary:
            self._boundaries.append((len(self.generated), len(self._decoder.text)))
        if text:
            text = self._stop.feed(text)
        if self._stop.matched is not None:
            self.finish_reason = FinishReason.STOP  # this token is not fed: it holds the match
        elif len(self.generated) >= self.params.max_tokens:
            self.finish_reason = FinishReason.LENGTH
        else:
            self.pending = [tok]
        return self._token_event(text, (tok,))

    def cancel(self) -> None:
        """Stop at the next step; what was fed is committed."""
        self.cancelled = True

    @property
    def fed(self) -> int:
        """Ids this turn has handed to the model so far (prompt, then generated)."""
        new = len(self.plan.prompt_ids) - self.plan.keep
        return new - len(self.pending) if self.prefilling else new + self.fed_generated

    def check(self) -> None:
        """Assert the in-flight invariant (our own bug if it fails).

        Until the first feed the cache is K; from then on it is exactly the reused positions
        plus what this turn fed.
        """
        s = self.session
        assert s.in_flight == self.request_id, f"session {s.session_id!r}: not this turn's"
        s.check()
        if s.feeding:
            assert s.cache.length == self.plan.keep + self.fed, (
                f"session {s.session_id!r}: cache holds {s.cache.length} positions, "
                f"the turn reused {self.plan.keep} and fed {self.fed}"
            )

    def _token_event(self, text: str, ids: tuple[int, ...]) -> TokenEvent:
        self.streamed_chars += len(text)
        event = TokenEvent(
            self.request_id, self.session.session_id, self.seq, text, ids, self.reply_to
        )
        self.seq += 1
        return event

    def finish(self) -> tuple[TokenEvent | None, EndEvent]:
        """Commit the session and build END (plus a last piece if bytes were left dangling).

        Call once, when ``done`` or ``cancelled``.
        """
        if self.finish_reason is None:
            self.finish_reason = FinishReason.CANCELLED
        t_end = self._clock()
        tail = ""
        if self._stop.matched is None:
            # Dangling bytes become U+FFFD; text held back for a stop string that never came
            # is released (unless the tail completes one).
            tail = self._stop.feed(self._decoder.flush())
            tail += self._stop.flush()
            if self._stop.matched is not None and self.finish_reason is FinishReason.LENGTH:
                self.finish_reason = FinishReason.STOP
        last = self._token_event(tail, ()) if tail else None
        self._commit()
        t_first = self.t_first if self.t_first is not None else t_end
        stats = TurnStats(
            prompt_tokens=len(self.plan.prompt_ids),
            cached_tokens=self.plan.keep,
            prefill_tokens=len(self.plan.prompt_ids) - self.plan.keep,
            generated_tokens=len(self.generated),
            path=self.plan.path,
            cold_reason=self.cold_reason,
            ttft_ms=round((t_first - self.t_start) * 1e3, 3),
            decode_ms=round((t_end - t_first) * 1e3, 3),
            worker=self.worker_id,
            restore_ms=self.restore_ms,
            kv_source=self.kv_source,
        )
        end = EndEvent(
            self.request_id,
            self.session.session_id,
            self.seq,
            self.finish_reason,
            stats,
            reply_sha256(self._decoder.text[: self.streamed_chars]),
            self.reply_to,
        )
        return last, end

    def _commit(self) -> None:
        if self.prefilling:
            # Ended before the prompt was in: no text of this turn is known to match what the
            # cache holds, so nothing of it is kept.
            self.session.rollback()
            return
        n_tok, n_chars = max(
            b
            for b in self._boundaries
            if b[0] <= self.fed_generated and b[1] <= self.streamed_chars
        )
        self.session.commit(
            self.prompt + self._decoder.text[:n_chars],
            self.plan.prompt_ids + self.generated[:n_tok],
        )
