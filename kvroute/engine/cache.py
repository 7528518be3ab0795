"""Per-sequence KV cache that grows in chunks and can be trimmed.

One object holds every layer of one sequence, so a session owns exactly one cache and its
length is one number. Memory grows with the sequence (``GROW_CHUNK`` positions at a time); nothing
is preallocated to the context size, so an idle 40-token session costs 40 positions, not n_ctx.
"""

from __future__ import annotations

import numpy as np

GROW_CHUNK = 256  # positions added per growth step; amortises the copy on growth


class KVCache:
    """Keys and values of one sequence, all layers, float32.

    Layout is ``(n_layers, n_kv_heads, capacity, head_dim)`` so that one layer's keys for one
    head are a contiguous ``(L, head_dim)`` block, which BLAS reads without a copy.

    The verbs mirror mlx-lm's caches: ``update_and_fetch`` during a forward pass, ``advance`` once
    the pass is complete, ``trim`` to drop a suffix, ``nbytes`` for budgets.
    """

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, max_len: int) -> None:
        self.n_layers = n_layers
        self.n_kv_heads = n_kv_heads
        self.head_dim = head_dim
        self.max_len = max_len
        self.length = 0  # positions holding committed keys/values
        shape = (n_layers, n_kv_heads, 0, head_dim)
        self.k = np.zeros(shape, dtype=np.float32)
        self.v = np.zeros(shape, dtype=np.float32)

    @property
    def capacity(self) -> int:
        """Positions allocated (>= length)."""
        return self.k.shape[2]

    @property
    def nbytes(self) -> int:
        """Bytes allocated for keys and values."""
        return self.k.nbytes + self.v.nbytes

    @property
    def bytes_per_token(self) -> int:
        """Bytes one position costs (keys + values, all layers)."""
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * 4

    def reserve(self, n_new: int) -> None:
        """Make room for ``n_new`` more positions, growing in ``GROW_CHUNK`` steps."""
        need = self.length + n_new
        assert need <= self.max_len, f"cache overflow: {need} > {self.max_len}"
        if need <= self.capacity:
            return
        cap = min(self.max_len, -(-need // GROW_CHUNK) * GROW_CHUNK)
        shape = (self.n_layers, self.n_kv_heads, cap, self.head_dim)
        k = np.empty(shape, dtype=np.float32)
        v = np.empty(shape, dtype=np.float32)
        k[:, :, : self.length] = self.k[:, :, : self.length]
        v[:, :, : self.length] = self.v[:, :, : self.length]
        self.k, self.v = k, v

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

    def compact(self) -> None:
        """Release capacity beyond the next chunk boundary (after a large trim)."""
        cap = min(self.max_len, -(-self.length // GROW_CHUNK) * GROW_CHUNK)
        if cap < self.capacity:
            self.k = self.k[:, :, :cap].copy()
            self.v = self.v[:, :, :cap].copy()
