"""``--plot``: one PNG with TTFT against turn index (warm and cold) and output tok/s over time.

matplotlib is an optional dependency (the ``plot`` extra); it is imported only when a plot is
asked for, with the non-interactive Agg backend so it works without a display.
"""

from __future__ import annotations

import math
from pathlib import Path

from .metrics import Summary


def _f(v: float | None) -> float:
    return math.nan if v is None else v  # a gap in the line rather than a TypeError


class PlotUnavailable(RuntimeError):
    """matplotlib is not installed."""


def check_available() -> None:
    """Raise :class:`PlotUnavailable` now, before a long run, if a plot cannot be drawn."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise PlotUnavailable(
            "--plot needs matplotlib: pip install 'kvroute[plot]' (or pip install matplotlib)"
        ) from exc


def write_plot(summary: Summary, path: str | Path, title: str = "kvroute bench") -> None:
    """Draw the two panels and save them as PNG at ``path``.

    Raises
    ------
    PlotUnavailable
        matplotlib is missing.
    """
    check_available()
    import matplotlib

    matplotlib.use("Agg")  # no display needed; must precede pyplot's first import
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator, ScalarFormatter

    fig, (ax_ttft, ax_tps) = plt.subplots(1, 2, figsize=(12, 4.5))
    try:
        rows = summary.per_turn
        turns = [r.turn for r in rows]
        ax_ttft.plot(turns, [_f(r.ttft_ms["p50"]) for r in rows], "o-", label="warm p50")
        ax_ttft.fill_between(
            turns,
            [_f(r.ttft_ms["p50"]) for r in rows],
            [_f(r.ttft_ms["p90"]) for r in rows],
            alpha=0.2,
            label="warm p50-p90",
        )
        if summary.probes:
            cold = [_f(r.cold_ttft_ms["p50"]) for r in rows]
            ax_ttft.plot(turns, cold, "s--", color="tab:red", label="cold p50 (fresh session)")
        ax_ttft.set(
            title="Time to first token vs turn index",
            xlabel="turn index",
            ylabel="TTFT (ms, client-side)",
        )
        ax_ttft.set_yscale("log")  # warm and cold differ by an order of magnitude or more
        ax_ttft.yaxis.set_major_formatter(ScalarFormatter())  # 100, 1000 rather than 10^2, 10^3
        ax_ttft.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax_ttft.grid(True, which="both", alpha=0.3)
        ax_ttft.legend()

        edges = [t for t, _ in summary.timeline]
        if edges:
            edges.append(edges[-1] + summary.timeline_bin_s)
            ax_tps.stairs([v for _, v in summary.timeline], edges, label="per bin")
        ax_tps.axhline(summary.output_tok_s, color="gray", ls=":", label="run average")
        ax_tps.set(
            title="Output tokens per second over time",
            xlabel="seconds since measurement start",
            ylabel="tok/s",
        )
        ax_tps.grid(True, alpha=0.3)
        ax_tps.legend()
        fig.suptitle(title)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)
