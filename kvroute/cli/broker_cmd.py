"""``kvroute broker``: run the broker alone (workers on this or other hosts connect to it).

Also the options ``broker`` and ``serve`` share: CURVE (``--curve-secret``, ``--allow-keys`` for
clients, ``--allow-worker-keys`` for workers) and the per-client limits, collected by
:func:`broker_options` into ``BrokerConfig`` keywords.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import click

from kvroute.broker import Broker, BrokerConfig, BrokerError
from kvroute.proto.limits import MAX_BODY_BYTES

from .app import echo_err, option_group, stop_on_signals, user_errors
from .options import BIND

logger = logging.getLogger(__name__)
_DEFAULTS = BrokerConfig()

_BROKER_OPTIONS = (
    (
        "curve_secret",
        click.option(
            "--curve-secret",
            metavar="FILE",
            default=None,
            help="The broker's secret certificate (server.key_secret): clients and workers must "
            "speak CURVE with an allowed key. Needs --allow-keys.",
        ),
    ),
    (
        "allow_keys",
        click.option(
            "--allow-keys",
            metavar="DIR",
            default=None,
            help="Directory of the public certificates (*.key) of the clients let in.",
        ),
    ),
    (
        "allow_worker_keys",
        click.option(
            "--allow-worker-keys",
            metavar="DIR",
            default=None,
            help="Directory of the public certificates (*.key) of the workers let in (a key may "
            "not be in both). Needed by `broker` with CURVE; `serve` lets its own workers in.",
        ),
    ),
    (
        "max_sessions_per_client",
        click.option(
            "--max-sessions-per-client",
            type=click.IntRange(min=1),
            default=_DEFAULTS.max_sessions_per_client,
            show_default=True,
            help="Sessions one client (CURVE key, or connection) may have open.",
        ),
    ),
    (
        "max_requests_per_client",
        click.option(
            "--max-requests-per-client",
            type=click.IntRange(min=1),
            default=_DEFAULTS.max_requests_per_client,
            show_default=True,
            help="Turns (and resets, closes) one client may have in flight.",
        ),
    ),
    (
        "max_body_bytes",
        click.option(
            "--max-body-bytes",
            type=click.IntRange(1, MAX_BODY_BYTES),
            default=_DEFAULTS.max_body_bytes,
            show_default=True,
            help="Largest request body; bigger ones get ERROR too_large.",
        ),
    ),
    (
        "max_msg_size",
        click.option(
            "--max-msg-size",
            type=click.IntRange(min=1),
            default=_DEFAULTS.max_msg_size,
            show_default=True,
            help="Socket limit per frame: ZeroMQ drops bigger ones and the peer's connection.",
        ),
    ),
    (
        "pin_ttl_s",
        click.option(
            "--pin-ttl",
            "pin_ttl_s",
            type=click.FloatRange(min=0, min_open=True),
            default=_DEFAULTS.pin_ttl_s,
            show_default=True,
            help="Seconds an idle session stays pinned; then it is forgotten and closed.",
        ),
    ),
    (
        "max_pins",
        click.option(
            "--max-pins",
            type=click.IntRange(min=1),
            default=_DEFAULTS.max_pins,
            show_default=True,
            help="Sessions pinned in all; beyond it the least recently used idle ones are closed.",
        ),
    ),
)


def _check_broker_options(kw: dict[str, Any]) -> None:
    if (kw["curve_secret"] is None) != (kw["allow_keys"] is None):
        raise click.UsageError("--curve-secret and --allow-keys go together")
    if kw["allow_worker_keys"] is not None and kw["curve_secret"] is None:
        raise click.UsageError("--allow-worker-keys needs --curve-secret and --allow-keys")
    if kw["max_msg_size"] < kw["max_body_bytes"]:
        raise click.UsageError("--max-msg-size must be at least --max-body-bytes")


broker_options = option_group("broker_kw", _BROKER_OPTIONS, _check_broker_options)
"""The shared broker options, handed to the command as ``broker_kw`` (BrokerConfig keywords)."""


@click.command()
@click.option(
    "--frontend",
    type=BIND,
    default=_DEFAULTS.frontend,
    show_default=True,
    help="Bind here for clients.",
)
@click.option(
    "--backend",
    type=BIND,
    default=_DEFAULTS.backend,
    show_default=True,
    help="Bind here for workers.",
)
@click.option(
    "--heartbeat",
    type=click.FloatRange(min=0.01),
    default=_DEFAULTS.heartbeat_interval,
    show_default=True,
    help="Seconds between heartbeats.",
)
@click.option(
    "--liveness",
    type=click.IntRange(min=1),
    default=_DEFAULTS.liveness,
    show_default=True,
    help="Silent heartbeat intervals before a worker is declared lost.",
)
@broker_options
def broker(
    frontend: str, backend: str, heartbeat: float, liveness: int, broker_kw: dict[str, Any]
) -> None:
    """Route chat sessions from clients (FRONTEND) to workers (BACKEND) until SIGINT/SIGTERM."""
    config = BrokerConfig(
        frontend=frontend,
        backend=backend,
        heartbeat_interval=heartbeat,
        liveness=liveness,
        **broker_kw,
    )
    with user_errors():
        b = Broker(config)  # reads the CURVE keys: a bad file is one line, before any thread
    # The broker owns its sockets in its own thread; the main thread keeps the signals.
    thread = threading.Thread(target=_run, args=(b,), name="kvroute-broker", daemon=True)
    with stop_on_signals() as stop:
        thread.start()
        try:
            with user_errors(BrokerError):
                front, back = b.wait_bound(timeout=10.0)
                curve = " curve on" if config.curve else ""
                echo_err(
                    f"broker frontend {front} backend {back}"
                    f" heartbeat {config.heartbeat_interval}s liveness {config.liveness}{curve}"
                )
                while not stop.wait(0.2) and thread.is_alive():
                    pass
                if not stop.is_set():
                    raise BrokerError("the broker stopped unexpectedly (see the log above)")
        finally:
            b.close()
            thread.join(timeout=5.0)


def _run(b: Broker) -> None:
    try:
        b.run()
    except BrokerError:
        pass  # wait_bound reports it in the main thread
    except Exception:
        logger.exception("broker failed")
