"""``kvroute bench``: load-test a service (``--connect``) or one started for the run (``--serve``).

The tables go to stdout, the progress bar and status lines to stderr. The exit status says
whether the run stayed within its error budget, so CI can gate on it:

- 0: (failed requests + stickiness violations) / requests <= ``--max-error-rate``;
- 1: the run could not happen (bad prompts file, the service did not start);
- 2: invalid options (click's usage error);
- 3: the run happened but exceeded the error budget.
"""

from __future__ import annotations

import logging
import os
import platform
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from kvroute import __version__
from kvroute.bench import (
    RunConfig,
    Script,
    TurnRecord,
    WorkloadError,
    builtin_workload,
    file_workload,
    load_jsonl,
    run,
    summarize,
)
from kvroute.bench.openai_driver import run_openai
from kvroute.bench.plot import PlotInfo, PlotUnavailable, check_available, write_plot
from kvroute.bench.report import tables, write_json
from kvroute.bench.runner import OnRecord
from kvroute.broker import BrokerConfig, BrokerError
from kvroute.engine.engine import Engine
from kvroute.engine.model_store import resolve_model
from kvroute.worker.config import WorkerConfig

from .app import check_broker, echo_err, quiet_after_ctrl_c, user_errors
from .options import (
    config_errors,
    connect_option,
    curve_client_options,
    max_tokens_option,
    model_options,
    timeout_option,
)
from .supervisor import ServeError, Supervisor
from .terminal import Spinner

_R = RunConfig(url="")
EXIT_OVER_BUDGET = 3


@contextmanager
def _served(n_workers: int, wcfg: WorkerConfig) -> Iterator[tuple[str, str]]:
    """A broker + ``n_workers`` worker processes on free loopback ports; yields the frontend
    and the model's file name."""
    path = resolve_model(wcfg.model)  # fetch once here, not in N workers at the same time
    Engine.check(path)
    loopback = "tcp://127.0.0.1:0"
    sup = Supervisor(
        n_workers, BrokerConfig(frontend=loopback, backend=loopback), replace(wcfg, model=str(path))
    )
    stop = threading.Event()
    watcher: threading.Thread | None = None
    try:
        echo_err(f"starting {n_workers} worker(s); each loads {path.name} ...")
        spinner = Spinner()

        def loading(ready: list[str], elapsed: float) -> None:
            spinner.tick(f"loading: {len(ready)}/{n_workers} workers in, {elapsed:.0f} s")

        sup.start(progress=loading)  # Ctrl-C raises KeyboardInterrupt here; `finally` cleans up
        spinner.clear()
        echo_err(f"serving at {sup.frontend}")

        def restart_dead() -> None:  # as `kvroute serve` does; the bench sees SessionLost
            while not stop.wait(0.5):
                for wid in sup.check():
                    echo_err(f"worker {wid} exited; restarted")

        watcher = threading.Thread(target=restart_dead, name="bench-supervise", daemon=True)
        watcher.start()
        yield sup.frontend, path.name
    finally:
        stop.set()
        if watcher is not None:
            watcher.join(5.0)  # never let it restart a worker while close() stops them
        # Stopping the workers on purpose makes the broker warn that each was lost; those lines
        # would read like a failure at the end of every successful run.
        broker_log = logging.getLogger("kvroute.broker")
        level = broker_log.level
        broker_log.setLevel(logging.ERROR)
        try:
            sup.close()
        finally:
            broker_log.setLevel(level)


@contextmanager
def _service(
    serve_n: int | None, wcfg: WorkerConfig, url: str | None
) -> Iterator[tuple[str, str | None]]:
    """The service to load and its model: started here with ``--serve``, else the ``--connect``
    address (whose model is unknown)."""
    if serve_n is not None:
        with _served(serve_n, wcfg) as served:
            yield served
    else:
        assert url is not None, "checked by the caller"
        yield url, None


def _scripts(
    prompts: str, seed: int, sessions: int, turns: int, warmup: int
) -> tuple[list[Script], list[Script]]:
    """Measured and warm-up scripts; warm-up sessions come after the measured ones, so adding
    warm-up never changes what the measured sessions say."""
    if prompts == "builtin":
        return (
            builtin_workload(seed, sessions, turns),
            builtin_workload(seed, warmup, turns, first=sessions),
        )
    convs = load_jsonl(prompts)
    return file_workload(convs, sessions, turns), file_workload(convs, warmup, turns, sessions)


def _progress_callback(progress: Progress, task: TaskID) -> OnRecord:
    """Advance the bar per warm turn; show the errors so far (probes' included)."""
    errors = 0

    def on_record(rec: TurnRecord) -> None:
        nonlocal errors
        errors += rec.error is not None
        if not rec.probe:
            phase = "warm-up" if rec.warmup else "turns"
            progress.update(task, advance=1, description=f"{phase} (errors {errors})")

    return on_record


