"""Compressed KV at rest: f16, and GGUF's Q8_0 and Q4_0 block layouts (I/O-free, numpy only).

A session that is idle keeps its keys and values in one of these forms; the next turn decodes
them back into a float32 cache before its prefill. The codes are the ones llama.cpp uses for
weights, block by block along each position's ``head_dim`` values (rows shorter than a block, or
not a multiple of it, are zero-padded):

- ``f16``: IEEE half floats (0.5x of f32). Error per value <= ``2**-11 * |x| + 2**-25``.
- ``q8_0``: blocks of 32 values, an f16 scale ``d = amax / 127`` and 32 int8 codes ``round(x /
  d)`` (34 bytes per 32 values: 0.27x). Error per value <= ``d / 2`` (plus f16 rounding of d,
  below 0.1% of it).
- ``q4_0``: blocks of 32 values, an f16 scale ``d = m / -8`` where ``m`` is the value of largest
  magnitude, and 32 4-bit codes ``min(15, trunc(x / d + 8.5))`` packed two per byte (value j in
  the low nibble of byte j, value j + 16 in its high nibble): 18 bytes per 32 values, 0.14x.
  Error per value <= ``|d| = amax / 8`` (the code range is asymmetric: -8..7).

The block arrays are numpy structured arrays whose bytes are exactly GGUF's ``block_q8_0`` and
``block_q4_0``, so ``gguf.quants.dequantize`` reads them too (the tests check it).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

import numpy as np

QK = 32  # values per block in Q8_0 and Q4_0
BLOCK_Q8_0 = np.dtype([("d", "<f2"), ("qs", "i1", (QK,))])  # 34 bytes
BLOCK_Q4_0 = np.dtype([("d", "<f2"), ("qs", "u1", (QK // 2,))])  # 18 bytes


class RestDtype(StrEnum):
    """How an idle session's KV is held (``--kv-rest``)."""

    NONE = "none"  # float32, as the live cache: nothing to decode
    F16 = "f16"
    Q8_0 = "q8_0"
    Q4_0 = "q4_0"


@dataclass(frozen=True)
class Packed:
    """One float32 array in a rest form.

    ``data`` is a float32 array (``none``), a float16 array (``f16``), or blocks of the array's
    values in row-major order with each last-axis row padded to a multiple of ``QK``.
    """

    dtype: RestDtype
    shape: tuple[int, ...]  # of the float32 array it decodes to
    data: np.ndarray

    @property
    def nbytes(self) -> int:
        """Bytes held."""
        return int(self.data.nbytes)

    def tobytes(self) -> bytes:
        """The raw codes (GGUF block layout for q8_0 / q4_0, little-endian)."""
        return self.data.tobytes()

    @classmethod
    def frombytes(cls, dtype: RestDtype, shape: tuple[int, ...], buf: bytes) -> Packed:
        """Inverse of `tobytes`. Raises ValueError if ``buf`` is not the size ``shape`` needs."""
        want = packed_nbytes(dtype, shape)
        if len(buf) != want:
            raise ValueError(f"{dtype} codes of {shape}: want {want} bytes, got {len(buf)}")
        arr = np.frombuffer(buf, dtype=_storage(dtype))
        if dtype in (RestDtype.NONE, RestDtype.F16):
            arr = arr.reshape(shape)
        return cls(dtype, shape, arr.copy())  # frombuffer is read-only and pins ``buf``


_STORAGE: dict[RestDtype, np.dtype] = {
    RestDtype.NONE: np.dtype("<f4"),
    RestDtype.F16: np.dtype("<f2"),
    RestDtype.Q8_0: BLOCK_Q8_0,
    RestDtype.Q4_0: BLOCK_Q4_0,
}


def _storage(dtype: RestDtype) -> np.dtype:
    return _STORAGE[dtype]


