"""Grouped-query causal attention read straight from a float16 or float32 KV cache.

numpy has no half-precision arithmetic, so attending over a float16 cache with it means widening
keys and values to float32 first: 2 bytes read, 4 written and 4 read again per element, every
layer of every step. These kernels load the cache as it is stored, widen float16 in registers
(``fpext``: vcvtph2ps with F16C) and do all arithmetic in float32, so a float16 cache streams
half the bytes of a float32 one. They run for decode and short segments (a few queries per KV
head); a long prefill chunk stays on BLAS, which shares each key among hundreds of queries.

Per KV head and pass of up to ``MAX_ROWS`` query rows (the G heads of a group times the T new
tokens, ``row = g * T + t``):

1. `make_scores`: ``s[r, l] = q[r] . K[l]`` for every position l, 16 lanes of the head dimension at
   a time, one horizontal sum per (row, position). The scale 1/sqrt(hd) is folded into Wq.
2. In numba: the causal mask (query t sits at position L - T + t and sees keys 0..L - T + t), a
   softmax that subtracts each row's maximum, exponentials by `_exp` (vectorisable, unlike
   libm's); masked positions get weight 0.
3. `make_weighted`: ``out[r] = sum_l p[r, l] V[l]`` in blocks of ``POS_BLOCK`` positions that stay
   in L1 while each 16-lane slice of the head dimension is summed, then the division by the
   row's total weight.

The result equals the widen-then-numpy computation up to the order of float32 additions and the
last bits of the exponentials (`_exp`: relative error below 1e-6).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from .ir import LANES, _fn, _i, _load, _splat

MAX_ROWS = 8  # query rows per pass (their accumulators stay in registers)
POS_BLOCK = 128  # positions of V per block: 16 KiB as float16, 32 KiB as float32
# New tokens per segment up to which the kernels run, by cache dtype. On float32 they beat BLAS
# for decode and draw level past about 16 rows, so prefill keeps BLAS's rounding there; on
# float16 BLAS needs the cache widened first, which costs more than the kernels up to the
# default prefill chunk.
MAX_T = {np.dtype(np.float32): 16, np.dtype(np.float16): 128}

_i32, _f32, _f16 = ir.IntType(32), ir.FloatType(), ir.HalfType()
_vf32, _vf16 = ir.VectorType(_f32, LANES), ir.VectorType(_f16, LANES)


def _widen(builder: ir.IRBuilder, addr: Any, half: bool) -> Any:
    """The 16 cache elements at byte address ``addr`` as float32 lanes."""
    if half:
        return builder.fpext(_load(builder, addr, _i(0), _vf16, 2), _vf32)
    return _load(builder, addr, _i(0), _vf32, 4)


def _hsum(builder: ir.IRBuilder, v: Any) -> Any:
    """The sum of a vector's lanes, halving its width at each step."""
    width = LANES
    while width > 1:
        width //= 2
        undef = ir.Constant(v.type, ir.Undefined)
        low = ir.Constant(ir.VectorType(_i32, width), list(range(width)))
        high = ir.Constant(ir.VectorType(_i32, width), list(range(width, 2 * width)))
        v = builder.fadd(
            builder.shuffle_vector(v, undef, low), builder.shuffle_vector(v, undef, high)
        )
    return builder.extract_element(v, _i32(0))


def _per_rows(loops: Callable[[ir.IRBuilder, Sequence[Any], int], None]) -> Callable[..., Any]:
    """Codegen that runs ``loops`` specialised for the row count in its last argument."""

    def codegen(context: Any, builder: ir.IRBuilder, signature: Any, args: Sequence[Any]) -> Any:
        for rows in range(1, MAX_ROWS + 1):
            with builder.if_then(builder.icmp_signed("==", args[-1], _i(rows))):
                loops(builder, args[:-1], rows)
        return context.get_dummy_value()

    return codegen


def make_scores(half: bool) -> Callable[..., None]:
    """The intrinsic ``(q, k, s, n, s_stride, chunks, rows)``, all int64: for the ``rows``
    float32 query rows at address q (each ``16 chunks`` long, contiguous) and the ``n`` key rows
    at k (float16 if ``half``, else float32; contiguous), store ``s[r, l] = q[r] . k[l]`` as
    float32 at ``s + r * s_stride + 4 l``. The head dimension is ``16 chunks``."""
    size = 2 if half else 4

    def loops(builder: ir.IRBuilder, args: Sequence[Any], rows: int) -> None:
        q, k, s, n, s_stride, chunks = args
        fma = _fn(builder, "llvm.fma.v16f32", _vf32, _vf32, _vf32, _vf32)
        accs = [cgutils.alloca_once(builder, _vf32) for _ in range(rows)]  # type: ignore[no-untyped-call]
        k_row = builder.mul(chunks, _i(LANES * size))
        q_row = builder.mul(chunks, _i(LANES * 4))
        with cgutils.for_range(builder, n) as pos:
            for acc in accs:
                builder.store(_vf32(None), acc)
            key = builder.add(k, builder.mul(pos.index, k_row))
            with cgutils.for_range(builder, chunks) as c:
                kv = _widen(builder, builder.add(key, builder.mul(c.index, _i(LANES * size))), half)
                at = builder.mul(c.index, _i(LANES * 4))
                for r, acc in enumerate(accs):
                    qv = _load(builder, q, builder.add(builder.mul(_i(r), q_row), at), _vf32, 4)
                    builder.store(builder.call(fma, [qv, kv, builder.load(acc)]), acc)
            col = builder.mul(pos.index, _i(4))
            for r, acc in enumerate(accs):
                dst = builder.add(s, builder.add(builder.mul(_i(r), s_stride), col))
                ptr = builder.inttoptr(dst, ir.PointerType(_f32))
                builder.store(_hsum(builder, builder.load(acc)), ptr, align=4)

    def typer(typingctx, q, k, s, n, s_stride, chunks, rows):  # type: ignore[no-untyped-def]
        return types.void(*([types.int64] * 7)), _per_rows(loops)

    typer.__name__ = f"_scores_{'f16' if half else 'f32'}"
    kernel: Callable[..., None] = intrinsic(typer)
    return kernel


