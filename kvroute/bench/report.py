"""A :class:`~kvroute.bench.metrics.Summary` as rich tables (for the CLI to print) and as JSON.

Nothing here prints: :func:`tables` returns renderables and the CLI decides where they go.
The JSON document is :func:`to_json`; its keys are the :class:`Summary` field names, plus
``meta`` (what was run) and ``schema`` (bumped when a key changes meaning).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rich import box
from rich.table import Table

from .metrics import Summary

SCHEMA = "kvroute-bench/1"
MAX_VIOLATIONS_SHOWN = 10


def to_json(summary: Summary, meta: Mapping[str, Any]) -> dict[str, Any]:
    """The summary as a JSON-ready dict, with ``meta`` (options, service, versions) attached."""
    doc = dataclasses.asdict(summary)
    doc["timeline"] = [{"t_s": t, "tok_s": v} for t, v in summary.timeline]  # self-describing
    return {"schema": SCHEMA, "meta": dict(meta), **doc}


def write_json(path: str | Path, summary: Summary, meta: Mapping[str, Any]) -> None:
    """Write :func:`to_json` to ``path`` (indented, UTF-8)."""
    text = json.dumps(to_json(summary, meta), indent=2, ensure_ascii=False)
    Path(path).write_text(text + "\n", encoding="utf-8")


def _ms(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:,.0f}" if v >= 100 else f"{v:.1f}"


def _pcts(d: Mapping[str, float | None]) -> str:
    return " / ".join(_ms(v) for v in d.values())


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.0f}%"


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}x"


def _counts(d: Mapping[str, int]) -> str:
    shown = {k: v for k, v in d.items() if v}
    return ", ".join(f"{k} {v}" for k, v in sorted(shown.items())) or "none"


def overview(s: Summary) -> Table:
    """Throughput, latency percentiles, cache reuse, errors and stickiness of the whole run."""
    t = Table(title="kvroute bench", show_header=False, title_justify="left")
    t.add_column("metric", style="bold")
    t.add_column("value")
    failed = sum(s.errors.values()) + sum(s.probe_errors.values())
    t.add_row("requests", f"{s.requests} ({s.turns} turns, {s.probes} cold probes)")
    t.add_row("turns ok", f"{s.turns_ok} of {s.turns}")
    t.add_row("duration", f"{s.duration_s:.1f} s")
    t.add_row("output tok/s", f"{s.output_tok_s:.1f}  ({s.output_tokens} tokens)")
    t.add_row("turns/s", f"{s.turns_s:.2f}")
    t.add_row("TTFT ms p50/p90/p99", _pcts(s.ttft_ms))
    t.add_row("  worker-side", _pcts(s.worker_ttft_ms))
    t.add_row("ITL ms p50/p99", _pcts(s.itl_ms))
    t.add_row("TPOT ms p50/p99", _pcts(s.tpot_ms))
    t.add_row("end-to-end ms p50/p90/p99", _pcts(s.e2e_ms))
    unknown = s.cache_hit is None and s.turns_ok > 0  # the server did not report cached tokens
    t.add_row("cache hit (cached/prompt)", "not reported" if unknown else _pct(s.cache_hit))
    t.add_row("paths", _counts(s.paths))
    t.add_row("cold reasons", _counts(s.cold_reasons))
    t.add_row("finish reasons", _counts(s.finish_reasons))
    t.add_row("errors", _counts(s.errors))
    if s.probes:
        t.add_row("probe errors", _counts(s.probe_errors))
    style = "red" if s.violations else "green"
    t.add_row("stickiness violations", f"[{style}]{len(s.violations)}[/{style}]")
    t.add_row(
        "error rate",
        f"{100 * s.error_rate:.1f}%  ({failed} failed + {len(s.violations)} violations"
        f" of {s.requests} requests)",
    )
    return t


def per_turn(s: Summary) -> Table:
    """TTFT and cache reuse against turn index (and cold TTFT with ``--compare-cold``).

    ``worker`` columns are the workers' own TTFT (TURN received -> first token), without the
    client's and broker's share; ``cold/warm`` is cold p50 over warm p50 TTFT.
    """
    t = Table(title="per turn index (TTFT in ms)", title_justify="left", box=box.SIMPLE_HEAD)
    names = ["turn", "n", "err", "prompt tok", "cache hit", "TTFT p50", "p90", "p99", "worker"]
    cold = s.probes > 0
    if cold:
        names += ["cold p50", "cold worker", "cold/warm", "worker c/w"]
    for name in names:
        t.add_column(name, justify="right")
    for r in s.per_turn:
        prompt = "-" if r.prompt_tokens is None else f"{r.prompt_tokens:.0f}"
        row = [str(r.turn), str(r.n), str(r.errors), prompt, _pct(r.cache_hit)]
        row += [_ms(v) for v in r.ttft_ms.values()] + [_ms(r.worker_ttft_ms)]
        if cold:
            row += [_ms(r.cold_ttft_ms["p50"]), _ms(r.cold_worker_ttft_ms)]
            row += [_x(r.speedup), _x(r.worker_speedup)]
        t.add_row(*row)
    return t


def workers(s: Summary) -> Table:
    """What each worker served: the balance the broker's placement achieved."""
    t = Table(title="per worker", title_justify="left", box=box.SIMPLE_HEAD)
    for name in ("worker", "sessions", "turns", "share", "generated tok", "prefill tok", "probes"):
        t.add_column(name, justify="right")
    total = sum(w.turns for w in s.workers.values()) or 1
    for wid, w in s.workers.items():
        t.add_row(
            wid,
            str(w.sessions),
            str(w.turns),
            f"{100 * w.turns / total:.0f}%",
            str(w.generated_tokens),
            str(w.prefill_tokens),
            str(w.probes),
        )
    return t


def violations(s: Summary) -> Table:
    """The first stickiness violations, so a failure can be traced to a session."""
    t = Table(title="stickiness violations", title_justify="left", style="red")
    for name in ("session", "turn", "owner", "served by"):
        t.add_column(name)
    for v in s.violations[:MAX_VIOLATIONS_SHOWN]:
        t.add_row(str(v.session), str(v.turn), v.previous_worker, v.worker)
    if len(s.violations) > MAX_VIOLATIONS_SHOWN:
        t.caption = f"... and {len(s.violations) - MAX_VIOLATIONS_SHOWN} more (see --json)"
    return t


def tables(s: Summary) -> list[Table]:
    """Every table of the report, in display order."""
    out = [overview(s), per_turn(s), workers(s)]
    if s.violations:
        out.append(violations(s))
    return out
