"""The bench plot's helpers: 1-2-5 ticks, the throughput average, the title, tick labels."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from kvroute.bench.metrics import TurnRecord, summarize
from kvroute.bench.plot import PlotInfo, _turn_label, moving_average, ticks_125, write_plot


@pytest.mark.parametrize(
    ("lo", "hi", "want"),
    [
        (80, 1400, [50, 100, 200, 500, 1000, 2000]),
        (95, 130, [50, 100, 200]),
        (3.2, 9.0, [2, 5, 10]),
    ],
)
def test_ticks_are_1_2_5_and_cover_the_range(lo: float, hi: float, want: list[float]) -> None:
    ticks = ticks_125(lo, hi)
    assert ticks == pytest.approx(want)
    assert ticks[0] <= lo and ticks[-1] >= hi
    for t in ticks:
        mantissa = t / 10 ** math.floor(math.log10(t))
        assert round(mantissa, 6) in (1, 2, 5)


def test_moving_average_is_centred_and_keeps_length() -> None:
    assert moving_average([0, 3, 0, 3, 0], 3) == [1.5, 1, 2, 1, 1.5]
    assert moving_average([4.0, 2.0], 1) == [4.0, 2.0]
    assert moving_average([], 5) == []


def test_title_names_the_run() -> None:
    info = PlotInfo("m.gguf", 2, 8, 32, 8, 10)
    assert info.title() == (
        "kvroute bench · m.gguf · 2 workers · concurrency 8 · max_tokens 32 · 8 sessions x 10 turns"
    )
    assert PlotInfo(workers=1).title() == "kvroute bench · 1 worker"


def test_turn_labels_count_what_the_points_are_made_of() -> None:
    assert _turn_label(3, 8, 0) == "3\nn=8"
    assert _turn_label(4, 8, 1) == "4\nn=7\n(1 failed)"


def test_write_plot_draws_a_png(tmp_path: Path) -> None:
    records = []
    for s in range(2):
        for turn in (1, 2):
            t = s + turn * 0.5
            pieces = [t + 0.1 + 0.01 * i for i in range(5)]
            records.append(
                TurnRecord(s, turn, start=t, end=pieces[-1], pieces=pieces, generated_tokens=5)
            )
            records.append(
                TurnRecord(s, turn, probe=True, start=t, end=t + turn, pieces=[t + turn])
            )
    png = tmp_path / "p.png"
    write_plot(summarize(records), png, info=PlotInfo("m", 1, 2, 5, 2, 2))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
