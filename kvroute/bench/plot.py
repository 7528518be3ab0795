"""``--plot``: one PNG with TTFT against turn index (warm and cold) and output tok/s over time.

Made to be read at a glance: the log axis has one tick style (1-2-5 steps, plain numbers), the
legends sit below the panels so they never cover a line, each turn index is labelled with its
sample count and (with cold probes) its cold/warm ratio, and throughput is a moving average
over a window long enough to mean something, with the raw bins faint behind it.

matplotlib is an optional dependency (the ``plot`` extra); it is imported only when a plot is
asked for, with the non-interactive Agg backend so it works without a display.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .metrics import Summary

SMOOTH_S = 3.0
"""Seconds of the throughput moving average (at least 3 bins; at most a fifth of the run)."""


LOG_SPAN = 4.0
"""Largest / smallest TTFT at which the TTFT axis turns logarithmic."""


class PlotUnavailable(RuntimeError):
    """matplotlib is not installed."""


@dataclass(frozen=True)
class PlotInfo:
    """What the title says about the run (None: unknown, left out)."""

    model: str | None = None
    workers: int | None = None
    concurrency: int | None = None
    max_tokens: int | None = None
    sessions: int | None = None
    turns: int | None = None

    def title(self) -> str:
        """``kvroute bench · MODEL · 2 workers · concurrency 8 · max_tokens 32 · 8x10 turns``."""
        parts = ["kvroute bench"]
        if self.model:
            parts.append(self.model)
        if self.workers is not None:
            parts.append(f"{self.workers} worker{'s' if self.workers != 1 else ''}")
        if self.concurrency is not None:
            parts.append(f"concurrency {self.concurrency}")
        if self.max_tokens is not None:
            parts.append(f"max_tokens {self.max_tokens}")
        if self.sessions is not None and self.turns is not None:
            parts.append(f"{self.sessions} sessions x {self.turns} turns")
        return " · ".join(parts)


def check_available() -> None:
    """Raise :class:`PlotUnavailable` now, before a long run, if a plot cannot be drawn."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise PlotUnavailable(
            "--plot needs matplotlib: pip install 'kvroute[plot]' (or pip install matplotlib)"
        ) from exc


def _f(v: float | None) -> float:
    return math.nan if v is None else v  # a gap in the line rather than a TypeError


def ticks_125(lo: float, hi: float) -> list[float]:
    """1-2-5 steps covering [lo, hi] (positive), one below and one above: the log-axis ticks."""
    lo, hi = max(lo, 1e-3), max(hi, lo)
    out: list[float] = []
    decade = 10.0 ** math.floor(math.log10(lo))
    while True:
        for m in (1, 2, 5):
            v = m * decade
            if v >= lo / 2.5 and (not out or out[-1] < hi):
                out.append(v)
        if out and out[-1] >= hi:
            return out
        decade *= 10


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """Centred moving average over ``window`` points (shorter at the edges)."""
    half = max(window, 1) // 2
    out = []
    for i in range(len(values)):
        part = values[max(0, i - half) : i + half + 1]
        out.append(sum(part) / len(part))
    return out


def _turn_label(turn: int, n: int, errors: int) -> str:
    """An x tick: the turn index, the sample count behind its points, failures if any."""
    return f"{turn}\nn={n - errors}" + (f"\n({errors} failed)" if errors else "")


def _number(v: float, _pos: object = None) -> str:
    return f"{v:,.0f}" if v >= 1 else f"{v:g}"


def write_plot(
    summary: Summary, path: str | Path, title: str | None = None, info: PlotInfo | None = None
) -> None:
    """Draw the two panels and save them as PNG at ``path``.

    ``title`` overrides the one made from ``info``.

    Raises
    ------
    PlotUnavailable
        matplotlib is missing.
    """
    check_available()
    import matplotlib

    matplotlib.use("Agg")  # no display needed; must precede pyplot's first import
    import matplotlib.pyplot as plt

    fig, (ax_ttft, ax_tps) = plt.subplots(1, 2, figsize=(13, 5.2))
    try:
        _ttft_panel(ax_ttft, summary)
        _throughput_panel(ax_tps, summary)
        fig.suptitle(title or (info or PlotInfo()).title(), fontsize=12)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)


