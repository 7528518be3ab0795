"""LLaMA-family forward pass in numpy (SmolLM2, TinyLlama, Llama 3.x): GGUF architecture ``llama``.

The weights are laid out by `llama_weights` (fused, permuted, folded; float32 and/or the file's
own Q4_1 / Q8_0 blocks), written once per host to the weights cache and mapped read-only by
every worker.

A forward pass takes a ragged batch of segments (cache, new token ids): all rows share the
matmuls, attention runs per segment against that segment's own cache. Batched prefill, batched
decode and a mix of both are the same call. Each product goes through the model's `MatmulPlan`
(``self.mm``), which picks per row count how to multiply (see `matmul`): BLAS on float32, or the
quantized kernels on the blocks (see `quant`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from types import ModuleType

import numpy as np

from ..cache import KVCache
from ..gguf_file import GGUFFile
from ..matmul import Linear, MatmulPlan
from . import llama_weights
from .llama_weights import LayerWeights, ModelArgs

logger = logging.getLogger(__name__)


class LlamaModel:
    """The llama forward pass (weights in `llama_weights`' layout)."""

    # Names what `prepare` writes (see `llama_weights.LAYOUT`).
    LAYOUT = llama_weights.LAYOUT

    def __init__(
        self,
        args: ModelArgs,
        layers: list[LayerWeights],
        out_norm: np.ndarray,
        head: Linear,
        embed: np.ndarray | None = None,
        kernels: str | None = None,
    ) -> None:
        self.args = args
        self.kernels = kernels  # the quantized kernels its blocks are for (see `quant.mode`)
        # The attention kernel, where the kernels run (numba is imported only then): looked up
        # once here, not in every layer of every step.
        self._attention: ModuleType | None = None
        if kernels is not None:
            from ..kernels import attention

            self._attention = attention
        self.layers = layers
        self.out_norm = out_norm  # (D,) gain of the final RMSNorm
        self.head = head  # (D, V) LM head, (in, out)
        # (V, D) embeddings; None when tied to the head: rows are then gathered from head
        # columns, which saves a second copy of the largest matrix for SmolLM2.
        self.embed = embed
        # How to multiply N rows by a weight matrix; the engine replaces this default with
        # one measured on the host (see `matmul`).
        self.mm = MatmulPlan()
        hd = args.head_dim
        self._inv_freq = args.rope_base ** (-np.arange(0, hd, 2, dtype=np.float64) / hd)

    @classmethod
    def from_gguf(cls, gguf: GGUFFile, mode: str | None) -> LlamaModel:
        """Lay out every tensor of a llama GGUF in memory (nothing cached), in the form the
        kernels ``mode`` use (see `quant.mode`)."""
        arrays = dict(cls.prepare(gguf, llama_weights.form_for(mode)))
        return cls.from_arrays(gguf, arrays, mode)

    @staticmethod
    def prepare(gguf: GGUFFile, form: str) -> Iterator[tuple[str, np.ndarray]]:
        """The named arrays of ``form``, one at a time (see `llama_weights.prepare`)."""
        return llama_weights.prepare(gguf, form)

    @classmethod
    def from_arrays(
        cls, gguf: GGUFFile, arrays: Mapping[str, np.ndarray], mode: str | None
    ) -> LlamaModel:
        """The model on prepared arrays, from `prepare` or mapped from a weights cache, for the
        kernels ``mode`` (see `llama_weights.build`; ModelLoadError if they do not fit)."""
        p = llama_weights.build(gguf, arrays, mode)
        return cls(p.args, p.layers, p.out_norm, p.head, p.embed, mode)

    @property
    def reads_half_kv(self) -> bool:
        """Whether attention reads a float16 cache as stored (else numpy widens it per step)."""
        return self._attention is not None and self._attention.head_dim_fits(self.args.head_dim)

    def new_cache(self, max_len: int, dtype: str = "f32") -> KVCache:
        """An empty cache sized for this model, allowed to grow to ``max_len`` positions."""
        a = self.args
        return KVCache(a.n_layers, a.n_kv_heads, a.head_dim, max_len, dtype)

    def matrices(self) -> list[Linear]:
        """Every matrix a decode step multiplies by, in the order it does."""
        return [lin for lw in self.layers for lin in lw.linears()] + [self.head]

    @property
    def weight_bytes(self) -> int:
        """Bytes of the weight matrices held, in every form (mapped, so shared by workers)."""
        n = self.embed.nbytes if self.embed is not None else 0
        for lin in self.matrices():
            n += (lin.w.nbytes if lin.w is not None else 0) + (lin.q.nbytes if lin.q else 0)
        return n

    def _rms(self, x: np.ndarray) -> np.ndarray:
        # Gain already folded into the next matmul; only the normalisation is left.
        ms = np.einsum("nd,nd->n", x, x) / x.shape[1]
        y: np.ndarray = x * (1.0 / np.sqrt(ms + self.args.rms_eps)).astype(np.float32)[:, None]
        return y

    def _rope(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ang = positions[:, None].astype(np.float64) * self._inv_freq[None, :]  # (N, hd/2)
        return np.cos(ang).astype(np.float32)[:, None, :], np.sin(ang).astype(np.float32)[
            :, None, :
        ]

    @staticmethod
    def _rotate(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
        # x: (N, heads, hd) with each head's dims ordered (even..., odd...): rotate the halves.
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
        return np.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)

    def forward(
        self,
        segments: Sequence[tuple[KVCache, Sequence[int]]],
        all_logits: bool = False,
    ) -> list[np.ndarray]:
        """Run new tokens of several sequences through the model in one pass.

        Parameters
        ----------
        segments:
            ``(cache, token_ids)`` pairs; each segment's tokens follow its cache's committed
            positions. Caches must be distinct objects.
        all_logits:
            Return logits for every new position, not just the last of each segment.

        Returns
        -------
        list of np.ndarray
            Per segment, logits ``(V,)`` for its last position, or ``(T, V)`` if ``all_logits``.
            Every cache has advanced by its segment's length.
        """
        a = self.args
        hd, H, KV = a.head_dim, a.n_heads, a.n_kv_heads
        G = H // KV
        lens = [len(ids) for _, ids in segments]
        assert all(n > 0 for n in lens), "empty segment"
        ids = np.concatenate([np.asarray(t, dtype=np.int64) for _, t in segments])
        positions = np.concatenate(
            [np.arange(c.length, c.length + n) for (c, _), n in zip(segments, lens, strict=True)]
        )
        bounds = np.concatenate([[0], np.cumsum(lens)])
        for cache, _ in segments:
            cache.reserve(len(_))
        cos, sin = self._rope(positions)
        x = self.embed[ids] if self.embed is not None else self.head.columns(ids)  # (N, D)
        mm = self.mm
        for li, lw in enumerate(self.layers):
            qkv = mm(self._rms(x), lw.wqkv)  # (N, (H + 2KV) hd)
            q = self._rotate(qkv[:, : H * hd].reshape(-1, H, hd), cos, sin)  # (N, H, hd)
            k = self._rotate(qkv[:, H * hd : (H + KV) * hd].reshape(-1, KV, hd), cos, sin)
            v = qkv[:, (H + KV) * hd :].reshape(-1, KV, hd)
            attn = np.empty((x.shape[0], H * hd), dtype=np.float32)
            for si, (cache, _) in enumerate(segments):
                s, e = bounds[si], bounds[si + 1]
                attn[s:e] = self._attend(cache, li, q[s:e], k[s:e], v[s:e], G)
            x = x + mm(attn, lw.wo)
            gu = mm(self._rms(x), lw.w_gate_up)  # (N, 2F)
            g, u = gu[:, : a.d_ff], gu[:, a.d_ff :]
            x = x + mm((g / (1.0 + np.exp(-g))) * u, lw.w_down)  # SwiGLU
        for (cache, _), n in zip(segments, lens, strict=True):
            cache.advance(n)
        if all_logits:
            logits = mm(self._rms(x) * self.out_norm, self.head)  # (N, V)
            return [logits[bounds[i] : bounds[i + 1]] for i in range(len(segments))]
        # The head is 49152 x 576: apply it to the last row of each segment only.
        last = mm(self._rms(x[bounds[1:] - 1]) * self.out_norm, self.head)  # (B, V)
        return list(last)

    def _attend(
        self, cache: KVCache, layer: int, q: np.ndarray, k: np.ndarray, v: np.ndarray, G: int
    ) -> np.ndarray:
        """Grouped-query causal attention of one segment's T queries over its cache."""
        T, H, hd = q.shape
        KV = H // G
        K, V = cache.update_and_fetch(layer, k.transpose(1, 0, 2), v.transpose(1, 0, 2))
        # (T, H, hd) -> (KV, G*T, hd): the G query heads of a group share one K/V head.
        qg = q.reshape(T, KV, G, hd).transpose(1, 2, 0, 3).reshape(KV, G * T, hd)
        kernel = self._attention
        if kernel is not None and kernel.supports(K) and kernel.MAX_T.get(K.dtype, 0) >= T:
            # Reads a float16 cache as stored, where numpy would widen it first.
            out: np.ndarray = kernel.attend(qg, K, V, T)
        else:
            out = self._attend_numpy(qg, K, V, T)
        return out.reshape(KV, G, T, hd).transpose(2, 0, 1, 3).reshape(T, H * hd)

    @staticmethod
    def _attend_numpy(qg: np.ndarray, K: np.ndarray, V: np.ndarray, T: int) -> np.ndarray:
        """`_attend` with BLAS: queries (KV, G*T, hd), the cache's K, V (KV, L, hd)."""
        KV, GT, _ = qg.shape
        if K.dtype != np.float32:
            # numpy has no half-precision BLAS: a float16 cache is widened per layer here.
            K, V = K.astype(np.float32), V.astype(np.float32)
        L = K.shape[1]  # past + the T new positions
        scores = qg @ K.transpose(0, 2, 1)  # (KV, G*T, L); 1/sqrt(hd) is folded into Wq
        if T > 1:
            # Query t sits at position L - T + t and may see keys 0..L - T + t.
            mask = np.arange(L)[None, :] > (np.arange(T) + (L - T))[:, None]  # (T, L)
            scores = scores.reshape(KV, GT // T, T, L)
            scores[:, :, mask] = -np.inf
            scores = scores.reshape(KV, GT, L)
        scores -= scores.max(axis=-1, keepdims=True)
        np.exp(scores, out=scores)
        scores /= scores.sum(axis=-1, keepdims=True)
        out: np.ndarray = scores @ V  # (KV, G*T, hd)
        return out
