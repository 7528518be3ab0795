"""How a llama GGUF's weights are laid out for the engine (`llama.LlamaModel` computes with them).

`prepare` turns the file's tensors into named arrays, which the engine writes to the host's
weights cache and every worker maps read-only (`build` makes the model's parts from them):

- Q, K and V projections are fused into one ``(D, (H + 2 KV) * hd)`` matrix and gate/up into one
  ``(D, 2 F)`` matrix, stored (in, out) so activations multiply them without a transposed view
  (a transposed view costs ~2x at batch 8 on this CPU).
- In the float32 copy the RMSNorm gains are folded into the matrix that follows each norm and
  the attention scale ``1/sqrt(hd)`` into Wq, so a layer does no extra elementwise passes for
  them. The blocks (`quant.QuantMatrix`) cannot take them (a gain folded into 4-bit values would
  not survive), so `Linear` applies them outside the kernel: the gain to the activation, the
  scale to the result.
- llama GGUFs store Q/K rows permuted so that RoPE rotates adjacent pairs (2i, 2i+1). We reorder
  every head's rows to put the even dims first and the odd dims second: RoPE then rotates the two
  halves (a cheap slice instead of a strided interleave). Attention only uses q.k, which is
  unchanged by applying the same permutation to both, and V is untouched. The blocks' output
  rows are permuted the same way.

Two forms (`FORMS`), one cache file each. ``tiles``, where the quantized kernels run (see
`quant.mode`): the blocks of every matrix whose tensors are all Q4_1 or all Q8_0, and float32
only for a matrix that has none; the kernels then do every product of a matrix with blocks, at
any row count. For the default model that is a sixth of the float32 bytes, and it is built
without dequantising anything. ``float32``, where no kernel runs: the float32 copy of every
matrix, for BLAS.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ModelLoadError
from ..gguf_file import GGUFFile
from ..matmul import Linear
from ..quant import QuantMatrix

FORMS = ("tiles", "float32")
LAYOUT = "llama-halves-3"  # change whenever `prepare`'s arrays change: older caches are rebuilt


def form_for(mode: str | None) -> str:
    """The form a model computes with under the kernels ``mode`` (see `quant.mode`)."""
    return "float32" if mode is None else "tiles"


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
) -> list[tuple[str, np.ndarray]]:
    """The named arrays of the `QuantMatrix` fused from ``parts`` (tensor name, permutation of
    its output rows), laid out like the float32 matrix ``name``; none unless every part is of
    one block type the kernels read."""
    kinds: set[str] = set()
    rows: list[np.ndarray] = []
    for tensor, permute in parts:
        found = gguf.blocks(tensor)
        if found is None:
            return []
        kinds.add(found[0])
        rows.append(permute(found[1]) if permute is not None else found[1])
    if len(kinds) != 1:
        return []
    (kind,) = kinds
    return list(QuantMatrix.from_rows(kind, np.concatenate(rows)).arrays(name).items())


def prepare(gguf: GGUFFile, form: str) -> Iterator[tuple[str, np.ndarray]]:
    """Lay out every tensor in ``form`` (see the module docstring), one named array at a time.

    A generator, so a weights cache can write each array before the next is made; a float32
    matrix is dequantised only when the form keeps it.
    """
    assert form in FORMS, form
    a = ModelArgs.from_gguf(gguf)
    hd = a.head_dim
    scale = np.float32(1.0 / np.sqrt(hd))
    embd = gguf.shape("token_embd.weight")
    if embd != (a.vocab_size, a.d_model):
        raise ModelLoadError(
            f"{gguf.path}: token_embd.weight has shape {embd}, expected {(a.vocab_size, a.d_model)}"
        )

    def heads(n_heads: int) -> Permutation:
        return lambda rows: _pairs_to_halves(rows, n_heads, hd)

    def matrix(
        name: str, parts: Sequence[tuple[str, Permutation | None]], f32: Callable[[], np.ndarray]
    ) -> Iterator[tuple[str, np.ndarray]]:
        blocks = _blocks(gguf, name, parts) if form == "tiles" else []
        yield from blocks
        if not blocks:
            yield name, np.ascontiguousarray(f32(), dtype=np.float32)

    def t(name: str) -> np.ndarray:
        return gguf.tensor(name)

    def layer(p: str) -> Iterator[tuple[str, np.ndarray]]:
        attn_norm, ffn_norm = t(p + "attn_norm.weight"), t(p + "ffn_norm.weight")
        yield p + "attn_norm", attn_norm
        yield p + "ffn_norm", ffn_norm
        q, k, v = p + "attn_q.weight", p + "attn_k.weight", p + "attn_v.weight"
        yield from matrix(
            p + "wqkv",
            [(q, heads(a.n_heads)), (k, heads(a.n_kv_heads)), (v, None)],
            lambda: (
                np.concatenate([heads(a.n_heads)(t(q)) * scale, heads(a.n_kv_heads)(t(k)), t(v)]).T
                * attn_norm[:, None]
            ),
        )
        o = p + "attn_output.weight"
        yield from matrix(p + "wo", [(o, None)], lambda: t(o).T)
        gate, up = p + "ffn_gate.weight", p + "ffn_up.weight"
        yield from matrix(
            p + "w_gate_up",
            [(gate, None), (up, None)],
            lambda: np.concatenate([t(gate), t(up)]).T * ffn_norm[:, None],
        )
        down = p + "ffn_down.weight"
        yield from matrix(p + "w_down", [(down, None)], lambda: t(down).T)

    for i in range(a.n_layers):
        yield from layer(f"blk.{i}.")
    yield "out_norm", t("output_norm.weight")
    if gguf.has_tensor("output.weight"):
        yield from matrix("head", [("output.weight", None)], lambda: t("output.weight").T)
        yield "embed", t("token_embd.weight")
    else:  # tied: the head is the embedding, whose rows the forward pass gathers from it
        yield from matrix("head", [("token_embd.weight", None)], lambda: t("token_embd.weight").T)


@dataclass
class Parts:
    """What `build` makes of the prepared arrays."""

    args: ModelArgs
    layers: list[LayerWeights]
    out_norm: np.ndarray
    head: Linear
    embed: np.ndarray | None


def build(gguf: GGUFFile, arrays: Mapping[str, np.ndarray], mode: str | None) -> Parts:
    """The model's parts on prepared arrays (from `prepare`, or mapped from a weights cache),
    for the kernels ``mode`` (see `quant.mode`).

    Only ``gguf``'s metadata is read, so it may come from `GGUFFile.from_meta`. A matrix held
    only as blocks needs a kernel (``mode`` not None).

    Raises
    ------
    ModelLoadError
        If an array is missing or its shape does not match the metadata.
    """
    a = ModelArgs.from_gguf(gguf)
    d, hd = a.d_model, a.head_dim
    vectors: dict[str, tuple[int, ...]] = {"out_norm": (d,)}
    if "embed" in arrays:
        vectors["embed"] = (a.vocab_size, d)
    for i in range(a.n_layers):
        vectors |= {f"blk.{i}.attn_norm": (d,), f"blk.{i}.ffn_norm": (d,)}
    for name, shape in vectors.items():
        got = arrays[name].shape if name in arrays else None
        if got != shape:
            raise ModelLoadError(f"prepared weights: {name} has shape {got}, expected {shape}")

    def linear(name: str, shape: tuple[int, int], **folds: Any) -> Linear:
        w = arrays.get(name)
        if w is not None and w.shape != shape:
            raise ModelLoadError(f"prepared weights: {name} has shape {w.shape}, expected {shape}")
        try:
            blocks = QuantMatrix.from_arrays(name, arrays, shape[1], exact=mode != "int8")
        except ValueError as exc:
            raise ModelLoadError(f"prepared weights: {exc}") from exc
        if blocks is not None and blocks.shape != shape:
            raise ModelLoadError(
                f"prepared weights: blocks of {name} are {blocks.shape}, expected {shape}"
            )
        if w is None and (blocks is None or mode is None):
            raise ModelLoadError(f"prepared weights: no float32 {name}, and no kernel for blocks")
        return Linear(w, blocks, **folds)

    qkv = (a.n_heads + 2 * a.n_kv_heads) * hd
    scale = float(np.float32(1.0 / np.sqrt(hd)))
    layers = []
    for i in range(a.n_layers):
        p = f"blk.{i}."
        layers.append(
            LayerWeights(
                linear(
                    p + "wqkv",
                    (d, qkv),
                    gain=arrays[p + "attn_norm"],
                    scale=scale,
                    scaled=a.n_heads * hd,
                ),
                linear(p + "wo", (a.n_heads * hd, d)),
                linear(p + "w_gate_up", (d, 2 * a.d_ff), gain=arrays[p + "ffn_norm"]),
                linear(p + "w_down", (a.d_ff, d)),
            )
        )
    head = linear("head", (d, a.vocab_size))
    return Parts(a, layers, arrays["out_norm"], head, arrays.get("embed"))
