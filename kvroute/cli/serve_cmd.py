"""``kvroute serve`` (broker + N worker processes) and ``kvroute worker`` (one worker alone).

With ``--curve-secret`` and ``--allow-keys``, ``serve`` makes a throwaway CURVE key pair for its
own workers and lets that key in on the backend only (see :class:`.supervisor.Supervisor`), so
the allowed directory needs the clients' keys alone. A ``kvroute worker`` started separately
authenticates with ``--server-key`` and ``--key``, and its public key must be in the directory
given as ``--allow-worker-keys`` (never in ``--allow-keys``: clients and workers are kept apart).
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Any

import click

from kvroute.broker import BrokerConfig, BrokerError
from kvroute.engine.engine import Engine
from kvroute.engine.model_store import resolve_model
from kvroute.gateway.config import DEFAULT_HTTP
from kvroute.worker.config import WorkerConfig
from kvroute.worker.process import set_title
from kvroute.worker.service import WorkerService, serve_worker

from .app import echo_err, stop_on_signals, user_errors
from .gateway_cmd import HTTP_ADDRESS, GatewayError, GatewayProcess, start_serve_gateway
from .options import (
    bind_option,
    config_errors,
    connect_option,
    curve_client_options,
    model_options,
)
from .service_options import broker_options, heartbeat_options, worker_options
from .supervisor import ServeError, Supervisor
from .terminal import Spinner

_B = BrokerConfig()
_W = WorkerConfig()


@click.command()
@click.option(
    "--workers",
    "n_workers",
    default=2,
    show_default=True,
    type=click.IntRange(min=1),
    help="Worker processes to start.",
)
@bind_option("frontend", _B.frontend, "for clients (kvroute chat --connect)")
@bind_option("backend", "tcp://127.0.0.1:0", "for the workers (port 0: any free port)")
@click.option(
    "--http",
    "http",
    type=HTTP_ADDRESS,
    default=DEFAULT_HTTP,
    show_default=True,
    help="Serve the OpenAI-compatible HTTP API here (port 0: any free port).",
)
@click.option("--no-http", is_flag=True, help="Do not start the HTTP gateway.")
@model_options
@worker_options
@heartbeat_options
@broker_options
def serve(
    n_workers: int,
    frontend: str,
    backend: str,
    http: tuple[str, int],
    no_http: bool,
    model_kw: dict[str, Any],
    worker_kw: dict[str, Any],
    heartbeat_kw: dict[str, Any],
    broker_kw: dict[str, Any],
) -> None:
    """Start a broker and N workers; print a line per worker, then `ready`; stop on SIGINT/TERM.

    Each worker loads the model (seconds to tens of seconds); a line says when each is in.
    """
    with config_errors():  # every setting checked before the model is fetched
        bcfg = BrokerConfig(frontend=frontend, backend=backend, **heartbeat_kw, **broker_kw)
        wcfg = WorkerConfig(**model_kw, **worker_kw, **heartbeat_kw)
    gw: GatewayProcess | None = None
    with user_errors(BrokerError, ServeError, GatewayError):
        path = resolve_model(wcfg.model)  # fetch once here, not in N workers at the same time
        Engine.check(path)  # a bad file is one line here, not N tracebacks in workers
        sup = Supervisor(n_workers, bcfg, replace(wcfg, model=str(path)))
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
@connect_option(_W.connect, "The broker's backend address")
@click.option(
    "--id", "worker_id", default="", show_default="w<pid>", help="Worker id, reported in END."
)
@model_options
@worker_options
@heartbeat_options
@curve_client_options
def worker(
    url: str,
    worker_id: str,
    model_kw: dict[str, Any],
    worker_kw: dict[str, Any],
    heartbeat_kw: dict[str, Any],
    server_key: str | None,
    key: str | None,
) -> None:
    """Run one worker connected to a broker (this host or another) until SIGINT/SIGTERM."""
    set_title(f"kvroute worker {worker_id or f'w{os.getpid()}'}")
    with config_errors():
        cfg = WorkerConfig(
            connect=url,
            worker_id=worker_id,
            **model_kw,
            **worker_kw,
            **heartbeat_kw,
            server_key=server_key,
            key=key,
        )
    with user_errors():
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