def _ttft_panel(ax: object, summary: Summary) -> None:
    from matplotlib.axes import Axes
    from matplotlib.ticker import FixedLocator, FuncFormatter, MaxNLocator, NullLocator

    assert isinstance(ax, Axes)
    rows = summary.per_turn
    turns = [r.turn for r in rows]
    p50 = [_f(r.ttft_ms["p50"]) for r in rows]
    p90 = [_f(r.ttft_ms["p90"]) for r in rows]
    ax.fill_between(turns, p50, p90, color="tab:blue", alpha=0.15, label="warm p50-p90")
    ax.plot(turns, p50, "o-", color="tab:blue", label="warm p50 (same session)")
    values = [v for v in (*p50, *p90) if not math.isnan(v)]
    if summary.probes:
        cold = [_f(r.cold_ttft_ms["p50"]) for r in rows]
        ax.plot(turns, cold, "s--", color="tab:red", label="cold p50 (fresh session)")
        values += [v for v in cold if not math.isnan(v)]
        for r, c in zip(rows, cold, strict=True):
            if r.speedup is not None and not math.isnan(c):
                ax.annotate(
                    f"{r.speedup:.1f}x",
                    (r.turn, c),
                    textcoords="offset points",
                    xytext=(0, 7),
                    ha="center",
                    fontsize=8,
                    color="tab:red",
                )
    log = bool(values) and max(values) / max(min(values), 1e-9) >= LOG_SPAN
    if log:  # warm and cold differ by an order of magnitude: a log axis with 1-2-5 ticks
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(FixedLocator(ticks_125(min(values), max(values))))
        ax.yaxis.set_minor_locator(NullLocator())  # one tick style: no unlabelled minor ticks
        ax.set_ylim(min(values) / 1.3, max(values) * 1.6)  # room above for the ratio labels
    else:
        ax.yaxis.set_major_locator(MaxNLocator(6, steps=[1, 2, 5, 10]))  # 1-2-5 here too
        ax.set_ylim(0, max(values, default=1.0) * 1.25)
    ax.yaxis.set_major_formatter(FuncFormatter(_number))
    ax.set_xticks(turns, [_turn_label(r.turn, r.n, r.errors) for r in rows])
    ax.set(
        title="Time to first token by turn index"
        + (" (red: cold / warm p50)" if summary.probes else ""),
        xlabel="turn index (n = warm turns that succeeded)",
        ylabel="TTFT, ms (client-side" + (", log scale)" if log else ")"),
    )
    ax.grid(True, alpha=0.3)
    below = -0.27 if any(r.errors for r in rows) else -0.2  # clear of 3-line tick labels
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, below), ncol=3, frameon=False)


def _throughput_panel(ax: object, summary: Summary) -> None:
    from matplotlib.axes import Axes

    assert isinstance(ax, Axes)
    width = summary.timeline_bin_s
    starts = [t for t, _ in summary.timeline]
    values = [v for _, v in summary.timeline]
    if starts and width > 0:
        edges = [*starts, starts[-1] + width]
        ax.stairs(values, edges, color="tab:green", alpha=0.25, label=f"per {width:.2g} s bin")
        window = max(3, min(round(SMOOTH_S / width), len(values) // 5 or 1))
        centres = [t + width / 2 for t in starts]
        smooth = moving_average(values, window)
        ax.plot(centres, smooth, color="tab:green", lw=2, label=f"{window * width:.2g} s average")
    ax.axhline(summary.output_tok_s, color="gray", ls=":", label="run average")
    ax.set_ylim(bottom=0)
    ax.set(
        title=f"Output tokens per second ({summary.output_tok_s:.1f} on average)",
        xlabel="seconds since measurement start",
        ylabel="tok/s (warm turns)",
    )
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=3, frameon=False)
