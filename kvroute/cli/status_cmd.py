"""``kvroute status``: see the fleet, like ``ollama ps`` for a service of many workers.

One STATUS to the broker (:meth:`kvroute.Client.status`) gives the fleet view: a table with one
row per registered worker (id, pid/host, up since, sessions resident, KV memory against its
budget, requests in flight and waiting, turns finished, cache hit, evictions), a fleet row, and
a few lines of the broker's own counters. ``--watch`` redraws it in place; ``--json`` prints
the FLEET body as the protocol defines it (one object per refresh with ``--watch``).
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Iterable
from datetime import datetime
from typing import Any

import click
import msgspec
from rich import box
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from kvroute.broker.config import BrokerConfig
from kvroute.client import Client, KvrouteError, Timeout
from kvroute.proto import CachePath, Fleet, WorkerCounters, WorkerView

from .app import check_broker, curve_client_options, user_errors
from .options import connect_option, timeout_option

MIB = float(1 << 20)


def fleet_json(fleet: Fleet) -> dict[str, Any]:
    """The FLEET body as plain JSON types (the shape ``docs/design.md`` documents)."""
    out: dict[str, Any] = msgspec.to_builtins(fleet)
    return out


def hit_rate(c: WorkerCounters) -> float | None:
    """Cached / prompt tokens over a set of counters (None before any prompt)."""
    return c.cached_tokens / c.prompt_tokens if c.prompt_tokens else None


def _ago(seconds: float) -> str:
    s = int(max(0.0, seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _since(started_ns: int, now_ns: int) -> str:
    when = datetime.fromtimestamp(started_ns / 1e9)
    same_day = when.date() == datetime.fromtimestamp(now_ns / 1e9).date()
    return when.strftime("%H:%M:%S" if same_day else "%b %d %H:%M")


def _pct(rate: float | None) -> str:
    return "-" if rate is None else f"{rate * 100:.0f}%"


def _mb(used: int, budget: int | None) -> str:
    if not budget:
        return f"{used / MIB:,.1f} / -"
    return f"{used / MIB:,.1f} / {budget / MIB:,.0f}"


def _row(w: WorkerView, now_ns: int) -> list[str]:
    g = w.gauges
    flight = _flight(w.in_flight, 0 if g is None else g.queue_depth)
    if g is None:  # a worker of an older release, or no heartbeat yet
        return [w.worker, str(w.pid), "-", f"{w.sessions:,}", _mb(w.kv_bytes, None), flight]
        +["-"] * 3
    return [
        w.worker,
        f"{w.pid}/{g.host}",
        _since(g.started_ns, now_ns),
        f"{w.sessions:,}",
        _mb(w.kv_bytes, g.kv_budget_bytes),
        flight,
        f"{g.counters.turns:,}",
        _pct(hit_rate(g.counters)),
        f"{g.counters.evictions:,}",
    ]


def _flight(running: int, waiting: int) -> str:
    return f"{running} +{waiting} queued" if waiting else str(running)


def _breakdown(items: Iterable[tuple[str, int]]) -> str:
    parts = [f"{k} {n:,}" for k, n in items if n]
    return ", ".join(parts) if parts else "none"


def fleet_table(fleet: Fleet, url: str, now_ns: int | None = None) -> Group:
    """The status display: a title line, the worker table with its fleet row, then the
    broker's counters."""
    now_ns = time.time_ns() if now_ns is None else now_ns
    b = fleet.broker
    n = len(fleet.workers) + fleet.unlisted
    title = Text.assemble(
        ("kvroute status", "bold"),
        f" · {url} · broker up {_ago((now_ns - b.started_ns) / 1e9)} · {n} worker"
        f"{'s' if n != 1 else ''} · {b.requests_in_flight} in flight · "
        f"{b.sessions_pinned:,} session{'s' if b.sessions_pinned != 1 else ''} pinned",
    )
    table = Table(
        box=box.SIMPLE, pad_edge=False, header_style="bold", footer_style="bold", show_footer=True
    )
    heads = ["worker", "pid/host", "up since", "sessions", "KV MB / budget", "in flight"]
    heads += ["turns", "cache hit", "evictions"]
    live = [w for w in fleet.workers if w.gauges is not None]
    t = fleet.totals
    foot = [
        "fleet",
        f"{n} worker{'s' if n != 1 else ''}",
        "",
        f"{sum(w.sessions for w in fleet.workers):,}",
        _mb(
            sum(w.kv_bytes for w in fleet.workers),
            sum(w.gauges.kv_budget_bytes for w in live if w.gauges is not None) or None,
        ),
        _flight(
            sum(w.in_flight for w in fleet.workers),
            sum(w.gauges.queue_depth for w in live if w.gauges is not None),
        ),
        f"{t.turns:,}",
        _pct(hit_rate(t)),
        f"{t.evictions:,}",
    ]
    for i, head in enumerate(heads):
        table.add_column(
            head,
            footer=foot[i],
            justify="left" if i < 3 else "right",
            no_wrap=True,
            overflow="ellipsis",
            max_width=24 if i == 1 else None,
        )
    for w in sorted(fleet.workers, key=lambda w: w.worker):
        table.add_row(*_row(w, now_ns))
    if fleet.unlisted:
        table.add_row(f"... {fleet.unlisted} more", *[""] * (len(heads) - 1))
    paths = [(str(p), t.paths.get(p, 0)) for p in CachePath]
    lines = [
        f"turns by path: {_breakdown(paths)} · cold reasons: "
        f"{_breakdown((str(r), k) for r, k in t.cold_reasons.items())}",
        f"tokens: prompt {t.prompt_tokens:,} · cached {t.cached_tokens:,} · prefilled "
        f"{t.prefill_tokens:,} · generated {t.generated_tokens:,}",
        f"requests: {_breakdown((str(o), k) for o, k in b.requests.items())} · errors sent: "
        f"{_breakdown((str(c), k) for c, k in b.errors.items())} · workers lost "
        f"{b.workers_lost} · messages {b.messages:,}",
    ]
    return Group(title, table, Text("\n".join(lines), style="dim"))


