"""Can a JIT kernel that reads Q4_1 blocks beat float32 SGEMV for a decode step? (numba)

    pip install numba   # not a kvroute dependency: this script only measures
    python benchmarks/quant_kernels.py [--model default] [--json OUT]

One decode step multiplies one activation row by every weight matrix. The engine streams the
dequantised float32 copy (4 bytes a weight) through OpenBLAS SGEMV; Q4_1 keeps 20 bytes per 32
weights. This times, on the model's own Q4_1 matrices (all layers, one row, best of 5, in
alternating rounds), against OpenBLAS SGEMV on the engine's float32 layout:

- ``blocks_int8``: the straightforward kernel: per output row, per 32-weight block, unpack the
  nibbles, integer dot product with the activation quantised to int8 per block (as llama.cpp
  does), one scalar reduction per block;
- ``transposed_f32``: the same blocks transposed at load so that consecutive bytes belong to
  consecutive output rows (values, scales and mins unchanged): the inner loop runs over output
  rows, one activation broadcast times 16 rows per instruction, no horizontal sums, float32
  activations (so the result equals the float32 path's up to rounding);
- ``head_transposed_q8_0``: the same idea for the Q8_0 LM head (the tied token embedding),
  against SGEMV on its float32 copy (``head_sgemv_f32``).

It also reports what importing numba and running one kernel costs in private memory per process,
which every worker would pay. Prints one JSON object with the times and ratios.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import limit_blas_threads

limit_blas_threads(1)

import numpy as np  # noqa: E402
import psutil  # noqa: E402

from kvroute.engine.gguf_file import GGUFFile  # noqa: E402
from kvroute.engine.model_store import resolve_model  # noqa: E402

ROUNDS = 3
REPEATS = 5
Q4_1_BLOCK = 20  # bytes: f16 scale, f16 min, 16 bytes of nibbles (element j low, j + 16 high)
Q8_0_BLOCK = 34  # bytes: f16 scale, 32 int8 values


def anon_mib() -> float:
    """Private anonymous memory of this process (what each worker would add)."""
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("Anonymous:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def kernels() -> dict[str, Callable[..., None]]:
    """Compile the two numba kernels (imported here: numba is optional)."""
    from numba import njit

    @njit(fastmath=True, boundscheck=False, error_model="numpy", nogil=True)
    def blocks_int8(qw, f16, xq, xd, xs, out):  # type: ignore[no-untyped-def]
        for o in range(qw.shape[0]):
            acc = np.float32(0.0)
            for b in range(xd.shape[0]):
                base = b * 20
                d = f16[np.int32(qw[o, base]) | (np.int32(qw[o, base + 1]) << 8)]
                m = f16[np.int32(qw[o, base + 2]) | (np.int32(qw[o, base + 3]) << 8)]
                isum = np.int32(0)
                for j in range(16):
                    q = np.int32(qw[o, base + 4 + j])
                    lo = (q & 15) * np.int32(xq[b * 32 + j])
                    isum += lo + (q >> 4) * np.int32(xq[b * 32 + 16 + j])
                acc += d * xd[b] * np.float32(isum) + m * xs[b]
            out[o] = acc

    @njit(fastmath=True, boundscheck=False, error_model="numpy", nogil=True)
    def transposed_f32(qt, d, m, x, xsum, out, tmp):  # type: ignore[no-untyped-def]
        n_out = qt.shape[2]
        for o in range(n_out):
            out[o] = 0.0
        for b in range(qt.shape[0]):
            for o in range(n_out):
                tmp[o] = 0.0
            for j in range(16):
                xl = x[b * 32 + j]
                xh = x[b * 32 + 16 + j]
                for o in range(n_out):
                    q = qt[b, j, o]
                    tmp[o] += np.float32(q & 15) * xl + np.float32(q >> 4) * xh
            for o in range(n_out):
                out[o] += d[b, o] * tmp[o] + m[b, o] * xsum[b]

    @njit(fastmath=True, boundscheck=False, error_model="numpy", nogil=True)
    def transposed_q8_0(qt, d, x, out, tmp):  # type: ignore[no-untyped-def]
        n_out = qt.shape[2]
        for o in range(n_out):
            out[o] = 0.0
        for b in range(qt.shape[0]):
            for o in range(n_out):
                tmp[o] = 0.0
            for j in range(32):
                xj = x[b * 32 + j]
                for o in range(n_out):
                    tmp[o] += np.float32(qt[b, j, o]) * xj
            for o in range(n_out):
                out[o] += d[b, o] * tmp[o]

    return {
        "blocks_int8": blocks_int8,
        "transposed_f32": transposed_f32,
        "transposed_q8_0": transposed_q8_0,
    }


def quantize_row(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Activation as int8 per 32-block: values, scales, scale * sum of values."""
    xb = x.reshape(-1, 32)
    d = (np.abs(xb).max(axis=1) / 127).astype(np.float32)
    inv = np.divide(1.0, d, out=np.zeros_like(d), where=d > 0)
    q = np.round(xb * inv[:, None]).astype(np.int8)
    return q.reshape(-1), d, (d * q.sum(axis=1, dtype=np.int32)).astype(np.float32)


