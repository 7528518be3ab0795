"""``kvroute serve`` (broker + N worker processes) and ``kvroute worker`` (one worker alone).

With ``--curve-secret`` and ``--allow-keys``, ``serve`` makes a throwaway CURVE key pair for its
own workers and lets that key in on the backend only (see :class:`.supervisor.Supervisor`), so
the allowed directory needs the clients' keys alone. A ``kvroute worker`` started separately
authenticates with ``--server-key`` and ``--key``, and its public key must be in the directory.
"""

from __future__ import annotations

import os
from typing import Any

import click

from kvroute.broker import BrokerConfig, BrokerError
from kvroute.engine.engine import DEFAULT_N_CTX, Engine
from kvroute.engine.model_store import resolve_model
from kvroute.worker.config import WorkerConfig
from kvroute.worker.service import WorkerService, serve_worker

from .app import (
    curve_client_options,
    echo_err,
    model_option,
    option_group,
    stop_on_signals,
    user_errors,
)
from .broker_cmd import broker_options
from .supervisor import ServeError, Supervisor

_B = BrokerConfig()
_W = WorkerConfig()


_WORKER_OPTIONS = (
    (
        "n_ctx",
        click.option(
            "--ctx",
            "n_ctx",
            default=DEFAULT_N_CTX,
            show_default=True,
            type=click.IntRange(min=16),
            help="Context positions per session.",
        ),
    ),
    (
        "kv_budget_mb",
        click.option(
            "--kv-budget-mb",
            type=click.FloatRange(min=1),
            default=_W.kv_budget_mb,
            help="KV cache budget per worker; idle sessions are evicted LRU beyond it.",
        ),
    ),
    (
        "threads",
        click.option(
            "--threads",
            default=_W.threads,
            show_default=True,
            type=click.IntRange(min=1),
            help="BLAS threads per worker.",
        ),
    ),
    (
        "prefill_chunk",
        click.option(
            "--prefill-chunk",
            default=_W.prefill_chunk,
            show_default=True,
            type=click.IntRange(min=1),
            help="Prompt tokens per scheduler step.",
        ),
    ),
)
worker_options = option_group("worker_kw", _WORKER_OPTIONS)
"""Options ``serve`` and ``worker`` share, handed over as ``worker_kw`` (WorkerConfig keywords)."""


@click.command()
@click.option(
    "--workers",
    "n_workers",
    default=2,
    show_default=True,
    type=click.IntRange(min=1),
    help="Worker processes to start.",
)
@click.option("--frontend", default=_B.frontend, show_default=True, help="Address clients use.")
@click.option(
    "--backend",
    default="tcp://127.0.0.1:0",
    show_default=True,
    help="Address workers connect to (port 0 = any free port).",
)
@click.option(
    "--heartbeat",
    default=_B.heartbeat_interval,
    show_default=True,
    type=float,
    help="Seconds between heartbeats.",
)
@model_option
@worker_options
@broker_options
def serve(
    n_workers: int,
    frontend: str,
    backend: str,
    heartbeat: float,
    model: str,
    worker_kw: dict[str, Any],
    broker_kw: dict[str, Any],
) -> None:
    """Start a broker and N workers; print a line per worker, then `ready`; stop on SIGINT/TERM."""
    with user_errors(BrokerError, ServeError):
        path = resolve_model(model)  # fetch once here, not in N workers at the same time
        Engine.check(path)  # a bad file is one line here, not N tracebacks in workers
        wcfg = WorkerConfig(
            model=str(path),
            **worker_kw,
            heartbeat_interval=heartbeat,
        )
        bcfg = BrokerConfig(
            frontend=frontend, backend=backend, heartbeat_interval=heartbeat, **broker_kw
        )
        sup = Supervisor(n_workers, bcfg, wcfg)
        with stop_on_signals() as stop:
            try:
                sup.start()
                for wp in sup.workers.values():
                    click.echo(f"worker {wp.worker_id} pid {wp.process.pid}")
                click.echo(
                    f"ready frontend {sup.frontend} workers {n_workers} model {path.name}",
                    color=False,
                )
                while not stop.wait(0.5):
                    for wid in sup.check():
                        echo_err(
                            f"worker {wid} exited; restarted as pid {sup.workers[wid].process.pid}"
                        )
            finally:
                sup.close()
        echo_err("stopped")


@click.command()
@click.option(
    "--connect", default=_W.connect, show_default=True, help="The broker's backend address."
)
@click.option("--id", "worker_id", default="", help="Worker id (default w<pid>).")
@click.option(
    "--heartbeat",
    default=_W.heartbeat_interval,
    show_default=True,
    type=float,
    help="Seconds between heartbeats (match the broker's).",
)
@model_option
@worker_options
@curve_client_options
def worker(
    connect: str,
    worker_id: str,
    heartbeat: float,
    model: str,
    worker_kw: dict[str, Any],
    server_key: str | None,
    key: str | None,
) -> None:
    """Run one worker connected to a broker (this host or another) until SIGINT/SIGTERM."""
    with user_errors():
        cfg = WorkerConfig(
            connect=connect,
            worker_id=worker_id,
            model=model,
            **worker_kw,
            heartbeat_interval=heartbeat,
            server_key=server_key,
            key=key,
        )
        serve_worker(cfg, on_loaded=_announce)


def _announce(service: WorkerService) -> None:
    e = service.engine
    echo_err(
        f"worker {service.worker_id} pid {os.getpid()} model {e.model_name} "
        f"n_ctx {e.n_ctx} connecting to {service.config.connect}"
    )
