"""KVCache: geometric growth (never preallocated to n_ctx), writes, trim / truncate / compact."""

from __future__ import annotations

import numpy as np
import pytest

from kvroute.engine.cache import MIN_GROW, KVCache

N_LAYERS, N_KV, HD = 3, 2, 4


def make_cache(max_len: int = 1024) -> KVCache:
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


def test_first_allocation_is_the_first_pass_not_a_chunk() -> None:
    cache = make_cache(max_len=8192)
    fill(cache, 20)
    assert cache.capacity == 20
    tiny = make_cache(max_len=8192)
    fill(tiny, 1)  # a lone token gets MIN_GROW positions, so decode does not copy every step
    assert tiny.capacity == MIN_GROW


def test_twenty_token_session_of_the_default_model_is_under_one_megabyte() -> None:
    # SmolLM2-135M's cache geometry: 30 layers, 3 KV heads, head dim 64, float32.
    cache = KVCache(30, 3, 64, 2048)
    cache.reserve(20)
    cache.advance(20)
    assert cache.nbytes == 20 * cache.bytes_per_token == 921_600
    assert cache.nbytes < 1_000_000  # a 256-position first chunk cost 11,796,480


def test_growth_is_geometric() -> None:
    cache = make_cache(max_len=1 << 16)
    fill(cache, 100)
    assert cache.capacity == 100
    fill(cache, 1)
    assert cache.capacity == 150  # + half
    fill(cache, 49)
    assert (cache.length, cache.capacity) == (150, 150)  # exactly full: no growth yet
    fill(cache, 1)
    assert cache.capacity == 225
    fill(cache, 500)  # one big pass needs more than a step: allocate exactly what it needs
    assert cache.capacity == cache.length == 651


def test_decode_one_token_at_a_time_copies_o_n_positions() -> None:
    cache = make_cache(max_len=1 << 16)
    copied, capacity = 0, 0
    for _ in range(4000):
        if cache.length + 1 > cache.capacity:
            copied += cache.length  # what reserve() copies into the new arrays
        fill(cache, 1)
        capacity = max(capacity, cache.capacity)
    assert copied <= 3 * cache.length
    assert capacity <= 1.5 * cache.length + MIN_GROW


def test_growth_is_capped_at_max_len() -> None:
    cache = make_cache(max_len=110)
    fill(cache, 100)
    fill(cache, 1)
    assert cache.capacity == 110


def test_growth_limit_caps_growth_but_never_refuses_a_need() -> None:
    cache = make_cache(max_len=8192)
    cache.growth_limit = 107  # e.g. a 100-token prompt with max_tokens 7
    fill(cache, 100)
    fill(cache, 1)
    assert cache.capacity == 107  # not 150
    fill(cache, 6)
    assert cache.capacity == 107
    fill(cache, 3)  # beyond the limit: allocates what is needed, no more
    assert cache.capacity == 110
    first = make_cache(max_len=8192)
    first.growth_limit = 5
    fill(first, 1)
    assert first.capacity == 5  # the MIN_GROW floor yields to the limit too


def test_growth_preserves_contents() -> None:
    cache = make_cache()
    fill(cache, 37)
    fill(cache, 10, start=37)  # crosses the capacity: arrays are reallocated
    fill(cache, 1, start=47)
    for layer in range(N_LAYERS):
        np.testing.assert_array_equal(committed_keys(cache, layer), np.arange(48))
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
    fill(cache, 300)
    cache.truncate(133)
    cache.compact()
    assert cache.capacity == 133
    assert cache.nbytes == 133 * cache.bytes_per_token
    np.testing.assert_array_equal(committed_keys(cache, 2), np.arange(133))
    fill(cache, 2, start=133)  # and it grows again from there
    np.testing.assert_array_equal(committed_keys(cache, 1), np.arange(135))
    cache.truncate(0)
    cache.compact()
    assert cache.nbytes == 0


@pytest.mark.parametrize("length", [1, MIN_GROW, MIN_GROW + 1])
def test_compact_never_drops_committed_positions(length: int) -> None:
    cache = make_cache()
    fill(cache, length)
    cache.compact()
    assert cache.capacity == cache.length == length
    np.testing.assert_array_equal(committed_keys(cache), np.arange(length))