def transpose_blocks(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GGUF Q4_1 rows (O, nb * 20) to nibbles (nb, 16, O), scales and mins (nb, O) float32."""
    blocks = raw.reshape(raw.shape[0], -1, Q4_1_BLOCK)
    qt = np.ascontiguousarray(blocks[:, :, 4:].transpose(1, 2, 0))
    dm = blocks[:, :, :4].copy().view(np.float16).astype(np.float32)
    return qt, np.ascontiguousarray(dm[:, :, 0].T), np.ascontiguousarray(dm[:, :, 1].T)


def transpose_q8_0(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """GGUF Q8_0 rows (O, nb * 34) to values (nb, 32, O) int8 and scales (nb, O) float32."""
    blocks = raw.reshape(raw.shape[0], -1, Q8_0_BLOCK)
    qt = np.ascontiguousarray(blocks[:, :, 2:].view(np.int8).transpose(1, 2, 0))
    d = blocks[:, :, :2].copy().view(np.float16)[:, :, 0].astype(np.float32)
    return qt, np.ascontiguousarray(d.T)


def run(model: str) -> dict[str, Any]:
    """Time the kernels against SGEMV; check them against the float32 product."""
    gguf = GGUFFile(resolve_model(model))
    tensors = {t.name: t for t in gguf.reader.tensors}
    names = [n for n, t in tensors.items() if t.tensor_type.name == "Q4_1"]
    raw = [np.asarray(tensors[n].data) for n in names]
    f32 = [np.ascontiguousarray(gguf.tensor(n).T) for n in names]  # (in, out), as the engine
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal(w.shape[0], dtype=np.float32) for w in f32]
    f16 = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)
    quantized = [quantize_row(x) for x in xs]
    transposed = [transpose_blocks(r) for r in raw]
    xsums = [x.reshape(-1, 32).sum(axis=1).astype(np.float32) for x in xs]
    outs = [np.empty(w.shape[1], np.float32) for w in f32]
    tmp = np.empty(max(w.shape[1] for w in f32), np.float32)

    # The LM head (tied to the Q8_0 token embedding in SmolLM2): float32 (D, V) against Q8_0.
    embed = tensors["token_embd.weight"]
    head_f32 = np.ascontiguousarray(gguf.tensor("token_embd.weight").T)
    head_q = transpose_q8_0(np.asarray(embed.data)) if embed.tensor_type.name == "Q8_0" else None
    hx = rng.standard_normal(head_f32.shape[0], dtype=np.float32)
    hout = np.empty(head_f32.shape[1], np.float32)
    htmp = np.empty_like(hout)

    before = anon_mib()
    k = kernels()

    def sgemv_f32() -> None:
        for x, w, o in zip(xs, f32, outs, strict=True):
            np.matmul(x, w, out=o)

    def blocks_int8() -> None:
        for r, q, o in zip(raw, quantized, outs, strict=True):
            k["blocks_int8"](r, f16, *q, o)

    def transposed_f32() -> None:
        for t, x, s, o in zip(transposed, xs, xsums, outs, strict=True):
            k["transposed_f32"](*t, x, s, o, tmp[: o.shape[0]])

    def head_sgemv_f32() -> None:
        np.matmul(hx, head_f32, out=hout)

    def head_transposed_q8_0() -> None:
        assert head_q is not None
        k["transposed_q8_0"](*head_q, hx, hout, htmp)

    ways: dict[str, Callable[[], None]] = {
        "sgemv_f32": sgemv_f32,
        "blocks_int8": blocks_int8,
        "transposed_f32": transposed_f32,
        "head_sgemv_f32": head_sgemv_f32,
    }
    if head_q is not None:
        ways["head_transposed_q8_0"] = head_transposed_q8_0
    errors = {}
    for name in ("blocks_int8", "transposed_f32"):
        ways[name]()  # compiles on the first call
        errors[name] = max(
            float(np.abs(o - x @ w).max() / np.abs(x @ w).max())
            for o, x, w in zip(outs, xs, f32, strict=True)
        )
    if head_q is not None:
        head_transposed_q8_0()
        ref = hx @ head_f32
        errors["head_transposed_q8_0"] = float(np.abs(hout - ref).max() / np.abs(ref).max())
    numba_mib = anon_mib() - before

    best = dict.fromkeys(ways, float("inf"))
    for _ in range(ROUNDS):
        for name, op in ways.items():
            for _ in range(REPEATS):
                t0 = time.perf_counter()
                op()
                best[name] = min(best[name], (time.perf_counter() - t0) * 1e3)
    base = {k_: best["head_sgemv_f32" if k_.startswith("head") else "sgemv_f32"] for k_ in best}
    return {
        "matrices": len(names),
        "bytes": {
            "float32": sum(w.nbytes for w in f32),
            "q4_1_gguf": sum(r.nbytes for r in raw),
            "transposed": sum(sum(a.nbytes for a in t) for t in transposed),
        },
        "ms_per_step_best": {k_: round(v, 2) for k_, v in best.items()},
        "speed_vs_sgemv": {k_: round(base[k_] / v, 2) for k_, v in best.items()},
        "max_relative_error_vs_float32": errors,
        "numba_private_anon_mib": round(numba_mib, 1),
        "process_uss_mib": round(psutil.Process().memory_full_info().uss / 2**20, 1),
    }


def main() -> None:
    """Parse arguments, run, print the JSON object (and write it to --json OUT)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default", help="GGUF path or 'default'")
    parser.add_argument("--json", type=Path, help="also write the JSON object to this file")
    args = parser.parse_args()
    text = json.dumps(run(args.model), indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
