"""Quantized decode kernels: the file's Q4_1 / Q8_0 blocks, transposed, multiplied directly.

The kernels must multiply exactly the weights the float32 path dequantises (gguf-py's own
dequantisation is the reference), for any row count, and a model must give the same logits and
the same greedy tokens whichever path a plan picks.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
from tiny_gguf import TinySpec, write_tiny_gguf

from kvroute.engine import quant
from kvroute.engine.engine import Engine
from kvroute.engine.matmul import MAX_ROWS, Linear, MatmulPlan
from kvroute.engine.quant import QuantMatrix
from kvroute.engine.sampling import SamplingParams
from kvroute.engine.weights_cache import CacheConfig

pytestmark = pytest.mark.skipif(not quant.available(), reason="numba is not installed")


def blocks_of(w: np.ndarray, kind: str) -> tuple[QuantMatrix, np.ndarray]:
    """``w`` (M, K) quantized by gguf-py: our matrix, and gguf-py's (K, M) dequantisation."""
    qtype = gguf.GGMLQuantizationType[kind]
    raw = gguf.quants.quantize(w, qtype)
    return QuantMatrix.from_rows(kind, raw), gguf.quants.dequantize(raw, qtype).T


@pytest.mark.parametrize("kind", quant.KINDS)
def test_blocks_hold_exactly_the_files_weights(kind: str) -> None:
    rng = np.random.default_rng(3)
    q, ref = blocks_of(rng.standard_normal((40, 96), dtype=np.float32), kind)
    assert q.kind == kind and q.shape == ref.shape == (96, 40)
    assert np.array_equal(q.dequantize(), ref)
    stored = q.arrays("m")
    assert all(name.startswith(f"m.{kind}.") for name in stored)
    again = QuantMatrix.from_arrays("m", stored)
    assert again is not None and np.array_equal(again.dequantize(), ref)
    assert QuantMatrix.from_arrays("other", stored) is None


@pytest.mark.parametrize("kind", quant.KINDS)
def test_kernels_compute_the_dequantised_product_for_any_row_count(kind: str) -> None:
    rng = np.random.default_rng(4)
    q, ref = blocks_of(rng.standard_normal((72, 160), dtype=np.float32), kind)
    for n in (1, 2, 3, 5, 8, 17):
        x = rng.standard_normal((n, 160), dtype=np.float32)
        got = q.matmul(x)
        assert got.shape == (n, 72) and got.dtype == np.float32
        np.testing.assert_allclose(got, x.astype(np.float64) @ ref, rtol=2e-4, atol=2e-4)


def test_linear_applies_the_folds_the_float32_matrix_has() -> None:
    """The float32 matrix has the norm gain in its rows and a scale in its first columns; the
    blocks have neither, so the quantized product applies them outside the kernel."""
    rng = np.random.default_rng(5)
    q, ref = blocks_of(rng.standard_normal((64, 96), dtype=np.float32), "Q4_1")
    gain = rng.uniform(0.5, 1.5, 96).astype(np.float32)
    w = (ref * gain[:, None]).astype(np.float32)
    w[:, :16] *= 0.125
    lin = Linear(w, q, gain=gain, scale=0.125, scaled=16)
    x = rng.standard_normal((3, 96), dtype=np.float32)
    np.testing.assert_allclose(lin.quantized(x), x @ w, rtol=2e-4, atol=2e-4)
    plan = MatmulPlan(("quant",) * MAX_ROWS)
    np.testing.assert_allclose(plan(x, lin), x @ w, rtol=2e-4, atol=2e-4)
    # A matrix with no blocks takes the float32 way whatever the plan says.
    assert np.array_equal(plan(x, Linear(w)), x @ w)


@pytest.mark.parametrize("kind", quant.KINDS)
def test_model_on_blocks_matches_the_float32_path(tmp_path: Path, kind: str) -> None:
    path = write_tiny_gguf(tmp_path / "tiny.gguf", TinySpec(matrix_type=kind))
    e = Engine.load(path, weights=CacheConfig(enabled=False))
    assert all(lin.q is not None and lin.q.kind in (kind, "Q8_0") for lin in e.model.matrices())
    prompts = [[5, 80, 81], [72, 79, 79, 82, 3], [100]]

    def run() -> list[np.ndarray]:
        caches = [e.new_cache() for _ in prompts]
        first = e.forward(list(zip(caches, prompts, strict=True)))
        return first + e.forward([(c, [7]) for c in caches])

    def greedy() -> list[int | None]:
        params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
        return [p.token_id for p in e.generate([5, 80, 81, 72], params)]

    e.model.mm = MatmulPlan(("gemm",) * MAX_ROWS)
    base, base_tokens = run(), greedy()
    e.model.mm = MatmulPlan(("quant",) * MAX_ROWS)
    for x, y in zip(base, run(), strict=True):
        assert float(np.max(np.abs(x - y))) < 1e-4
    assert greedy() == base_tokens


def test_mixed_types_are_not_fused_into_blocks(tmp_path: Path) -> None:
    """Q and K are Q8_0 but V is F16 in the default tiny model: the fused QKV matrix has no
    blocks (it takes the float32 way), while all-Q8_0 gate/up and the tied head do."""
    e = Engine.load(write_tiny_gguf(tmp_path / "tiny.gguf"), weights=CacheConfig(enabled=False))
    layer = e.model.layers[0]
    assert layer.wqkv.q is None and layer.wo.q is None and layer.w_down.q is None
    assert layer.w_gate_up.q is not None and layer.w_gate_up.q.kind == "Q8_0"
    assert e.model.head.q is not None


def test_cached_model_maps_its_blocks(tmp_path: Path) -> None:
    """Blocks go to the weights cache with the float32 arrays and come back mapped."""
    path = write_tiny_gguf(tmp_path / "tiny.gguf", TinySpec(matrix_type="Q4_1"))
    config = CacheConfig(directory=tmp_path / "weights", min_model_bytes=0)
    first = Engine.load(path, weights=config)
    second = Engine.load(path, weights=config)
    q1, q2 = first.model.layers[1].wqkv.q, second.model.layers[1].wqkv.q
    assert q1 is not None and q2 is not None and q1.kind == "Q4_1"
    assert isinstance(q2.q, np.memmap)
    assert np.array_equal(q1.q, q2.q) and np.array_equal(q1.d, q2.d)
