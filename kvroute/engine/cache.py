"""Per-sequence KV cache that grows geometrically and can be trimmed.

One object holds every layer of one sequence, so a session owns exactly one cache and its
length is one number. Nothing is preallocated to the context size: the first allocation is what
the first forward pass needs (at least ``MIN_GROW`` positions), and each later growth adds half
the current capacity (at least ``MIN_GROW``), so a sequence of n positions is copied O(n) times
in all and never holds more than about 1.5x what it uses. An idle 20-token session costs 20
positions.

``growth_limit`` lets the caller cap growth at what a sequence can still reach (a turn knows its
prompt length and ``max_tokens``), so a turn that reserves its worst case in a memory budget
never allocates more than it reserved. A chat session capped that way grows at the start of
almost every turn, so growth extends the arrays in place where it can (``realloc``, then each
layer's and head's positions move up within the memory already touched): a fresh allocation
would pay the first touch of every page again, which costs far more than the copy and varies
with the host's memory state.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .kv_codec import Packed, RestDtype, decode, encode

MIN_GROW = 16  # fewest positions one growth adds: decode one token at a time without a copy each
GROWTH = 0.5  # growth adds this fraction of the capacity: geometric, so copies amortise to O(n)


@dataclass(frozen=True)
class RestKV:
    """A parked cache's keys and values in a rest form, ``(n_layers, n_kv_heads, L, head_dim)``."""

    k: Packed
    v: Packed

    @property
    def nbytes(self) -> int:
        """Bytes held."""
        return self.k.nbytes + self.v.nbytes

    @property
    def length(self) -> int:
        """Positions held."""
        return self.k.shape[2]


LIVE_DTYPES = {"f32": np.float32, "f16": np.float16}
# What a worker may be asked for: a dtype, or "auto" (see `Engine.live_kv_dtype`).
KV_DTYPE_ASKS = ("auto", *LIVE_DTYPES)
"""How a live cache holds keys and values (``--kv-dtype``): the attention reads them as float32."""


