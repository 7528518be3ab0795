"""Matrix products chosen by shape: per number of rows, the way measured fastest on this host.

A decode step multiplies a few activation rows (one per sequence in the batch) by every weight
matrix. BLAS is not uniformly good at that: a one-row product is a GEMV that streams the matrix
once at memory speed, while a 2..7-row SGEMM first packs the whole matrix into its own panel
layout and can cost several times as much as one GEMV; and padding the rows up to the kernel's
unroll width helps on some BLAS builds and hurts on others. So rather than guessing, `measure`
times each way for 1..`MAX_ROWS` rows on the model's own matrices (several layers, well beyond
the CPU caches, as a decode step sees them) and `MatmulPlan` applies the winner. The table is
cached per host, BLAS build and matrix shapes (`load_or_measure`), since measuring takes a few
seconds; delete the file to measure again.

Ways:

- ``gemm``: one BLAS product of all rows (GEMV for one row).
- ``rows``: one GEMV per row; a matrix wider than ``ROWS_BLOCK_BYTES`` is done a column block
  at a time, so that only the first row's GEMV reads the block from memory and the others find
  it in the cache.
- ``pad4`` / ``pad8``: zero rows appended up to a multiple of 4 / 8, then one SGEMM.

All of this is for float32 matrices. A matrix kept as the file's Q4_1 / Q8_0 blocks (`Linear.q`,
where the quantized kernels run: see `quant`) always takes the kernels, at every row count:
they beat BLAS at each one measured here, from 1 row to a 512-token prefill chunk.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .durable import write_atomic
from .quant import QuantMatrix
from .weights_cache import locked

logger = logging.getLogger(__name__)

MAX_ROWS = 16  # row counts above this always use gemm
WAYS = ("gemm", "rows", "pad4", "pad8")
PLAN_FORMAT = 1
MEASURE_BYTES = 64 << 20  # matrices timed per pass: beyond the last-level cache, like a step
MEASURE_ROUNDS = 5  # interleaved rounds; the fastest of each way counts
ROWS_BLOCK_BYTES = 4 << 20  # "rows" walks wider matrices in column blocks that stay cached
MARGIN = 0.9  # another way replaces gemm only if at least 10% faster: timing noise is no reason


def matmul(x: np.ndarray, w: np.ndarray, way: str) -> np.ndarray:
    """``x @ w`` for ``x`` of shape (N, K), computed the given way; returns (N, M)."""
    n = x.shape[0]
    y: np.ndarray  # numpy types ``@`` on untyped arrays as Any
    if way == "gemm" or n == 1:
        y = x @ w
        return y
    if way == "rows":
        out = np.empty((n, w.shape[1]), dtype=np.result_type(x, w))
        step = max(64, ROWS_BLOCK_BYTES // (w.shape[0] * w.itemsize))
        for c in range(0, w.shape[1], step):
            block = w[:, c : c + step]  # rows 2..n read it from cache, not memory
            for i in range(n):
                np.matmul(x[i], block, out=out[i, c : c + step])
        return out
    to = int(way.removeprefix("pad"))
    pad = -n % to
    y = x @ w if not pad else (np.concatenate([x, np.zeros((pad, x.shape[1]), x.dtype)]) @ w)[:n]
    return y


@dataclass(frozen=True)
class Linear:
    """One weight matrix, as float32 ``w`` or as the file's blocks ``q`` (for the kernels).

    ``w`` is the (K, M) float32 matrix with the model's folds applied: the gain of the norm
    before it scales its rows, and ``scale`` its first ``scaled`` columns. ``q`` is the same
    matrix as the file stores it, without the folds (they would not survive requantising), so
    `quantized` applies them to the activations and the result instead.
    """

    w: np.ndarray | None
    q: QuantMatrix | None = None
    gain: np.ndarray | None = None  # (K,)
    scale: float = 1.0
    scaled: int = 0

    @property
    def shape(self) -> tuple[int, int]:
        """(K, M)."""
        if self.w is not None:
            return self.w.shape[0], self.w.shape[1]
        assert self.q is not None, "a Linear holds w or q"
        return self.q.shape

    def quantized(self, x: np.ndarray) -> np.ndarray:
        """``x @ w`` through the quantized kernels (``q`` must be set)."""
        assert self.q is not None
        y = self.q.matmul(x if self.gain is None else x * self.gain)
        if self.scaled:
            y[:, : self.scaled] *= self.scale
        return y

    def columns(self, ids: np.ndarray) -> np.ndarray:
        """Columns ``ids`` of the matrix as rows, (len(ids), K) float32: a tied embedding's
        lookup (it has no folds)."""
        if self.q is not None:
            assert self.gain is None and not self.scaled
            return self.q.columns(ids)
        assert self.w is not None
        return np.ascontiguousarray(self.w[:, ids].T)


@dataclass(frozen=True)
class MatmulPlan:
    """The way to multiply for each row count 1..MAX_ROWS (``ways[n - 1]``), and its timings.

    ``ms[n - 1]`` maps each way measured for ``n`` rows to its milliseconds per pass over the
    timed matrices (empty when the plan was not measured).
    """

    ways: tuple[str, ...] = ("gemm",) * MAX_ROWS
    ms: tuple[dict[str, float], ...] = ()
    source: str = "default"

    def way(self, n: int) -> str:
        """The way to use for ``n`` rows."""
        return self.ways[n - 1] if n <= len(self.ways) else "gemm"

    def __call__(self, x: np.ndarray, lin: Linear) -> np.ndarray:
        """``x @ lin``: by the kernels if it has blocks, else the planned way for the rows."""
        if lin.q is not None:
            return lin.quantized(x)
        assert lin.w is not None
        return matmul(x, lin.w, self.way(x.shape[0]))

    def describe(self) -> str:
        """One line for the log: per row count, the way and its ms relative to gemm."""
        cells = []
        for n, way in enumerate(self.ways, 1):
            t = self.ms[n - 1] if n <= len(self.ms) else {}
            if way in t and "gemm" in t and way != "gemm":
                cells.append(f"{n}:{way} {t[way]:.0f}/{t['gemm']:.0f}ms")
            elif way in t:
                cells.append(f"{n}:{way} {t[way]:.0f}ms")
            else:
                cells.append(f"{n}:{way}")
        return f"matmul plan ({self.source}; way ms vs gemm ms per pass): " + " ".join(cells)

    def to_json(self) -> dict[str, object]:
        return {"format": PLAN_FORMAT, "ways": list(self.ways), "ms": list(self.ms)}

    @classmethod
    def from_json(cls, data: dict[str, object], source: str) -> MatmulPlan:
        """Inverse of `to_json`; ValueError if malformed."""
        ways = data.get("ways")
        ms = data.get("ms")
        if (
            data.get("format") != PLAN_FORMAT
            or not isinstance(ways, list)
            or len(ways) != MAX_ROWS
            or any(w not in WAYS for w in ways)
            or not isinstance(ms, list)
        ):
            raise ValueError("malformed matmul plan")
        return cls(tuple(ways), tuple(dict(t) for t in ms), source)


def _timed(op: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    op()
    return (time.perf_counter() - t0) * 1e3


def measure(weights: Sequence[np.ndarray], rounds: int = MEASURE_ROUNDS) -> MatmulPlan:
    """Time every way for 1..MAX_ROWS rows over ``weights`` (all (K, M) float32 matrices).

    Only as many matrices as make `MEASURE_BYTES` are used. ``rows`` stops being tried once it
    is clearly beaten: its cost grows linearly with the row count, gemm's far more slowly.
    """
    mats: list[np.ndarray] = []
    for w in weights:
        if sum(m.nbytes for m in mats) >= MEASURE_BYTES:
            break
        mats.append(w)
    rng = np.random.default_rng(0)
    inputs = {
        k: rng.standard_normal((MAX_ROWS, k), dtype=np.float32) for k in {m.shape[0] for m in mats}
    }

    def one_pass(n: int, way: str) -> float:
        return _timed(lambda: [matmul(inputs[m.shape[0]][:n], m, way) for m in mats])

    best: list[dict[str, float]] = [{} for _ in range(MAX_ROWS)]
    try_rows = True
    for n in range(1, MAX_ROWS + 1):
        ways = ["gemm"]
        if n > 1 and try_rows:
            ways.append("rows")
        ways += [w for w in ("pad4", "pad8") if n % int(w[3:])]
        for _ in range(rounds):  # interleaved, so a burst of load hits every way alike
            for way in ways:
                t = one_pass(n, way)
                best[n - 1][way] = min(best[n - 1].get(way, t), t)
        times = best[n - 1]
        if "rows" in times and times["rows"] > 1.5 * min(times.values()):
            try_rows = False
    ways_chosen = tuple(_winner(t) for t in best)
    rounded = tuple({w: round(v, 2) for w, v in t.items()} for t in best)
    return MatmulPlan(ways_chosen, rounded, "measured")


def _winner(ms: dict[str, float]) -> str:
    fastest = min(ms, key=lambda w: ms[w])
    return fastest if ms[fastest] < MARGIN * ms["gemm"] else "gemm"


def host_key(weights: Sequence[np.ndarray]) -> str:
    """What a measured plan depends on: CPU, BLAS build and threads, numpy, matrix shapes."""
    from threadpoolctl import threadpool_info

    cpu: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            cpu.setdefault(key.strip(), value.strip())
    blas = [
        {k: i.get(k) for k in ("internal_api", "version", "architecture", "num_threads")}
        for i in threadpool_info()
    ]
    shapes = sorted({tuple(w.shape) for w in weights})
    cpu_id = [cpu.get("model name"), cpu.get("flags")]
    ident = json.dumps([platform.machine(), cpu_id, blas, np.__version__, shapes], sort_keys=True)
    return hashlib.sha256(ident.encode()).hexdigest()[:16]


def plan_for(weights: Sequence[Linear], directory: Path | None) -> MatmulPlan:
    """The plan for the float32 products among a model's matrices (`load_or_measure` on them);
    the default plan if every matrix has blocks (there is nothing to measure)."""
    dense = [lin.w for lin in weights if lin.q is None and lin.w is not None]
    if not dense:
        return MatmulPlan(source="quantized kernels for every matrix")
    return load_or_measure(dense, directory)


def load_or_measure(weights: Sequence[np.ndarray], directory: Path | None) -> MatmulPlan:
    """The cached plan for this host and these shapes, or measure it and cache it.

    Measuring takes seconds, so it is done only where the table can be kept: with
    ``directory`` None, or one that cannot be written, the default plan (gemm) is used.
    """
    if directory is None:
        return MatmulPlan()
    path = directory / f"matmul-{host_key(weights)}.json"
    with contextlib.suppress(OSError, ValueError):
        return MatmulPlan.from_json(json.loads(path.read_text()), f"cached {path.name}")
    plan: MatmulPlan | None = None
    try:
        directory.mkdir(parents=True, exist_ok=True)
        # Two workers starting together would measure at the same time and spoil each other's
        # timings: one measures, the other waits and reads its table.
        with locked(path):
            with contextlib.suppress(OSError, ValueError):
                return MatmulPlan.from_json(json.loads(path.read_text()), f"cached {path.name}")
            plan = measure(weights)
            write_atomic(path, json.dumps(plan.to_json()).encode())
            return plan
    except OSError as exc:
        logger.warning("cannot keep the matmul plan in %s (%s)", directory, exc)
        return plan if plan is not None else MatmulPlan()
