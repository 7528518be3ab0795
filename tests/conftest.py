"""Shared fixtures: the real default model (fetched once) and a tiny synthetic GGUF."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from threadpoolctl import threadpool_limits

from kvroute.engine.model_store import fetch_default_model

if TYPE_CHECKING:
    from service_harness import Harness

    from kvroute.engine.engine import Engine


@pytest.fixture(scope="session")
def model_path() -> Path:
    """Path of the default SmolLM2-135M-Instruct Q4_1 GGUF (fetched on first use)."""
    return fetch_default_model()


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random llama GGUF with a byte-level vocabulary (see tests/tiny_gguf.py)."""
    from tiny_gguf import write_tiny_gguf

    return write_tiny_gguf(tmp_path_factory.mktemp("tiny") / "tiny.gguf")


@pytest.fixture(scope="session")
def engine(model_path: Path) -> Engine:
    """The default model loaded once per session (~4 s: every weight is dequantised to f32).

    Tests share it, so each must use its own caches (`Engine.new_cache`) and leave the engine
    itself unchanged.
    """
    from kvroute.engine.engine import Engine

    return Engine.load(model_path)


@pytest.fixture(scope="session")
def tiny_engine(tiny_model_path: Path) -> Engine:
    """The tiny synthetic model loaded once per session (milliseconds)."""
    from kvroute.engine.engine import Engine

    return Engine.load(tiny_model_path)


@pytest.fixture(scope="session", autouse=True)
def single_blas_thread() -> Iterator[None]:
    """Run BLAS on one thread for the whole test session.

    On a machine with few cores OpenBLAS's second thread helps little even when the machine is
    idle, and as soon as another CPU-bound process runs (a parallel test run, a worker) its
    threads wait on each other for whole scheduler slices, making a decode step many times
    slower. One thread keeps test durations stable.
    """
    with threadpool_limits(limits=1):
        yield


@pytest.fixture
def tiny_service(tiny_engine: Engine) -> Iterator[Harness]:
    """Broker + 2 worker threads (w0, w1) serving the tiny model; yields the harness."""
    from service_harness import start_harness

    harness = start_harness(tiny_engine, 2)
    try:
        yield harness
    finally:
        harness.close()