def make_weighted(half: bool) -> Callable[..., None]:
    """The intrinsic ``(p, v, out, n, p_stride, chunks, rows)``, all int64: add
    ``sum_l p[r, l] v[l]`` over the ``n`` value rows at v (float16 if ``half``, else float32;
    contiguous, ``16 chunks`` long) to the ``rows`` float32 rows at out (contiguous), with the
    float32 weights ``p[r, l]`` at ``p + r * p_stride + 4 l``."""
    size = 2 if half else 4

    def loops(builder: ir.IRBuilder, args: Sequence[Any], rows: int) -> None:
        p, v, out, n, p_stride, chunks = args
        fma = _fn(builder, "llvm.fma.v16f32", _vf32, _vf32, _vf32, _vf32)
        accs = [cgutils.alloca_once(builder, _vf32) for _ in range(rows)]  # type: ignore[no-untyped-call]
        v_row = builder.mul(chunks, _i(LANES * size))
        out_row = builder.mul(chunks, _i(LANES * 4))
        # One 16-lane slice of the head dimension at a time, so each row's sum is a register.
        with cgutils.for_range(builder, chunks) as c:
            outs = [
                builder.add(
                    out,
                    builder.add(builder.mul(_i(r), out_row), builder.mul(c.index, _i(LANES * 4))),
                )
                for r in range(rows)
            ]
            for acc, at in zip(accs, outs, strict=True):
                builder.store(_load(builder, at, _i(0), _vf32, 4), acc)
            lanes = builder.add(v, builder.mul(c.index, _i(LANES * size)))
            with cgutils.for_range(builder, n) as pos:
                vv = _widen(builder, builder.add(lanes, builder.mul(pos.index, v_row)), half)
                col = builder.mul(pos.index, _i(4))
                for r, acc in enumerate(accs):
                    at = builder.add(builder.mul(_i(r), p_stride), col)
                    pr = _splat(builder, _load(builder, p, at, _f32, 4), _vf32)
                    builder.store(builder.call(fma, [pr, vv, builder.load(acc)]), acc)
            for acc, at in zip(accs, outs, strict=True):
                builder.store(
                    builder.load(acc), builder.inttoptr(at, ir.PointerType(_vf32)), align=4
                )

    def typer(typingctx, p, v, out, n, p_stride, chunks, rows):  # type: ignore[no-untyped-def]
        return types.void(*([types.int64] * 7)), _per_rows(loops)

    typer.__name__ = f"_weighted_{'f16' if half else 'f32'}"
    kernel: Callable[..., None] = intrinsic(typer)
    return kernel


def _bits_typing(typingctx, n):  # type: ignore[no-untyped-def]
    """The float32 whose bits are the low 32 bits of the int64 ``n``."""

    def codegen(context: Any, builder: ir.IRBuilder, signature: Any, args: Sequence[Any]) -> Any:
        return builder.bitcast(builder.trunc(args[0], _i32), _f32)

    return types.float32(types.int64), codegen


_as_float: Any = intrinsic(_bits_typing)

_jit = njit(fastmath=True, boundscheck=False, error_model="numpy", nogil=True, cache=True)

_scores_f16, _scores_f32 = make_scores(True), make_scores(False)
_weighted_f16, _weighted_f32 = make_weighted(True), make_weighted(False)

_LOG2E = np.float32(1.4426950408889634)
_LN2_HI, _LN2_LO = np.float32(0.693359375), np.float32(-2.12194440e-4)  # ln 2 = HI + LO


@_jit
def _exp(x):  # type: ignore[no-untyped-def]
    """``exp(x)`` for float32 ``x <= 0`` (Cephes' expf: x = n ln2 + r, |r| <= ln2 / 2, a degree-7
    polynomial for e^r, 2^n from its exponent bits); below -87, where e^x leaves the normal
    float32 range, 0."""
    if x < np.float32(-87.0):
        return np.float32(0.0)
    n = np.float32(math.floor(x * _LOG2E + np.float32(0.5)))
    r = x - n * _LN2_HI - n * _LN2_LO
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    return (p * r * r + r + np.float32(1.0)) * _as_float((np.int64(n) + 127) << 23)


