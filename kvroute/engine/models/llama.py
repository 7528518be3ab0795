"""LLaMA-family forward pass in numpy (SmolLM2, TinyLlama, Llama 3.x): GGUF architecture ``llama``.

Weights are dequantised once to float32 and laid out for sgemm by `LlamaModel.prepare`, whose
named arrays the engine writes to the host's weights cache and every worker maps read-only
(`LlamaModel.from_arrays`):

- Q, K and V projections are fused into one ``(D, (H + 2 KV) * hd)`` matrix and gate/up into one
  ``(D, 2 F)`` matrix, stored (in, out) so activations multiply them without a transposed view
  (a transposed view costs ~2x at batch 8 on this CPU).
- The RMSNorm gains are folded into the matrix that follows each norm and the attention scale
  ``1/sqrt(hd)`` into Wq, so a layer does no extra elementwise passes for them.
- llama GGUFs store Q/K rows permuted so that RoPE rotates adjacent pairs (2i, 2i+1). We reorder
  every head's rows to put the even dims first and the odd dims second: RoPE then rotates the two
  halves (a cheap slice instead of a strided interleave). Attention only uses q.k, which is
  unchanged by applying the same permutation to both, and V is untouched.

A forward pass takes a ragged batch of segments (cache, new token ids): all rows share the
matmuls, attention runs per segment against that segment's own cache. Batched prefill, batched
decode and a mix of both are the same call. Each product goes through the model's `MatmulPlan`
(``self.mm``), which picks per row count how to multiply (see `matmul`): with few rows, as in
decode, that is usually the quantized kernels over the file's own Q4_1 / Q8_0 blocks, which
`prepare` stores next to the float32 arrays (transposed, permuted and fused like them, but with
no gain or scale folded in: `Linear` applies those outside the kernel).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import quant
from ..cache import KVCache
from ..errors import ModelLoadError
from ..gguf_file import GGUFFile
from ..matmul import Linear, MatmulPlan
from ..quant import QuantMatrix

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelArgs:
    """Hyperparameters read from GGUF metadata (``{arch}.*`` keys)."""

    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_ff: int
    vocab_size: int
    n_ctx_train: int
    rope_base: float = 10000.0
    rms_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @classmethod
    def from_gguf(cls, gguf: GGUFFile) -> ModelArgs:
        arch = gguf.architecture
        get = gguf.require
        n_heads = int(get(f"{arch}.attention.head_count"))
        vocab = gguf.meta.get(f"{arch}.vocab_size")
        if vocab is None:
            vocab = len(gguf.require("tokenizer.ggml.tokens"))
        args = cls(
            n_layers=int(get(f"{arch}.block_count")),
            d_model=int(get(f"{arch}.embedding_length")),
            n_heads=n_heads,
            n_kv_heads=int(gguf.meta.get(f"{arch}.attention.head_count_kv", n_heads)),
            d_ff=int(get(f"{arch}.feed_forward_length")),
            vocab_size=int(vocab),
            n_ctx_train=int(get(f"{arch}.context_length")),
            rope_base=float(gguf.meta.get(f"{arch}.rope.freq_base", 10000.0)),
            rms_eps=float(gguf.meta.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        )
        if args.n_heads % args.n_kv_heads or args.d_model % args.n_heads:
            raise ModelLoadError(
                f"{gguf.path}: inconsistent heads ({args.n_heads} heads, {args.n_kv_heads} KV "
                f"heads, d_model {args.d_model})"
            )
        return args


@dataclass
class LayerWeights:
    """One transformer block's matrices, laid out (in, out) with norms and scales folded in."""

    wqkv: Linear  # (D, (H + 2 KV) * hd)
    wo: Linear  # (H * hd, D)
    w_gate_up: Linear  # (D, 2 F)
    w_down: Linear  # (F, D)

    def linears(self) -> tuple[Linear, Linear, Linear, Linear]:
        return self.wqkv, self.wo, self.w_gate_up, self.w_down


