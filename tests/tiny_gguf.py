"""Write a tiny synthetic llama GGUF with `gguf.GGUFWriter`, for fast unit tests.

The model is random (2 layers, d_model 64, 4 heads / 2 KV heads) but complete: byte-level BPE
vocabulary (ChatML control tokens, the 256 GPT-2 byte symbols and a few merges), the SmolLM2 chat
template, and tensors in F32, F16 and Q8_0 so the dequantising path is exercised.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "Ġ a", "i n", "h e", "r e", "o n", "e r", "Ġt he", "a t", "Ġ s", "o u", "e n"]


def gpt2_byte_symbols() -> list[str]:
    """The 256 printable stand-ins GPT-2's byte-level BPE uses for raw bytes, in byte order."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table: dict[int, str] = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


@dataclass
class TinySpec:
    """Hyperparameters of the synthetic model (defaults keep a forward pass well under 1 ms)."""

    n_layers: int = 2
    d_model: int = 64
    n_heads: int = 4
    n_kv_heads: int = 2
    d_ff: int = 128
    n_ctx: int = 256
    rope_base: float = 10000.0
    tied: bool = True  # no output.weight, like SmolLM2
    seed: int = 0
    architecture: str = "llama"
    with_tokenizer: bool = True
    # "mixed": F32, F16 and Q8_0 matrices; "Q4_1" or "Q8_0": every layer matrix of that type.
    matrix_type: str = "mixed"


def tiny_vocab() -> tuple[list[str], list[int], list[str]]:
    """Tokens, token types (3 = control) and merges of the tiny vocabulary."""
    tokens = list(SPECIAL_TOKENS) + gpt2_byte_symbols()
    for merge in MERGES:
        tokens.append(merge.replace(" ", ""))
    types = [3] * len(SPECIAL_TOKENS) + [1] * (len(tokens) - len(SPECIAL_TOKENS))
    return tokens, types, list(MERGES)


def write_tiny_gguf(path: str | Path, spec: TinySpec | None = None) -> Path:
    """Write the synthetic model to ``path`` and return it."""
    spec = spec or TinySpec()
    path = Path(path)
    rng = np.random.default_rng(spec.seed)
    tokens, types, merges = tiny_vocab()
    vocab = len(tokens)
    hd = spec.d_model // spec.n_heads

    w = gguf.GGUFWriter(str(path), spec.architecture)
    arch = spec.architecture
    w.add_block_count(spec.n_layers)
    w.add_context_length(spec.n_ctx)
    w.add_embedding_length(spec.d_model)
    w.add_feed_forward_length(spec.d_ff)
    w.add_head_count(spec.n_heads)
    w.add_head_count_kv(spec.n_kv_heads)
    w.add_rope_freq_base(spec.rope_base)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(hd)
    w.add_uint32(f"{arch}.vocab_size", vocab)
    if spec.with_tokenizer:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("smollm")
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_add_bos_token(False)
        w.add_chat_template(CHATML_TEMPLATE)

    def rand(*shape: int, scale: float = 0.2) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    def add_q8(name: str, arr: np.ndarray) -> None:
        add_as(name, arr, "Q8_0")

    def add_as(name: str, arr: np.ndarray, kind: str) -> None:
        if kind == "F16":
            w.add_tensor(name, arr.astype(np.float16))
        elif kind == "F32":
            w.add_tensor(name, arr)
        else:
            qtype = gguf.GGMLQuantizationType[kind]
            w.add_tensor(name, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)

    def kind(mixed: str) -> str:
        return mixed if spec.matrix_type == "mixed" else spec.matrix_type

    add_q8("token_embd.weight", rand(vocab, spec.d_model, scale=1.0))
    w.add_tensor("output_norm.weight", 1.0 + rand(spec.d_model, scale=0.05))
    if not spec.tied:
        w.add_tensor("output.weight", rand(vocab, spec.d_model))
    for i in range(spec.n_layers):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", 1.0 + rand(spec.d_model, scale=0.05))
        w.add_tensor(p + "ffn_norm.weight", 1.0 + rand(spec.d_model, scale=0.05))
        add_as(p + "attn_q.weight", rand(spec.n_heads * hd, spec.d_model), kind("Q8_0"))
        add_as(p + "attn_k.weight", rand(spec.n_kv_heads * hd, spec.d_model), kind("Q8_0"))
        add_as(p + "attn_v.weight", rand(spec.n_kv_heads * hd, spec.d_model), kind("F16"))
        add_as(p + "attn_output.weight", rand(spec.d_model, spec.n_heads * hd), kind("F32"))
        add_as(p + "ffn_gate.weight", rand(spec.d_ff, spec.d_model), kind("Q8_0"))
        add_as(p + "ffn_up.weight", rand(spec.d_ff, spec.d_model), kind("Q8_0"))
        add_as(p + "ffn_down.weight", rand(spec.d_model, spec.d_ff), kind("F32"))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