@click.command()
@connect_option(None, "Frontend address of a running service")
@click.option(
    "--serve",
    "serve_n",
    type=click.IntRange(min=1),
    default=None,
    help="Start a service with N workers for the run (stopped afterwards).",
)
@click.option(
    "--openai",
    "openai_url",
    default=None,
    metavar="URL",
    help="Drive an OpenAI-compatible server instead (http://HOST:PORT: kvroute's gateway, "
    "llama.cpp's server, vLLM).",
)
@click.option(
    "--sessions",
    default=8,
    show_default=True,
    type=click.IntRange(min=1),
    help="Conversations to play in all (measured; --warmup adds more).",
)
@click.option(
    "--turns",
    default=5,
    show_default=True,
    type=click.IntRange(min=1),
    help="User messages per conversation.",
)
@click.option(
    "--concurrency",
    default=_R.concurrency,
    show_default=True,
    type=click.IntRange(min=1),
    help="Simulated users, each in one session at a time.",
)
@max_tokens_option
@click.option(
    "--think-time",
    default=_R.think_time,
    show_default=True,
    type=click.FloatRange(min=0),
    help="Seconds between a reply and the user's next message.",
)
@click.option(
    "--prompts",
    default="builtin",
    show_default=True,
    help='\'builtin\', or a JSONL file: one {"system"?: str, "turns": [str, ...]} per line.',
)
@click.option("--seed", default=0, show_default=True, type=int, help="Built-in script choice.")
@click.option(
    "--warmup",
    default=0,
    show_default=True,
    type=click.IntRange(min=0),
    help="Extra sessions run first and excluded from the statistics.",
)
@click.option(
    "--json",
    "json_out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write every statistic (and the options) as JSON here.",
)
@click.option(
    "--plot",
    "plot_out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write a PNG: TTFT vs turn index (warm, cold), tok/s over time (needs matplotlib).",
)
@click.option(
    "--compare-cold",
    is_flag=True,
    help="Also send each turn's history to a fresh session: warm vs cold TTFT per turn.",
)
@click.option(
    "--max-error-rate",
    default=0.0,
    show_default=True,
    type=click.FloatRange(0, 1),
    help="Exit 3 when (failed requests + stickiness violations) / requests exceeds this.",
)
@timeout_option()
@model_options
@curve_client_options
def bench(
    url: str | None,
    serve_n: int | None,
    sessions: int,
    turns: int,
    concurrency: int,
    max_tokens: int,
    think_time: float,
    prompts: str,
    seed: int,
    warmup: int,
    json_out: Path | None,
    plot_out: Path | None,
    compare_cold: bool,
    max_error_rate: float,
    timeout: float,
    model_kw: dict[str, Any],
    server_key: str | None,
    key: str | None,
    openai_url: str | None,
) -> None:
    """Multi-turn load test: TTFT per turn, cache reuse, throughput, stickiness, errors."""
    if [url, serve_n, openai_url].count(None) != 2:
        raise click.UsageError("give exactly one of --connect URL or --serve N (or --openai URL)")
    if url is None and (server_key or key):
        raise click.UsageError("--server-key/--key go with --connect")
    params = click.get_current_context().params  # every option, defaults filled in, for JSON
    options = {k: str(v) if isinstance(v, Path) else v for k, v in params.items()}
    with config_errors():
        wcfg = WorkerConfig(**model_kw)  # the workers of --serve
    with user_errors(WorkloadError, PlotUnavailable, BrokerError, ServeError, OSError):
        if plot_out is not None:
            check_available()  # fail now, not after a run of several minutes
        scripts, warm = _scripts(prompts, seed, sessions, turns, warmup)
        total = sum(len(s.turns) for s in (*warm, *scripts))
        if url is not None:
            check_broker(url, timeout, server_key, key)  # nobody there: say so now, not per turn
        with _service(serve_n, wcfg, url or openai_url) as (frontend, model_name):
            config = RunConfig(
                frontend,
                concurrency,
                max_tokens,
                think_time,
                compare_cold,
                timeout,
                server_key,
                key,
            )
            columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
            progress = Progress(
                *columns, TimeElapsedColumn(), console=Console(stderr=True), transient=True
            )
            with progress:
                task = progress.add_task("turns (errors 0)", total=total)
                cpu0 = time.process_time()
                driver = run_openai if openai_url else run
                with quiet_after_ctrl_c():
                    result = driver(config, scripts, warm, _progress_callback(progress, task))
                cpu_s = time.process_time() - cpu0
        summary = summarize(result.records)
        out = Console()
        if not out.is_terminal:  # a file or pipe: do not squeeze the tables into 80 columns
            out = Console(width=150)
        for table in tables(summary):
            out.print(table)
        for kind, message in summary.error_examples.items():
            echo_err(f"{kind}: {message}")
        # The load generator shares the machine with what it measures: say how much it took.
        echo_err(
            f"bench process CPU {cpu_s:.1f} s over {result.wall_s:.1f} s "
            f"({100 * cpu_s / max(result.wall_s, 1e-9):.0f}% of one core"
            f"{', broker thread included' if serve_n else ''})"
        )
        meta = {
            "kvroute": __version__,
            "started_at": result.started_at,
            "wall_s": result.wall_s,
            "bench_cpu_s": cpu_s,
            "host": {"cpus": os.cpu_count(), "machine": platform.machine()},
            "options": options,
        }
        if json_out is not None:
            write_json(json_out, summary, meta)
            echo_err(f"wrote {json_out}")
        if plot_out is not None:
            info = PlotInfo(
                model_name,
                serve_n if serve_n else len(summary.workers),
                concurrency,
                max_tokens,
                sessions,
                turns,
            )
            write_plot(summary, plot_out, info=info)
            echo_err(f"wrote {plot_out}")
    if summary.error_rate > max_error_rate:
        echo_err(
            f"error rate {100 * summary.error_rate:.1f}% exceeds --max-error-rate "
            f"{100 * max_error_rate:.1f}%"
        )
        sys.exit(EXIT_OVER_BUDGET)