@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_copy_is_an_independent_cache_with_the_same_positions(dtype: str) -> None:
    cache = KVCache(N_LAYERS, N_KV, HD, 64, dtype)
    fill(cache, 20)
    twin = cache.copy()
    assert (twin.length, twin.capacity, twin.dtype, twin.max_len) == (20, 20, cache.dtype, 64)
    for layer in range(N_LAYERS):
        np.testing.assert_array_equal(committed_keys(twin, layer), np.arange(20))
    fill(twin, 5, start=100)  # growing the copy leaves the original as it was
    assert cache.length == 20
    np.testing.assert_array_equal(committed_keys(cache), np.arange(20))


def random_keys(cache: KVCache, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` positions of distinct random keys, (layers, KV heads, n, head dim), as the cache's
    dtype holds them."""
    k = rng.standard_normal((cache.n_layers, cache.n_kv_heads, n, cache.head_dim))
    return k.astype(cache.dtype).astype(np.float32)


def append(cache: KVCache, k: np.ndarray) -> None:
    """Append keys ``k`` (values: their negation) to every layer, as a forward pass does."""
    cache.reserve(k.shape[2])
    for layer in range(cache.n_layers):
        cache.update_and_fetch(layer, k[layer], -k[layer])
    cache.advance(k.shape[2])


@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_growth_at_every_turn_is_in_place_and_keeps_every_head_and_dim(
    dtype: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A chat session whose growth is capped at each turn's horizon grows at every turn.
    rng = np.random.default_rng(7)
    cache = KVCache(N_LAYERS, N_KV, HD, 4096, dtype)
    want = np.zeros((N_LAYERS, N_KV, 0, HD), dtype=np.float32)

    def no_new_arrays(*args: object, **kwargs: object) -> np.ndarray:
        raise AssertionError("growth allocated new arrays instead of resizing")

    for _ in range(6):
        cache.growth_limit = cache.length + 30 + 8  # prompt of 30 new tokens, max_tokens 8
        capacity = cache.capacity
        turn = [random_keys(cache, 30, rng)]  # the prompt, then the reply one token at a time
        turn += [random_keys(cache, 1, rng) for _ in range(int(rng.integers(1, 9)))]
        with monkeypatch.context() as m:
            m.setattr(np, "empty", no_new_arrays)
            for k in turn:
                append(cache, k)
        assert capacity < cache.capacity <= cache.growth_limit
        want = np.concatenate([want, *turn], axis=2)
        np.testing.assert_array_equal(cache.k[:, :, : cache.length], want)
        np.testing.assert_array_equal(cache.v[:, :, : cache.length], -want)


def test_growth_while_a_view_is_alive_copies_and_leaves_the_view_intact() -> None:
    cache = make_cache()
    fill(cache, 10)
    view = cache.k[2, 1]  # keys someone still holds: resizing under it would free its memory
    before = view[:10].copy()
    fill(cache, 30, start=10)  # grows
    np.testing.assert_array_equal(view[:10], before)
    assert not np.shares_memory(view, cache.k)
    for layer in range(N_LAYERS):
        np.testing.assert_array_equal(committed_keys(cache, layer), np.arange(40))


def test_a_failed_growth_leaves_the_cache_usable(monkeypatch: pytest.MonkeyPatch) -> None:
    cache = make_cache()
    fill(cache, 20)
    capacity = cache.capacity
    grown = KVCache._grown

    def values_out_of_memory(self: KVCache, name: str, capacity: int) -> np.ndarray:
        if name == "v":
            raise MemoryError
        return grown(self, name, capacity)

    with monkeypatch.context() as m:
        m.setattr(KVCache, "_grown", values_out_of_memory)
        with pytest.raises(MemoryError):
            cache.reserve(50)
    assert cache.k.shape == cache.v.shape and cache.capacity == capacity
    assert cache.length == 20
    fill(cache, 50, start=20)  # and it grows on the next pass
    np.testing.assert_array_equal(committed_keys(cache, 1), np.arange(70))
    np.testing.assert_array_equal(cache.v[:, :, : cache.length], -cache.k[:, :, : cache.length])