def _console() -> Console:
    """Stdout; as wide as the terminal, or 120 columns when piped (a table, not a squeeze)."""
    console = Console(highlight=False)
    return console if console.is_terminal else Console(highlight=False, width=120)


def _unreachable(url: str, since: float) -> Text:
    when = datetime.fromtimestamp(since).strftime("%H:%M:%S")
    return Text(f"kvroute status · {url} · no answer from the broker since {when}", style="red")


@click.command()
@connect_option(BrokerConfig().frontend)
@click.option(
    "--watch",
    type=click.FloatRange(0.1),
    default=None,
    metavar="SECONDS",
    help="Refresh every SECONDS in place until Ctrl-C.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the fleet view as JSON.")
@timeout_option("the broker's answer")
@curve_client_options
def status(
    url: str,
    watch: float | None,
    as_json: bool,
    timeout: float,
    server_key: str | None,
    key: str | None,
) -> None:
    """Show the fleet: workers, sessions, KV memory, turns, cache hit, evictions.

    The fleet row adds up the workers listed (sessions, KV, in flight) and, for turns, cache
    hit and evictions, every worker process the broker has heard from since it started.
    """
    check_broker(url, timeout, server_key, key)
    with user_errors(ValueError):
        client = Client(url, timeout=timeout, server_key=server_key, key=key)
    with client:
        if watch is None:
            fleet = _ask(client, url)
            if as_json:
                click.echo(json.dumps(fleet_json(fleet)))
            else:
                _console().print(fleet_table(fleet, url))
            return
        with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C ends a watch: not an error
            _watch(client, url, watch, as_json)


def _ask(client: Client, url: str) -> Fleet:
    try:
        return client.status()
    except KvrouteError as exc:
        click.echo(f"error: {url}: {exc}", err=True)
        sys.exit(1)


def _watch(client: Client, url: str, every: float, as_json: bool) -> None:
    """Redraw every ``every`` seconds; a broker that stops answering is shown, not fatal."""
    console = _console()
    silent_since: float | None = None

    def frame() -> Group | Text:
        nonlocal silent_since
        try:
            fleet = client.status()
        except Timeout:
            silent_since = silent_since or time.time()
            if as_json:
                click.echo(f"error: {url}: no answer from the broker", err=True)
            return _unreachable(url, silent_since)
        silent_since = None
        if as_json:
            click.echo(json.dumps(fleet_json(fleet)))
        return fleet_table(fleet, url)

    if as_json or not console.is_terminal:
        while True:
            shown = frame()
            if not as_json:
                console.print(shown)
                console.print()
            time.sleep(every)
    with Live(frame(), console=console, auto_refresh=False, transient=False) as live:
        while True:
            time.sleep(every)
            live.update(frame(), refresh=True)
