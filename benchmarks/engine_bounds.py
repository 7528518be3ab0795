"""What bounds the engine's speed on this host, for `engine.py`: the bytes a decode step streams
and one core's DRAM bandwidth (decode), the matmul FLOPs per token and sgemm throughput
(prefill, batched decode)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from _common import best_of, seconds

from kvroute.engine.engine import Engine

MIB = 1 << 20


def bytes_per_decode_step(engine: Engine, context: int) -> int:
    """DRAM bytes one single-stream decode step reads: all weights once (in the form they are
    multiplied in), plus the KV cache.

    A separate (untied) embedding table is not streamed: a step gathers one row of it.
    """
    weights = 0
    for lin in engine.model.matrices():  # the blocks where the kernels multiply them
        weights += lin.q.nbytes if lin.q is not None else 4 * lin.shape[0] * lin.shape[1]
    kv = engine.new_cache().bytes_per_token * context
    return weights + kv


def flops_per_token(engine: Engine) -> int:
    """Multiply-adds x 2 of the matmuls per token (attention over the context excluded)."""
    return 2 * sum(m.shape[0] * m.shape[1] for m in engine.model.matrices())


def memory_bandwidth(nbytes: int = 512 * MIB) -> dict[str, float]:
    """One-core DRAM bandwidth in GB/s, three ways, best of 5 each.

    ``sum`` and ``gemv`` only read (``gemv`` is the kernel a decode step actually runs: a vector
    times a matrix far larger than the caches); ``copy`` reads and writes, counted as both.
    """
    src = np.ones(nbytes // 4, dtype=np.float32)
    dst = np.empty_like(src)
    mat = src.reshape(-1, 16384)
    vec = np.ones((1, mat.shape[0]), dtype=np.float32)

    def gb_s(moved: int, op: Callable[[], object]) -> float:
        return moved / best_of(5, lambda: seconds(op)) / 1e9

    return {
        "sum_read": gb_s(nbytes, lambda: np.add.reduce(src)),
        "gemv_read": gb_s(nbytes, lambda: vec @ mat),
        "copy_read_write": gb_s(2 * nbytes, lambda: np.copyto(dst, src)),
    }


def sgemm_gflops(n: int = 2048) -> float:
    """One-core float32 matrix-multiply throughput on an n x n product, best of 3."""
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    b = a.T.copy()
    return 2 * n**3 / best_of(3, lambda: seconds(lambda: a @ b)) / 1e9
