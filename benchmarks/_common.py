"""Helpers shared by the benchmark scripts: BLAS threads, model path, reference figures, medians,
best-of timings, short follow-up turns."""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REFERENCE = Path(__file__).resolve().parent.parent / "tests" / "data" / "llamacpp_speed.json"
SHORT_TURNS = [
    "Tell me one more fact.",
    "Why is that?",
    "Give a short example.",
    "And what else?",
    "Say it differently.",
]


def limit_blas_threads(n: int = 1) -> None:
    """Pin BLAS to ``n`` threads (call before heavy numpy work), like a worker does."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(n)
    os.environ["OMP_NUM_THREADS"] = str(n)


def llamacpp_reference() -> dict[str, Any]:
    """llama.cpp's figures as recorded with the test data (see tests/data/README.md)."""
    return json.loads(REFERENCE.read_text())


def p50(xs: list[float]) -> float:
    """The median of ``xs``."""
    return statistics.median(xs)


def best_of(n: int, run: Callable[[], float]) -> float:
    """Smallest of ``n`` timings: the least disturbed run is the closest to the machine's speed."""
    return min(run() for _ in range(n))


def seconds(op: Callable[[], object]) -> float:
    """Wall time of one call of ``op``."""
    t0 = time.perf_counter()
    op()
    return time.perf_counter() - t0


def emit(report: dict[str, Any], path: Path | None) -> None:
    """Print the report as one JSON object, and write it to ``path`` too if given."""
    text = json.dumps(report, indent=1)
    print(text)
    sys.stdout.flush()
    if path is not None:
        path.write_text(text + "\n")
