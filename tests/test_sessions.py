"""The session store: factory, reset, close, LRU eviction by bytes, in-flight protection, and
the turn verbs that alone write (T, K, S) (no model)."""

from __future__ import annotations

import pytest

from kvroute.engine.cache import MIN_GROW, KVCache
from kvroute.proto.messages import ColdReason
from kvroute.worker.sessions import Session, SessionStore


def small_cache() -> KVCache:
    return KVCache(n_layers=1, n_kv_heads=1, head_dim=4, max_len=1024)


CHUNK_BYTES = small_cache().bytes_per_token * MIN_GROW  # what a 10-token session allocates


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


def test_close_forgets_an_id_entirely() -> None:
    store = SessionStore(small_cache)
    fill(store, b"live", 10)
    store.reset(b"was-reset")
    store.reset(b"was-evicted", ColdReason.EVICTED)
    assert store.forget(b"live") is True and store.forget(b"live") is False  # idempotent
    for sid in (b"was-reset", b"was-evicted"):
        assert store.forget(sid) is False  # nothing live, but the memory goes too
    for sid in (b"live", b"was-reset", b"was-evicted"):
        assert store.acquire(sid).cold_reason == ColdReason.NEW


# --- the turn verbs: begin, trim_to_keep, commit, rollback -------------------------------------


def committed(n: int) -> Session:
    """A session whose committed K is ids 0..n-1 (text: one letter per id)."""
    s = Session(b"s", small_cache())
    s.cache.reserve(n)
    s.cache.advance(n)
    s.text, s.tokens = "x" * n, list(range(n))
    s.check()
    return s


def feed(s: Session, n: int) -> None:
    """What a forward pass does to the cache: ``n`` more positions."""
    s.cache.reserve(n)
    s.cache.advance(n)


def test_begin_changes_nothing_until_the_first_feed() -> None:
    s = committed(10)
    s.begin(b"r", keep=9)  # a full hit: one position must be re-fed
    assert (s.in_flight, s.cache.length, s.feeding) == (b"r", 10, False)
    s.rollback()  # cancelled before any feed: exactly as before
    assert (s.text, s.tokens, s.cache.length, s.in_flight) == ("x" * 10, list(range(10)), 10, None)
    assert s.cold_reason == ColdReason.NEW


def test_rollback_after_an_append_restores_the_committed_state() -> None:
    s = committed(10)
    s.begin(b"r", keep=10)
    s.trim_to_keep()
    feed(s, 5)
    s.rollback()
    assert (s.tokens, s.cache.length) == (list(range(10)), 10)


def test_rollback_after_trimming_what_k_needs_starts_over_cancelled() -> None:
    s = committed(10)
    s.begin(b"r", keep=9)
    s.trim_to_keep()  # position 9 is gone: the cache can no longer hold K
    assert s.cache.length == 9
    s.trim_to_keep()  # idempotent
    assert s.cache.length == 9
    s.rollback()
    assert (s.text, s.tokens, s.cache.length) == ("", [], 0)
    assert s.cold_reason == ColdReason.CANCELLED


def test_commit_keeps_what_was_fed_and_never_grows_the_cache() -> None:
    s = committed(10)
    s.begin(b"r", keep=9)
    s.trim_to_keep()
    with pytest.raises(AssertionError, match="committing 10 ids"):
        s.commit("x" * 10, list(range(10)))  # the old rollback's mistake: K longer than S
    feed(s, 3)
    with pytest.raises(AssertionError, match="reused prefix"):
        s.commit("y" * 12, [7, *range(1, 12)])
    s.commit("x" * 11, list(range(11)))  # one fed position is dropped (say, mid-character)
    assert (s.tokens, s.cache.length, s.turns, s.in_flight) == (list(range(11)), 11, 1, None)


def test_one_turn_at_a_time() -> None:
    s = committed(4)
    s.begin(b"r1", keep=4)
    with pytest.raises(AssertionError, match="already in flight"):
        s.begin(b"r2", keep=4)
    with pytest.raises(AssertionError, match="outside K"):
        committed(4).begin(b"r", keep=5)
