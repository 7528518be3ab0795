"""``kvroute serve`` (broker + N worker processes) and ``kvroute worker`` (one worker alone).

With ``--curve-secret`` and ``--allow-keys``, ``serve`` makes a throwaway CURVE key pair for its
own workers and lets that key in on the backend only (see :class:`.supervisor.Supervisor`), so
the allowed directory needs the clients' keys alone. A ``kvroute worker`` started separately
authenticates with ``--server-key`` and ``--key``, and its public key must be in the directory
given as ``--allow-worker-keys`` (never in ``--allow-keys``: clients and workers are kept apart).
"""

from __future__ import annotations

import os
from typing import Any

import click

from kvroute.broker import BrokerConfig, BrokerError
from kvroute.engine.engine import DEFAULT_N_CTX, Engine
from kvroute.engine.model_store import resolve_model
from kvroute.gateway.config import DEFAULT_HTTP
from kvroute.proto.limits import MAX_CAPACITY
from kvroute.worker.config import KV_DEFAULT_RULE, WorkerConfig
from kvroute.worker.process import set_title
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
from .gateway_cmd import HTTP_ADDRESS, GatewayError, GatewayProcess, start_serve_gateway
from .options import BIND, CONNECT
from .supervisor import ServeError, Supervisor
from .terminal import Spinner

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
            help=(
                "KV cache budget per worker in MiB; idle sessions are evicted LRU beyond it,"
                " and turns wait while it is reserved by turns running. Default:"
                f" {KV_DEFAULT_RULE}."
            ),
        ),
    ),
    (
        "capacity",
        click.option(
            "--capacity",
            default=_W.capacity,
            show_default=True,
            type=click.IntRange(min=1, max=MAX_CAPACITY),
            help=(
                "Turns a worker runs at once; more wait in a queue fair across clients"
                f" (up to {_W.max_waiting}, {_W.max_waiting_per_client} per client,"
                f" {_W.max_wait_s:g} s), then get the retryable ERROR overloaded."
            ),
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
@click.option(
    "--frontend",
    type=BIND,
    default=_B.frontend,
    show_default=True,
    help="Bind here for clients (kvroute chat --connect).",
)
@click.option(
    "--backend",
    type=BIND,
    default="tcp://127.0.0.1:0",
    show_default=True,
    help="Bind here for the workers (port 0: any free port).",
)
@click.option(
    "--heartbeat",
    default=_B.heartbeat_interval,
    show_default=True,
    type=float,
    help="Seconds between heartbeats.",
)
@click.option(
    "--http",
    "http",
    type=HTTP_ADDRESS,
    default=DEFAULT_HTTP,
    show_default=True,
    help="Serve the OpenAI-compatible HTTP API here (port 0: any free port).",
)
@click.option("--no-http", is_flag=True, help="Do not start the HTTP gateway.")
@model_option
@worker_options
@broker_options
def serve(
    n_workers: int,
    frontend: str,
    backend: str,
    heartbeat: float,
    http: tuple[str, int],
    no_http: bool,
    model: str,
    worker_kw: dict[str, Any],
    broker_kw: dict[str, Any],
) -> None:
    """Start a broker and N workers; print a line per worker, then `ready`; stop on SIGINT/TERM.

    Each worker loads the model (seconds to tens of seconds); a line says when each is in.
    """
    gw: GatewayProcess | None = None
    with user_errors(BrokerError, ServeError, GatewayError):
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
                echo_err(f"starting {n_workers} worker(s); each loads {path.name} (Ctrl-C stops)")
                loading = LoadProgress(sup, n_workers)
                if not sup.start(stop=stop, progress=loading):
                    return  # Ctrl-C while loading: `finally` stops what started
                loading.spinner.clear()
                set_title(f"kvroute serve: broker {sup.frontend}, workers {n_workers}")
                if not no_http:
                    gw = start_serve_gateway(sup.frontend, http, path.name, bcfg.curve)
                click.echo(
                    f"ready frontend {sup.frontend} workers {n_workers} model {path.name}"
                    f" in {loading.elapsed:.1f} s",
                    color=False,
                )
                echo_err(f"next: kvroute chat --connect {sup.frontend}   (Ctrl-C here stops)")
                while not stop.wait(0.5):
                    for wid in sup.check():
                        echo_err(
                            f"worker {wid} exited; restarted as pid {sup.workers[wid].process.pid}"
                        )
            finally:
                if gw is not None:
                    gw.close()
                sup.close()
                echo_err("stopped")


@click.command()
@click.option(
    "--connect",
    type=CONNECT,
    default=_W.connect,
    show_default=True,
    help="The broker's backend address: tcp://HOST:PORT, HOST:PORT or ipc://PATH.",
)
@click.option(
    "--id", "worker_id", default="", show_default="w<pid>", help="Worker id, reported in END."
)
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
    set_title(f"kvroute worker {worker_id or f'w{os.getpid()}'}")
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


class LoadProgress:
    """While workers load: a line per worker as it registers, and a spinner on a terminal."""

    def __init__(self, sup: Supervisor, n_workers: int) -> None:
        self.sup = sup
        self.n = n_workers
        self.seen: set[str] = set()
        self.elapsed = 0.0
        self.spinner = Spinner()

    def __call__(self, ready: list[str], elapsed: float) -> None:
        self.elapsed = elapsed
        for wid in ready:
            if wid not in self.seen:
                self.seen.add(wid)
                self.spinner.clear()
                click.echo(f"worker {wid} pid {self.sup.workers[wid].process.pid}")
        if len(self.seen) < self.n:
            self.spinner.tick(
                f"loading the model: {len(self.seen)}/{self.n} workers in, {elapsed:.0f} s"
            )
