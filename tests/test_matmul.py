"""Matmul by shape: every way computes the same product; the plan is measured once per host.

Which way wins is the host's business (the plan's log line shows it); these tests check that
every way is a correct product, that a plan picks the fastest way it measured, that the table
is cached and re-measured when the file is bad, and that a model gives the same logits
whatever way it multiplies.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tiny_gguf import write_tiny_gguf

from kvroute.engine import matmul as mm
from kvroute.engine.engine import Engine
from kvroute.engine.matmul import MAX_ROWS, WAYS, MatmulPlan
from kvroute.engine.weights_cache import CacheConfig


@pytest.mark.parametrize("way", WAYS)
def test_every_way_is_the_product(way: str) -> None:
    rng = np.random.default_rng(1)
    w = rng.standard_normal((48, 40), dtype=np.float32)
    for n in range(1, MAX_ROWS + 3):
        x = rng.standard_normal((n, 48), dtype=np.float32)
        got = mm.matmul(x, w, way)
        assert got.shape == (n, 40)
        np.testing.assert_allclose(got, x.astype(np.float64) @ w, rtol=1e-4, atol=1e-4)


def small_matrices() -> list[np.ndarray]:
    rng = np.random.default_rng(2)
    return [rng.standard_normal((64, 96), dtype=np.float32) for _ in range(3)]


def test_measured_plan_picks_the_fastest_way_it_timed() -> None:
    plan = mm.measure(small_matrices(), rounds=1)
    assert plan.source == "measured"
    assert len(plan.ways) == len(plan.ms) == MAX_ROWS
    for n, (way, ms) in enumerate(zip(plan.ways, plan.ms, strict=True), 1):
        assert way in ms and "gemm" in ms, f"{n} rows"
        fastest = min(ms.values())
        # gemm stays unless another way beats it by the margin; else the fastest is chosen.
        if way == "gemm":
            assert fastest >= mm.MARGIN * ms["gemm"]
        else:
            assert ms[way] == fastest
        if n % 4 == 0:
            assert "pad4" not in ms  # padding to 4 rows is plain gemm there
    assert f"1:{plan.ways[0]}" in plan.describe()


def test_plan_is_cached_and_a_bad_file_remeasured(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mats = small_matrices()
    first = mm.load_or_measure(mats, tmp_path)
    files = list(tmp_path.glob("matmul-*.json"))
    assert len(files) == 1 and first.source == "measured"

    def no_measuring(*_: object, **__: object) -> MatmulPlan:
        raise AssertionError("measured again although a valid table is cached")

    with monkeypatch.context() as m:
        m.setattr(mm, "measure", no_measuring)
        cached = mm.load_or_measure(mats, tmp_path)
    assert cached.ways == first.ways and cached.source.startswith("cached")
    # Other shapes are another table.
    mm.load_or_measure([np.ones((32, 32), np.float32)], tmp_path)
    assert len(list(tmp_path.glob("matmul-*.json"))) == 2

    for bad in ('{"format": 1, "ways": ["warp"], "ms": []}', "{not json", ""):
        files[0].write_text(bad)
        again = mm.load_or_measure(mats, tmp_path)
        assert again.source == "measured"
        assert MatmulPlan.from_json(json.loads(files[0].read_text()), "x").ways == again.ways


@pytest.mark.parametrize("way", WAYS)
def test_model_logits_do_not_depend_on_the_way(tmp_path: Path, way: str) -> None:
    e = Engine.load(write_tiny_gguf(tmp_path / "tiny.gguf"), weights=CacheConfig(enabled=False))
    prompts = [[5, 80, 81], [72, 79, 79, 82, 3], [100], [9, 9], [40, 41, 42]]

    def prefill_then_step() -> list[np.ndarray]:
        caches = [e.new_cache() for _ in prompts]
        first = e.forward(list(zip(caches, prompts, strict=True)))  # 14 rows, ragged
        return first + e.forward([(c, [7]) for c in caches])  # 5 rows

    base = prefill_then_step()
    e.model.mm = MatmulPlan((way,) * MAX_ROWS)
    for x, y in zip(base, prefill_then_step(), strict=True):
        assert float(np.max(np.abs(x - y))) < 1e-4


def test_no_place_to_keep_the_plan_means_no_measuring(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    for directory in (None, blocker / "weights"):
        plan = mm.load_or_measure(small_matrices(), directory)
        assert plan == MatmulPlan(), "measuring takes seconds: only where the table is kept"
