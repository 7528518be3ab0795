"""Admission: capacity, the bounded fair queue, KV reservations (units, then the scheduler).

The scheduler tests run the tiny model: more turns than capacity, floods from one client beside
a quiet one, budgets that force eviction, and waiting turns that are cancelled, reset or expire.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from kvroute.engine.engine import Engine
from kvroute.engine.sampling import SamplingParams
from kvroute.proto.errors import ErrorCode
from kvroute.proto.messages import CachePath, ColdReason, FinishReason
from kvroute.worker.admission import AdmissionConfig, FairQueue
from kvroute.worker.events import BusyEvent, EndEvent, ErrorEvent, Event, TokenEvent
from kvroute.worker.scheduler import Scheduler, SchedulerConfig

HI = [{"role": "user", "content": "hi"}]


# --- the queue alone --------------------------------------------------------------------------


def order_taken(q: FairQueue[str]) -> list[str]:
    """Take every item, always the first head offered."""
    out = []
    while len(q):
        head = next(q.heads())
        out.append(q.take(head.key))
    return out


def test_fair_queue_serves_clients_round_robin() -> None:
    q: FairQueue[str] = FairQueue(100, 100)
    for i in range(4):
        q.push(b"f%d" % i, b"flood", f"f{i}", now=i)
    q.push(b"q0", b"quiet", "q0", now=10)
    q.push(b"q1", b"quiet", "q1", now=11)
    q.push(b"o0", b"other", "o0", now=12)
    assert order_taken(q) == ["f0", "q0", "o0", "f1", "q1", "f2", "f3"]


def test_fair_queue_bounds_total_and_per_client() -> None:
    q: FairQueue[str] = FairQueue(max_total=3, max_per_client=2)
    q.push(b"a", b"c1", "a", 0)
    q.push(b"b", b"c1", "b", 0)
    assert not q.has_room(b"c1") and q.has_room(b"c2")
    q.push(b"c", b"c2", "c", 0)
    assert not q.has_room(b"c2") and not q.has_room(b"c3")  # the total is reached
    assert q.remove(b"a") == "a"
    assert q.has_room(b"c1") and q.has_room(b"c3")


def test_fair_queue_remove_where_and_remove_keep_the_rest_in_order() -> None:
    q: FairQueue[str] = FairQueue(100, 100)
    for i, client in enumerate([b"x", b"y", b"x", b"y", b"x"]):
        q.push(b"k%d" % i, client, f"i{i}", now=i)
    assert q.remove_where(lambda w: w.since in (0, 3)) == ["i0", "i3"]
    assert q.remove(b"nope") is None and b"k0" not in q and q.get(b"k2") == "i2"
    assert order_taken(q) == ["i2", "i1", "i4"]  # x still goes first: removal keeps turns


def test_config_spare_slots_and_validation() -> None:
    assert AdmissionConfig(capacity=1).spare == 0
    assert AdmissionConfig(capacity=4).spare == 1
    assert AdmissionConfig(capacity=16).spare == 2
    assert AdmissionConfig(capacity=16, spare_slots=0).spare == 0
    for bad in (
        {"capacity": 0},
        {"max_wait_s": 0.0},
        {"capacity": 2, "spare_slots": 2},
        {"max_waiting": -1},
        {"shared_window_s": -1.0},
    ):
        with pytest.raises(ValueError):
            AdmissionConfig(**bad)  # type: ignore[arg-type]


# --- through the scheduler --------------------------------------------------------------------


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def scheduler(engine: Engine, budget: int | None = None, **admission: object) -> Scheduler:
    cfg = SchedulerConfig(kv_budget_bytes=budget, admission=AdmissionConfig(**admission))  # type: ignore[arg-type]
    sched = Scheduler(engine, cfg)
    sched.admission.clock = Clock()
    return sched


def submit(
    sched: Scheduler, sid: bytes, client: bytes = b"", max_tokens: int = 4, messages: Sequence = HI
) -> list[Event]:
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    return sched.submit(b"r-" + sid, sid, messages, params, client=client)


def prompt_len(engine: Engine, messages: Sequence = HI) -> int:
    """Prompt tokens of ``messages`` on a fresh session (as END reports them)."""
    sched = scheduler(engine)
    submit(sched, b"probe", messages=messages, max_tokens=1)
    return Run(sched).to_idle().ends()[b"probe"].stats.prompt_tokens


class Run:
    """Steps a scheduler to idle, recording who ran when."""

    def __init__(self, sched: Scheduler) -> None:
        self.sched = sched
        self.events: list[Event] = []
        self.started: list[bytes] = []  # session ids in the order they first got a slot
        self.max_running = 0
        self.max_kv = 0

    def note(self) -> None:
        for sid in self.sched.turns:
            if sid not in self.started:
                self.started.append(sid)
        self.max_running = max(self.max_running, len(self.sched.turns))
        self.max_kv = max(self.max_kv, self.sched.store.kv_bytes)

    def step(self) -> list[Event]:
        new = self.sched.step()
        self.events += new
        self.note()
        return new

    def to_idle(self, limit: int = 10_000) -> Run:
        self.note()
        for _ in range(limit):
            if not self.sched.busy:
                return self
            self.step()
        raise AssertionError("scheduler never went idle")

    def ends(self) -> dict[bytes, EndEvent]:
        return {e.session_id: e for e in self.events if isinstance(e, EndEvent)}

    def errors(self, code: ErrorCode) -> list[bytes]:
        return [e.session_id for e in self.events if isinstance(e, ErrorEvent) and e.code == code]


def test_more_turns_than_capacity_never_run_more_than_capacity(tiny_engine: Engine) -> None:
    sched = scheduler(tiny_engine, capacity=3)
    sids = [b"s%d" % i for i in range(8)]
    for sid in sids:
        assert submit(sched, sid, client=b"one") == []
    assert len(sched.turns) == 2 and len(sched.admission) == 6  # the last slot is spare
    run = Run(sched).to_idle()
    assert run.max_running <= 3
    ends = run.ends()
    assert set(ends) == set(sids)
    assert all(e.finish_reason == FinishReason.LENGTH for e in ends.values())
    assert all(e.stats.generated_tokens == 4 for e in ends.values())


def test_spare_slot_lets_a_quiet_client_in_at_once(tiny_engine: Engine) -> None:
    sched = scheduler(tiny_engine, capacity=4)  # spare 1
    for i in range(6):
        submit(sched, b"f%d" % i, client=b"flood", max_tokens=8)
    assert len(sched.turns) == 3  # the flood may not take the spare slot
    assert submit(sched, b"q", client=b"quiet") == []
    assert b"q" in sched.turns  # started without waiting for a flood turn to end
    assert set(Run(sched).to_idle().ends()) == {b"q"} | {b"f%d" % i for i in range(6)}


def test_waiting_turns_start_round_robin_over_clients(tiny_engine: Engine) -> None:
    sched = scheduler(tiny_engine, capacity=1)  # no spare slot: order alone decides
    for i in range(4):
        submit(sched, b"f%d" % i, client=b"flood")
    submit(sched, b"q0", client=b"quiet")
    submit(sched, b"q1", client=b"quiet")
    run = Run(sched).to_idle()
    assert run.max_running == 1
    # FIFO would run f0 f1 f2 f3 q0 q1; the quiet client waits one flood turn per slot at most.
    assert run.started == [b"f0", b"f1", b"q0", b"f2", b"q1", b"f3"]


def test_full_queue_answers_overloaded_and_changes_nothing(tiny_engine: Engine) -> None:
    sched = scheduler(tiny_engine, capacity=1, max_waiting=3, max_waiting_per_client=2)
    Run(sched)  # nothing yet
    assert submit(sched, b"a", client=b"c1") == []  # runs
    assert submit(sched, b"b", client=b"c1") == []  # waits
    assert submit(sched, b"c", client=b"c1") == []  # waits: c1 now holds its 2
    refused = submit(sched, b"d", client=b"c1")
    assert [(type(e), e.code) for e in refused] == [(ErrorEvent, ErrorCode.OVERLOADED)]  # type: ignore[union-attr]
    assert b"d" not in sched.store  # refused before anything was created
    assert submit(sched, b"e", client=b"c2") == []  # another client still fits: total 3
    refused = submit(sched, b"f", client=b"c3")
    assert [(type(e), e.code) for e in refused] == [(ErrorEvent, ErrorCode.OVERLOADED)]  # type: ignore[union-attr]
    assert set(Run(sched).to_idle().ends()) == {b"a", b"b", b"c", b"e"}


def test_a_turn_that_waits_too_long_is_overloaded_and_its_session_kept(
    tiny_engine: Engine,
) -> None:
    sched = scheduler(tiny_engine, capacity=1, max_wait_s=5.0)
    clock = sched.admission.clock
    assert isinstance(clock, Clock)
    first = Run(sched)
    submit(sched, b"b", max_tokens=2)
    first.to_idle()
    held = sched.store.get(b"b")
    assert held is not None
    before = (held.text, list(held.tokens), held.cache.length)
    submit(sched, b"a", max_tokens=50)
    follow_up = [*HI, {"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]
    assert submit(sched, b"b", messages=follow_up) == []  # waits behind a
    run = Run(sched)
    run.step()
    clock.t += 6.0
    run.step()
    assert run.errors(ErrorCode.OVERLOADED) == [b"b"]
    assert sched.admission.expired == 1
    held = sched.store.get(b"b")
    assert held is not None and held.in_flight is None
    assert (held.text, list(held.tokens), held.cache.length) == before
    run.to_idle()
    assert set(run.ends()) == {b"a"}


def test_a_new_session_whose_first_turn_expires_leaves_nothing_behind(
    tiny_engine: Engine,
) -> None:
    sched = scheduler(tiny_engine, capacity=1, max_wait_s=5.0)
    clock = sched.admission.clock
    assert isinstance(clock, Clock)
    submit(sched, b"a", max_tokens=50)
    assert submit(sched, b"new") == []  # waits behind a
    run = Run(sched)
    run.step()
    clock.t += 6.0
    run.step()
    assert run.errors(ErrorCode.OVERLOADED) == [b"new"]
    assert sched.store.get(b"new") is None  # no empty session left to count or announce
    run.to_idle()
    submit(sched, b"new", max_tokens=1)
    end = Run(sched).to_idle().ends()[b"new"]
    assert end.stats.cold_reason == ColdReason.NEW  # not "cancelled": nothing was cancelled


def test_cancel_and_reset_of_waiting_turns(tiny_engine: Engine) -> None:
    sched = scheduler(tiny_engine, capacity=1)
    submit(sched, b"a", max_tokens=20)
    submit(sched, b"b")
    submit(sched, b"c")
    assert [type(e) for e in submit(sched, b"b")] == [BusyEvent]  # one turn per session
    assert sched.cancel(b"b", b"r-b")
    reset = sched.reset(b"c")  # ends at once, as a running turn would
    assert [(type(e), e.finish_reason) for e in reset] == [(EndEvent, FinishReason.CANCELLED)]  # type: ignore[union-attr]
    run = Run(sched)
    first = run.step()
    end_b = [e for e in first if isinstance(e, EndEvent) and e.session_id == b"b"]
    assert len(end_b) == 1 and end_b[0].finish_reason == FinishReason.CANCELLED
    assert end_b[0].stats.generated_tokens == 0 and end_b[0].seq == 0
    assert not [e for e in run.events if isinstance(e, TokenEvent) and e.session_id != b"a"]
    run.to_idle()
    assert run.started == [b"a"]


def test_budget_reserves_running_turns_and_evicts_idle_sessions(tiny_engine: Engine) -> None:
    bpt = tiny_engine.new_cache().bytes_per_token
    reservation = (prompt_len(tiny_engine) + 8) * bpt  # one cold "hi" turn, max_tokens 8
    sched = scheduler(tiny_engine, budget=2 * reservation + bpt, capacity=8)
    idle = Run(sched)
    submit(sched, b"idle", max_tokens=8)
    idle.to_idle()
    assert b"idle" in sched.store
    for sid in (b"a", b"b", b"c"):
        submit(sched, sid, client=sid, max_tokens=8)
    # Two reservations fit the budget only without the idle session: it was evicted, and c
    # waits for a slot of memory although capacity has room.
    assert b"idle" not in sched.store
    assert set(sched.turns) == {b"a", b"b"} and b"c" in sched.admission
    run = Run(sched).to_idle()
    assert run.max_running == 2
    assert run.max_kv <= 2 * reservation + bpt
    assert set(run.ends()) == {b"a", b"b", b"c"}
    again = Run(sched)
    submit(sched, b"idle", max_tokens=2)
    end = again.to_idle().ends()[b"idle"]
    assert (end.stats.path, end.stats.cold_reason) == (CachePath.COLD, ColdReason.EVICTED)


def test_resident_kv_stays_within_budget_under_a_flood(tiny_engine: Engine) -> None:
    bpt = tiny_engine.new_cache().bytes_per_token
    flood_turn = prompt_len(tiny_engine) + 6
    budget = 4 * flood_turn * bpt + bpt  # four flood turns, or one flood turn beside the quiet
    sched = scheduler(tiny_engine, budget=budget, capacity=6)
    run = Run(sched)
    history: list[dict[str, str]] = []
    for wave in range(4):  # the quiet client's prompt grows to ~190 of the tiny model's 256
        for i in range(8):
            submit(sched, b"f%d-%d" % (wave, i), client=b"flood", max_tokens=6)
        history = [*history, {"role": "user", "content": f"question {wave}"}]
        assert submit(sched, b"quiet", client=b"quiet", messages=history, max_tokens=6) == []
        while sched.busy:
            run.step()
            assert sched.store.kv_bytes <= budget  # after every step
        quiet = run.ends()[b"quiet"]
        history.append({"role": "assistant", "content": "x"})
        assert quiet.finish_reason == FinishReason.LENGTH
    assert run.max_kv <= budget
    assert sched.store.evictions > 0  # the flood's idle sessions made room
    assert len(run.ends()) == len(set(run.ends())) and not run.errors(ErrorCode.INTERNAL)


def test_a_turn_bigger_than_the_budget_runs_alone(tiny_engine: Engine) -> None:
    bpt = tiny_engine.new_cache().bytes_per_token
    sched = scheduler(tiny_engine, budget=4 * bpt, capacity=4)  # a prompt alone is ~90 tokens
    submit(sched, b"big", client=b"a", max_tokens=20)
    submit(sched, b"next", client=b"b", max_tokens=20)
    assert list(sched.turns) == [b"big"] and b"next" in sched.admission
    run = Run(sched).to_idle()
    assert run.max_running == 1 and set(run.ends()) == {b"big", b"next"}


def test_prefill_budget_goes_to_the_light_client_first(tiny_engine: Engine) -> None:
    sched = Scheduler(
        tiny_engine,
        SchedulerConfig(prefill_chunk=32, admission=AdmissionConfig(capacity=8)),
    )
    warm = Run(sched)
    submit(sched, b"q", client=b"quiet", max_tokens=2)
    reply = "".join(e.text for e in warm.to_idle().events if isinstance(e, TokenEvent))
    for i in range(3):  # cold prompts of ~90 tokens: three steps of budget each
        submit(sched, b"f%d" % i, client=b"flood", max_tokens=4)
    follow_up = [*HI, {"role": "assistant", "content": reply}, {"role": "user", "content": "y"}]
    assert submit(sched, b"q", client=b"quiet", messages=follow_up, max_tokens=4) == []
    run = Run(sched)
    first = run.step()
    # The quiet turn's ~20 new tokens (text prefix) were fed first: it streams after one step.
    assert [e.session_id for e in first if isinstance(e, TokenEvent)] == [b"q"]
    assert all(sched.turns[b"f%d" % i].prefilling for i in range(3))
    # ... in a step of its own: the flood's prompts waited (they do not lengthen that step).
    assert [sched.store.get(b"f%d" % i).cache.length for i in range(3)] == [0, 0, 0]  # type: ignore[union-attr]
    assert set(run.to_idle().ends()) == {b"q", b"f0", b"f1", b"f2"}


def test_steps_feed_fewer_prompt_tokens_while_clients_share_the_worker(
    tiny_engine: Engine,
) -> None:
    admission = AdmissionConfig(capacity=8, shared_prefill_chunk=16)
    sched = Scheduler(tiny_engine, SchedulerConfig(prefill_chunk=200, admission=admission))
    submit(sched, b"a", client=b"one")
    Run(sched).step()
    assert sched.store.get(b"a").cache.length == prompt_len(tiny_engine)  # type: ignore[union-attr]
    Run(sched).to_idle()
    submit(sched, b"b", client=b"one")
    submit(sched, b"c", client=b"two")
    Run(sched).step()
    fed = [sched.store.get(sid).cache.length for sid in (b"b", b"c")]  # type: ignore[union-attr]
    assert sum(fed) == 16  # one shared step's worth, not 200
    assert set(Run(sched).to_idle().ends()) == {b"b", b"c"}


def decoding_flood(engine: Engine, n: int = 3, **admission: object) -> Scheduler:
    """A scheduler (hand-moved clock) whose ``n`` flood turns are all past their prompts."""
    cfg = AdmissionConfig(capacity=8, **admission)  # type: ignore[arg-type]
    sched = Scheduler(engine, SchedulerConfig(prefill_chunk=128, admission=cfg))
    sched.admission.clock = Clock()
    for i in range(n):
        submit(sched, b"f%d" % i, client=b"flood", max_tokens=40)
    run = Run(sched)
    while any(t.prefilling for t in sched.turns.values()):
        run.step()
    return sched


def cache_lengths(sched: Scheduler, sids: Sequence[bytes]) -> list[int]:
    return [sched.store.get(sid).cache.length for sid in sids]  # type: ignore[union-attr]


def test_a_light_clients_first_token_comes_from_a_step_of_its_own(tiny_engine: Engine) -> None:
    sched = decoding_flood(tiny_engine, shared_prefill_chunk=128)
    flood = [b"f0", b"f1", b"f2"]
    before = cache_lengths(sched, flood)
    submit(sched, b"q", client=b"quiet")
    first = Run(sched).step()
    # Its whole prompt, and no decode row of the flood: the step costs the quiet prompt alone.
    assert [e.session_id for e in first if isinstance(e, TokenEvent)] == [b"q"]
    assert cache_lengths(sched, flood) == before
    second = Run(sched).step()  # everyone decodes again, the quiet turn too
    assert {e.session_id for e in second if isinstance(e, TokenEvent)} == {b"q", *flood}
    assert cache_lengths(sched, flood) == [n + 1 for n in before]


def test_steps_of_their_own_never_follow_each_other(tiny_engine: Engine) -> None:
    sched = decoding_flood(tiny_engine, shared_prefill_chunk=128)
    flood = [b"f0", b"f1", b"f2"]
    before = cache_lengths(sched, flood)
    submit(sched, b"q1", client=b"quiet1", max_tokens=1)  # ends with its first token
    submit(sched, b"q2", client=b"quiet2")
    run = Run(sched)
    first = {e.session_id for e in run.step() if isinstance(e, TokenEvent)}
    assert first == {b"q1"} and cache_lengths(sched, flood) == before
    assert b"q1" in run.ends()
    # The flood decodes before the second light client's prompt gets its step.
    second = {e.session_id for e in run.step() if isinstance(e, TokenEvent)}
    assert second == set(flood) and sched.turns[b"q2"].prefilling
    assert cache_lengths(sched, flood) == [n + 1 for n in before]
    third = {e.session_id for e in run.step() if isinstance(e, TokenEvent)}
    assert third == {b"q2"} and cache_lengths(sched, flood) == [n + 1 for n in before]
    assert set(run.to_idle().ends()) == {b"q1", b"q2", *flood}


def test_a_light_client_streaming_already_waits_its_turn(tiny_engine: Engine) -> None:
    sched = decoding_flood(tiny_engine, shared_prefill_chunk=128)
    flood = [b"f0", b"f1", b"f2"]
    submit(sched, b"q1", client=b"quiet", max_tokens=20)
    run = Run(sched)
    run.step()  # q1's step of its own
    run.step()  # everyone decodes
    submit(sched, b"f3", client=b"flood", max_tokens=20)
    run.step()  # the flood's new prompt
    assert not sched.turns[b"f3"].prefilling
    before = cache_lengths(sched, flood)
    submit(sched, b"q2", client=b"quiet")  # q1 streams: the quiet client had its first token
    run.step()  # so the decode rows come first, as for anyone
    assert cache_lengths(sched, flood) == [n + 1 for n in before]
    assert sched.turns[b"q2"].prefilling and cache_lengths(sched, [b"q2"]) == [0]
    run.step()
    assert not sched.turns[b"q2"].prefilling


def test_shared_steps_feed_prompts_or_decode_rows_in_turn(tiny_engine: Engine) -> None:
    admission = AdmissionConfig(capacity=8, shared_prefill_chunk=16)
    sched = Scheduler(tiny_engine, SchedulerConfig(prefill_chunk=200, admission=admission))
    submit(sched, b"a", client=b"one", max_tokens=20)
    run = Run(sched)
    run.step()  # alone: the whole prompt in one step
    assert not sched.turns[b"a"].prefilling
    submit(sched, b"b", client=b"two")  # a prompt of several shared steps
    seen = []
    for _ in range(4):
        a, b = cache_lengths(sched, [b"a", b"b"])
        run.step()
        a2, b2 = cache_lengths(sched, [b"a", b"b"])
        seen.append((a2 - a, b2 - b))
    assert seen == [(1, 0), (0, 16), (1, 0), (0, 16)]
    assert set(run.to_idle().ends()) == {b"a", b"b"}


def test_a_client_that_ended_a_turn_recently_still_shares_the_worker(
    tiny_engine: Engine,
) -> None:
    admission = AdmissionConfig(capacity=8, shared_prefill_chunk=16, shared_window_s=5.0)
    sched = Scheduler(tiny_engine, SchedulerConfig(prefill_chunk=200, admission=admission))
    clock = Clock()
    sched.admission.clock = clock
    submit(sched, b"q", client=b"quiet")
    Run(sched).to_idle()
    clock.t += 4.0  # the quiet client thinks: its next turn is likely on its way
    submit(sched, b"a", client=b"flood")
    Run(sched).step()
    assert cache_lengths(sched, [b"a"]) == [16]  # a shared step's worth, not 200
    Run(sched).to_idle()
    clock.t += 2.0  # the quiet client's last turn ended 6 s ago: the flood is alone
    submit(sched, b"b", client=b"flood")
    Run(sched).step()
    assert cache_lengths(sched, [b"b"]) == [prompt_len(tiny_engine)]
    assert set(Run(sched).to_idle().ends()) == {b"b"}
