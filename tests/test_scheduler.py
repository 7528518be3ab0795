"""The worker core end to end: turns, paths, overflow, reset, close, eviction, cancel and rollback,
busy, batching, and containment of a failing turn.

Real-model tests check the product's promise: the warm paths compute exactly what a
cold prefill of the same ids computes, and a chat replayed with its replies as streamed stays on
the text-prefix path.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pytest

from kvroute.engine.engine import Engine
from kvroute.engine.sampling import SamplingParams
from kvroute.proto.errors import ErrorCode
from kvroute.proto.messages import CachePath, ColdReason, FinishReason
from kvroute.worker.events import BusyEvent, EndEvent, ErrorEvent, Event, OverflowEvent, TokenEvent
from kvroute.worker.planner import plan_prefill
from kvroute.worker.scheduler import Scheduler, SchedulerConfig

Messages = list[dict[str, str]]
USER_TURNS = [
    "What is the capital of France?",
    "Tell me one fact about its history.",
    "What river flows through it?",
    "Name a famous museum there.",
    "What is a popular food in France?",
    "How do you say hello in French?",
    "What is the population of Paris, roughly?",
    "Name a famous French painter.",
    "What sport is popular in France?",
    "Thank you! Summarise our chat in one sentence.",
]


@dataclass
class Outcome:
    """Everything one turn produced."""

    text: str = ""
    tokens: list[TokenEvent] = field(default_factory=list)
    end: EndEvent | None = None
    other: list[Event] = field(default_factory=list)


def run(
    sched: Scheduler,
    sid: bytes,
    messages: Sequence[Mapping[str, str]],
    max_tokens: int = 32,
    **kw: object,
) -> Outcome:
    """Submit one turn and step until it ends."""
    out = Outcome()
    params = SamplingParams(max_tokens=max_tokens, **kw)  # type: ignore[arg-type]
    out.other = list(sched.submit(b"req-" + sid, sid, messages, params))
    while sched.busy:
        collect(out, sched.step())
    return out


def collect(out: Outcome, events: list[Event]) -> None:
    for e in events:
        if isinstance(e, TokenEvent):
            out.tokens.append(e)
            out.text += e.text
        elif isinstance(e, EndEvent):
            out.end = e
        else:
            out.other.append(e)


def cold_greedy(engine: Engine, prompt_ids: list[int], max_tokens: int) -> str:
    """The reply a fresh cache gives for exactly these ids."""
    return "".join(p.text for p in engine.generate(prompt_ids, SamplingParams(max_tokens)))


# ----------------------------------------------------------------------------- tiny model


def test_turn_streams_in_order_and_commits(tiny_engine: Engine) -> None:
    sched = Scheduler(tiny_engine)
    out = run(sched, b"a", [{"role": "user", "content": "hi"}], max_tokens=8, ignore_eos=True)
    assert out.end is not None and not out.other
    assert [t.seq for t in out.tokens] == list(range(len(out.tokens)))
    assert out.end.seq == len(out.tokens)
    st = out.end.stats
    assert (st.path, st.cold_reason, out.end.finish_reason) == (
        CachePath.COLD,
        ColdReason.NEW,
        FinishReason.LENGTH,
    )
    assert st.generated_tokens == 8 and st.prefill_tokens == st.prompt_tokens
    session = sched.store.get(b"a")
    assert session is not None and session.in_flight is None
    session.check()
    # The 8th token was sampled but never fed: it is not committed. The tiny model emits raw
    # bytes, so K may stop even earlier, at the last whole character; T matches K exactly.
    reply_ids = session.tokens[st.prompt_tokens :]
    assert len(reply_ids) <= 7
    assert reply_ids == [t.token_ids[0] for t in out.tokens][: len(reply_ids)]
    prompt = tiny_engine.render([{"role": "user", "content": "hi"}])
    assert session.text == prompt + tiny_engine.tokenizer.decode(reply_ids)
    assert out.text.startswith(session.text[len(prompt) :])


def test_busy_second_turn_is_refused(tiny_engine: Engine) -> None:
    sched = Scheduler(tiny_engine)
    msgs = [{"role": "user", "content": "hi"}]
    assert sched.submit(b"r1", b"a", msgs, SamplingParams(max_tokens=4)) == []
    events = sched.submit(b"r2", b"a", msgs, SamplingParams(max_tokens=4))
    assert events == [BusyEvent(b"r2", b"a")]
    while sched.busy:
        sched.step()
    assert sched.submit(b"r3", b"a", msgs, SamplingParams(max_tokens=4)) == []


def test_bad_messages_get_an_error_and_change_nothing(tiny_engine: Engine) -> None:
    sched = Scheduler(tiny_engine)
    events = sched.submit(b"r1", b"a", [{"role": "robot", "content": "x"}], SamplingParams())
    assert len(events) == 1 and isinstance(events[0], ErrorEvent)
    assert events[0].code == ErrorCode.BAD_BODY
    assert b"a" not in sched.store and not sched.busy


def test_overflow_leaves_session_exactly_as_it_was(tiny_engine: Engine) -> None:
    sched = Scheduler(tiny_engine)
    history: Messages = [{"role": "user", "content": "hello"}]
    first = run(sched, b"a", history, max_tokens=6, ignore_eos=True)
    session = sched.store.get(b"a")
    assert session is not None
    before = (session.text, list(session.tokens), session.cache.length)
    history += [{"role": "assistant", "content": first.text}, {"role": "user", "content": "x"}]
    events = sched.submit(b"r", b"a", history, SamplingParams(max_tokens=tiny_engine.n_ctx))
    assert len(events) == 1 and isinstance(events[0], OverflowEvent)
    ov = events[0].overflow
    assert ov.n_ctx == tiny_engine.n_ctx and ov.max_tokens == tiny_engine.n_ctx
    assert ov.prompt_tokens + ov.max_tokens > ov.n_ctx
    assert (session.text, session.tokens, session.cache.length) == before
    smaller = run(sched, b"a", history, max_tokens=4, ignore_eos=True)
    assert smaller.end is not None and smaller.end.stats.path == CachePath.TEXT_PREFIX


def test_reset_makes_next_turn_cold_reset(tiny_engine: Engine) -> None:
    sched = Scheduler(tiny_engine)
    msgs = [{"role": "user", "content": "hi"}]
    run(sched, b"a", msgs, max_tokens=3, ignore_eos=True)
    assert sched.reset(b"a") == [] and sched.reset(b"a") == []  # idempotent, no turn to end
    out = run(sched, b"a", msgs, max_tokens=3, ignore_eos=True)
    assert out.end is not None
    assert (out.end.stats.path, out.end.stats.cold_reason) == (CachePath.COLD, ColdReason.RESET)


def test_worker_lost_flag_reports_cold_worker_lost(tiny_engine: Engine) -> None:
    sched = Scheduler(tiny_engine)
    msgs = [{"role": "user", "content": "hi"}]
    sched.submit(b"r", b"a", msgs, SamplingParams(max_tokens=3), worker_lost=True)
    out = Outcome()
    while sched.busy:
        collect(out, sched.step())
    assert out.end is not None and out.end.stats.cold_reason == ColdReason.WORKER_LOST


def test_cancel_stops_at_next_step_and_commits_what_was_fed(tiny_engine: Engine) -> None:
    sched = Scheduler(tiny_engine)
    msgs = [{"role": "user", "content": "hi"}]
    sched.submit(b"r", b"a", msgs, SamplingParams(max_tokens=100, ignore_eos=True))
    out = Outcome()
    while len(out.tokens) < 3:
        collect(out, sched.step())
    assert sched.cancel(b"a", b"other-request") is False
    assert sched.cancel(b"a", b"r") is True
    collect(out, sched.step())
    assert not sched.busy
    assert out.end is not None and out.end.finish_reason == FinishReason.CANCELLED
    assert out.end.stats.generated_tokens == len(out.tokens) < 100
    session = sched.store.get(b"a")
    assert session is not None and session.in_flight is None
    session.check()
    # The history with the partial reply as streamed continues on the text-prefix path.
    msgs2 = [*msgs, {"role": "assistant", "content": out.text}, {"role": "user", "content": "go"}]
    nxt = run(sched, b"a", msgs2, max_tokens=2)
    assert nxt.end is not None and nxt.end.stats.path == CachePath.TEXT_PREFIX


def test_reset_during_a_turn_ends_it_cancelled(tiny_engine: Engine) -> None:
    sched = Scheduler(tiny_engine)
    sched.submit(
        b"r",
        b"a",
        [{"role": "user", "content": "x"}],
        SamplingParams(max_tokens=50, ignore_eos=True),
    )
    sched.step()
    events = sched.reset(b"a")
    ends = [e for e in events if isinstance(e, EndEvent)]
    assert len(ends) == 1 and ends[0].finish_reason == FinishReason.CANCELLED
    assert not sched.busy and b"a" not in sched.store


def one_turn_budget(engine: Engine, msgs: Messages, max_tokens: int) -> int:
    """KV bytes one cold turn reserves (prompt + max_tokens positions): a budget for one."""
    positions = len(engine.encode(engine.render(msgs))) + max_tokens
    return positions * engine.new_cache().bytes_per_token


def test_eviction_under_small_budget(tiny_engine: Engine) -> None:
    msgs = [{"role": "user", "content": "hi"}]
    budget = one_turn_budget(tiny_engine, msgs, 3)
    sched = Scheduler(tiny_engine, SchedulerConfig(kv_budget_bytes=budget))
    run(sched, b"a", msgs, max_tokens=3, ignore_eos=True)
    run(sched, b"b", msgs, max_tokens=3, ignore_eos=True)  # needs room: a (idle) goes
    assert b"a" not in sched.store and b"b" in sched.store
    out = run(sched, b"a", msgs, max_tokens=3, ignore_eos=True)
    assert out.end is not None
    assert (out.end.stats.path, out.end.stats.cold_reason) == (CachePath.COLD, ColdReason.EVICTED)


def test_in_flight_session_survives_budget_pressure(tiny_engine: Engine) -> None:
    msgs = [{"role": "user", "content": "hi"}]
    budget = one_turn_budget(tiny_engine, msgs, 20)
    sched = Scheduler(tiny_engine, SchedulerConfig(kv_budget_bytes=budget))
    sched.submit(b"r1", b"a", msgs, SamplingParams(max_tokens=20, ignore_eos=True))
    sched.step()
    sched.submit(b"r2", b"b", msgs, SamplingParams(max_tokens=20, ignore_eos=True))
    ends = Outcome()
    while sched.busy:
        for e in sched.step():
            if isinstance(e, EndEvent):
                assert e.stats.generated_tokens == 20
                ends.other.append(e)
    assert len(ends.other) == 2  # both finished: neither was evicted mid-turn


def test_long_prompt_is_prefilled_in_chunks(tiny_engine: Engine) -> None:
    sched = Scheduler(tiny_engine, SchedulerConfig(prefill_chunk=16))
    msgs = [{"role": "user", "content": "word " * 30}]
    sched.submit(b"r", b"a", msgs, SamplingParams(max_tokens=2, ignore_eos=True))
    steps_before_first_token = 0
    while True:
        events = sched.step()
        if any(isinstance(e, TokenEvent) for e in events):
            break
        steps_before_first_token += 1
    prompt = sched.turns[b"a"].plan.prompt_ids
    assert steps_before_first_token == -(-len(prompt) // 16) - 1


# ------------------------------------------------------------- rollback, labels, containment


def state(sched: Scheduler, sid: bytes) -> tuple[str, list[int], int]:
    """The committed (T, K, len(S)) of a session, checked."""
    session = sched.store.get(sid)
    assert session is not None and session.in_flight is None
    session.check()
    return session.text, list(session.tokens), session.cache.length


def test_full_hit_cancelled_at_once_then_next_turn_works(tiny_engine: Engine) -> None:
    """The three-call crash: commit text == prompt, resend it (full hit), cancel, go on."""
    sched = Scheduler(tiny_engine)
    history: Messages = [{"role": "user", "content": "hi"}]
    first = run(sched, b"a", history, max_tokens=1)
    assert first.end is not None and first.end.finish_reason == FinishReason.LENGTH
    before = state(sched, b"a")
    assert before[0] == tiny_engine.render(history)  # nothing of the reply was fed
    assert sched.submit(b"r2", b"a", history, SamplingParams(max_tokens=4)) == []
    assert sched.turns[b"a"].plan.keep == len(before[1]) - 1  # the full hit re-feeds one token
    assert sched.cancel(b"a", b"r2")
    out = Outcome()
    while sched.busy:
        collect(out, sched.step())
    assert not out.other and out.end is not None
    assert out.end.finish_reason == FinishReason.CANCELLED and not out.tokens
    assert state(sched, b"a") == before  # nothing was fed: nothing changed
    history += [{"role": "assistant", "content": first.text}, {"role": "user", "content": "x"}]
    nxt = run(sched, b"a", history, max_tokens=3, ignore_eos=True)
    assert nxt.end is not None and not nxt.other
    assert nxt.end.stats.path == CachePath.TEXT_PREFIX
    assert nxt.end.stats.cached_tokens == len(before[1])
    state(sched, b"a")


def test_cancel_before_the_first_step_leaves_an_edited_history_untouched(
    tiny_engine: Engine,
) -> None:
    sched = Scheduler(tiny_engine)
    history: Messages = [{"role": "user", "content": "hello there"}]
    first = run(sched, b"a", history, max_tokens=4, ignore_eos=True)
    before = state(sched, b"a")
    edited = [{"role": "user", "content": "hello world"}]  # token-prefix: trims K
    sched.submit(b"r2", b"a", edited, SamplingParams(max_tokens=4))
    assert sched.turns[b"a"].plan.path == CachePath.TOKEN_PREFIX
    sched.cancel(b"a")
    sched.step()
    assert state(sched, b"a") == before
    history += [{"role": "assistant", "content": first.text}, {"role": "user", "content": "y"}]
    nxt = run(sched, b"a", history, max_tokens=2)
    assert nxt.end is not None and nxt.end.stats.path == CachePath.TEXT_PREFIX


def test_cancel_mid_prefill_of_an_appended_prompt_restores_the_session(
    tiny_engine: Engine,
) -> None:
    sched = Scheduler(tiny_engine, SchedulerConfig(prefill_chunk=8))
    history: Messages = [{"role": "user", "content": "hi"}]
    first = run(sched, b"a", history, max_tokens=3, ignore_eos=True)
    before = state(sched, b"a")
    history += [
        {"role": "assistant", "content": first.text},
        {"role": "user", "content": "a long follow-up question " * 2},
    ]
    sched.submit(b"r2", b"a", history, SamplingParams(max_tokens=4))
    sched.step()  # one chunk of 8 is in, the rest is not
    turn = sched.turns[b"a"]
    assert turn.prefilling and turn.session.cache.length == len(before[1]) + 8
    turn.check()
    sched.cancel(b"a")
    sched.step()
    assert state(sched, b"a") == before


def test_cancel_mid_prefill_of_a_diverged_prompt_starts_over_cancelled(
    tiny_engine: Engine,
) -> None:
    sched = Scheduler(tiny_engine, SchedulerConfig(prefill_chunk=8))
    run(sched, b"a", [{"role": "user", "content": "hi"}], max_tokens=3, ignore_eos=True)
    other = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "yo"}]
    sched.submit(b"r2", b"a", other, SamplingParams(max_tokens=4))
    sched.step()  # the old K was trimmed and 8 ids of the new prompt are in: K is gone
    sched.cancel(b"a")
    sched.step()
    assert state(sched, b"a") == ("", [], 0)
    out = run(sched, b"a", other, max_tokens=2)
    assert out.end is not None
    assert (out.end.stats.path, out.end.stats.cold_reason) == (CachePath.COLD, ColdReason.CANCELLED)


def test_cancelled_first_turn_makes_the_next_cold_cancelled_not_reset(
    tiny_engine: Engine,
) -> None:
    sched = Scheduler(tiny_engine, SchedulerConfig(prefill_chunk=8))
    msgs = [{"role": "user", "content": "hi"}]
    for steps_before_cancel in (0, 1):  # before anything was fed, and mid-prefill
        sid = bytes([steps_before_cancel])
        sched.submit(b"r1", sid, msgs, SamplingParams(max_tokens=4))
        for _ in range(steps_before_cancel):
            sched.step()
        sched.cancel(sid)
        while sched.busy:
            sched.step()
        assert state(sched, sid) == ("", [], 0)
        out = run(sched, sid, msgs, max_tokens=2)
        assert out.end is not None
        stats = out.end.stats
        assert (stats.path, stats.cold_reason) == (CachePath.COLD, ColdReason.CANCELLED)


def test_close_forgets_the_id_but_reset_is_remembered(tiny_engine: Engine) -> None:
    sched = Scheduler(tiny_engine)
    msgs = [{"role": "user", "content": "hi"}]
    for sid in (b"closed", b"reset", b"reset-then-closed"):
        run(sched, sid, msgs, max_tokens=2)
    assert sched.close(b"closed") == [] and sched.close(b"closed") == []  # idempotent
    assert sched.reset(b"reset") == []
    sched.reset(b"reset-then-closed")
    sched.close(b"reset-then-closed")
    assert len(sched.store) == 0
    reasons = {}
    for sid in (b"closed", b"reset", b"reset-then-closed", b"never-seen"):
        out = run(sched, sid, msgs, max_tokens=2)
        assert out.end is not None and out.end.stats.path == CachePath.COLD
        reasons[sid] = out.end.stats.cold_reason
    assert reasons == {
        b"closed": ColdReason.NEW,
        b"reset": ColdReason.RESET,
        b"reset-then-closed": ColdReason.NEW,
        b"never-seen": ColdReason.NEW,
    }


def test_close_during_a_turn_ends_it_and_forgets(tiny_engine: Engine) -> None:
    sched = Scheduler(tiny_engine)
    msgs = [{"role": "user", "content": "x"}]
    sched.submit(b"r", b"a", msgs, SamplingParams(max_tokens=50, ignore_eos=True))
    sched.step()
    ends = [e for e in sched.close(b"a") if isinstance(e, EndEvent)]
    assert len(ends) == 1 and ends[0].finish_reason == FinishReason.CANCELLED
    assert not sched.busy and b"a" not in sched.store
    out = run(sched, b"a", msgs, max_tokens=2)
    assert out.end is not None and out.end.stats.cold_reason == ColdReason.NEW


class Boom(RuntimeError):
    """An injected bug."""


def raise_once(real: Callable[..., object]) -> Callable[..., object]:
    """``real``, except that its first call raises `Boom`."""
    calls = []

    def wrapper(*args: object, **kw: object) -> object:
        calls.append(1)
        if len(calls) == 1:
            raise Boom("injected")
        return real(*args, **kw)

    return wrapper


def internal_error(events: list[Event], request_id: bytes) -> bool:
    errors = [e for e in events if isinstance(e, ErrorEvent) and e.request_id == request_id]
    return len(errors) == 1 and errors[0].code == ErrorCode.INTERNAL


def two_sessions_in_flight(sched: Scheduler) -> None:
    """Session a has committed one turn; a (its second) and b (new) each have one submitted."""
    msgs: Messages = [{"role": "user", "content": "hi"}]
    first = run(sched, b"a", msgs, max_tokens=2)
    msgs += [{"role": "assistant", "content": first.text}, {"role": "user", "content": "more"}]
    for sid in (b"a", b"b"):
        params = SamplingParams(max_tokens=6, ignore_eos=True)
        assert sched.submit(b"r-" + sid, sid, msgs, params) == []


def finish_all(sched: Scheduler) -> list[Event]:
    events: list[Event] = []
    while sched.busy:
        events += sched.step()
    return events


def assert_reset_then_serves(sched: Scheduler, sid: bytes) -> None:
    """The failed session was reset: its next turn runs cold, reason reset, and completes."""
    out = run(sched, sid, [{"role": "user", "content": "again"}], max_tokens=2)
    assert out.end is not None and not out.other
    assert (out.end.stats.path, out.end.stats.cold_reason) == (CachePath.COLD, ColdReason.RESET)


@pytest.mark.parametrize("where", ["commit", "rollback", "on_logits", "take", "check"])
def test_a_failing_turn_ends_alone_with_internal_error(
    tiny_engine: Engine, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """A bug hit by one turn fails that turn and resets its session; the other turn goes on."""
    from kvroute.worker.sessions import Session
    from kvroute.worker.turn import Turn

    sched = Scheduler(tiny_engine)
    two_sessions_in_flight(sched)
    target = Session if where in ("commit", "rollback") else Turn
    real = getattr(target, where)

    def only_a(self: object, *args: object, **kw: object) -> object:
        session = self if isinstance(self, Session) else self.session  # type: ignore[attr-defined]
        if session.session_id == b"a":
            raise Boom(where)
        return real(self, *args, **kw)

    monkeypatch.setattr(target, where, only_a)
    if where == "rollback":
        sched.cancel(b"a")  # cancelled before the prompt is in: the turn rolls back
    events = finish_all(sched)
    monkeypatch.undo()
    assert internal_error(events, b"r-a")
    assert not [e for e in events if isinstance(e, EndEvent) and e.request_id == b"r-a"]
    ends_b = [e for e in events if isinstance(e, EndEvent) and e.request_id == b"r-b"]
    assert len(ends_b) == 1 and ends_b[0].stats.generated_tokens == 6
    assert b"a" not in sched.store and not sched.busy
    state(sched, b"b")
    assert_reset_then_serves(sched, b"a")


def test_a_failing_forward_pass_fails_its_batch_only(
    tiny_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    sched = Scheduler(tiny_engine)
    two_sessions_in_flight(sched)
    monkeypatch.setattr(sched.engine, "forward", raise_once(tiny_engine.forward))
    events = finish_all(sched)
    assert internal_error(events, b"r-a") and internal_error(events, b"r-b")
    assert not sched.busy and len(sched.store) == 0
    assert_reset_then_serves(sched, b"a")


def test_a_failing_submit_answers_internal_and_resets_the_session(
    tiny_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    sched = Scheduler(tiny_engine)
    msgs = [{"role": "user", "content": "hi"}]
    run(sched, b"a", msgs, max_tokens=2)
    monkeypatch.setattr(sched.engine.prompts, "encode", raise_once(tiny_engine.prompts.encode))
    events = sched.submit(b"r2", b"a", msgs, SamplingParams(max_tokens=2))
    assert internal_error(events, b"r2") and len(events) == 1
    assert not sched.busy and b"a" not in sched.store
    assert_reset_then_serves(sched, b"a")


def test_a_failing_cancel_is_answered_at_the_next_step(
    tiny_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kvroute.worker.turn import Turn

    sched = Scheduler(tiny_engine)
    two_sessions_in_flight(sched)
    monkeypatch.setattr(Turn, "cancel", raise_once(Turn.cancel))
    assert sched.cancel(b"a", b"r-a") is True
    monkeypatch.undo()
    assert sched.busy
    events = finish_all(sched)
    assert internal_error(events, b"r-a")
    assert [e.request_id for e in events if isinstance(e, EndEvent)] == [b"r-b"]
    assert_reset_then_serves(sched, b"a")


# ----------------------------------------------------------------------------- real model


def chat(
    sched: Scheduler,
    sid: bytes,
    turns: Sequence[str],
    max_tokens: int = 32,
    system: str | None = None,
) -> tuple[Messages, list[EndEvent]]:
    """Run a chat, echoing each reply exactly as streamed."""
    history: Messages = [{"role": "system", "content": system}] if system else []
    ends = []
    for text in turns:
        history.append({"role": "user", "content": text})
        out = run(sched, sid, history, max_tokens=max_tokens)
        assert out.end is not None, out.other
        ends.append(out.end)
        history.append({"role": "assistant", "content": out.text})
    return history, ends


@pytest.mark.model
def test_warm_paths_equal_cold_prefill_over_ten_turns(engine: Engine) -> None:
    """At every newly computed position, warm logits equal a cold prefill of the same ids."""
    sched = Scheduler(engine)
    history: Messages = []
    worst = 0.0
    for i, text in enumerate(USER_TURNS):
        history.append({"role": "user", "content": text})
        if i == 5:  # edit an earlier message: exercises the token-prefix path too
            history[2] = {"role": "user", "content": "Tell me one fact about its food."}
        session = sched.store.get(b"s")
        prompt = engine.render_prompt(history)
        held = (session.text, session.tokens) if session else ("", [])
        plan = plan_prefill(*held, prompt, engine.prompts)
        if session is not None:
            warm = engine.new_cache()
            warm.reserve(plan.keep)
            warm.k[:, :, : plan.keep] = session.cache.k[:, :, : plan.keep]
            warm.v[:, :, : plan.keep] = session.cache.v[:, :, : plan.keep]
            warm.advance(plan.keep)
            got = engine.forward([(warm, plan.new_ids)], all_logits=True)[0]
            want = engine.forward([(engine.new_cache(), plan.prompt_ids)], all_logits=True)[0]
            worst = max(worst, float(np.abs(got - want[plan.keep :]).max()))
        out = run(sched, b"s", history)
        assert out.end is not None
        assert out.end.stats.path == (plan.path if session else CachePath.COLD)
        assert out.text == cold_greedy(engine, plan.prompt_ids, 32)
        history.append({"role": "assistant", "content": out.text})
    assert worst < 1e-3, worst


@pytest.mark.model
def test_replay_stays_on_text_prefix_path(engine: Engine) -> None:
    sched = Scheduler(engine)
    history: Messages = []
    committed = 0
    for i, text in enumerate(USER_TURNS):
        history.append({"role": "user", "content": text})
        out = run(sched, b"s", history)
        assert out.end is not None
        st = out.end.stats
        if i == 0:
            assert st.path == CachePath.COLD
        else:
            assert st.path == CachePath.TEXT_PREFIX, (i, st)
            assert st.cached_tokens == committed
        session = sched.store.get(b"s")
        assert session is not None
        committed = len(session.tokens)
        history.append({"role": "assistant", "content": out.text})


@pytest.mark.model
def test_identical_resend_and_regenerate_match_cold(engine: Engine) -> None:
    sched = Scheduler(engine)
    history, _ = chat(sched, b"s", USER_TURNS[:2])
    # Regenerate: the same history without the last reply.
    regen = run(sched, b"s", history[:-1])
    assert regen.end is not None and regen.end.stats.prefill_tokens == 1
    assert regen.text == cold_greedy(engine, engine.encode(engine.render(history[:-1])), 32)
    # Identical resend of the same prompt again: a full hit, still fresh logits.
    again = run(sched, b"s", history[:-1])
    assert again.end is not None and again.end.stats.prefill_tokens == 1
    assert again.text == regen.text


@pytest.mark.model
def test_edited_message_takes_token_prefix_path(engine: Engine) -> None:
    sched = Scheduler(engine)
    history, _ = chat(sched, b"s", USER_TURNS[:3])
    history[2] = {"role": "user", "content": "Tell me one fact about its cuisine."}
    history = [*history[:3], {"role": "user", "content": "Why?"}]
    out = run(sched, b"s", history)
    assert out.end is not None and out.end.stats.path == CachePath.TOKEN_PREFIX
    assert 0 < out.end.stats.cached_tokens < out.end.stats.prompt_tokens
    assert out.text == cold_greedy(engine, engine.encode(engine.render(history)), 32)


@pytest.mark.model
def test_non_ascii_history_stays_on_text_prefix(engine: Engine) -> None:
    turns = [
        "Traduis « bonjour » en 日本語 s'il te plaît 🙂",
        "Et « merci » ? 🙏🏽",
        "Écris un emoji 🎉",
    ]
    sched = Scheduler(engine)
    _, ends = chat(sched, b"s", turns, max_tokens=24)
    paths = [e.stats.path for e in ends]
    assert paths == [CachePath.COLD, CachePath.TEXT_PREFIX, CachePath.TEXT_PREFIX]


@pytest.mark.model
def test_interleaved_sessions_never_see_each_others_text(engine: Engine) -> None:
    solo_a, _ = chat(Scheduler(engine), b"a", USER_TURNS[:2])
    solo_b, _ = chat(Scheduler(engine), b"b", ["Write a haiku about the sea.", "Another one."])
    sched = Scheduler(engine)
    hist: dict[bytes, Messages] = {b"a": [], b"b": []}
    script = {b"a": USER_TURNS[:2], b"b": ["Write a haiku about the sea.", "Another one."]}
    for i in range(2):
        outs = {sid: Outcome() for sid in hist}
        for sid in hist:
            hist[sid].append({"role": "user", "content": script[sid][i]})
            assert sched.submit(b"r" + sid, sid, hist[sid], SamplingParams(max_tokens=32)) == []
        while sched.busy:
            events = sched.step()
            for sid, out in outs.items():
                collect(out, [e for e in events if getattr(e, "session_id", None) == sid])
        for sid, out in outs.items():
            hist[sid].append({"role": "assistant", "content": out.text})
    assert hist[b"a"] == solo_a
    assert hist[b"b"] == solo_b
