"""A fake fleet for the gateway benchmark: a broker with deep queues and a worker without an
engine that answers every TURN at once. Both are spawn targets (``multiprocessing``)."""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import zmq

from kvroute.proto import (
    EMPTY_BODY,
    CachePath,
    ColdReason,
    FinishReason,
    Heartbeat,
    Kind,
    Ready,
    Token,
    TurnEnd,
    TurnStats,
    control_frames,
    reply_sha256,
)
from kvroute.proto.kinds import HEADERS
from kvroute.proto.status import WorkerCounters, WorkerGauges


def gauges_heartbeat(started_ns: int) -> list[bytes]:
    """A fake worker's HEARTBEAT with gauges (what real workers send every interval)."""
    counters = WorkerCounters(
        {CachePath.COLD: 10, CachePath.TEXT_PREFIX: 90}, {ColdReason.NEW: 10}, 9000, 8000, 1000,
        6400, 0,
    )  # fmt: skip
    gauges = WorkerGauges("bench-host", started_ns, 1 << 30, 0, counters)
    return control_frames(Kind.HEARTBEAT, Heartbeat(1, 8, 1 << 24, gauges).encode())


def run_broker(q: Any, stop: Any) -> None:
    from kvroute.broker import Broker, BrokerConfig

    cfg = BrokerConfig("tcp://127.0.0.1:*", "tcp://127.0.0.1:*", hwm=1_000_000)
    b = Broker(cfg)
    threading.Thread(target=lambda: (stop.wait(), b.close()), daemon=True).start()
    threading.Thread(target=lambda: q.put(b.wait_bound(10.0)), daemon=True).start()
    b.run()


def run_fake_worker(backend: str, tokens: int, stop: Any, gauges_on: Any = None) -> None:
    """Answers each TURN with ``tokens`` TOKEN frames and an END, all at once; its heartbeats
    carry gauges while the event ``gauges_on`` is set."""
    text = " tok"
    bodies = [Token(i, text, (7,)).encode() for i in range(tokens)]
    stats = TurnStats(20, 0, 20, tokens, CachePath.COLD, ColdReason.NEW, 1.0, 2.0, "fake")
    end = TurnEnd(tokens, FinishReason.LENGTH, reply_sha256(text * tokens), stats).encode()
    tok_h, end_h = HEADERS[Kind.TOKEN], HEADERS[Kind.END]
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.SNDHWM, 1_000_000)
    s.connect(backend)
    s.send_multipart(
        control_frames(
            Kind.READY, Ready("fake", os.getpid(), time.time_ns(), 4096, "fake", 1 << 20).encode()
        )
    )
    beat = control_frames(Kind.HEARTBEAT, Heartbeat().encode())
    gauges_beat = gauges_heartbeat(time.time_ns())
    next_beat = time.monotonic() + 1.0
    while not stop.is_set():
        if s.poll(100):
            while True:
                try:
                    frames = s.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                if len(frames) == 6 and frames[0] == HEADERS[Kind.TURN]:
                    _, client, sid, rid, _, _ = frames
                    for body in bodies:
                        s.send_multipart([tok_h, client, sid, rid, body])
                    s.send_multipart([end_h, client, sid, rid, end])
                elif len(frames) == 6 and frames[0] == HEADERS[Kind.CLOSE]:
                    _, client, sid, rid, _, _ = frames
                    s.send_multipart([HEADERS[Kind.CLOSE_OK], client, sid, rid, EMPTY_BODY])
        if time.monotonic() >= next_beat:
            next_beat = time.monotonic() + 1.0
            s.send_multipart(gauges_beat if gauges_on is not None and gauges_on.is_set() else beat)
    s.close()
    ctx.term()
