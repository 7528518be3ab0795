"""Decode-step cost of kvroute's quantized kernels against float32 np.matmul (numba, one thread).

    python benchmarks/quant_kernels.py [--model default] [--json OUT]

A decode step multiplies a few activation rows by every weight matrix, so it is bound by the
bytes it streams (float32: 4 bytes a weight; Q4_1: 20 bytes per 32; Q8_0: 34 per 32) and, for
more rows, by the multiplies. One pass multiplies every Q4_1 matrix of the model once; the Q8_0
LM head (the tied token embedding) is timed separately. For 1, 2, 4, 8 and 16 rows, best of
`ROUNDS` interleaved rounds (so drifting load hits every variant alike):

- ``float32``: np.matmul on the dequantised (K, M) float32 copy, as the float32 engine holds it;
- ``exact``: `QuantMatrix.matmul` with float32 activations (`kvroute.engine.kernels`);
- ``int8``: the same tiles with activations quantised to int8 per 32-block (VNNI).

A variant the CPU cannot run is skipped (`int8_supported` / `exact_supported`): compiling it
for such a CPU would abort the process. Prints one JSON object: ms per pass, each variant's
speed-up over float32 (float32 ms / variant ms, all from this run), the largest error relative
to the float32 product (max |y - y32| / max |y32| per matrix, over all row counts), and the
bytes each way streams per pass.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, limit_blas_threads

limit_blas_threads(1)

import numpy as np  # noqa: E402

from kvroute.engine.gguf_file import GGUFFile  # noqa: E402
from kvroute.engine.kernels import ir  # noqa: E402
from kvroute.engine.model_store import resolve_model  # noqa: E402
from kvroute.engine.quant import QuantMatrix  # noqa: E402

ROUNDS = 5
ROW_COUNTS = (1, 2, 4, 8, 16)
HEAD = "token_embd.weight"

Pass = Callable[[], list[np.ndarray]]


def load(gguf: GGUFFile, names: list[str]) -> tuple[list[np.ndarray], list[QuantMatrix]]:
    """Each tensor's float32 (K, M) copy and its tiles (exact kernels) from the file's blocks."""
    f32, quant = [], []
    for name in names:
        blocks = gguf.blocks(name)
        if blocks is None:
            raise SystemExit(f"{name} is not Q4_1 or Q8_0")
        quant.append(QuantMatrix.from_rows(*blocks))
        f32.append(np.ascontiguousarray(gguf.tensor(name).T))
    return f32, quant


def passes(x: list[np.ndarray], f32: list[np.ndarray], quant: list[QuantMatrix]) -> dict[str, Pass]:
    """One pass each way the CPU runs: every matrix times its activation rows ``x[i]``."""
    ways: dict[str, Pass] = {"float32": lambda: [a @ w for a, w in zip(x, f32, strict=True)]}
    if ir.exact_supported():
        ways["exact"] = lambda: [q.matmul(a) for a, q in zip(x, quant, strict=True)]
    if ir.int8_supported():
        int8 = [dataclasses.replace(q, exact=False) for q in quant]
        ways["int8"] = lambda: [q.matmul(a) for a, q in zip(x, int8, strict=True)]
    return ways


def best_ms(ways: Mapping[str, Pass]) -> dict[str, float]:
    """Best time of each way over interleaved rounds."""
    best = dict.fromkeys(ways, math.inf)
    for _ in range(ROUNDS):
        for name, op in ways.items():
            t0 = time.perf_counter()
            op()
            best[name] = min(best[name], (time.perf_counter() - t0) * 1e3)
    return best


def rel_error(ys: list[np.ndarray], refs: list[np.ndarray]) -> float:
    """The largest ``max |y - ref| / max |ref|`` over matrices."""
    return max(float(np.abs(y - r).max() / np.abs(r).max()) for y, r in zip(ys, refs, strict=True))


def measure(f32: list[np.ndarray], quant: list[QuantMatrix]) -> dict[str, Any]:
    """ms, speed-ups and errors of one group of matrices for every row count."""
    rng = np.random.default_rng(0)
    xs = rng.standard_normal((max(ROW_COUNTS), max(w.shape[0] for w in f32)), dtype=np.float32)
    out: dict[str, Any] = {"ms": {}, "speedup_vs_float32": {}, "max_relative_error": {}}
    errors: dict[str, float] = {}
    for n in ROW_COUNTS:
        x = [np.ascontiguousarray(xs[:n, : w.shape[0]]) for w in f32]
        ways = passes(x, f32, quant)
        ys = {name: op() for name, op in ways.items()}  # also compiles on the first call
        for name, y in ys.items():
            errors[name] = max(errors.get(name, 0.0), rel_error(y, ys["float32"]))
        ms = best_ms(ways)
        out["ms"][str(n)] = {k: round(v, 2) for k, v in ms.items()}
        out["speedup_vs_float32"][str(n)] = {k: round(ms["float32"] / v, 2) for k, v in ms.items()}
    out["max_relative_error"] = {k: float(f"{v:.2e}") for k, v in errors.items() if k != "float32"}
    return out


def run(model: str) -> dict[str, Any]:
    """Time and check every variant on the model's Q4_1 matrices and on its Q8_0 head."""
    gguf = GGUFFile(resolve_model(model))
    groups: dict[str, list[str]] = {
        "q4_1": [t.name for t in gguf.reader.tensors if t.tensor_type.name == "Q4_1"]
    }
    head = gguf.blocks(HEAD) if gguf.has_tensor(HEAD) else None
    if head is not None and head[0] == "Q8_0":
        groups["head_q8_0"] = [HEAD]
    result: dict[str, Any] = {
        "rounds": ROUNDS,
        "int8_supported": ir.int8_supported(),
        "exact_supported": ir.exact_supported(),
    }
    for label, names in groups.items():
        f32, quant = load(gguf, names)
        result[label] = {
            "matrices": len(names),
            "bytes": {
                "float32": sum(w.nbytes for w in f32),
                "tiles": sum(q.nbytes for q in quant),
            },
            **measure(f32, quant),
        }
        del f32, quant  # free one group's float32 copies before loading the next
    return result


def main() -> None:
    """Parse arguments, run, print the JSON object (and write it to --json OUT)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default", help="GGUF path or 'default'")
    parser.add_argument("--json", type=Path, help="also write the JSON object to this file")
    args = parser.parse_args()
    emit(run(args.model), args.json)


if __name__ == "__main__":
    main()
