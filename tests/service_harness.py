"""An in-process kvroute service for tests: a broker thread and worker threads on loopback.

Each component creates its own ZeroMQ context and sockets inside its own thread, as in the real
processes; ports are picked by the OS. Real-process tests (``kvroute serve``) live elsewhere.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from kvroute.broker.config import BrokerConfig
from kvroute.broker.service import Broker
from kvroute.engine.engine import Engine
from kvroute.worker.config import WorkerConfig
from kvroute.worker.service import WorkerService

HEARTBEAT = 0.2  # seconds: short, so liveness tests finish quickly
REAL_MODEL_HEARTBEAT = 0.5
"""For the default model: a worker thread in a long prefill step (shared cores, the GIL) must
not look dead (liveness is 3 intervals)."""


@dataclass
class Harness:
    """A running broker + workers. ``frontend`` is what clients connect to."""

    broker: Broker
    frontend: str
    backend: str
    workers: dict[str, WorkerService] = field(default_factory=dict)
    stops: dict[str, threading.Event] = field(default_factory=dict)
    threads: list[threading.Thread] = field(default_factory=list)

    heartbeat: float = HEARTBEAT

    def add_worker(self, engine: Engine, worker_id: str, **kw: object) -> WorkerService:
        """Start one more worker thread and wait until the broker has it registered."""
        stop = threading.Event()
        cfg = WorkerConfig(
            connect=self.backend, worker_id=worker_id, heartbeat_interval=self.heartbeat, **kw
        )  # type: ignore[arg-type]
        service = WorkerService(engine, cfg, stop)
        t = threading.Thread(target=service.run, name=f"worker-{worker_id}", daemon=True)
        t.start()
        self.workers[worker_id], self.stops[worker_id] = service, stop
        self.threads.append(t)
        deadline = time.monotonic() + 10
        while self.broker.table.worker_key(worker_id) is None:
            assert time.monotonic() < deadline, f"worker {worker_id} did not register"
            time.sleep(0.01)
        return service

    def stop_worker(self, worker_id: str) -> None:
        """Stop one worker thread (it says DISCONNECT on the way out)."""
        self.stops[worker_id].set()

    def close(self) -> None:
        for stop in self.stops.values():
            stop.set()
        self.broker.close()
        for t in self.threads:
            t.join(timeout=5)


def start_harness(
    engine: Engine, n_workers: int = 2, heartbeat: float = HEARTBEAT, **worker_kw: object
) -> Harness:
    """Broker on random loopback ports plus ``n_workers`` workers named w0, w1, ..."""
    cfg = BrokerConfig(
        frontend="tcp://127.0.0.1:0", backend="tcp://127.0.0.1:0", heartbeat_interval=heartbeat
    )
    broker = Broker(cfg)
    t = threading.Thread(target=broker.run, name="broker", daemon=True)
    t.start()
    frontend, backend = broker.wait_bound(10)
    h = Harness(broker, frontend, backend, threads=[t], heartbeat=heartbeat)
    for i in range(n_workers):
        h.add_worker(engine, f"w{i}", **worker_kw)
    return h
