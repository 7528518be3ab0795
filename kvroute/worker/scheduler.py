"""Run many turns together on one engine (I/O-free; the worker process polls between steps).

Each `Scheduler.step` is one forward pass over a ragged batch: one token for every turn that is
generating (batched decode) plus prompt chunks of turns still prefilling, within a token budget
(``prefill_chunk``), so a long prompt never blocks the worker for more than one chunk. A cancel
takes effect at the next step. Overflow and busy are decided before any session state changes.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from kvroute.engine.engine import Engine
from kvroute.engine.errors import EngineError
from kvroute.engine.sampling import SamplingParams
from kvroute.proto.errors import ErrorCode
from kvroute.proto.messages import ColdReason

from .events import BusyEvent, ErrorEvent, Event, OverflowEvent
from .planner import plan_prefill
from .sessions import SessionStore
from .turn import Turn

logger = logging.getLogger(__name__)


@dataclass
class SchedulerConfig:
    """Knobs of the worker core."""

    prefill_chunk: int = 256  # max prompt tokens fed per step, over all prefilling turns
    kv_budget_bytes: int | None = None  # KV bytes for all sessions; idle ones evicted beyond it


class Scheduler:
    """Sessions and turns of one worker.

    Parameters
    ----------
    engine:
        The loaded model.
    config:
        Chunk size and KV budget.
    worker_id:
        Reported in every END's stats.
    """

    def __init__(
        self, engine: Engine, config: SchedulerConfig | None = None, worker_id: str = "worker"
    ) -> None:
        self.engine = engine
        self.worker_id = worker_id
        self.config = config or SchedulerConfig()
        self.store = SessionStore(engine.new_cache, self.config.kv_budget_bytes)
        self.turns: dict[bytes, Turn] = {}  # session id -> turn in flight

    @property
    def busy(self) -> bool:
        """Whether `step` has work to do."""
        return bool(self.turns)

    def submit(
        self,
        request_id: bytes,
        session_id: bytes,
        messages: Sequence[Mapping[str, str]],
        params: SamplingParams,
        worker_lost: bool = False,
    ) -> list[Event]:
        """Start a turn. Returns immediate answers (BUSY, OVERFLOW, ERROR), else nothing.

        ``worker_lost`` is the broker's word that the session's previous owner died: whatever
        this worker holds for it is stale and is dropped first.
        """
        if session_id in self.turns:
            return [BusyEvent(request_id, session_id)]
        try:
            prompt = self.engine.render(messages)
        except EngineError as exc:
            return [ErrorEvent(request_id, session_id, ErrorCode.BAD_BODY, str(exc))]
        if worker_lost:
            self.store.reset(session_id, ColdReason.WORKER_LOST)
        held = self.store.get(session_id)
        text, tokens = (held.text, held.tokens) if held else ("", [])
        plan = plan_prefill(text, tokens, prompt, self.engine.encode)
        n_ctx = self.engine.n_ctx
        if len(plan.prompt_ids) + params.max_tokens > n_ctx:
            return [
                OverflowEvent(
                    request_id, session_id, len(plan.prompt_ids), params.max_tokens, n_ctx
                )
            ]
        # Past this point the turn is accepted and the session may change.
        session = self.store.acquire(session_id)
        session.cache.truncate(plan.keep)
        session.in_flight = request_id
        turn = Turn(
            request_id,
            session,
            prompt,
            plan,
            params,
            self.engine.tokenizer,
            self.engine.eot_ids,
            self.worker_id,
        )
        self.turns[session_id] = turn
        grow = len(plan.new_ids) + params.max_tokens
        self.store.evict_to_fit(grow * session.cache.bytes_per_token)
        return []

    def cancel(self, session_id: bytes, request_id: bytes | None = None) -> bool:
        """Cancel the session's turn in flight (if ``request_id`` given, only that one)."""
        turn = self.turns.get(session_id)
        if turn is None or (request_id is not None and turn.request_id != request_id):
            return False
        turn.cancel()
        return True

    def reset(self, session_id: bytes) -> list[Event]:
        """Forget a session (idempotent). A turn in flight ends as cancelled first."""
        events: list[Event] = []
        turn = self.turns.pop(session_id, None)
        if turn is not None:
            turn.cancel()
            events.extend(self._finish(turn))
        self.store.reset(session_id)
        return events

    def step(self) -> list[Event]:
        """One forward pass over every turn in flight; returns the events it produced."""
        events: list[Event] = []
        for turn in [t for t in self.turns.values() if t.cancelled or t.done]:
            del self.turns[turn.session.session_id]
            events.extend(self._finish(turn))
        segments, batch = [], []
        budget = self.config.prefill_chunk
        for turn in self.turns.values():
            if turn.prefilling:
                if budget <= 0:
                    continue
                ids = turn.take(budget)
                budget -= len(ids)
            else:
                ids = turn.take(1)
            segments.append((turn.session.cache, ids))
            batch.append(turn)
        if not segments:
            return events
        try:
            logits = self.engine.forward(segments)
        except Exception:
            # Our bug or an exhausted machine: fail these turns, keep the worker and others.
            logger.exception("forward pass failed for %d turns", len(batch))
            for turn in batch:
                events.append(self._fail(turn))
            return events
        for turn, row in zip(batch, logits, strict=True):
            try:
                piece = turn.on_logits(row)
            except Exception:
                # A bug in one turn's sampling must not take the worker and the others down.
                logger.exception("sampling failed for session %r", turn.session.session_id)
                events.append(self._fail(turn))
                continue
            if piece is not None:
                events.append(piece)
            if turn.done:
                del self.turns[turn.session.session_id]
                events.extend(self._finish(turn))
        return events

    def _finish(self, turn: Turn) -> list[Event]:
        last, end = turn.finish()
        turn.session.in_flight = None
        return [last, end] if last is not None else [end]

    def _fail(self, turn: Turn) -> ErrorEvent:
        self.turns.pop(turn.session.session_id, None)
        self.store.reset(turn.session.session_id)
        return ErrorEvent(
            turn.request_id,
            turn.session.session_id,
            ErrorCode.INTERNAL,
            "the turn failed on the worker; the session will restart cold",
        )
