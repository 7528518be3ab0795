"""``kvroute broker``: run the broker alone (workers on this or other hosts connect to it).

Its options besides the addresses are the sets ``serve`` takes too (:mod:`.service_options`): the
heartbeat, CURVE (``--curve-secret``, ``--allow-keys`` for clients, ``--allow-worker-keys`` for
workers) and the per-client limits.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import click

from kvroute.broker import Broker, BrokerConfig, BrokerError

from .app import echo_err, stop_on_signals, user_errors
from .options import bind_option, config_errors
from .service_options import broker_options, heartbeat_options

logger = logging.getLogger(__name__)
_DEFAULTS = BrokerConfig()


@click.command()
@bind_option("frontend", _DEFAULTS.frontend, "for clients")
@bind_option("backend", _DEFAULTS.backend, "for workers")
@heartbeat_options
@broker_options
def broker(
    frontend: str, backend: str, heartbeat_kw: dict[str, Any], broker_kw: dict[str, Any]
) -> None:
    """Route chat sessions from clients (FRONTEND) to workers (BACKEND) until SIGINT/SIGTERM."""
    with config_errors():
        config = BrokerConfig(frontend=frontend, backend=backend, **heartbeat_kw, **broker_kw)
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
