"""Quantized decode kernels over tiles of GGUF blocks: the layout, the activation quantiser and
the jitted drivers of the LLVM IR kernels in `ir`.

`matmul` is ``x @ W`` for float32 rows ``x`` and W as tiles (laid out by `kvroute.engine.quant`):
int8 activations with VNNI dot products by default, or float32 activations with ``exact``.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .ir import (
    BLOCK,
    LANES,
    MAX_ROWS,
    STRIDE,
    STRIDE_Q8_0,
    absmax32,
    f16,
    make_kernel,
    quantize32,
)

_jit = njit(fastmath=True, boundscheck=False, error_model="numpy", nogil=True, cache=True)

_q4_1_kernel = make_kernel("Q4_1")
_q8_0_kernel = make_kernel("Q8_0")
_q4_1_float_kernel = make_kernel("Q4_1", exact=True)
_q8_0_float_kernel = make_kernel("Q8_0", exact=True)


@_jit
def quantize_rows(x, xq, xs, xm, xc):  # type: ignore[no-untyped-def]
    """Quantise float32 rows x (n, K) per 32-block like llama.cpp's Q8_1 / Q8_0.

    Writes xq (n, K) int8 ``rint(x * 127 / max|x|)``; xs (n, nb) float32 the scale
    ``max|x| / 127`` rounded to float16; xm (n, nb) float32 ``float16(scale * sum(xq))`` (the
    Q4_1 min term's factor); xc (n, nb) int32 ``-128 * sum(xq)`` (undoes the Q8_0 +128).
    x and xq must be C-contiguous.
    """
    n, k = x.shape
    src, dst = np.int64(x.ctypes.data), np.int64(xq.ctypes.data)
    for r in range(n):
        for b in range(k // BLOCK):
            at = r * k + b * BLOCK
            amax = absmax32(src + at * 4)
            scale = amax / np.float32(127.0)
            inv = np.float32(127.0) / amax if amax > 0 else np.float32(0.0)
            total = quantize32(src + at * 4, dst + at, inv)
            xs[r, b] = f16(scale)
            xm[r, b] = f16(scale * np.float32(total))
            xc[r, b] = -128 * total


@_jit
def tiles_product(w, xq, xs, xm, xc, out):  # type: ignore[no-untyped-def]
    """``out = x @ W`` from quantised rows (`quantize_rows`) and tiles ``w`` (see `quant`);
    out is (n, 16 T) float32, C-contiguous, like xq, xs, xm and xc."""
    n, k = xq.shape
    tiles, nb = w.shape[0], w.shape[1]
    stride = np.int64(out.shape[1] * 4)
    r0 = 0
    while r0 < n:  # passes of up to 8 rows, each reading the weights once
        rows = min(MAX_ROWS, n - r0)
        args = (
            np.int64(w.ctypes.data),
            np.int64(xq.ctypes.data) + r0 * k,
            np.int64(xs.ctypes.data) + r0 * nb * 4,
            np.int64(xm.ctypes.data) + r0 * nb * 4,
            np.int64(xc.ctypes.data) + r0 * nb * 4,
            np.int64(out.ctypes.data) + r0 * stride,
            np.int64(tiles),
            np.int64(nb),
            stride,
            np.int64(rows),
        )
        if w.shape[2] == STRIDE_Q8_0:
            _q8_0_kernel(*args)
        else:
            _q4_1_kernel(*args)
        r0 += rows


@_jit
def tiles_product_exact(w, x, xsum, out):  # type: ignore[no-untyped-def]
    """``out = x @ W`` with float32 activations x (n, K) and their block sums xsum (n, nb)."""
    n, k = x.shape
    tiles, nb = w.shape[0], w.shape[1]
    stride = np.int64(out.shape[1] * 4)
    r0 = 0
    while r0 < n:
        rows = min(MAX_ROWS, n - r0)
        xa = np.int64(x.ctypes.data) + r0 * k * 4
        sa = np.int64(xsum.ctypes.data) + r0 * nb * 4
        oa = np.int64(out.ctypes.data) + r0 * stride
        args = (np.int64(w.ctypes.data), xa, xa, sa, sa, oa, np.int64(tiles), np.int64(nb))
        if w.shape[2] == STRIDE_Q8_0:
            _q8_0_float_kernel(*args, stride, np.int64(rows))
        else:
            _q4_1_float_kernel(*args, stride, np.int64(rows))
        r0 += rows


@_jit
def product_exact(x, w):  # type: ignore[no-untyped-def]
    """Like `product` with float32 activations (no int8 rounding)."""
    n, k = x.shape
    nb = k // BLOCK
    xsum = np.empty((n, nb), np.float32)
    for r in range(n):
        for b in range(nb):
            total = np.float32(0.0)
            for j in range(BLOCK):
                total += x[r, b * BLOCK + j]
            xsum[r, b] = total
    out = np.empty((n, w.shape[0] * LANES), np.float32)
    tiles_product_exact(w, x, xsum, out)
    return out


@_jit
def product(x, w):  # type: ignore[no-untyped-def]
    """``x @ W`` for float32 x (n, K) C-contiguous and tiles ``w``: (n, 16 T) float32."""
    n, k = x.shape
    nb = k // BLOCK
    xq = np.empty((n, k), np.int8)
    xs = np.empty((n, nb), np.float32)
    xm = np.empty((n, nb), np.float32)
    xc = np.empty((n, nb), np.int32)
    quantize_rows(x, xq, xs, xm, xc)
    out = np.empty((n, w.shape[0] * LANES), np.float32)
    tiles_product(w, xq, xs, xm, xc, out)
    return out


_KINDS = {stride: kind for kind, stride in STRIDE.items()}


def matmul(x: np.ndarray, w: np.ndarray, cols: int, exact: bool = False) -> np.ndarray:
    """``x @ W`` for float32 ``x`` (N, K) and W as tiles ``w`` (see `kvroute.engine.quant`) of
    ``cols`` output columns; returns (N, cols) float32. The kind follows from the tile size. With
    ``exact`` the activations stay float32 (no int8 rounding; slower).

    Raises ValueError if the arrays do not fit together.
    """
    if w.ndim != 3 or w.shape[2] not in _KINDS or w.dtype != np.uint8 or not w.flags.c_contiguous:
        raise ValueError(f"not a tiles array: {w.dtype} {w.shape}")
    if x.ndim != 2 or x.shape[1] != w.shape[1] * BLOCK or not 0 < cols <= w.shape[0] * LANES:
        raise ValueError(f"x {x.shape} does not fit tiles {w.shape} of {cols} columns")
    if x.dtype != np.float32 or not x.flags.c_contiguous:
        x = np.ascontiguousarray(x, dtype=np.float32)
    out = (product_exact if exact else product)(x, w)
    return out if out.shape[1] == cols else np.ascontiguousarray(out[:, :cols])
