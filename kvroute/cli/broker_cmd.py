"""``kvroute broker``: run the broker alone (workers on this or other hosts connect to it)."""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

import click

from kvroute.broker import Broker, BrokerConfig, BrokerError

from .app import echo_err, user_errors

logger = logging.getLogger(__name__)
_DEFAULTS = BrokerConfig()


@click.command()
@click.option(
    "--frontend", default=_DEFAULTS.frontend, show_default=True, help="Bind here for clients."
)
@click.option(
    "--backend", default=_DEFAULTS.backend, show_default=True, help="Bind here for workers."
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
def broker(frontend: str, backend: str, heartbeat: float, liveness: int) -> None:
    """Route chat sessions from clients (FRONTEND) to workers (BACKEND) until SIGINT/SIGTERM."""
    config = BrokerConfig(
        frontend=frontend, backend=backend, heartbeat_interval=heartbeat, liveness=liveness
    )
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    b = Broker(config)
    # The broker owns its sockets in its own thread; the main thread keeps the signals.
    thread = threading.Thread(target=_run, args=(b,), name="kvroute-broker", daemon=True)
    thread.start()
    try:
        with user_errors(BrokerError):
            front, back = b.wait_bound(timeout=10.0)
            echo_err(
                f"broker frontend {front} backend {back}"
                f" heartbeat {config.heartbeat_interval}s liveness {config.liveness}"
            )
            while not stop.wait(0.2) and thread.is_alive():
                pass
            if not stop.is_set():
                raise BrokerError("the broker stopped unexpectedly (see the log above)")
    finally:
        b.close()
        thread.join(timeout=5.0)
        for s, handler in previous.items():
            signal.signal(s, handler)


def _run(b: Broker) -> None:
    try:
        b.run()
    except BrokerError:
        pass  # wait_bound reports it in the main thread
    except Exception:
        logger.exception("broker failed")
