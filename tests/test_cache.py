"""KVCache: growth in chunks (never preallocated to n_ctx), writes, trim / truncate / compact."""

from __future__ import annotations

import numpy as np
import pytest

from kvroute.engine.cache import GROW_CHUNK, KVCache

N_LAYERS, N_KV, HD = 3, 2, 4


def make_cache(max_len: int = 4 * GROW_CHUNK) -> KVCache:
    """A small cache: 3 layers, 2 KV heads, head dim 4."""
    return KVCache(N_LAYERS, N_KV, HD, max_len)


def fill(cache: KVCache, n: int, start: float = 0.0) -> np.ndarray:
    """Append ``n`` positions to every layer the way a forward pass does; return the keys written.

    Position p of layer l holds ``start + p`` (+ 1000 l in keys, negated in values), so any
    misplaced copy shows up as a wrong number.
    """
    cache.reserve(n)
    pos = start + np.arange(n, dtype=np.float32)
    k = np.broadcast_to(pos[None, :, None], (N_KV, n, HD)).copy()  # (KV, T, hd)
    for layer in range(N_LAYERS):
        cache.update_and_fetch(layer, k + 1000 * layer, -(k + 1000 * layer))
    cache.advance(n)
    return k


def committed_keys(cache: KVCache, layer: int = 0) -> np.ndarray:
    """Position values stored for layer ``layer``, head 0 (one number per position)."""
    return cache.k[layer, 0, : cache.length, 0] - 1000 * layer


def test_new_cache_allocates_nothing() -> None:
    cache = make_cache(max_len=8192)
    assert cache.length == 0
    assert cache.capacity == 0
    assert cache.nbytes == 0


def test_grows_in_chunks_not_to_max_len() -> None:
    cache = make_cache(max_len=8192)
    fill(cache, 1)
    assert cache.capacity == GROW_CHUNK
    fill(cache, GROW_CHUNK - 1)  # exactly full: no growth yet
    assert (cache.length, cache.capacity) == (GROW_CHUNK, GROW_CHUNK)
    fill(cache, 1)
    assert cache.capacity == 2 * GROW_CHUNK
    fill(cache, 2 * GROW_CHUNK)  # one big prefill rounds up to the next chunk boundary
    assert cache.length == 3 * GROW_CHUNK + 1
    assert cache.capacity == 4 * GROW_CHUNK


def test_growth_is_capped_at_max_len() -> None:
    cache = make_cache(max_len=GROW_CHUNK + 10)
    fill(cache, GROW_CHUNK + 1)
    assert cache.capacity == GROW_CHUNK + 10


def test_growth_preserves_contents() -> None:
    cache = make_cache()
    fill(cache, GROW_CHUNK - 3)
    fill(cache, 10, start=GROW_CHUNK - 3)  # crosses a chunk boundary: arrays are reallocated
    for layer in range(N_LAYERS):
        np.testing.assert_array_equal(committed_keys(cache, layer), np.arange(GROW_CHUNK + 7))
    np.testing.assert_array_equal(cache.v[:, :, : cache.length], -cache.k[:, :, : cache.length])


def test_update_and_fetch_returns_past_plus_new_without_committing() -> None:
    cache = make_cache()
    fill(cache, 5)
    cache.reserve(2)
    new = np.full((N_KV, 2, HD), 99.0, dtype=np.float32)
    k, v = cache.update_and_fetch(1, new, -new)
    assert k.shape == v.shape == (N_KV, 7, HD)
    np.testing.assert_array_equal(k[0, :, 0], [1000, 1001, 1002, 1003, 1004, 99, 99])
    # length only moves in advance(): the other layers of the same pass write at offset 5 too.
    assert cache.length == 5
    k0, _ = cache.update_and_fetch(0, new, -new)
    np.testing.assert_array_equal(k0[0, :, 0], [0, 1, 2, 3, 4, 99, 99])


def test_nbytes_and_bytes_per_token() -> None:
    cache = make_cache()
    assert cache.bytes_per_token == 2 * N_LAYERS * N_KV * HD * 4  # keys + values, float32
    fill(cache, 3)
    assert cache.nbytes == cache.capacity * cache.bytes_per_token


def test_trim_drops_a_suffix_and_clamps() -> None:
    cache = make_cache()
    fill(cache, 10)
    assert cache.trim(4) == 4
    assert cache.length == 6
    np.testing.assert_array_equal(committed_keys(cache), np.arange(6))
    assert cache.trim(100) == 6  # clamped to what is there
    assert cache.length == 0
    assert cache.trim(-3) == 0  # a negative count is a no-op, not growth
    assert cache.length == 0


def test_trim_then_append_overwrites_the_dropped_positions() -> None:
    cache = make_cache()
    fill(cache, 10)
    cache.trim(4)
    fill(cache, 2, start=50)
    np.testing.assert_array_equal(committed_keys(cache), [0, 1, 2, 3, 4, 5, 50, 51])


def test_truncate_keeps_a_prefix() -> None:
    cache = make_cache()
    fill(cache, 10)
    capacity = cache.capacity
    cache.truncate(3)
    assert cache.length == 3
    assert cache.capacity == capacity  # trimming alone keeps the memory for reuse
    np.testing.assert_array_equal(committed_keys(cache), [0, 1, 2])


def test_compact_releases_memory_and_keeps_contents() -> None:
    cache = make_cache()
    fill(cache, 3 * GROW_CHUNK)
    cache.truncate(GROW_CHUNK + 5)
    cache.compact()
    assert cache.capacity == 2 * GROW_CHUNK
    assert cache.nbytes == 2 * GROW_CHUNK * cache.bytes_per_token
    np.testing.assert_array_equal(committed_keys(cache, 2), np.arange(GROW_CHUNK + 5))
    cache.truncate(0)
    cache.compact()
    assert cache.nbytes == 0


@pytest.mark.parametrize("length", [1, GROW_CHUNK, GROW_CHUNK + 1])
def test_compact_never_drops_committed_positions(length: int) -> None:
    cache = make_cache()
    fill(cache, length)
    cache.compact()
    assert cache.capacity >= cache.length == length
    np.testing.assert_array_equal(committed_keys(cache), np.arange(length))
