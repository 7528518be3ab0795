"""Weight matrices kept in their GGUF blocks (Q4_1, Q8_0), multiplied by the decode kernels.

A decode step multiplies a few activation rows by every weight matrix, so it is bound by the
bytes it streams: float32 costs 4 bytes a weight, Q4_1 20 bytes per 32 and Q8_0 34 per 32. A
`QuantMatrix` keeps the file's own values, scales and mins (as float16, exactly as stored),
re-laid in *tiles* of 16 output columns so that a vector register holds one value for each of
16 columns and no horizontal sums are needed (`kernels.ir`)::

    Q4_1: tiles (T, nb, 320) uint8, T = ceil(M / 16), nb = K / 32; per (tile t, block b):
          [0, 256)   4 groups g x 16 columns c x 4 bytes i: byte i of (g, c) is the file's
                     nibble byte 4g + i of column 16t + c, block b (low nibble: element
                     32b + 4g + i, high nibble: element 32b + 16 + 4g + i)
          [256, 288) the 16 columns' float16 scales d;  [288, 320) their float16 mins m
    Q8_0: tiles (T, nb, 544) uint8; per (t, b):
          [0, 512)   8 groups g x 16 columns x 4 bytes i: the file's int8 element 32b + 4g + i
                     plus 128, as uint8 (the dot-product instruction takes unsigned weights;
                     the kernel starts each dot product from -128 * sum(x) to undo it)
          [512, 544) the 16 columns' float16 scales d

Columns past M in the last tile are zero; the bytes per weight are the file's.

Which kernels run is `mode`: ``exact`` (float32 activations: the dequantised float32 product up
to the order of additions; needs AVX2, FMA and F16C), ``int8`` (activations quantised to int8 per
32-block as llama.cpp does, integer dot products; needs AVX-512 VNNI), or None (neither runs
here: the engine stays on float32). The default, ``auto``, is ``exact`` where it runs: every
product then equals the float32 one up to the order of additions, so a prefill and a decode
step compute a position alike (a session's cached KV is reused as if it had been prefilled),
and greedy output is the float32 engine's. ``int8`` is faster still, above all for batched
decode, and is llama.cpp's own arithmetic; but its rounding turns differences in the last
float32 bit into visible ones, so, as in llama.cpp, a position prefilled and the same position
decoded may differ slightly. Ask for it with ``$KVROUTE_QUANT=int8`` (or ``Engine.load(kernels=
"int8")``); ``off`` keeps float32.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)

BLOCK = 32  # weights per block, both types
BLOCK_BYTES = {"Q4_1": 20, "Q8_0": 34}  # Q4_1: f16 d, f16 m, 16 bytes; Q8_0: f16 d, 32 int8
KINDS = tuple(BLOCK_BYTES)
LANES = 16  # output columns per tile
TILE_BYTES = {"Q4_1": 320, "Q8_0": 544}  # per (tile, block)
ENV = "KVROUTE_QUANT"
ASKS = ("auto", "exact", "int8", "off")  # what may be asked for (see `mode`)

_resolved: dict[str, str | None] = {}


def mode(asked: str | None = None) -> str | None:
    """The kernels to use when ``asked`` for ``auto``, ``int8``, ``exact`` or ``off`` (None:
    ``$KVROUTE_QUANT``, default ``auto``): ``int8``, ``exact``, or None when none runs here or
    ``off`` was asked for (see the module docstring). A kernel this CPU cannot run is never
    returned: compiling it would abort the process."""
    asked = (asked if asked is not None else os.environ.get(ENV, "auto")).strip().lower()
    if asked not in _resolved:
        _resolved[asked] = _choose(asked)
    return _resolved[asked]


def _choose(asked: str) -> str | None:
    if asked == "off":
        return None
    if asked not in ASKS:
        logger.warning("kernels %r are not auto, int8, exact or off: using auto", asked)
        asked = "auto"
    try:
        from .kernels import ir
    except ImportError as exc:  # numba or llvmlite missing: the float32 path only
        logger.info("quantized decode kernels unavailable (%s)", exc)
        return None
    runs = {"int8": ir.int8_supported(), "exact": ir.exact_supported()}
    if asked != "auto" and not runs[asked]:
        # Compiling a kernel for a CPU that lacks its instructions would abort the process.
        logger.warning("kernels %s: this CPU lacks their instructions; using auto", asked)
        asked = "auto"
    if asked == "auto":
        return "exact" if runs["exact"] else None
    return asked


@dataclass(frozen=True)
class QuantMatrix:
    """A (K, M) weight matrix as tiles of GGUF blocks (see the module docstring).

    ``y = x @ W`` for ``x`` of shape (N, K) is `matmul`; it multiplies exactly the weights the
    float32 copy holds (the file's blocks), without any gain or scale folded into that copy.
    """

    kind: str  # "Q4_1" or "Q8_0"
    tiles: np.ndarray  # (T, nb, TILE_BYTES[kind]) uint8
    cols: int  # M
    exact: bool = True  # float32 activations (else int8: see `mode`)

    @property
    def shape(self) -> tuple[int, int]:
        """(K, M), like the float32 matrix it stands for."""
        return self.tiles.shape[1] * BLOCK, self.cols

    @property
    def nbytes(self) -> int:
        return int(self.tiles.nbytes)

    @classmethod
    def from_rows(cls, kind: str, rows: np.ndarray) -> QuantMatrix:
        """From the file's blocks: ``rows`` is (M, nb * block bytes) uint8, one output row each
        (the GGUF tensor's raw data, rows permuted or concatenated as the model needs)."""
        cols = rows.shape[0]
        blocks = rows.reshape(cols, -1, BLOCK_BYTES[kind])  # (M, nb, bytes)
        tiles = -(-cols // LANES)
        blocks = np.pad(blocks, ((0, tiles * LANES - cols), (0, 0), (0, 0)))
        nb = blocks.shape[1]
        # (T, c, nb, bytes) -> (T, nb, c, bytes): each tile's blocks together, columns inside.
        per_tile = blocks.reshape(tiles, LANES, nb, -1).transpose(0, 2, 1, 3)
        if kind == "Q4_1":
            values = per_tile[..., 4:]  # 16 nibble bytes
            scales = [per_tile[..., 0:2], per_tile[..., 2:4]]
        else:
            values = per_tile[..., 2:] ^ np.uint8(0x80)  # int8 + 128 as uint8
            scales = [per_tile[..., 0:2]]
        groups = values.shape[-1] // 4
        # (T, nb, c, g, i) -> (T, nb, g, c, i): 4 bytes of one column in each 32-bit lane.
        lanes = values.reshape(tiles, nb, LANES, groups, 4).transpose(0, 1, 3, 2, 4)
        parts = [lanes.reshape(tiles, nb, -1)] + [s.reshape(tiles, nb, -1) for s in scales]
        return cls(kind, np.ascontiguousarray(np.concatenate(parts, axis=2)), cols)

    def arrays(self, prefix: str) -> dict[str, np.ndarray]:
        """Named arrays to store (see `from_arrays`)."""
        return {f"{prefix}.{self.kind}": self.tiles}

    @classmethod
    def from_arrays(
        cls, prefix: str, arrays: Mapping[str, np.ndarray], cols: int, exact: bool = True
    ) -> QuantMatrix | None:
        """Inverse of `arrays` for a matrix of ``cols`` output columns, to be multiplied by the
        ``exact`` or the int8 kernels; None if ``arrays`` holds no blocks under ``prefix``.
        ValueError if they do not fit ``cols``."""
        for kind in KINDS:
            tiles = arrays.get(f"{prefix}.{kind}")
            if tiles is not None:
                fits = (-(-cols // LANES), TILE_BYTES[kind])
                if tiles.ndim != 3 or (tiles.shape[0], tiles.shape[2]) != fits:
                    raise ValueError(f"{prefix}: tiles {tiles.shape} do not hold {cols} columns")
                return cls(kind, tiles, cols, exact)
        return None

    def matmul(self, x: np.ndarray) -> np.ndarray:
        """``x @ W`` for float32 ``x`` of shape (N, K); returns (N, M) float32. Call it only
        where `mode` says the kernels run (``exact``; or ``int8`` if the matrix is not exact)."""
        from .kernels import tiles

        return tiles.matmul(x, self.tiles, self.cols, exact=self.exact)

    def dequantize(self) -> np.ndarray:
        """The (K, M) float32 matrix the blocks hold (what `matmul` multiplies by)."""
        w = _dequantize(self.kind, self.tiles)  # (T, nb, 16, 32)
        tiles, nb = w.shape[:2]
        full = w.transpose(1, 3, 0, 2).reshape(nb * BLOCK, tiles * LANES)
        return np.ascontiguousarray(full[:, : self.cols])

    def columns(self, ids: np.ndarray) -> np.ndarray:
        """Columns ``ids`` as rows, (len(ids), K) float32 (a tied embedding's lookup)."""
        ids = np.asarray(ids, dtype=np.int64)
        w = _dequantize(self.kind, self.tiles[ids // LANES])  # (n, nb, 16, 32)
        picked = w[np.arange(len(ids)), :, ids % LANES]  # (n, nb, 32)
        return np.ascontiguousarray(picked.reshape(len(ids), -1))


def _dequantize(kind: str, tiles: np.ndarray) -> np.ndarray:
    """Tiles (T, nb, bytes) -> float32 weights (T, nb, 16 columns, 32 elements)."""
    count, nb, _ = tiles.shape
    groups = 4 if kind == "Q4_1" else 8
    lanes = tiles[..., : groups * LANES * 4].reshape(count, nb, groups, LANES, 4)
    values = lanes.transpose(0, 1, 3, 2, 4).reshape(count, nb, LANES, -1)  # (T, nb, c, .)
    half = np.ascontiguousarray(tiles[..., groups * LANES * 4 :]).view(np.float16)
    d = half[..., :LANES].astype(np.float32)[..., None]  # (T, nb, c, 1)
    if kind == "Q4_1":
        low, high = (values & 15).astype(np.float32), (values >> 4).astype(np.float32)
        mins = half[..., LANES:, None].astype(np.float32)
        w: np.ndarray = np.concatenate([low, high], axis=3) * d + mins
    else:
        w = (values ^ np.uint8(0x80)).view(np.int8).astype(np.float32) * d
    return w
