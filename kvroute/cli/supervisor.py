"""Run a broker and N spawned worker processes as one service (``kvroute serve``, ``bench``).

The broker runs in a thread of this process (its sockets live in that thread); workers are
separate processes started with the ``spawn`` method, each creating its own ZeroMQ context after
it starts. Their process sentinels go to the broker, so a worker that exits is declared lost at
once rather than after the heartbeat window; the supervisor then starts a replacement with the
same id, which registers with a new epoch. Each worker titles itself ``kvroute worker ID`` and
exits when this process is gone, even after a SIGKILL (:mod:`kvroute.worker.process`).

Under CURVE (``broker_config.curve``) the supervisor makes a throwaway key pair for its workers,
unless the worker config brings one: the broker lets its public key in on the backend only
(``extra_worker_keys``), and each worker gets it with the broker's public key in its config
(the secret travels to the child through the spawn pipe, never to disk). ``--allow-keys`` then
holds the clients' keys, and ``--allow-worker-keys`` (optional here) those of workers started
elsewhere.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from multiprocessing.process import BaseProcess

import zmq

from kvroute.broker import Broker, BrokerConfig, BrokerError
from kvroute.worker.config import WorkerConfig
from kvroute.worker.service import worker_process_main

logger = logging.getLogger(__name__)

Progress = Callable[[list[str], float], None]
"""Called while workers load with the ids registered so far and the seconds elapsed."""

_BLAS_ENV = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


class ServeError(RuntimeError):
    """The service could not start (bind failure, a worker died while loading, timeout)."""


@dataclass
class WorkerProcess:
    """One worker child."""

    worker_id: str
    process: BaseProcess
    restarts: int = 0


class Supervisor:
    """Own a broker thread and the worker processes; `close` leaves nothing running.

    Parameters
    ----------
    n_workers:
        Worker processes to start (ids ``w0`` .. ``w{n-1}``).
    broker_config:
        Addresses and heartbeat of the broker.
    worker_config:
        Template for every worker (``connect`` and ``worker_id`` are filled in here).
    restart:
        Start a replacement when a worker exits unexpectedly.

    Raises
    ------
    KeyFileError
        CURVE is configured and a key file cannot be used.
    """

    def __init__(
        self,
        n_workers: int,
        broker_config: BrokerConfig,
        worker_config: WorkerConfig,
        restart: bool = True,
    ) -> None:
        self.n_workers = n_workers
        if broker_config.curve and worker_config.key is None:
            public, secret = zmq.curve_keypair()
            extra = (*broker_config.extra_worker_keys, public)
            broker_config = replace(broker_config, extra_worker_keys=extra)
            worker_config = replace(worker_config, key=(public, secret))
        self.broker = Broker(broker_config)
        if self.broker.curve is not None and worker_config.server_key is None:
            worker_config = replace(worker_config, server_key=self.broker.curve.public.decode())
        self.worker_config = worker_config
        self.restart = restart
        self.workers: dict[str, WorkerProcess] = {}
        self.frontend = ""
        self.backend = ""
        self._ctx = mp.get_context("spawn")
        self._thread: threading.Thread | None = None
        self._closed = False

    def start(
        self,
        timeout: float = 300.0,
        stop: threading.Event | None = None,
        progress: Progress | None = None,
    ) -> bool:
        """Start the broker and the workers; return once every worker has registered.

        Returns False if ``stop`` was set first (the caller then calls :meth:`close`).
        ``progress`` is called about ten times a second while the workers load.
        """
        thread = threading.Thread(target=self._run_broker, name="kvroute-broker", daemon=True)
        thread.start()
        self._thread = thread
        self.frontend, self.backend = self.broker.wait_bound(10.0)
        for i in range(self.n_workers):
            self._spawn(f"w{i}")
        return self.wait_registered(timeout, stop, progress)

    def _run_broker(self) -> None:
        try:
            self.broker.run()
        except BrokerError:
            pass  # wait_bound reports it to start()
        except Exception:
            logger.exception("broker thread crashed")

    def _spawn(self, worker_id: str) -> WorkerProcess:
        # Siblings share the machine's memory: each one's default KV budget counts them.
        host_workers = max(self.worker_config.host_workers, self.n_workers)
        cfg = replace(
            self.worker_config, connect=self.backend, worker_id=worker_id, host_workers=host_workers
        )
        # Children read these when numpy loads: one BLAS thread pool of the right size from the
        # start, so N workers do not fight over the cores.
        saved = {k: os.environ.get(k) for k in _BLAS_ENV}
        os.environ.update({k: str(cfg.threads) for k in _BLAS_ENV})
        try:
            proc = self._ctx.Process(
                target=worker_process_main, args=(cfg,), name=f"kvroute-{worker_id}"
            )
            proc.start()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        self.broker.watch(proc.sentinel, worker_id)
        old = self.workers.get(worker_id)
        wp = WorkerProcess(worker_id, proc, old.restarts + 1 if old else 0)
        self.workers[worker_id] = wp
        logger.info("started worker %s pid %s", worker_id, proc.pid)
        return wp

    def registered(self) -> list[str]:
        """Ids of workers the broker currently has as live."""
        return [w for w in self.workers if self.broker.table.worker_key(w) is not None]

    def wait_registered(
        self,
        timeout: float,
        stop: threading.Event | None = None,
        progress: Progress | None = None,
    ) -> bool:
        """Block until every worker is registered (True) or ``stop`` is set (False).

        Raises
        ------
        ServeError
            A worker died while loading, or ``timeout`` passed.
        """
        t0 = time.monotonic()
        while True:
            ready = self.registered()
            if progress is not None:
                progress(ready, time.monotonic() - t0)
            if len(ready) == len(self.workers):
                return True
            for wp in self.workers.values():
                if not wp.process.is_alive():
                    raise ServeError(
                        f"worker {wp.worker_id} exited with code {wp.process.exitcode} "
                        "while starting (see its log above)"
                    )
            if time.monotonic() - t0 > timeout:
                raise ServeError(f"workers not registered after {timeout:.0f} s")
            if stop is None:
                time.sleep(0.1)
            elif stop.wait(0.1):
                return False

    def check(self) -> list[str]:
        """Restart workers that exited (call periodically); returns the ids restarted.

        Call it from a thread that lives as long as the workers (the main thread): a worker's
        parent-death signal fires when the thread that started it exits.
        """
        restarted = []
        for wp in list(self.workers.values()):
            if not wp.process.is_alive() and not self._closed:
                logger.warning(
                    "worker %s (pid %s) exited with code %s",
                    wp.worker_id,
                    wp.process.pid,
                    wp.process.exitcode,
                )
                if self.restart:
                    self._spawn(wp.worker_id)
                    restarted.append(wp.worker_id)
        return restarted

    def close(self, timeout: float = 10.0) -> None:
        """Stop the broker, then the workers (SIGTERM, SIGKILL after ``timeout``). Idempotent.

        The broker goes first: it ends the turns in flight with ERROR ``shutting_down``, so a
        client learns the service is stopping instead of resending into workers that are
        stopping too.
        """
        if self._closed:
            return
        self._closed = True
        self.broker.close()
        if self._thread is not None:
            self._thread.join(5.0)
        for wp in self.workers.values():
            if wp.process.is_alive():
                wp.process.terminate()
        deadline = time.monotonic() + timeout
        for wp in self.workers.values():
            wp.process.join(max(0.0, deadline - time.monotonic()))
            if wp.process.is_alive():
                logger.warning("worker %s did not stop; killing it", wp.worker_id)
                wp.process.kill()
                wp.process.join(5.0)