class KVCache:
    """Keys and values of one sequence, all layers, float32 (or float16, ``dtype="f16"``).

    Layout is ``(n_layers, n_kv_heads, capacity, head_dim)`` so that one layer's keys for one
    head are a contiguous ``(L, head_dim)`` block, which BLAS reads without a copy.

    The verbs mirror mlx-lm's caches: ``update_and_fetch`` during a forward pass, ``advance`` once
    the pass is complete, ``trim`` to drop a suffix, ``nbytes`` for budgets.

    An idle cache may be *parked*: its positions compressed (`park`, see ``kv_codec``) and its
    float32 arrays released. ``length`` and `trim` work as before; `unpark` decodes the kept
    positions back before the next forward pass (which asserts it is not parked).
    """

    def __init__(
        self,
        n_layers: int,
        n_kv_heads: int,
        head_dim: int,
        max_len: int,
        dtype: str = "f32",
    ) -> None:
        self.dtype = np.dtype(LIVE_DTYPES[dtype])
        self.n_layers = n_layers
        self.n_kv_heads = n_kv_heads
        self.head_dim = head_dim
        self.max_len = max_len
        self.growth_limit = max_len  # growth allocates no more positions than this (see reserve)
        self.length = 0  # positions holding committed keys/values
        shape = (n_layers, n_kv_heads, 0, head_dim)
        self.k = np.zeros(shape, dtype=self.dtype)
        self.v = np.zeros(shape, dtype=self.dtype)
        self.rest: RestKV | None = None  # the positions, compressed, while parked

    @property
    def capacity(self) -> int:
        """Positions allocated (>= length)."""
        return int(self.k.shape[2])

    @property
    def nbytes(self) -> int:
        """Bytes held for keys and values (allocated arrays, or the codes while parked)."""
        return self.k.nbytes + self.v.nbytes + (self.rest.nbytes if self.rest else 0)

    @property
    def parked(self) -> bool:
        """Whether the positions are held compressed (`unpark` before a forward pass)."""
        return self.rest is not None

    def park(self, dtype: RestDtype) -> None:
        """Compress the committed positions into ``dtype`` and release the arrays (idempotent)."""
        if self.rest is not None:
            return
        n = self.length
        self.rest = RestKV(encode(self.k[:, :, :n], dtype), encode(self.v[:, :, :n], dtype))
        empty = (self.n_layers, self.n_kv_heads, 0, self.head_dim)
        self.k = np.zeros(empty, dtype=self.dtype)
        self.v = np.zeros(empty, dtype=self.dtype)

    def load(self, rest: RestKV) -> None:
        """Hold ``rest`` as this (empty) cache's positions, parked (a restore from disk)."""
        assert self.length == 0 and self.rest is None, "load into an empty cache"
        shape = (self.n_layers, self.n_kv_heads, rest.length, self.head_dim)
        assert rest.k.shape == shape and rest.v.shape == shape, f"{rest.k.shape} != {shape}"
        assert rest.length <= self.max_len
        self.rest, self.length = rest, rest.length

    def unpark(self, n_new: int = 0) -> None:
        """Decode the kept positions back to float32, with room for ``n_new`` more (idempotent).

        Only the first ``length`` positions come back (a parked cache may have been trimmed).
        """
        rest = self.rest
        if rest is None:
            return
        self.rest = None
        n = self.length
        cap = min(self.max_len, max(n + n_new, min(self.growth_limit, n + max(n_new, MIN_GROW))))
        shape = (self.n_layers, self.n_kv_heads, cap, self.head_dim)
        self.k = np.empty(shape, dtype=self.dtype)
        self.v = np.empty(shape, dtype=self.dtype)
        for packed, dst in ((rest.k, self.k), (rest.v, self.v)):
            if rest.length == n:
                decode(packed, dst[:, :, :n])
            else:
                dst[:, :, :n] = decode(packed)[:, :, :n]

    @property
    def bytes_per_token(self) -> int:
        """Bytes one position costs (keys + values, all layers)."""
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * self.dtype.itemsize

    def grown_capacity(self, need: int) -> int:
        """The capacity `reserve` allocates when ``need`` positions do not fit.

        Geometric: the current capacity plus half of it (at least ``MIN_GROW``), but never less
        than ``need``, and never more than ``growth_limit`` (unless ``need`` is more) or
        ``max_len``.
        """
        step = max(MIN_GROW, int(self.capacity * GROWTH))
        target = min(self.capacity + step, max(self.growth_limit, need))
        return min(self.max_len, max(need, target))

    def reserve(self, n_new: int) -> None:
        """Make room for ``n_new`` more positions (see `grown_capacity`)."""
        assert self.rest is None, "unpark() before a forward pass"
        need = self.length + n_new
        assert need <= self.max_len, f"cache overflow: {need} > {self.max_len}"
        if need <= self.capacity:
            return
        capacity = self.grown_capacity(need)
        k = self._grown("k", capacity)
        try:
            v = self._grown("v", capacity)
        except BaseException:
            # v is as it was: cut k back to its capacity (the positions are the same).
            self.k = k[:, :, : self.v.shape[2]]
            raise
        self.k, self.v = k, v

    def _grown(self, name: str, capacity: int) -> np.ndarray:
        """Array ``name`` (``k`` or ``v``) with room for ``capacity`` positions, its committed
        ones kept; grown in place when numpy can resize it, else copied.

        The attribute is taken off the cache meanwhile (the caller sets it again), so that the
        array's only reference is ours: numpy resizes an array only when nothing else refers to
        it. On an error the attribute is put back, unchanged.
        """
        a: np.ndarray = vars(self).pop(name)
        n = self.length
        shape = (self.n_layers, self.n_kv_heads, capacity, self.head_dim)
        old = a.shape[2]
        try:
            a.resize(shape, refcheck=True)  # realloc: the touched pages stay, the tail is zeroed
        except (ValueError, MemoryError):
            # A view of it is alive (or it is a view itself), or realloc failed; it is unchanged.
            try:
                out = np.empty(shape, dtype=self.dtype)
                out[:, :, :n] = a[:, :, :n]
            except BaseException:
                setattr(self, name, a)
                raise
            return out
        # The old layout's blocks (one per layer and head, `old` positions apart) now lie at the
        # start of the flat buffer: move each to its place, `capacity` apart, the last one first
        # so that no block is overwritten before it moves (numpy copies overlapping slices safely).
        flat = a.reshape(-1)
        hd = self.head_dim
        for i in range(self.n_layers * self.n_kv_heads - 1, 0, -1):
            src, dst = i * old * hd, i * capacity * hd
            flat[dst : dst + n * hd] = flat[src : src + n * hd]
        return a

    def update_and_fetch(
        self, layer: int, k: np.ndarray, v: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Write ``k, v`` (n_kv, T, hd) after the committed positions; return all keys/values.

        The returned views cover ``length + T`` positions. ``length`` itself only moves in
        `advance`, so every layer of one forward pass writes at the same offset.
        """
        t = k.shape[1]
        end = self.length + t
        assert end <= self.capacity, "reserve() before update_and_fetch()"
        self.k[layer, :, self.length : end] = k
        self.v[layer, :, self.length : end] = v
        return self.k[layer, :, :end], self.v[layer, :, :end]

    def advance(self, n: int) -> None:
        """Commit ``n`` positions written by the last forward pass."""
        assert self.length + n <= self.capacity
        self.length += n

    def trim(self, n: int) -> int:
        """Drop the last ``n`` positions (clamped to the length); return how many were dropped."""
        n = max(0, min(n, self.length))
        self.length -= n
        return n

    def truncate(self, length: int) -> None:
        """Keep only the first ``length`` positions."""
        self.trim(self.length - length)

    def copy(self) -> KVCache:
        """A new cache with this one's committed positions, sized to them (not parked)."""
        assert self.rest is None, "unpark() before copy()"
        name = next(n for n, t in LIVE_DTYPES.items() if np.dtype(t) == self.dtype)
        out = KVCache(self.n_layers, self.n_kv_heads, self.head_dim, self.max_len, name)
        out.reserve(self.length)
        out.k[:, :, : self.length] = self.k[:, :, : self.length]
        out.v[:, :, : self.length] = self.v[:, :, : self.length]
        out.advance(self.length)
        return out

    def compact(self) -> None:
        """Release all capacity beyond the length (after a large trim, or to park a sequence)."""
        if self.rest is None and self.length < self.capacity:
            self.k = self.k[:, :, : self.length].copy()
            self.v = self.v[:, :, : self.length].copy()
