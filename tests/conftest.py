"""Shared fixtures: the real default model (fetched once) and a tiny synthetic GGUF."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from kvroute.engine.model_store import fetch_default_model

if TYPE_CHECKING:
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
