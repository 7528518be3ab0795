"""Measurement 4 of benchmarks/gateway.py: the cost of the fleet view (STATUS, ``GET /metrics``,
heartbeat gauges), on the fake fleet (frames/s) and on the real model (warm TTFT)."""

from __future__ import annotations

import multiprocessing as mp
import threading
import time
from typing import Any

import httpx
import zmq
from _common import SHORT_TURNS, p50
from fake_fleet import gauges_heartbeat, run_broker, run_fake_worker

from kvroute import Client
from kvroute.proto import ChatMessage, Heartbeat, Kind, Ready, Role, TurnRequest, request_frames
from kvroute.proto.kinds import HEADERS


class FramePump:
    """``sessions`` raw DEALER sessions, each keeping one TURN in flight through the broker to a
    fake worker; counts the frames that come back (TOKENs and ENDs)."""

    def __init__(self, frontend: str, sessions: int) -> None:
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVHWM, 1_000_000)
        self.sock.connect(frontend)
        self.body = TurnRequest((ChatMessage(Role.USER, "go"),), max_tokens=64).encode()
        self.sids = [f"obs-{i}".encode() for i in range(sessions)]
        self.n = 0
        for sid in self.sids:
            self._turn(sid)

    def _turn(self, sid: bytes) -> None:
        self.n += 1
        self.sock.send_multipart(request_frames(Kind.TURN, sid, b"%d" % self.n, self.body))

    def run(self, seconds: float) -> float:
        """Frames received per second over ``seconds``."""
        end_h, frames, t0 = HEADERS[Kind.END], 0, time.perf_counter()
        deadline = t0 + seconds
        while (now := time.perf_counter()) < deadline:
            if not self.sock.poll(max(1, int((deadline - now) * 1000))):
                continue
            while True:
                try:
                    msg = self.sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                frames += 1
                if msg[0] == end_h:
                    self._turn(msg[1])
        return frames / (time.perf_counter() - t0)

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()


class Poller:
    """A thread that, while :attr:`on` is set, fetches the fleet view ``hz`` times a second:
    STATUS through the client library, or ``GET /metrics`` from a gateway (which sends one)."""

    def __init__(self, hz: float, frontend: str | None = None, metrics_url: str | None = None):
        self.on, self.stop, self.hz, self.polls = threading.Event(), threading.Event(), hz, 0
        self.frontend, self.metrics_url = frontend, metrics_url
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        client = Client(self.frontend, timeout=10) if self.frontend else None
        http = httpx.Client(timeout=10) if self.metrics_url else None
        try:
            while not self.stop.is_set():
                if not self.on.wait(0.05):
                    continue
                t0 = time.perf_counter()
                if client is not None:
                    client.status()
                if http is not None and self.metrics_url is not None:
                    http.get(self.metrics_url).raise_for_status()
                self.polls += 1
                self.stop.wait(max(0.0, 1 / self.hz - (time.perf_counter() - t0)))
        finally:
            if client is not None:
                client.close()
            if http is not None:
                http.close()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)


def fleet_view_cpu(workers: int = 8, hz: float = 10.0, n: int = 2000) -> dict[str, Any]:
    """The broker's own CPU for the fleet view, timed in this process without sockets: decoding
    and keeping a HEARTBEAT with gauges, and building and encoding a FLEET of ``workers``
    workers; and what share of one second ``hz`` STATUS plus a heartbeat a second per worker
    take (the throughput it can cost, free of the noise of the frames/s rounds)."""
    from kvroute.broker.config import BrokerStats
    from kvroute.broker.fleet import FleetLedger
    from kvroute.broker.routing import RoutingTable

    table, ledger, stats = RoutingTable(3.0), FleetLedger(), BrokerStats()
    for i in range(workers):
        ready = Ready(f"w{i}", 1000 + i, i + 1, 16, "SmolLM2", 2048)
        table.register(b"key-%d" % i, ready, 0.0)
    beat = gauges_heartbeat(time.time_ns())[1]
    state = table.workers[b"key-0"]

    def per_call(fn: Any) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - t0) / n * 1e6

    heartbeat_us = per_call(lambda: ledger.heartbeat(state, Heartbeat.decode(beat)))
    for i in range(workers):
        ledger.heartbeat(table.workers[b"key-%d" % i], Heartbeat.decode(beat))
    status_us = per_call(lambda: ledger.view(table, stats, 1.0).encode())
    turn_us = per_call(lambda: ledger.turn_ended(Kind.END))
    share = (hz * status_us + workers * heartbeat_us) / 1e6
    return {
        "workers": workers,
        "heartbeat_with_gauges_us": heartbeat_us,
        "status_us": status_us,
        "turn_end_count_us": turn_us,
        "cpu_share_at_status_hz": share,
    }


