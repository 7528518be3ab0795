"""Quantized decode kernels: the file's Q4_1 / Q8_0 blocks, re-laid in tiles, multiplied directly.

The tiles must hold exactly the weights gguf-py dequantises. The exact kernels must compute the
dequantised float32 product for any row count; the int8 kernels must compute llama.cpp's product
(activations quantised to int8 per 32-block, integer dot products), emulated here in float64.
A model must give the same logits and greedy tokens on its blocks as on float32 (exact), and
with the int8 kernels a prefill must compute a position as a decode step does, since a session's
cached KV is reused as if it had been prefilled.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from tiny_gguf import TinySpec, write_tiny_gguf

from kvroute.engine import quant
from kvroute.engine.engine import Engine
from kvroute.engine.matmul import Linear, MatmulPlan
from kvroute.engine.quant import QuantMatrix
from kvroute.engine.sampling import SamplingParams
from kvroute.engine.weights_cache import CacheConfig, cache_file

try:
    from kvroute.engine.kernels import ir
except ImportError:  # numba missing: only the layout is tested
    ir = None  # type: ignore[assignment]

EXACT = ir is not None and ir.exact_supported()
INT8 = ir is not None and ir.int8_supported()
needs_exact = pytest.mark.skipif(not EXACT, reason="this CPU lacks AVX2/FMA/F16C")
needs_int8 = pytest.mark.skipif(not INT8, reason="this CPU lacks AVX-512 VNNI")


def quantized(w: np.ndarray, kind: str) -> np.ndarray:
    """gguf-py's blocks of ``w`` (M, K): (M, bytes) uint8."""
    return gguf.quants.quantize(w, gguf.GGMLQuantizationType[kind])


def dequantized(raw: np.ndarray, kind: str) -> np.ndarray:
    """gguf-py's (K, M) float32 weights of the blocks."""
    return gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[kind]).T


@pytest.mark.parametrize("kind", quant.KINDS)
def test_tiles_hold_exactly_the_files_weights(kind: str) -> None:
    rng = np.random.default_rng(3)
    raw = quantized(rng.standard_normal((40, 96), dtype=np.float32), kind)  # 40: a partial tile
    q, ref = QuantMatrix.from_rows(kind, raw), dequantized(raw, kind)
    assert q.kind == kind and q.shape == ref.shape == (96, 40)
    assert q.tiles.shape == (3, 3, quant.TILE_BYTES[kind])
    assert np.array_equal(q.dequantize(), ref)
    ids = np.array([0, 39, 16, 5, 5])
    assert np.array_equal(q.columns(ids), ref[:, ids].T)
    stored = q.arrays("m")
    assert list(stored) == [f"m.{kind}"]
    again = QuantMatrix.from_arrays("m", stored, 40)
    assert again is not None and np.array_equal(again.dequantize(), ref)
    assert QuantMatrix.from_arrays("other", stored, 40) is None
    with pytest.raises(ValueError, match="do not hold"):
        QuantMatrix.from_arrays("m", stored, 64)


ROWS = (1, 2, 3, 5, 8, 9, 17)  # the kernels run up to 8 rows a pass: more take several


def random_blocks(
    kind: str, rng: np.random.Generator
) -> tuple[np.ndarray, QuantMatrix, np.ndarray]:
    """A random (160, 72) matrix's blocks: raw, as tiles, and gguf-py's dequantisation."""
    raw = quantized(rng.standard_normal((72, 160), dtype=np.float32), kind)
    return raw, QuantMatrix.from_rows(kind, raw), dequantized(raw, kind)


@needs_exact
@pytest.mark.parametrize("kind", quant.KINDS)
def test_exact_kernels_compute_the_dequantised_product(kind: str) -> None:
    from kvroute.engine.kernels import tiles

    rng = np.random.default_rng(4)
    _, q, ref = random_blocks(kind, rng)
    for n in ROWS:
        x = rng.standard_normal((n, 160), dtype=np.float32)
        got = tiles.matmul(x, q.tiles, q.cols, exact=True)
        assert got.shape == (n, 72) and got.dtype == np.float32
        np.testing.assert_allclose(got, x.astype(np.float64) @ ref, rtol=1e-4, atol=1e-4)