def _pairs_to_halves(w: np.ndarray, n_heads: int, hd: int) -> np.ndarray:
    """Reorder each head's output rows from (0,1,2,3,...) to (0,2,4,...,1,3,5,...)."""
    out_dim, in_dim = w.shape
    w = w.reshape(n_heads, hd // 2, 2, in_dim)  # rows of one head as (pair, member)
    return w.transpose(0, 2, 1, 3).reshape(out_dim, in_dim)


Permutation = Callable[[np.ndarray], np.ndarray]  # of a matrix's output rows


def _blocks(
    gguf: GGUFFile, name: str, parts: Sequence[tuple[str, Permutation | None]]
) -> Iterator[tuple[str, np.ndarray]]:
    """The named arrays of the `QuantMatrix` fused from ``parts`` (tensor name, permutation of
    its output rows), laid out like the float32 matrix ``name``; nothing unless every part is
    of one block type the kernels read."""
    kinds: set[str] = set()
    rows: list[np.ndarray] = []
    for tensor, permute in parts:
        found = gguf.blocks(tensor)
        if found is None:
            return
        kinds.add(found[0])
        rows.append(permute(found[1]) if permute is not None else found[1])
    if len(kinds) != 1:
        return
    (kind,) = kinds
    yield from QuantMatrix.from_rows(kind, np.concatenate(rows)).arrays(name).items()


class LlamaModel:
    """The llama forward pass over float32 weights."""

    # Names what `prepare` writes; change it whenever the prepared arrays change, so that weights
    # caches written by older code are rebuilt rather than misread.
    LAYOUT = "llama-f32-halves-q-2"

    def __init__(
        self,
        args: ModelArgs,
        layers: list[LayerWeights],
        out_norm: np.ndarray,
        head: Linear,
        embed: np.ndarray | None = None,
    ) -> None:
        self.args = args
        self.layers = layers
        self.out_norm = out_norm  # (D,) gain of the final RMSNorm
        self.head = head  # (D, V) LM head, (in, out) for sgemm
        # (V, D) embeddings; None when tied to the head: rows are then gathered from head
        # columns, which saves a second 113 MB copy per worker for SmolLM2.
        self.embed = embed
        # How to multiply N rows by a weight matrix; the engine replaces this default with
        # one measured on the host (see `matmul`).
        self.mm = MatmulPlan()
        hd = args.head_dim
        self._inv_freq = args.rope_base ** (-np.arange(0, hd, 2, dtype=np.float64) / hd)

    @classmethod
    def from_gguf(cls, gguf: GGUFFile) -> LlamaModel:
        """Dequantise and lay out every tensor of a llama GGUF (in memory, nothing cached)."""
        return cls.from_arrays(gguf, dict(cls.prepare(gguf)))

    @classmethod
    def prepare(cls, gguf: GGUFFile) -> Iterator[tuple[str, np.ndarray]]:
        """Dequantise and lay out every tensor, one named array at a time (see `from_arrays`).

        A generator, so a weights cache can write each array before the next is made. Each
        matrix whose source tensors are all Q4_1 or all Q8_0 also gets its blocks (see
        `QuantMatrix.arrays`), and each layer its two norm gains.
        """
        a = ModelArgs.from_gguf(gguf)
        hd = a.head_dim
        scale = np.float32(1.0 / np.sqrt(hd))
        embed = gguf.tensor("token_embd.weight")
        if embed.shape != (a.vocab_size, a.d_model):
            raise ModelLoadError(
                f"{gguf.path}: token_embd.weight has shape {embed.shape}, "
                f"expected {(a.vocab_size, a.d_model)}"
            )

        def heads(n_heads: int) -> Permutation:
            return lambda rows: _pairs_to_halves(rows, n_heads, hd)

        for i in range(a.n_layers):
            p = f"blk.{i}."
            attn_norm = gguf.tensor(p + "attn_norm.weight")
            ffn_norm = gguf.tensor(p + "ffn_norm.weight")
            wq = heads(a.n_heads)(gguf.tensor(p + "attn_q.weight")) * scale
            wk = heads(a.n_kv_heads)(gguf.tensor(p + "attn_k.weight"))
            wv = gguf.tensor(p + "attn_v.weight")
            wqkv = np.concatenate([wq, wk, wv], axis=0).T * attn_norm[:, None]
            gate_up = (
                np.concatenate(
                    [gguf.tensor(p + "ffn_gate.weight"), gguf.tensor(p + "ffn_up.weight")], axis=0
                ).T
                * ffn_norm[:, None]
            )
            yield p + "wqkv", np.ascontiguousarray(wqkv, dtype=np.float32)
            yield p + "wo", np.ascontiguousarray(gguf.tensor(p + "attn_output.weight").T)
            yield p + "w_gate_up", np.ascontiguousarray(gate_up, dtype=np.float32)
            yield p + "w_down", np.ascontiguousarray(gguf.tensor(p + "ffn_down.weight").T)
            yield p + "attn_norm", attn_norm
            yield p + "ffn_norm", ffn_norm
            yield from _blocks(
                gguf,
                p + "wqkv",
                [
                    (p + "attn_q.weight", heads(a.n_heads)),
                    (p + "attn_k.weight", heads(a.n_kv_heads)),
                    (p + "attn_v.weight", None),
                ],
            )
            yield from _blocks(gguf, p + "wo", [(p + "attn_output.weight", None)])
            yield from _blocks(
                gguf, p + "w_gate_up", [(p + "ffn_gate.weight", None), (p + "ffn_up.weight", None)]
            )
            yield from _blocks(gguf, p + "w_down", [(p + "ffn_down.weight", None)])
        yield "out_norm", gguf.tensor("output_norm.weight")
        if gguf.has_tensor("output.weight"):
            yield "head", np.ascontiguousarray(gguf.tensor("output.weight").T)
            yield "embed", embed
            yield from _blocks(gguf, "head", [("output.weight", None)])
        else:
            yield "head", np.ascontiguousarray(embed.T)  # tied embeddings
            yield from _blocks(gguf, "head", [("token_embd.weight", None)])

    @classmethod
    def from_arrays(cls, gguf: GGUFFile, arrays: Mapping[str, np.ndarray]) -> LlamaModel:
        """Build the model on prepared arrays (from `prepare`, or mapped from a weights cache).

        Only ``gguf``'s metadata is read, so it may come from `GGUFFile.from_meta`. The blocks
        for the quantized kernels are used only where the kernels run (see `quant.available`).

        Raises
        ------
        ModelLoadError
            If an array is missing or its shape does not match the metadata.
        """
        a = ModelArgs.from_gguf(gguf)
        qkv = (a.n_heads + 2 * a.n_kv_heads) * a.head_dim
        shapes = {"out_norm": (a.d_model,), "head": (a.d_model, a.vocab_size)}
        for i in range(a.n_layers):
            p = f"blk.{i}."
            shapes |= {
                p + "wqkv": (a.d_model, qkv),
                p + "wo": (a.n_heads * a.head_dim, a.d_model),
                p + "w_gate_up": (a.d_model, 2 * a.d_ff),
                p + "w_down": (a.d_ff, a.d_model),
                p + "attn_norm": (a.d_model,),
                p + "ffn_norm": (a.d_model,),
            }
        if "embed" in arrays:
            shapes["embed"] = (a.vocab_size, a.d_model)
        for name, shape in shapes.items():
            got = arrays[name].shape if name in arrays else None
            if got != shape:
                raise ModelLoadError(f"prepared weights: {name} has shape {got}, expected {shape}")
        kernels = quant.available()

        def linear(name: str, **folds: Any) -> Linear:
            blocks = QuantMatrix.from_arrays(name, arrays)
            if blocks is not None and blocks.shape != arrays[name].shape:
                raise ModelLoadError(
                    f"prepared weights: blocks of {name} are {blocks.shape}, "
                    f"expected {arrays[name].shape}"
                )
            return Linear(arrays[name], blocks if kernels else None, **folds)

        scale = float(np.float32(1.0 / np.sqrt(a.head_dim)))
        layers = []
        for i in range(a.n_layers):
            p = f"blk.{i}."
            layers.append(
                LayerWeights(
                    linear(
                        p + "wqkv",
                        gain=arrays[p + "attn_norm"],
                        scale=scale,
                        scaled=a.n_heads * a.head_dim,
                    ),
                    linear(p + "wo"),
                    linear(p + "w_gate_up", gain=arrays[p + "ffn_norm"]),
                    linear(p + "w_down"),
                )
            )
        return cls(a, layers, arrays["out_norm"], linear("head"), arrays.get("embed"))

    def new_cache(self, max_len: int, dtype: str = "f32") -> KVCache:
        """An empty cache sized for this model, allowed to grow to ``max_len`` positions."""
        a = self.args
        return KVCache(a.n_layers, a.n_kv_heads, a.head_dim, max_len, dtype)

    def matrices(self) -> list[Linear]:
        """Every matrix a decode step multiplies by, in the order it does."""
        return [lin for lw in self.layers for lin in lw.linears()] + [self.head]

    @property
    def weight_bytes(self) -> int:
        """Bytes of float32 weights held (what one float32 decode step streams from memory)."""
        n = self.embed.nbytes if self.embed is not None else 0
        return n + sum(lin.w.nbytes for lin in self.matrices())

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
        x = self.embed[ids] if self.embed is not None else self.head.w[:, ids].T.copy()  # (N, D)
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

    @staticmethod
    def _attend(
        cache: KVCache, layer: int, q: np.ndarray, k: np.ndarray, v: np.ndarray, G: int
    ) -> np.ndarray:
        """Grouped-query causal attention of one segment's T queries over its cache."""
        T, H, hd = q.shape
        KV = H // G
        K, V = cache.update_and_fetch(layer, k.transpose(1, 0, 2), v.transpose(1, 0, 2))
        if K.dtype != np.float32:
            # numpy has no half-precision BLAS: a float16 cache is widened per layer here.
            K, V = K.astype(np.float32), V.astype(np.float32)
        L = K.shape[1]  # (KV, L, hd): past + the T new positions
        # (T, H, hd) -> (KV, G*T, hd): the G query heads of a group share one K/V head.
        qg = q.reshape(T, KV, G, hd).transpose(1, 2, 0, 3).reshape(KV, G * T, hd)
        scores = qg @ K.transpose(0, 2, 1)  # (KV, G*T, L); 1/sqrt(hd) is folded into Wq
        if T > 1:
            # Query t sits at position L - T + t and may see keys 0..L - T + t.
            mask = np.arange(L)[None, :] > (np.arange(T) + (L - T))[:, None]  # (T, L)
            scores = scores.reshape(KV, G, T, L)
            scores[:, :, mask] = -np.inf
            scores = scores.reshape(KV, G * T, L)
        scores -= scores.max(axis=-1, keepdims=True)
        np.exp(scores, out=scores)
        scores /= scores.sum(axis=-1, keepdims=True)
        out: np.ndarray = scores @ V  # (KV, G*T, hd)
        return out.reshape(KV, G, T, hd).transpose(2, 0, 1, 3).reshape(T, H * hd)
