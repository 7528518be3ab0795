"""Run many turns together on one engine (I/O-free; the worker process polls between steps).

Each `Scheduler.step` is one forward pass over a ragged batch: one token for every turn that is
generating (batched decode) plus prompt chunks of turns still prefilling, within a token budget
(``prefill_chunk``), so a long prompt never blocks the worker for more than one chunk. While
several clients share the worker, steps are shorter: each feeds either prompts or the decode rows
(`Admission.step_plan`). A cancel takes effect at the next step. Overflow and busy are decided
before any session state changes.

No exception leaves `submit`, `step`, `cancel`, `reset` or `close`: a failure inside one turn (our
own bug, an exhausted machine) ends that turn with ERROR ``internal`` and resets its session, and
the worker and every other session go on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from kvroute.engine.engine import Engine
from kvroute.engine.errors import EngineError
from kvroute.engine.kv_codec import RestDtype
from kvroute.engine.sampling import SamplingParams
from kvroute.proto.errors import ErrorCode
from kvroute.proto.messages import CachePath, ColdReason, KvSource, Overflow

from .admission import Admission, AdmissionConfig
from .checkpoint import Checkpoints
from .events import BusyEvent, ErrorEvent, Event, OverflowEvent
from .planner import plan_prefill
from .sessions import Session, SessionStore
from .spill import SpillDir, SpillInvalid
from .turn import Turn

logger = logging.getLogger(__name__)


@dataclass
class SchedulerConfig:
    """Knobs of the worker core."""

    prefill_chunk: int = 128  # max prompt tokens fed per step, over all prefilling turns
    kv_budget_bytes: int | None = None  # KV bytes for all sessions; idle ones evicted beyond it
    admission: AdmissionConfig = field(default_factory=AdmissionConfig)  # capacity, queue
    kv_rest: RestDtype = RestDtype.NONE  # idle sessions compressed to this before eviction
    kv_dtype: str = "f32"  # how live caches hold keys and values (f32 or f16)
    spill: SpillDir | None = None  # where sessions leaving RAM are written (None: dropped)
    checkpoints: Checkpoints | None = None  # committed KV shared with other workers, or None


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
        dtype = self.config.kv_dtype
        self.store = SessionStore(
            lambda: engine.new_cache(dtype),
            self.config.kv_budget_bytes,
            rest=self.config.kv_rest,
            spill=self.config.spill,
        )
        self.turns: dict[bytes, Turn] = {}  # session id -> turn in flight
        # Turns beyond capacity or the KV budget wait here, started in fair order by client.
        self.admission = Admission(self.config.admission, self.store, engine.n_ctx)
        self._outbox: list[Event] = []  # events produced between steps, sent with the next one

    @property
    def busy(self) -> bool:
        """Whether `step` has work to do."""
        return bool(self.turns or self._outbox or self.admission)

    def submit(
        self,
        request_id: bytes,
        session_id: bytes,
        messages: Sequence[Mapping[str, str]],
        params: SamplingParams,
        worker_lost: bool = False,
        client: bytes = b"",
        reply_to: bytes = b"",
    ) -> list[Event]:
        """Start a turn, or queue it (see `Admission`). Returns immediate answers (BUSY,
        OVERFLOW, ERROR; ``overloaded`` if the queue is full), else nothing.

        ``worker_lost`` is the broker's word that the session's previous owner died: whatever
        this worker holds for it is stale and is dropped first. ``client`` is who owns the
        session (waiting turns start round-robin over clients; default: the session itself).
        ``reply_to`` is carried by every event of this request (the adapter's reply address).
        Never raises: a failure is answered ERROR ``internal`` and the session is reset.
        """
        try:
            return self._submit(
                request_id,
                session_id,
                messages,
                params,
                worker_lost,
                client or session_id,
                reply_to,
            )
        except Exception:
            logger.exception("starting a turn failed for session %r", session_id)
            return [self.fail_request(request_id, session_id, reply_to)]

    def _submit(
        self,
        request_id: bytes,
        session_id: bytes,
        messages: Sequence[Mapping[str, str]],
        params: SamplingParams,
        worker_lost: bool,
        client: bytes,
        reply_to: bytes,
    ) -> list[Event]:
        if session_id in self.turns or session_id in self.admission:
            return [BusyEvent(request_id, session_id, reply_to)]
        if not self.admission.has_room(client):  # before any work: a flood is refused cheaply
            why = "the worker's queue is full"
            return [self._overloaded(request_id, session_id, why, reply_to)]
        try:
            prompt = self.engine.render_prompt(messages)
        except EngineError as exc:
            return [ErrorEvent(request_id, session_id, ErrorCode.BAD_BODY, str(exc), reply_to)]
        held = None
        if worker_lost:
            self.store.reset(session_id, ColdReason.WORKER_LOST)
            held = self._restore_checkpoint(session_id)
        from_disk = held is None and self.store.get(session_id) is None
        held = held or self.store.get(session_id) or self.store.restore_spilled(session_id)
        from_disk = from_disk and held is not None
        text, tokens = (held.text, held.tokens) if held else ("", [])
        plan = plan_prefill(text, tokens, prompt, self.engine.prompts)
        if (
            held is not None
            and held.kv_from is KvSource.CHECKPOINT
            and plan.path is not (CachePath.TEXT_PREFIX)
        ):
            # A checkpoint is used only for the history it was written for.
            self.store.reset(session_id, ColdReason.WORKER_LOST)
            plan = plan_prefill("", [], prompt, self.engine.prompts)
        overflow = Overflow(len(plan.prompt_ids), params.max_tokens, self.engine.n_ctx)
        if not overflow.fits:
            if from_disk:
                self.store.respill(session_id)  # left as it was: on disk
            return [OverflowEvent(request_id, session_id, overflow, reply_to)]
        # Past this point the turn is accepted and the session may change.
        session = self.store.acquire(session_id)
        session.begin(request_id, plan.keep)
        turn = Turn(
            request_id,
            session,
            prompt.text,
            plan,
            params,
            self.engine.tokenizer,
            self.engine.eot_ids,
            self.worker_id,
            reply_to=reply_to,
        )
        self.admission.wait(turn, client)
        self.admission.admit(self.turns)
        return []

    def _restore_checkpoint(self, session_id: bytes) -> Session | None:
        """The session as its lost worker last checkpointed it (parked), or None."""
        ckpt = self.config.checkpoints
        if ckpt is None or not ckpt.has(session_id):
            return None
        t0 = time.perf_counter()
        try:
            spilled = ckpt.load(session_id)
        except SpillInvalid:
            self.store.reset(session_id, ColdReason.SPILL_INVALID)
            return None
        load_ms = (time.perf_counter() - t0) * 1e3
        return self.store.install(session_id, spilled, KvSource.CHECKPOINT, load_ms)

    def _checkpoint(self, turn: Turn) -> None:
        """Record the session's committed state after a turn (best effort, never raises)."""
        ckpt = self.config.checkpoints
        s = turn.session
        if ckpt is None or s.in_flight is not None:
            return
        try:
            if s.tokens and not s.cache.parked:
                ckpt.save(s.session_id, s.text, s.tokens, s.cache)
            elif not s.tokens:
                ckpt.drop(s.session_id)
        except Exception:
            logger.exception("checkpoint failed for session %r", s.session_id)

    def _overloaded(
        self, request_id: bytes, session_id: bytes, why: str, reply_to: bytes
    ) -> ErrorEvent:
        return ErrorEvent(
            request_id, session_id, ErrorCode.OVERLOADED, f"{why}; retry later", reply_to
        )

    def _admit_waiting(self, events: list[Event]) -> None:
        """End waiting turns that were cancelled or waited too long; start what fits now."""
        cancelled, expired = self.admission.expel()
        for turn in cancelled:
            events.extend(self._end(turn))
        for turn in expired:
            self._unrun(turn)
            wait = self.admission.config.max_wait_s
            why = f"no slot or KV budget freed up within {wait:g} s"
            sid = turn.session.session_id
            events.append(self._overloaded(turn.request_id, sid, why, turn.reply_to))
        self.admission.admit(self.turns)

    def _unrun(self, turn: Turn) -> None:
        """Undo a turn that never ran: the session is as it was before the TURN arrived.

        A session the store created for this turn alone is dropped again, keeping the reason it
        was cold for (``new``, ``evicted``, ...): the broker forgets the pin of a first turn
        refused this way, so nothing would ever close it, and its next turn must not say
        ``cancelled``.
        """
        session = turn.session
        created_for_it = session.turns == 0 and not session.tokens
        reason = session.cold_reason
        session.rollback()
        if not created_for_it:
            return
        if reason == ColdReason.NEW:
            self.store.forget(session.session_id)
        else:
            self.store.reset(session.session_id, reason)

    def cancel(self, session_id: bytes, request_id: bytes | None = None) -> bool:
        """Cancel the session's turn in flight (if ``request_id`` given, only that one)."""
        turn = self.turns.get(session_id) or self.admission.get(session_id)
        if turn is None or (request_id is not None and turn.request_id != request_id):
            return False
        try:
            turn.cancel()
        except Exception:
            logger.exception("cancelling failed for session %r", session_id)
            self._outbox.append(self._fail(turn))
        return True

    def reset(self, session_id: bytes) -> list[Event]:
        """Drop a session's state (idempotent); its next turn runs cold with reason ``reset``.

        A turn in flight ends as cancelled first.
        """
        return self._drop(session_id, forget=False)

    def close(self, session_id: bytes) -> list[Event]:
        """Drop a session and every memory of it (idempotent).

        A later turn with this id, whoever sends it, runs cold with reason ``new``. A turn in
        flight ends as cancelled first.
        """
        return self._drop(session_id, forget=True)

    def _drop(self, session_id: bytes, forget: bool) -> list[Event]:
        turn = self.turns.get(session_id) or self.admission.remove(session_id)
        events = self._end(turn, cancel=True) if turn is not None else []
        if forget:
            self.store.forget(session_id)
        else:
            self.store.reset(session_id)
        if self.config.checkpoints is not None:
            self.config.checkpoints.drop(session_id)
        return events

    def step(self) -> list[Event]:
        """One forward pass over every turn in flight; returns the events it produced.

        Never raises: a turn that fails ends with ERROR ``internal`` and its session is reset.
        """
        events, self._outbox = self._outbox, []
        try:
            self._step(events)
        except Exception:
            # A bug outside any one turn's guard: fail the turns in flight, not the worker.
            logger.exception("scheduler step failed; failing %d turns", len(self.turns))
            for turn in list(self.turns.values()):
                events.append(self._fail(turn))
        return events

    def _step(self, events: list[Event]) -> None:
        for turn in [t for t in self.turns.values() if t.cancelled or t.done]:
            events.extend(self._end(turn))
        self._admit_waiting(events)
        segments, batch = [], []
        # Light clients' prompts first, within the step's prompt budget.
        order, budget = self.admission.step_plan(self.turns, self.config.prefill_chunk)
        for turn in order:
            prefilling = turn.prefilling
            if prefilling and budget <= 0:
                continue
            try:
                ids = turn.take(budget if prefilling else 1)
            except Exception:
                logger.exception("taking ids failed for session %r", turn.session.session_id)
                events.append(self._fail(turn))
                continue
            if prefilling:
                budget -= len(ids)
            segments.append((turn.session.cache, ids))
            batch.append(turn)
        if not segments:
            return
        try:
            logits = self.engine.forward(segments)
        except Exception:
            # Our bug or an exhausted machine: fail these turns, keep the worker and others.
            logger.exception("forward pass failed for %d turns", len(batch))
            for turn in batch:
                events.append(self._fail(turn))
            return
        for turn, row in zip(batch, logits, strict=True):
            try:
                turn.check()
                piece = turn.on_logits(row)
            except Exception:
                # A bug in one turn must not take the worker and the others down.
                logger.exception("a step failed for session %r", turn.session.session_id)
                events.append(self._fail(turn))
                continue
            if piece is not None:
                events.append(piece)
            if turn.done:
                events.extend(self._end(turn))

    def _end(self, turn: Turn, cancel: bool = False) -> list[Event]:
        """Take a turn out of flight, commit or roll back its session; its last events."""
        sid = turn.session.session_id
        if self.turns.get(sid) is turn:
            del self.turns[sid]
            self.admission.release(sid)
        try:
            if cancel:
                turn.cancel()
            last, end = turn.finish()
        except Exception:
            logger.exception("finishing the turn failed for session %r", sid)
            return [self._fail(turn)]
        self._checkpoint(turn)
        return [last, end] if last is not None else [end]

    def _fail(self, turn: Turn) -> ErrorEvent:
        return self.fail_request(turn.request_id, turn.session.session_id, turn.reply_to)

    def fail_request(self, request_id: bytes, session_id: bytes, reply_to: bytes) -> ErrorEvent:
        """End a request our own code failed: drop its turn, reset its session, ERROR internal
        (the returned event; the turn sends nothing more).

        A session whose turn in flight belongs to another request is left alone.
        """
        turn = self.turns.get(session_id) or self.admission.get(session_id)
        if turn is None or turn.request_id == request_id:
            if self.turns.pop(session_id, None) is not None:
                self.admission.release(session_id)
            self.admission.remove(session_id)
            self.store.reset(session_id)
            if self.config.checkpoints is not None:
                self.config.checkpoints.drop(session_id)
        return ErrorEvent(
            request_id,
            session_id,
            ErrorCode.INTERNAL,
            "the turn failed on the worker; the session will restart cold",
            reply_to,
        )
