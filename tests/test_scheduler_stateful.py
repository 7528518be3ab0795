"""Stateful property test of the worker core: no sequence of calls breaks a session.

Hypothesis drives one `Scheduler` on the tiny model with random sequences of submits (next
message, identical resend, regenerate from an earlier message, edited history, new
conversation), cancels at any point (before the first step, mid-prefill, mid-decode, with the
right or a wrong request id), resets, closes, forced evictions and steps. After every rule it
checks every session and every request:

- an idle session satisfies the invariant: its cache holds exactly len(K) positions, K spells T,
  and the cache holds what a fresh prefill of K computes;
- a session with a turn in flight holds the reused positions plus what the turn fed, and is
  never evicted;
- each request gets TOKEN frames numbered without gaps and exactly one terminal event; an END's
  stats pass the protocol's checks and its digest matches the streamed text; no request ever
  ends with ERROR ``internal`` (that would be our bug, contained).
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from kvroute.engine.engine import Engine
from kvroute.engine.kv_codec import decode
from kvroute.engine.sampling import SamplingParams
from kvroute.proto.errors import ErrorCode
from kvroute.proto.messages import TurnEnd, reply_sha256
from kvroute.worker.events import BusyEvent, EndEvent, ErrorEvent, Event, TokenEvent
from kvroute.worker.scheduler import Scheduler, SchedulerConfig
from kvroute.worker.sessions import Session
from kvroute.worker.spill import SpillDir, SpillIdentity

Messages = list[dict[str, str]]

SIDS = (b"s0", b"s1", b"s2")
LONG = "please go on and on " * 7  # a few of these overflow the tiny model's 256 positions
WORDS = ("hi", "more", "why?", "ok then", "héllo 🙂", "tell me a story about it", LONG)
HOW = ("next", "next", "resend", "regenerate", "edit", "restart", "system")
PREFILL_CHUNK = 24  # a few steps per prompt, so cancels land mid-prefill too
MAX_DRAIN_STEPS = 500  # a turn of at most 6 tokens and a 256-position prompt needs far fewer


@dataclass
class Request:
    """What the test saw of one request."""

    rid: bytes
    sid: bytes
    tokens: list[TokenEvent] = field(default_factory=list)
    terminal: Event | None = None

    @property
    def text(self) -> str:
        return "".join(t.text for t in self.tokens)


class SchedulerMachine(RuleBasedStateMachine):
    """One scheduler, three sessions, a client-side history per session."""

    engine: Engine  # set by the test before running

    def new_spill(self) -> SpillDir | None:
        """Where evicted sessions go (None: dropped)."""
        return None

    def __init__(self) -> None:
        super().__init__()
        per_token = self.engine.new_cache().bytes_per_token
        # Room for about two full contexts: the third session's turns make the store evict.
        budget = 2 * self.engine.n_ctx * per_token
        cfg = SchedulerConfig(PREFILL_CHUNK, budget, spill=self.new_spill())
        self.sched = Scheduler(self.engine, cfg)
        self.requests: dict[bytes, Request] = {}
        self.history: dict[bytes, Messages] = {sid: [] for sid in SIDS}  # last prompt accepted
        self.reply: dict[bytes, str | None] = dict.fromkeys(SIDS)  # its reply as streamed
        self.verified: set[tuple[bytes, str]] = set()  # (K, S) digests already checked

    # --- the client side ------------------------------------------------------------------

    def open_request(self, sid: bytes) -> Request | None:
        """The session's request that has no terminal event yet."""
        found = [r for r in self.requests.values() if r.sid == sid and r.terminal is None]
        assert len(found) <= 1, found
        return found[0] if found else None

    def messages(self, sid: bytes, how: str, word: str, pick: int) -> Messages:
        hist, reply = self.history[sid], self.reply[sid]
        users = [i for i, m in enumerate(hist) if m["role"] == "user"]
        if not hist or how == "restart":
            return [{"role": "user", "content": word}]
        if how == "next":
            said = [{"role": "assistant", "content": reply}] if reply is not None else []
            return [*hist, *said, {"role": "user", "content": word}]
        if how == "resend":
            return list(hist)
        if how == "regenerate":
            return hist[: users[pick % len(users)] + 1]
        if how == "edit":
            j = users[pick % len(users)]
            edited = dict(hist[j], content=f"{hist[j]['content']} {word}")
            return [*hist[:j], edited, *hist[j + 1 :]]
        assert how == "system"
        return [{"role": "system", "content": word}, *hist[users[0] :]]

    def deliver(self, events: list[Event]) -> None:
        for e in events:
            req = self.requests[e.request_id]
            assert req.terminal is None, f"{e} after the terminal {req.terminal}"
            assert e.session_id == req.sid
            if isinstance(e, TokenEvent):
                assert e.seq == len(req.tokens)
                req.tokens.append(e)
                continue
            req.terminal = e
            event(f"terminal {type(e).__name__}")
            if isinstance(e, EndEvent):
                st_ = e.stats
                event(f"end {e.finish_reason} {st_.path} {st_.cold_reason or ''}".rstrip())
                assert e.seq == len(req.tokens)
                assert e.reply_sha256 == reply_sha256(req.text)
                end = TurnEnd(e.seq, e.finish_reason, e.reply_sha256, e.stats)
                assert TurnEnd.decode(end.encode()) == end  # the stats pass the wire's checks
                sampled = sum(len(t.token_ids) for t in req.tokens)
                assert e.stats.generated_tokens == sampled
                self.reply[req.sid] = req.text
            else:
                self.reply[req.sid] = None
            if isinstance(e, ErrorEvent):
                assert e.code != ErrorCode.INTERNAL, e.message

    # --- rules ----------------------------------------------------------------------------

    @rule(
        data=st.data(),
        how=st.sampled_from(HOW),
        word=st.sampled_from(WORDS),
        pick=st.integers(0, 7),
        max_tokens=st.integers(1, 6),
        ignore_eos=st.booleans(),
    )
    def submit(
        self, data: st.DataObject, how: str, word: str, pick: int, max_tokens: int, ignore_eos: bool
    ) -> None:
        # Mostly to a session without a turn in flight; one time in five to any (maybe BUSY).
        idle = [sid for sid in SIDS if self.open_request(sid) is None]
        anyone = not idle or data.draw(st.integers(0, 4), label="anyone") == 0
        sid = data.draw(st.sampled_from(SIDS if anyone else idle), label="sid")
        msgs = self.messages(sid, how, word, pick)
        busy = self.open_request(sid) is not None
        before = snapshot(self.sched.store.get(sid))
        rid = b"r%d" % len(self.requests)
        self.requests[rid] = Request(rid, sid)
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=ignore_eos)
        events = self.sched.submit(rid, sid, msgs, params)
        self.deliver(events)
        if busy:
            assert events == [BusyEvent(rid, sid)]
        if events:  # refused (busy, overflow, overloaded): nothing changed
            assert len(events) == 1 and self.requests[rid].terminal is not None
            assert snapshot(self.sched.store.get(sid)) == before
        else:
            self.history[sid] = msgs

    @precondition(lambda self: any(self.open_request(sid) for sid in SIDS))
    @rule(sid=st.sampled_from(SIDS), which=st.sampled_from(["own", "any", "wrong"]))
    def cancel(self, sid: bytes, which: str) -> None:
        req = self.open_request(sid)
        event(f"cancel {self.moment(sid)}")
        rid = {"own": req.rid if req else b"none", "any": None, "wrong": b"wrong"}[which]
        cancelled = self.sched.cancel(sid, rid)
        assert cancelled == (req is not None and which != "wrong")

    @rule(sid=st.sampled_from(SIDS), what=st.sampled_from(["reset", "close", "evict idle"]))
    def disrupt(self, sid: bytes, what: str) -> None:
        """One rule for the three ways a cache is lost, so they do not crowd out conversations."""
        store = self.sched.store
        if what != "evict idle":
            self.deliver(self.sched.close(sid) if what == "close" else self.sched.reset(sid))
            assert self.open_request(sid) is None, "the turn in flight was not ended"
            assert sid not in store
            return
        held, budget, store.kv_budget_bytes = len(store), store.kv_budget_bytes, 0
        try:
            store.evict_to_fit()
        finally:
            store.kv_budget_bytes = budget
        event(f"evict idle dropped {held - len(store)}")
        assert all(s.in_flight is not None or s.cache.nbytes == 0 for s in store)

    @precondition(lambda self: self.sched.busy)
    @rule(n=st.integers(1, 8))
    def step(self, n: int) -> None:
        for _ in range(n):
            self.deliver(self.sched.step())

    @precondition(lambda self: self.sched.busy)
    @rule()
    def run_until_idle(self) -> None:
        self.drain()

    def drain(self) -> None:
        for _ in range(MAX_DRAIN_STEPS):
            if not self.sched.busy:
                break
            self.deliver(self.sched.step())
        assert not self.sched.busy, "turns did not finish"
        assert all(r.terminal is not None for r in self.requests.values())

    def teardown(self) -> None:
        self.drain()
        self.check_sessions()

    def moment(self, sid: bytes) -> str:
        """Where the session's turn is (for the statistics of what was exercised)."""
        turn = self.sched.turns.get(sid)
        if turn is None:
            return "waiting" if self.open_request(sid) else "idle"
        full_hit = " full hit" if 0 < turn.plan.keep == len(turn.plan.prompt_ids) - 1 else ""
        if not turn.session.feeding:
            where = "before the first feed"
        else:
            where = "mid-prefill" if turn.prefilling else "decoding"
        return f"{where} {turn.plan.path}{full_hit}"

    # --- invariants -----------------------------------------------------------------------

    @invariant()
    def check_sessions(self) -> None:
        for session in self.sched.store:
            turn = self.sched.turns.get(session.session_id)
            if turn is not None:
                turn.check()
            elif session.in_flight is None:
                session.check()
                self.check_contents(session)
            else:
                session.check()  # accepted, waiting for a slot: untouched so far
        for req in self.requests.values():
            if req.terminal is None:  # accepted and running or waiting: never evicted
                session = self.sched.store.get(req.sid)
                assert session is not None and session.in_flight == req.rid

    def check_contents(self, session: Session) -> None:
        """K spells T, and the cache holds what a fresh prefill of K computes."""
        tokenizer = self.engine.tokenizer
        assert tokenizer.decode(session.tokens) == without_control_text(self.engine, session.text)
        n = len(session.tokens)
        if n == 0:
            return
        k, v = session.cache.k[:, :, :n], session.cache.v[:, :, :n]
        if session.cache.rest is not None:  # read back from disk, not yet run: float32 codes
            k, v = decode(session.cache.rest.k)[:, :, :n], decode(session.cache.rest.v)[:, :, :n]
        key = (bytes(np.array(session.tokens, dtype=np.int64)), digest(k, v))
        if key in self.verified:
            return
        fresh = self.engine.new_cache()
        self.engine.prefill(fresh, session.tokens)
        np.testing.assert_allclose(k, fresh.k[:, :, :n], atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(v, fresh.v[:, :, :n], atol=1e-4, rtol=1e-4)
        self.verified.add(key)


def snapshot(session: Session | None) -> tuple[str, list[int], int] | None:
    if session is None:
        return None
    return session.text, list(session.tokens), session.cache.length


def digest(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def without_control_text(engine: Engine, text: str) -> str:
    """``text`` minus the template's control-token texts (they decode to nothing)."""
    for special in engine.tokenizer.special_ids:
        text = text.replace(special, "")
    return text


def test_no_call_sequence_breaks_a_session(tiny_engine: Engine) -> None:
    assert not any(s in "".join(WORDS) for s in tiny_engine.tokenizer.special_ids)
    SchedulerMachine.engine = tiny_engine
    run_state_machine_as_test(
        SchedulerMachine,
        settings=settings(
            max_examples=100,
            stateful_step_count=50,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )


class SpillingMachine(SchedulerMachine):
    """The same, with evicted sessions written to disk (float32) and read back by their next
    turn: every path through a spill keeps the invariant and the exact cache contents."""

    directory: Path  # set by the test before running

    def new_spill(self) -> SpillDir | None:
        a = self.engine.model.args
        ident = SpillIdentity("ab" * 32, self.engine.n_ctx, a.n_layers, a.n_kv_heads, a.head_dim)
        return SpillDir(self.directory / uuid.uuid4().hex, 1 << 30, ident)


@pytest.mark.timeout(900)
def test_no_call_sequence_breaks_a_spilling_session(tiny_engine: Engine, tmp_path: Path) -> None:
    SpillingMachine.engine = tiny_engine
    SpillingMachine.directory = tmp_path
    run_state_machine_as_test(
        SpillingMachine,
        settings=settings(
            max_examples=40,
            stateful_step_count=50,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