def llamacpp_product(x: np.ndarray, raw: np.ndarray, kind: str) -> np.ndarray:
    """llama.cpp's product in float64: x quantised per 32-block to int8 (its scale max|x| / 127,
    and scale * sum(q), each rounded to float16), multiplied by the blocks' integers and scales."""
    n = x.shape[0]
    xb = x.reshape(n, -1, 32).astype(np.float32)
    amax = np.abs(xb).max(axis=2)
    inv = np.divide(np.float32(127), amax, out=np.zeros_like(amax), where=amax > 0)
    xq = np.rint(xb * inv[..., None]).astype(np.int64)  # (n, nb, 32)
    scale = amax / np.float32(127)  # float32
    xs = scale.astype(np.float16).astype(np.float64)  # (n, nb)
    size = quant.BLOCK_BYTES[kind]
    blocks = raw.reshape(raw.shape[0], -1, size)  # (M, nb, bytes)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float64)  # (M, nb)
    if kind == "Q4_1":
        m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float64)
        nib = blocks[..., 4:].astype(np.int64)
        wq = np.concatenate([nib & 15, nib >> 4], axis=2)  # (M, nb, 32)
        xm = (scale * xq.sum(axis=2).astype(np.float32)).astype(np.float16).astype(np.float64)
        dot = np.einsum("nbj,mbj->nmb", xq, wq).astype(np.float64)
        return np.einsum("mb,nb,nmb->nm", d, xs, dot) + np.einsum("mb,nb->nm", m, xm)
    wq = blocks[..., 2:].view(np.int8).astype(np.int64)
    dot = np.einsum("nbj,mbj->nmb", xq, wq).astype(np.float64)
    return np.einsum("mb,nb,nmb->nm", d, xs, dot)


@needs_int8
@pytest.mark.parametrize("kind", quant.KINDS)
def test_int8_kernels_compute_llamacpps_product(kind: str) -> None:
    from kvroute.engine.kernels import tiles

    rng = np.random.default_rng(5)
    raw, q, ref = random_blocks(kind, rng)
    for n in ROWS:
        x = rng.standard_normal((n, 160), dtype=np.float32)
        x[0, :32] = 0.0  # an all-zero block has scale 0
        got = tiles.matmul(x, q.tiles, q.cols)
        want = llamacpp_product(x, raw, kind)
        scale = np.abs(want).max()
        assert float(np.abs(got - want).max()) < 1e-5 * scale, f"{n} rows"
        # ... which is the float32 product up to the activations' int8 rounding.
        assert float(np.abs(got - x @ ref).max()) < 3e-2 * scale


@needs_exact
def test_linear_applies_the_folds_the_float32_matrix_has() -> None:
    """The float32 matrix has the norm gain in its rows and a scale in its first columns; the
    blocks have neither, so the quantized product applies them outside the kernel."""
    rng = np.random.default_rng(6)
    raw = quantized(rng.standard_normal((64, 96), dtype=np.float32), "Q4_1")
    q, ref = QuantMatrix.from_rows("Q4_1", raw), dequantized(raw, "Q4_1")
    gain = rng.uniform(0.5, 1.5, 96).astype(np.float32)
    w = (ref * gain[:, None]).astype(np.float32)
    w[:, :16] *= 0.125
    lin = Linear(w, q, gain=gain, scale=0.125, scaled=16)
    x = rng.standard_normal((3, 96), dtype=np.float32)
    np.testing.assert_allclose(lin.quantized(x), x @ w, rtol=2e-4, atol=2e-4)
    # A plan multiplies a matrix that has blocks by the kernels, one without by BLAS.
    plan = MatmulPlan()
    assert np.array_equal(plan(x, lin), lin.quantized(x))
    np.testing.assert_allclose(plan(x, Linear(None, q)), x @ ref, rtol=2e-4, atol=2e-4)
    assert np.array_equal(plan(x, Linear(w)), x @ w)


def tiny_engine_in(kernels: str, path: Path) -> Engine:
    return Engine.load(path, weights=CacheConfig(enabled=False), kernels=kernels)


def prefill_then_steps(e: Engine) -> list[np.ndarray]:
    """Logits of a ragged 3-sequence prefill, then two batched decode steps."""
    prompts = [[5, 80, 81], [72, 79, 79, 82, 3], [100]]
    caches = [e.new_cache() for _ in prompts]
    out = e.forward(list(zip(caches, prompts, strict=True)))
    for t in (7, 9):
        out += e.forward([(c, [t]) for c in caches])
    return out


def greedy(e: Engine) -> list[int | None]:
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    return [p.token_id for p in e.generate([5, 80, 81, 72], params)]


@needs_exact
@pytest.mark.parametrize("kind", quant.KINDS)
def test_model_on_blocks_matches_float32(tmp_path: Path, kind: str) -> None:
    path = write_tiny_gguf(tmp_path / "tiny.gguf", TinySpec(matrix_type=kind))
    dense = tiny_engine_in("off", path)
    assert all(lin.q is None and lin.w is not None for lin in dense.model.matrices())
    e = tiny_engine_in("exact", path)
    assert all(lin.q is not None and lin.w is None for lin in e.model.matrices())
    for x, y in zip(prefill_then_steps(dense), prefill_then_steps(e), strict=True):
        assert float(np.max(np.abs(x - y))) < 1e-4
    assert greedy(e) == greedy(dense)


