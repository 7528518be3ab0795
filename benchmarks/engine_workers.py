"""Engine processes for `engine.py`: summed PSS of several against one (whole processes, and the
weights file's pages alone), and the start-up of a worker when the weights cache is present.

Each process imports what a worker imports, so its own memory (interpreter, numpy, ZeroMQ,
tokenizer, and numba when the kernels run) is counted as a worker's is."""

from __future__ import annotations

import multiprocessing as mp
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from kvroute.engine.engine import Engine
from kvroute.engine.model_store import weights_dir
from kvroute.engine.weights_cache import CacheConfig

MIB = 1 << 20
WORKERS = 4


def engine_process(
    model: Path, weights: CacheConfig, kernels: str, started: float, conn: Any
) -> None:
    """A spawned stand-in for a worker: load, run a few decode steps, report, wait to exit."""
    import kvroute.worker.service  # noqa: F401  (a worker's imports, counted in its PSS)

    t0 = time.perf_counter()
    engine = Engine.load(model, weights=weights, kernels=kernels)
    load_s = time.perf_counter() - t0
    t_loaded = time.monotonic()
    cache = engine.new_cache()
    logits = engine.prefill(cache, list(range(100, 132)))  # any ids: it only touches pages
    for _ in range(4):  # every weight page touched, as in a serving worker
        logits = engine.forward([(cache, [int(np.argmax(logits))])])[0]
    conn.send({"startup_s": t_loaded - started, "load_s": load_s})
    conn.recv()  # exit when told


def pss_mib(pid: int) -> float:
    """Proportional set size: shared pages divided among the processes that map them."""
    return psutil.Process(pid).memory_full_info().pss / MIB


def weights_pss_mib(pid: int, directory: Path) -> float:
    """The part of ``pid``'s PSS that maps the weights cache files in ``directory``."""
    where = str(directory)
    return sum(m.pss for m in psutil.Process(pid).memory_maps() if m.path.startswith(where)) / MIB


def measure_workers(model: Path, weights: CacheConfig, kernels: str) -> dict[str, Any]:
    """PSS of 1 and of ``WORKERS`` engine processes running ``kernels`` (which picks the form of
    the weights they map, see `llama_weights.form_for`), and the start-up with the cache present.

    Runs before this process loads the model, so no page is shared with the measuring process;
    ``weights`` is a directory of this run's own, so none is shared with other processes on the
    host that map the usual cache either.
    """
    ctx = mp.get_context("spawn")
    procs: list[tuple[Any, Any]] = []

    def start() -> dict[str, Any]:
        parent, child = ctx.Pipe()
        p = ctx.Process(
            target=engine_process, args=(model, weights, kernels, time.monotonic(), child)
        )
        p.start()
        procs.append((p, parent))
        return parent.recv()

    def stop_all() -> None:
        for p, conn in procs:
            conn.send("exit")
            p.join(30)
        procs.clear()

    try:
        first = start()  # builds the weights cache and matmul plan if this host has none
        stop_all()
        second = start()  # a worker starting with the cache present
        assert weights.directory is not None
        one = pss_mib(procs[0][0].pid)
        one_weights = weights_pss_mib(procs[0][0].pid, weights.directory)
        for _ in range(WORKERS - 1):
            start()
        each = [pss_mib(p.pid) for p, _ in procs]
        each_weights = [weights_pss_mib(p.pid, weights.directory) for p, _ in procs]
    finally:
        stop_all()
    return {
        "kernels": kernels,
        "first_worker_startup_s": round(first["startup_s"], 2),
        "second_worker_startup_s": round(second["startup_s"], 2),
        "second_worker_load_s": round(second["load_s"], 2),
        "pss_1_worker_mib": round(one, 1),
        f"pss_{WORKERS}_workers_mib": [round(v, 1) for v in each],
        "pss_4_vs_1": round(sum(each) / one, 3),
        # The weights file alone: one copy however many map it, so about 1.0.
        "weights_pss_1_worker_mib": round(one_weights, 1),
        f"weights_pss_{WORKERS}_workers_mib": round(sum(each_weights), 1),
        "weights_pss_4_vs_1": round(sum(each_weights) / one_weights, 3),
    }


def private_cache(directory: Path) -> CacheConfig:
    """A weights cache in ``directory`` holding only the host's matmul plans (they depend on the
    host, not on the file), so the first worker builds the weights but measures no plan."""
    for plan in weights_dir().glob("matmul-*.json"):
        shutil.copy(plan, directory)
    return CacheConfig(directory=directory)