def _n_blocks(shape: tuple[int, ...]) -> int:
    row = shape[-1] if shape else 1
    rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
    return rows * (-(-row // QK))


def packed_nbytes(dtype: RestDtype, shape: tuple[int, ...]) -> int:
    """Bytes an array of ``shape`` takes in ``dtype``."""
    if dtype in (RestDtype.NONE, RestDtype.F16):
        return int(np.prod(shape)) * _storage(dtype).itemsize
    return _n_blocks(shape) * _storage(dtype).itemsize


def _blocks(x: np.ndarray) -> np.ndarray:
    """``x`` as (n_blocks, QK) float32, each last-axis row zero-padded to a multiple of QK."""
    row = x.shape[-1]
    rows = x.reshape(-1, row)
    pad = -row % QK
    if pad:
        rows = np.concatenate([rows, np.zeros((rows.shape[0], pad), np.float32)], axis=1)
    return np.ascontiguousarray(rows, dtype=np.float32).reshape(-1, QK)


def _unblock(values: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    row = shape[-1]
    padded = row + (-row % QK)
    return values.reshape(-1, padded)[:, :row].reshape(shape)


def encode(x: np.ndarray, dtype: RestDtype) -> Packed:
    """Compress a float32 array (any shape, ``x.ndim >= 1``)."""
    shape = tuple(int(n) for n in x.shape)
    if dtype is RestDtype.NONE:
        return Packed(dtype, shape, np.array(x, dtype=np.float32, copy=True))
    if dtype is RestDtype.F16:
        return Packed(dtype, shape, x.astype(np.float16))
    b = _blocks(x)  # (N, QK)
    out = np.empty(b.shape[0], dtype=_storage(dtype))
    if dtype is RestDtype.Q8_0:
        d = (np.abs(b).max(axis=1) / 127.0).astype(np.float16)
        inv = _inverse(d)
        out["d"] = d
        out["qs"] = np.clip(np.rint(b * inv[:, None]), -127, 127).astype(np.int8)
    else:  # Q4_0, as ggml's quantize_row_q4_0_ref
        idx = np.abs(b).argmax(axis=1)
        m = b[np.arange(b.shape[0]), idx]
        d = (m / -8.0).astype(np.float16)
        inv = _inverse(d)
        q = np.minimum(15, np.trunc(b * inv[:, None] + 8.5)).astype(np.uint8)  # (N, QK)
        out["d"] = d
        out["qs"] = q[:, : QK // 2] | (q[:, QK // 2 :] << 4)
    return Packed(dtype, shape, out)


def _inverse(d: np.ndarray) -> np.ndarray:
    d32 = d.astype(np.float32)
    inv = np.zeros_like(d32)
    np.divide(1.0, d32, out=inv, where=d32 != 0)
    return inv


def decode(p: Packed, out: np.ndarray | None = None) -> np.ndarray:
    """The float32 array ``p`` holds (written into ``out`` if given, same shape)."""
    if p.dtype in (RestDtype.NONE, RestDtype.F16):
        values = p.data
    elif p.dtype is RestDtype.Q8_0:
        values = _unblock(p.data["qs"].astype(np.float32) * _scales(p.data), p.shape)
    else:
        qs = p.data["qs"]
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32) - 8.0
        values = _unblock(q * _scales(p.data), p.shape)
    if out is None:
        return np.array(values, dtype=np.float32, copy=True).reshape(p.shape)
    out[...] = values.reshape(p.shape)
    return out


def _scales(blocks: np.ndarray) -> np.ndarray:
    return blocks["d"].astype(np.float32)[:, None]


def error_bound(x: np.ndarray, dtype: RestDtype) -> np.ndarray:
    """Per value, the largest error `decode(encode(x))` may have (see the module docstring)."""
    if dtype is RestDtype.NONE:
        return np.zeros(x.shape, np.float32)
    if dtype is RestDtype.F16:
        rel: np.ndarray = (np.abs(x) * 2.0**-11 + 2.0**-24).astype(np.float32)
        return rel
    b = _blocks(x)
    amax = np.abs(b).max(axis=1, keepdims=True)
    # d rounded to f16 may exceed its exact value by 2**-11 relative: allow 0.1% over.
    step = amax / 127.0 / 2.0 if dtype is RestDtype.Q8_0 else amax / 8.0
    bound: np.ndarray = _unblock(np.broadcast_to(step * 1.001 + 1e-30, b.shape), x.shape)
    return bound
