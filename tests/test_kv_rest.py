"""KV at rest: a parked cache keeps its length and trims, unparks to within the codec's bound,
the store parks idle sessions before it evicts any and counts the bytes held, and a turn on a
parked session decodes it first and says so in END (tiny model; the real model's greedy replies
after a restore are checked in ``test_kv_rest_model.py``)."""

from __future__ import annotations

import numpy as np
import pytest

from kvroute.engine.cache import KVCache
from kvroute.engine.engine import Engine
from kvroute.engine.kv_codec import RestDtype, error_bound
from kvroute.engine.sampling import SamplingParams
from kvroute.proto.messages import CachePath, ColdReason, KvSource
from kvroute.worker.events import EndEvent, Event, TokenEvent
from kvroute.worker.scheduler import Scheduler, SchedulerConfig
from kvroute.worker.sessions import SessionStore

LOSSY = [RestDtype.F16, RestDtype.Q8_0, RestDtype.Q4_0]


def filled_cache(n: int, seed: int = 0) -> KVCache:
    cache = KVCache(n_layers=2, n_kv_heads=2, head_dim=64, max_len=256)
    cache.reserve(n)
    rng = np.random.default_rng(seed)
    cache.k[:, :, :n] = rng.standard_normal((2, 2, n, 64))
    cache.v[:, :, :n] = rng.standard_normal((2, 2, n, 64))
    cache.advance(n)
    return cache


@pytest.mark.parametrize("dtype", list(RestDtype))
def test_park_unpark_within_bound(dtype: RestDtype) -> None:
    cache = filled_cache(40)
    k, v = cache.k[:, :, :40].copy(), cache.v[:, :, :40].copy()
    f32_bytes = cache.nbytes
    cache.park(dtype)
    assert cache.parked and cache.length == 40 and cache.capacity == 0
    assert cache.nbytes < f32_bytes or dtype is RestDtype.NONE
    cache.unpark(n_new=5)
    assert not cache.parked and cache.capacity >= 45
    for got, want in ((cache.k[:, :, :40], k), (cache.v[:, :, :40], v)):
        assert np.all(np.abs(got - want) <= error_bound(want, dtype))
    cache.reserve(5)  # usable again


def test_parked_trim_keeps_only_the_prefix() -> None:
    cache = filled_cache(30)
    k = cache.k[:, :, :30].copy()
    cache.park(RestDtype.F16)
    cache.truncate(12)
    assert cache.parked and cache.length == 12
    cache.unpark()
    assert cache.length == 12
    assert np.allclose(cache.k[:, :, :12], k[:, :, :12], rtol=1e-3, atol=1e-6)


def test_forward_needs_unpark() -> None:
    cache = filled_cache(8)
    cache.park(RestDtype.Q8_0)
    with pytest.raises(AssertionError):
        cache.reserve(1)


def fill(store: SessionStore, sid: bytes, n: int) -> None:
    s = store.acquire(sid)
    c = filled_cache(n, seed=len(store))
    s.cache = c
    s.tokens = list(range(n))


@pytest.mark.parametrize("dtype", LOSSY)
def test_store_parks_before_it_evicts(dtype: RestDtype) -> None:
    one = filled_cache(64).nbytes
    store = SessionStore(lambda: KVCache(2, 2, 64, 256), kv_budget_bytes=3 * one, rest=dtype)
    for sid in (b"a", b"b", b"c", b"d", b"e"):
        fill(store, sid, 64)
    assert store.evict_to_fit() == []  # compressed, all five fit where three f32 did
    assert store.kv_bytes <= 3 * one
    parked = [s.session_id for s in store if s.cache.parked]
    assert parked[0] == b"a" and b"e" not in parked  # oldest first, only as many as needed
    assert all(store.get(sid).kv_from is KvSource.REST for sid in parked)  # type: ignore[union-attr]


def test_store_without_rest_evicts() -> None:
    one = filled_cache(64).nbytes
    store = SessionStore(lambda: KVCache(2, 2, 64, 256), kv_budget_bytes=3 * one)
    for sid in (b"a", b"b", b"c", b"d"):
        fill(store, sid, 64)
    assert store.evict_to_fit() == [b"a"]
    assert store.acquire(b"a").cold_reason == ColdReason.EVICTED