@_jit
def attend_heads(q, k, v, head_bytes, half, length, t_new, out):  # type: ignore[no-untyped-def]
    """Attention of the float32 query rows q (KV, R, hd) over ``length`` cached positions.

    ``k`` and ``v`` are the int64 addresses of head 0's first key and value row, heads
    ``head_bytes`` apart, each head's rows contiguous, float16 if ``half`` else float32. Row
    ``r = g * t_new + t`` is new token t, at position ``length - t_new + t``. Writes out
    (KV, R, hd) float32. q and out must be C-contiguous; hd a multiple of 16.
    """
    kv_heads, rows, hd = q.shape
    chunks = hd // LANES
    size = 2 if half else 4
    s = np.empty((MAX_ROWS, length), np.float32)  # scores, then weights, of one pass
    inv = np.empty(MAX_ROWS, np.float32)
    sa, stride = np.int64(s.ctypes.data), np.int64(length * 4)
    out[:] = 0.0
    for h in range(kv_heads):
        kh, vh = k + h * head_bytes, v + h * head_bytes
        r0 = 0
        while r0 < rows:
            nr = min(MAX_ROWS, rows - r0)
            qa = np.int64(q.ctypes.data) + (h * rows + r0) * hd * 4
            oa = np.int64(out.ctypes.data) + (h * rows + r0) * hd * 4
            if half:
                _scores_f16(qa, kh, sa, np.int64(length), stride, np.int64(chunks), np.int64(nr))
            else:
                _scores_f32(qa, kh, sa, np.int64(length), stride, np.int64(chunks), np.int64(nr))
            for i in range(nr):
                seen = length - t_new + (r0 + i) % t_new + 1  # the causal mask
                m = s[i, 0]
                for j in range(1, seen):
                    m = max(m, s[i, j])
                total = np.float32(0.0)
                for j in range(seen):
                    e = _exp(s[i, j] - m)
                    s[i, j] = e
                    total += e
                s[i, seen:] = 0.0
                inv[i] = np.float32(1.0) / total
            for b in range(0, length, POS_BLOCK):
                n = np.int64(min(POS_BLOCK, length - b))
                pa, va = sa + b * 4, vh + b * hd * size
                if half:
                    _weighted_f16(pa, va, oa, n, stride, np.int64(chunks), np.int64(nr))
                else:
                    _weighted_f32(pa, va, oa, n, stride, np.int64(chunks), np.int64(nr))
            for i in range(nr):
                out[h, r0 + i] *= inv[i]
            r0 += nr


def head_dim_fits(hd: int) -> bool:
    """Whether the kernels run on heads of ``hd`` dimensions (whole vectors of 16 lanes)."""
    return hd % LANES == 0


def supports(k: np.ndarray) -> bool:
    """Whether the kernels read this cache view: float16 or float32 keys (KV, L, hd), each
    head's rows contiguous, hd a multiple of 16."""
    if k.ndim != 3 or k.dtype not in (np.float16, np.float32):
        return False
    hd = k.shape[2]
    return head_dim_fits(hd) and k.strides[1:] == (hd * k.itemsize, k.itemsize)


def attend(q: np.ndarray, k: np.ndarray, v: np.ndarray, t_new: int) -> np.ndarray:
    """Causal attention of query rows ``q`` (KV, G * T, hd) over keys and values ``k, v``
    (KV, L, hd), float16 or float32 (views of a cache: rows contiguous, heads at any stride).

    Row ``g * T + t`` of head h is query head g of the group, new token t, which sits at
    position ``L - T + t`` and sees keys 0..L - T + t. Scores are not scaled (1/sqrt(hd) is
    folded into the queries). Returns (KV, G * T, hd) float32.

    Raises ValueError if the arrays do not fit together (see `supports` for the layout).
    """
    if not supports(k):
        raise ValueError(f"keys {k.dtype} {k.shape} strides {k.strides}: rows not contiguous")
    kv_heads, length, hd = k.shape
    if v.shape != k.shape or v.strides != k.strides or v.dtype != k.dtype:
        raise ValueError(f"keys {k.dtype} {k.shape} and values {v.dtype} {v.shape} differ")
    if not 0 < t_new <= length:
        raise ValueError(f"{t_new} new tokens over {length} positions")
    if q.ndim != 3 or q.shape[0] != kv_heads or q.shape[2] != hd or q.shape[1] % t_new:
        raise ValueError(f"queries {q.shape} do not fit keys {k.shape} and {t_new} new tokens")
    q = np.ascontiguousarray(q, dtype=np.float32)
    out = np.empty(q.shape, np.float32)
    addr_k, addr_v = k.__array_interface__["data"][0], v.__array_interface__["data"][0]
    half = k.dtype == np.float16
    attend_heads(q, addr_k, addr_v, k.strides[0], half, length, t_new, out)
    return out
