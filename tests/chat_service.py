"""Services for driving ``kvroute chat``: a real broker with fake workers, and a mute broker.

The fake workers (:class:`fake_peers.FakeWorker`) stream ``t0 t1 ...`` at a chosen pace and
record every delivery, so a test can see exactly what chat sent (settings, history, resends).
The mute broker answers PING and nothing else: a service that is up but never replies.
"""

from __future__ import annotations

import threading

import zmq
from broker_service import add_worker
from fake_peers import INTERVAL, TIMEOUT, FakeWorker

from kvroute.broker.config import BrokerConfig
from kvroute.broker.service import Broker
from kvroute.proto import Kind, TurnRequest
from kvroute.proto.frames import client_frames, parse_frontend


class FakeService:
    """A broker thread on loopback plus fake workers; ``frontend`` is chat's --connect."""

    def __init__(self) -> None:
        cfg = BrokerConfig("tcp://127.0.0.1:0", "tcp://127.0.0.1:0", INTERVAL)
        self.broker = Broker(cfg)
        self._thread = threading.Thread(target=self.broker.run, name="broker", daemon=True)
        self._thread.start()
        self.frontend, self.backend = self.broker.wait_bound(TIMEOUT)
        self.workers: list[FakeWorker] = []

    def add(self, name: str, token_delay: float = 0.0) -> FakeWorker:
        return add_worker(self.broker, self.backend, self.workers, name, token_delay)

    def turns(self) -> list[TurnRequest]:
        """Every TURN the workers received, in order per worker, workers in order."""
        return [
            TurnRequest.decode(d.body)
            for w in self.workers
            for d in w.deliveries
            if d.kind is Kind.TURN
        ]

    def close(self) -> None:
        for w in self.workers:
            w.join()
        self.broker.close()
        self._thread.join(TIMEOUT)
        assert not self._thread.is_alive(), "broker did not stop"


class MuteBroker:
    """A frontend that answers PING with PONG and ignores everything else (TURN, CANCEL)."""

    def __init__(self) -> None:
        self.requests: list[Kind] = []
        self._stop = threading.Event()
        self._bound = threading.Event()
        self.frontend = ""
        self._thread = threading.Thread(target=self._run, name="mute-broker", daemon=True)
        self._thread.start()
        assert self._bound.wait(TIMEOUT)

    def _run(self) -> None:
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        sock = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind("tcp://127.0.0.1:*")
        self.frontend = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._bound.set()
        try:
            while not self._stop.is_set():
                if not sock.poll(50):
                    continue
                req = parse_frontend(sock.recv_multipart())
                self.requests.append(req.kind)
                if req.kind is Kind.PING:
                    sock.send_multipart(
                        client_frames(req.client, Kind.PONG, req.session_id, req.request_id)
                    )
        finally:
            sock.close()
            ctx.term()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(TIMEOUT)