def fleet_view_frames(seconds: float, rounds: int, hz: float) -> dict[str, Any]:
    """Measurement 4a: frames/s through the broker, fleet view on (workers' heartbeats carry
    gauges, STATUS ``hz`` times a second) vs off, alternating in one run."""
    ctx = mp.get_context("spawn")
    q, stop, gauges_on = ctx.Queue(), ctx.Event(), ctx.Event()
    broker = ctx.Process(target=run_broker, args=(q, stop), daemon=True)
    broker.start()
    frontend, backend = q.get(timeout=30)
    worker = ctx.Process(target=run_fake_worker, args=(backend, 64, stop, gauges_on), daemon=True)
    worker.start()
    with Client(frontend, timeout=10) as c:  # wait for the fake worker to register
        deadline = time.monotonic() + 30
        while not c.status().workers:
            assert time.monotonic() < deadline, "the fake worker did not register"
            time.sleep(0.05)
    poller = Poller(hz, frontend=frontend)
    pump = FramePump(frontend, sessions=8)
    rates: dict[str, list[float]] = {"off": [], "on": []}
    try:
        pump.run(1.0)  # warm-up
        for r in range(rounds):
            for arm in ("off", "on") if r % 2 == 0 else ("on", "off"):
                (gauges_on.set if arm == "on" else gauges_on.clear)()
                (poller.on.set if arm == "on" else poller.on.clear)()
                rates[arm].append(pump.run(seconds))
        poller.on.clear()
    finally:
        pump.close()
        poller.close()
        stop.set()
        worker.join(5)
        broker.join(5)
    on, off = p50(rates["on"]), p50(rates["off"])
    # Each round's two halves ran back to back: their ratio cancels the machine's slower drifts
    # (other processes on the same cores), which the medians over the run do not.
    paired = p50([a / b for a, b in zip(rates["on"], rates["off"], strict=True)])
    return {
        "rounds": rounds,
        "seconds_per_half": seconds,
        "frames_per_s_p50": {"off": off, "on": on},
        "frames_per_s": rates,
        "on_vs_off": on / off,
        "on_vs_off_paired_p50": paired,
        "throughput_loss": 1 - paired,
        "status_polls": poller.polls,
        "status_hz": hz,
        "target_loss": 0.03,
    }


def fleet_view_ttft(frontend: str, url: str, pairs: int, hz: float) -> dict[str, Any]:
    """Measurement 4b: warm TTFT through the library with ``GET /metrics`` scraped ``hz`` times
    a second (each scrape a STATUS) vs not, two conversations advancing turn by turn."""
    ttft: dict[str, list[float]] = {"off": [], "on": []}
    poller = Poller(hz, metrics_url=f"{url}/metrics")
    try:
        with Client(frontend, timeout=60) as client:
            chats = {"off": client.session(), "on": client.session()}
            for i in range(pairs + 2):
                text = SHORT_TURNS[i % len(SHORT_TURNS)]
                for arm in ("off", "on") if i % 2 == 0 else ("on", "off"):
                    (poller.on.set if arm == "on" else poller.on.clear)()
                    time.sleep(0.05)  # let the poller settle into (or out of) its rhythm
                    t0 = time.perf_counter()
                    first = None
                    for _ in chats[arm].send(text, max_tokens=4, temperature=0):
                        if first is None:
                            first = (time.perf_counter() - t0) * 1e3
                    if i >= 2:  # turn 1 is cold; turn 2 settles
                        ttft[arm].append(first if first is not None else float("nan"))
        poller.on.clear()
    finally:
        poller.close()
    on, off = p50(ttft["on"]), p50(ttft["off"])
    return {
        "pairs": len(ttft["on"]),
        "ttft_ms_p50": {"off": off, "on": on},
        "on_vs_off": on / off,
        "scrapes": poller.polls,
        "scrape_hz": hz,
    }