def test_store_never_parks_in_flight() -> None:
    one = filled_cache(64).nbytes
    store = SessionStore(
        lambda: KVCache(2, 2, 64, 256), kv_budget_bytes=one * 3 // 2, rest=RestDtype.Q8_0
    )
    fill(store, b"a", 64)
    fill(store, b"b", 64)
    store.get(b"a").begin(b"r", 64)  # type: ignore[union-attr]
    store.evict_to_fit()
    assert not store.get(b"a").cache.parked  # type: ignore[union-attr]
    assert store.get(b"b").cache.parked  # type: ignore[union-attr]


def run(sched: Scheduler, sid: bytes, messages: list[dict[str, str]]) -> tuple[str, EndEvent]:
    events: list[Event] = list(sched.submit(b"r" + sid, sid, messages, SamplingParams(8)))
    while sched.busy:
        events.extend(sched.step())
    text = "".join(e.text for e in events if isinstance(e, TokenEvent))
    ends = [e for e in events if isinstance(e, EndEvent)]
    assert len(ends) == 1, events
    return text, ends[0]


@pytest.mark.parametrize("dtype", [RestDtype.NONE, RestDtype.F16])
def test_turn_after_park_restores_and_reports(tiny_engine: Engine, dtype: RestDtype) -> None:
    msgs = [{"role": "user", "content": "hello there, how are you today?"}]
    plain = Scheduler(tiny_engine, SchedulerConfig(kv_rest=dtype))
    sched = Scheduler(tiny_engine, SchedulerConfig(kv_rest=dtype))
    histories = []
    for s in (plain, sched):
        reply, end = run(s, b"s", msgs)
        assert end.stats.kv_source is KvSource.HOT and end.stats.restore_ms == 0.0
        histories.append(
            [
                *msgs,
                {"role": "assistant", "content": reply},
                {"role": "user", "content": "and then?"},
            ]
        )
    assert histories[0] == histories[1]
    session = sched.store.get(b"s")
    assert session is not None
    freed = sched.store.park(session)
    assert (freed > 0) == (dtype is not RestDtype.NONE)
    want, end_hot = run(plain, b"s", histories[0])
    got, end = run(sched, b"s", histories[1])
    assert end.stats.path is CachePath.TEXT_PREFIX and end.stats.cached_tokens > 0
    if dtype is RestDtype.NONE:
        assert end.stats.kv_source is KvSource.HOT  # nothing was parked
    else:
        assert end.stats.kv_source is KvSource.REST
        assert 0 < end.stats.restore_ms <= end.stats.ttft_ms
    assert end.stats.cached_tokens == end_hot.stats.cached_tokens
    assert got == want
    assert not session.cache.parked and session.kv_from is KvSource.HOT


def test_f16_live_cache_parks_losslessly_to_f16(tiny_engine: Engine) -> None:
    """``--kv-dtype f16``: caches hold half floats, count half the bytes, and park to f16
    exactly, so the turn after a restore is the turn without one."""
    msgs = [{"role": "user", "content": "hello there, how are you today?"}]
    cfg = SchedulerConfig(kv_rest=RestDtype.F16, kv_dtype="f16")
    plain, sched = Scheduler(tiny_engine, cfg), Scheduler(tiny_engine, cfg)
    replies = [run(s, b"s", msgs)[0] for s in (plain, sched)]
    assert replies[0] == replies[1]
    session = sched.store.get(b"s")
    assert session is not None and session.cache.k.dtype == np.float16
    f32 = tiny_engine.new_cache()
    assert session.cache.bytes_per_token * 2 == f32.bytes_per_token
    held = session.cache.k[:, :, : session.cache.length].copy()
    assert sched.store.park(session) > 0
    session.begin(b"x", len(session.tokens))
    session.trim_to_keep()
    assert np.array_equal(session.cache.k[:, :, : session.cache.length], held)
    session.rollback()
    nxt = [*msgs, {"role": "assistant", "content": replies[0]}, {"role": "user", "content": "so?"}]
    assert run(plain, b"s", nxt)[0] == run(sched, b"s", nxt)[0]
