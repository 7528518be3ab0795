"""Weight matrices kept in their GGUF blocks (Q4_1, Q8_0), and the decode kernels that read them.

A decode step multiplies a few activation rows by every weight matrix, so it is bound by the
bytes it streams: float32 costs 4 bytes a weight, Q4_1 20 bytes per 32 and Q8_0 34 per 32. A
`QuantMatrix` keeps the file's own values, scales and mins, only transposed at load so that
consecutive bytes belong to consecutive *output* columns::

    Q4_1: q (nb, 16, M) uint8   byte j of block b: element j in the low nibble, j + 16 high
          d, m (nb, M) float32  the block's scale and min (the file's float16, widened)
    Q8_0: q (nb, 32, M) int8,  d (nb, M) float32

where ``nb = K / 32`` blocks run along the input dimension K. The kernels' inner loop then walks
M contiguous bytes with one activation value broadcast (SIMD across output columns, no
horizontal sums), accumulates a block's partial products in float32, and applies the block's
scale and min once per block: ``y[o] += d[b, o] * sum_j q[b, j, o] x[j] + m[b, o] * sum_j x[j]``.
Activations stay float32, so the product equals the dequantised float32 product up to the order
of additions. The kernels are compiled by numba (cached on disk after the first time); without
numba, `available` is False and the engine keeps its float32 path.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)

BLOCK = 32  # weights per block, both types
BLOCK_BYTES = {"Q4_1": 20, "Q8_0": 34}  # Q4_1: f16 d, f16 m, 16 bytes; Q8_0: f16 d, 32 int8
KINDS = tuple(BLOCK_BYTES)

_kernels: dict[str, Callable[..., None]] | None = None
_import_error: str | None = None


def _compile() -> dict[str, Callable[..., None]] | None:
    """The numba kernels, compiled on first use (None if numba cannot be imported)."""
    global _kernels, _import_error
    if _kernels is not None or _import_error is not None:
        return _kernels
    try:
        from numba import njit
    except ImportError as exc:  # an install without numba: the float32 path only
        _import_error = str(exc)
        logger.info("quantized decode kernels unavailable (%s)", exc)
        return None
    jit = njit(fastmath=True, boundscheck=False, error_model="numpy", nogil=True, cache=True)

    @jit
    def q4_1(x, xsum, q, d, m, out, tmp):  # type: ignore[no-untyped-def]
        n, (nb, _, cols) = x.shape[0], q.shape
        for r in range(n):
            for o in range(cols):
                out[r, o] = 0.0
        for b in range(nb):
            for r in range(n):
                for o in range(cols):
                    tmp[r, o] = 0.0
            for j in range(16):
                for r in range(n):
                    lo = x[r, b * 32 + j]
                    hi = x[r, b * 32 + 16 + j]
                    for o in range(cols):
                        v = q[b, j, o]
                        tmp[r, o] += np.float32(v & 15) * lo + np.float32(v >> 4) * hi
            for r in range(n):
                s = xsum[r, b]
                for o in range(cols):
                    out[r, o] += d[b, o] * tmp[r, o] + m[b, o] * s

    @jit
    def q8_0(x, q, d, out, tmp):  # type: ignore[no-untyped-def]
        n, (nb, _, cols) = x.shape[0], q.shape
        for r in range(n):
            for o in range(cols):
                out[r, o] = 0.0
        for b in range(nb):
            for r in range(n):
                for o in range(cols):
                    tmp[r, o] = 0.0
            for j in range(32):
                for r in range(n):
                    xj = x[r, b * 32 + j]
                    for o in range(cols):
                        tmp[r, o] += np.float32(q[b, j, o]) * xj
            for r in range(n):
                for o in range(cols):
                    out[r, o] += d[b, o] * tmp[r, o]

    _kernels = {"Q4_1": q4_1, "Q8_0": q8_0}
    return _kernels


def available() -> bool:
    """Whether the kernels can run here (numba imports); compiles them the first time."""
    return _compile() is not None


@dataclass(frozen=True)
class QuantMatrix:
    """A (K, M) weight matrix as transposed GGUF blocks (see the module docstring).

    ``y = x @ W`` for ``x`` of shape (N, K) is `matmul`; it multiplies exactly the weights the
    float32 copy holds (the file's blocks), without any gain or scale folded into that copy.
    """

    kind: str  # "Q4_1" or "Q8_0"
    q: np.ndarray
    d: np.ndarray
    m: np.ndarray | None = None  # Q4_1 only

    @property
    def shape(self) -> tuple[int, int]:
        """(K, M), like the float32 matrix it stands for."""
        return self.q.shape[0] * BLOCK, self.q.shape[2]

    @property
    def nbytes(self) -> int:
        return self.q.nbytes + self.d.nbytes + (self.m.nbytes if self.m is not None else 0)

    @classmethod
    def from_rows(cls, kind: str, rows: np.ndarray) -> QuantMatrix:
        """From the file's blocks: ``rows`` is (M, nb * block bytes) uint8, one output row each
        (the GGUF tensor's raw data, rows permuted or concatenated as the model needs)."""
        size = BLOCK_BYTES[kind]
        blocks = rows.reshape(rows.shape[0], -1, size)
        d = _widen(blocks[:, :, 0:2])
        if kind == "Q4_1":
            q = np.ascontiguousarray(blocks[:, :, 4:].transpose(1, 2, 0))
            return cls(kind, q, d, _widen(blocks[:, :, 2:4]))
        q = np.ascontiguousarray(blocks[:, :, 2:].view(np.int8).transpose(1, 2, 0))
        return cls(kind, q, d)

    def arrays(self, prefix: str) -> dict[str, np.ndarray]:
        """Named arrays to store (see `from_arrays`)."""
        out = {f"{prefix}.{self.kind}.q": self.q, f"{prefix}.{self.kind}.d": self.d}
        if self.m is not None:
            out[f"{prefix}.{self.kind}.m"] = self.m
        return out

    @classmethod
    def from_arrays(cls, prefix: str, arrays: Mapping[str, np.ndarray]) -> QuantMatrix | None:
        """Inverse of `arrays`; None if ``arrays`` holds no quantized copy under ``prefix``."""
        for kind in KINDS:
            q = arrays.get(f"{prefix}.{kind}.q")
            if q is not None:
                return cls(kind, q, arrays[f"{prefix}.{kind}.d"], arrays.get(f"{prefix}.{kind}.m"))
        return None

    def matmul(self, x: np.ndarray) -> np.ndarray:
        """``x @ W`` for float32 ``x`` of shape (N, K); returns (N, M) float32."""
        kernels = _compile()
        assert kernels is not None, "QuantMatrix.matmul without numba: check available() first"
        x = np.ascontiguousarray(x, dtype=np.float32)
        n, cols = x.shape[0], self.q.shape[2]
        out = np.empty((n, cols), np.float32)
        tmp = np.empty((n, cols), np.float32)
        if self.kind == "Q4_1":
            xsum = x.reshape(n, -1, BLOCK).sum(axis=2, dtype=np.float32)
            kernels["Q4_1"](x, xsum, self.q, self.d, self.m, out, tmp)
        else:
            kernels["Q8_0"](x, self.q, self.d, out, tmp)
        return out

    def dequantize(self) -> np.ndarray:
        """The (K, M) float32 matrix (for tests: what `matmul` multiplies by)."""
        if self.kind == "Q4_1":
            assert self.m is not None
            lo, hi = (self.q & 15).astype(np.float32), (self.q >> 4).astype(np.float32)
            vals = np.concatenate([lo, hi], axis=1)  # (nb, 32, M)
            w: np.ndarray = vals * self.d[:, None, :] + self.m[:, None, :]
        else:
            w = self.q.astype(np.float32) * self.d[:, None, :]
        return w.reshape(-1, w.shape[2])


def _widen(f16_bytes: np.ndarray) -> np.ndarray:
    """(M, nb, 2) uint8 little-endian float16 -> (nb, M) float32."""
    half: np.ndarray = np.ascontiguousarray(f16_bytes).view(np.float16)[:, :, 0]
    return np.ascontiguousarray(half.T, dtype=np.float32)
