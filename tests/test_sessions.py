"""The session store: factory, reset, LRU eviction by bytes, in-flight protection (no model)."""

from __future__ import annotations

from kvroute.engine.cache import GROW_CHUNK, KVCache
from kvroute.proto.messages import ColdReason
from kvroute.worker.sessions import SessionStore


def small_cache() -> KVCache:
    return KVCache(n_layers=1, n_kv_heads=1, head_dim=4, max_len=4 * GROW_CHUNK)


CHUNK_BYTES = small_cache().bytes_per_token * GROW_CHUNK


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        self.t += 1.0
        return self.t


def fill(store: SessionStore, sid: bytes, n: int) -> None:
    s = store.acquire(sid)
    s.cache.reserve(n)
    s.cache.advance(n)
    s.tokens = list(range(n))


def test_new_session_and_reasons() -> None:
    store = SessionStore(small_cache)
    s = store.acquire(b"a")
    assert s.cold_reason == ColdReason.NEW and s.tokens == [] and s.cache.length == 0
    assert store.acquire(b"a") is s
    assert store.reset(b"a") is True
    assert store.reset(b"a") is False  # idempotent
    assert b"a" not in store
    assert store.acquire(b"a").cold_reason == ColdReason.RESET
    store.reset(b"b", ColdReason.WORKER_LOST)
    assert store.acquire(b"b").cold_reason == ColdReason.WORKER_LOST


def test_evicts_least_recently_used_by_bytes() -> None:
    store = SessionStore(small_cache, kv_budget_bytes=2 * CHUNK_BYTES, clock=Clock())
    for sid in (b"a", b"b", b"c"):
        fill(store, sid, 10)  # one chunk each
    store.acquire(b"a")  # a becomes most recent: b is now the oldest
    assert store.kv_bytes == 3 * CHUNK_BYTES
    assert store.evict_to_fit() == [b"b"]
    assert store.kv_bytes == 2 * CHUNK_BYTES
    assert store.acquire(b"b").cold_reason == ColdReason.EVICTED
    assert store.evictions == 1


def test_extra_bytes_make_room_for_growth() -> None:
    store = SessionStore(small_cache, kv_budget_bytes=2 * CHUNK_BYTES)
    fill(store, b"a", 10)
    fill(store, b"b", 10)
    assert store.evict_to_fit(CHUNK_BYTES) == [b"a"]


def test_in_flight_session_is_never_evicted() -> None:
    store = SessionStore(small_cache, kv_budget_bytes=CHUNK_BYTES)
    fill(store, b"a", 10)
    fill(store, b"b", 10)
    store.get(b"a").in_flight = b"r1"  # type: ignore[union-attr]
    store.get(b"b").in_flight = b"r2"  # type: ignore[union-attr]
    assert store.evict_to_fit() == []  # over budget, but both are busy
    store.get(b"b").in_flight = None  # type: ignore[union-attr]
    assert store.evict_to_fit() == [b"b"]
    assert b"a" in store


def test_unbounded_store_never_evicts() -> None:
    store = SessionStore(small_cache)
    for i in range(5):
        fill(store, bytes([i]), 100)
    assert store.evict_to_fit(10**12) == []
    assert len(store) == 5