@needs_int8
def test_int8_model_computes_every_row_alike_and_close_to_float32(tmp_path: Path) -> None:
    """With the int8 kernels every product of a matrix with blocks takes them (no float32 copy
    is even held), and they compute each row alike whatever the batch; the logits are close
    to float32's, not equal (the activations are rounded to 8 bits)."""
    path = write_tiny_gguf(tmp_path / "tiny.gguf", TinySpec(matrix_type="Q4_1"))
    e = tiny_engine_in("int8", path)
    assert all(lin.w is None and lin.q is not None for lin in e.model.matrices())
    rng = np.random.default_rng(7)
    for lin in e.model.matrices():
        x = rng.standard_normal((11, lin.shape[0]), dtype=np.float32)
        alone = np.concatenate([lin.quantized(x[i : i + 1]) for i in range(11)])
        assert np.array_equal(lin.quantized(x), alone)
    ids = [5, 80, 81, 72, 79, 82, 3, 100, 9, 9, 40, 41]
    got = e.forward([(e.new_cache(), ids)], all_logits=True)[0]
    dense = tiny_engine_in("off", path)
    ref = dense.forward([(dense.new_cache(), ids)], all_logits=True)[0]
    assert float(np.max(np.abs(got - ref))) < 0.1 * float(np.abs(ref).max())


def test_mixed_types_are_not_fused_into_blocks(tmp_path: Path) -> None:
    """Q and K are Q8_0 but V is F16 in the default tiny model: the fused QKV matrix has no
    blocks (it stays float32), while all-Q8_0 gate/up and the tied head have them."""
    e = Engine.load(write_tiny_gguf(tmp_path / "tiny.gguf"), weights=CacheConfig(enabled=False))
    layer = e.model.layers[0]
    for lin in (layer.wqkv, layer.wo, layer.w_down):
        assert lin.q is None and lin.w is not None
    if quant.mode() is not None:
        assert layer.w_gate_up.q is not None and layer.w_gate_up.q.kind == "Q8_0"
        assert e.model.head.q is not None


@needs_exact
@pytest.mark.parametrize("kernels", ["exact", pytest.param("int8", marks=needs_int8)])
def test_cached_model_maps_its_blocks(tmp_path: Path, kernels: str) -> None:
    """Blocks go to the weights cache (of the form the kernels use) and come back mapped."""
    path = write_tiny_gguf(tmp_path / "tiny.gguf", TinySpec(matrix_type="Q4_1"))
    config = CacheConfig(directory=tmp_path / "weights", min_model_bytes=0)
    first = Engine.load(path, weights=config, kernels=kernels)
    second = Engine.load(path, weights=config, kernels=kernels)
    assert [p.name.split(".")[1] for p in config.directory.glob("*.kvw")] == ["tiles"]
    assert cache_file(config.directory, "x", "tiles").name == "x.tiles.kvw"
    q1, q2 = first.model.layers[1].wqkv.q, second.model.layers[1].wqkv.q
    assert q1 is not None and q2 is not None and q1.kind == "Q4_1"
    assert q2.exact == (kernels == "exact")
    assert isinstance(q2.tiles, np.memmap) and np.array_equal(q1.tiles, q2.tiles)
    assert second.model.layers[1].wqkv.w is None
    for x, y in zip(prefill_then_steps(first), prefill_then_steps(second), strict=True):
        assert np.array_equal(x, y)


def test_kernels_asked_for_resolve_to_what_runs_here() -> None:
    assert quant.mode("off") is None
    assert quant.mode("auto") == ("exact" if EXACT else None)
    assert quant.mode("int8") == ("int8" if INT8 else quant.mode("auto"))
    assert quant.mode("bogus") == quant.mode("auto")


@needs_exact
@pytest.mark.parametrize("kernels", ["exact", pytest.param("int8", marks=needs_int8)])
def test_loading_an_engine_compiles_its_kernels(tmp_path: Path, kernels: str) -> None:
    """The kernels are compiled (or loaded from numba's cache) by `Engine.load`, in a fresh
    process, so a worker's first turn never stalls on it."""
    path = write_tiny_gguf(tmp_path / "tiny.gguf", TinySpec(matrix_type="Q4_1"))
    product = "product_exact" if kernels == "exact" else "product"
    code = (
        "from kvroute.engine.engine import Engine\n"
        "from kvroute.engine.weights_cache import CacheConfig\n"
        "from kvroute.engine.kernels import tiles\n"
        f"Engine.load({str(path)!r}, weights=CacheConfig(enabled=False), kernels={kernels!r})\n"
        f"print(len(tiles.{product}.signatures))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) >= 1
