"""A broker on its own thread with fake workers, for the socket-level broker tests.

The test files keep their own fixtures (named as their tests expect) as thin wrappers around
these, so a fixture is never imported into a test module.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

import zmq
from fake_peers import INTERVAL, TIMEOUT, Client, FakeWorker, wait_until

from kvroute.broker import Broker, BrokerConfig

Ctx = zmq.Context[zmq.Socket[bytes]]
Service = Callable[..., tuple[Broker, FakeWorker]]


def zmq_context() -> Iterator[Ctx]:
    """One ZeroMQ context for a test, destroyed without linger at its end (``yield from`` it)."""
    c: Ctx = zmq.Context()
    yield c
    c.destroy(linger=0)


def run_broker(b: Broker, crashes: list[BaseException]) -> threading.Thread:
    """Start ``b.run()`` on a daemon thread; an exception it dies of is appended to ``crashes``."""

    def run() -> None:
        try:
            b.run()
        except BaseException as exc:  # checked at teardown: the broker must never die
            crashes.append(exc)

    t = threading.Thread(target=run, name="broker", daemon=True)
    t.start()
    return t


@contextlib.contextmanager
def broker_service(token_delay: float = 0.0) -> Iterator[Service]:
    """``start(frontend=..., token_delay=..., **BrokerConfig overrides)`` -> broker and worker w0.

    ``token_delay`` is the default of the fake workers started. On exit every worker and broker
    is stopped, and it is asserted that each stopped cleanly and no broker died.
    """
    started: list[tuple[Broker, threading.Thread, FakeWorker]] = []
    crashes: list[BaseException] = []

    def start(
        frontend: str = "tcp://127.0.0.1:*", token_delay: float = token_delay, **config: Any
    ) -> tuple[Broker, FakeWorker]:
        b = Broker(BrokerConfig(frontend, "tcp://127.0.0.1:*", INTERVAL, **config))
        t = run_broker(b, crashes)
        _, backend = b.wait_bound(TIMEOUT)
        w = FakeWorker(backend, "w0", token_delay)
        w.start()
        started.append((b, t, w))
        wait_until(lambda: b.table.worker_key("w0") is not None)
        return b, w

    yield start
    for b, t, w in started:
        w.join()
        b.close()
        t.join(TIMEOUT)
        assert not t.is_alive(), "broker did not stop"
        assert w.exc is None, f"fake worker failed: {w.exc!r}"
    assert not crashes, f"broker died: {crashes!r}"


def add_worker(
    b: Broker, backend: str, workers: list[FakeWorker], name: str, token_delay: float = 0.0
) -> FakeWorker:
    """Start fake worker ``name`` on ``backend``, record it in ``workers`` (for the caller to
    join), and wait until broker ``b`` has registered it."""
    w = FakeWorker(backend, name, token_delay)
    w.start()
    workers.append(w)
    wait_until(lambda: b.table.worker_key(name) is not None)
    return w


def connect(ctx: Ctx, b: Broker) -> Client:
    """A test client on the broker's frontend."""
    assert b.endpoints is not None
    return Client(ctx, b.endpoints[0])
