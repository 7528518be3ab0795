"""Broker throughput and added latency, with a fake echo worker (no engine).

    python benchmarks/broker.py [--seconds 3] [--samples 10000] [--window 64] [--json OUT]

Three processes on loopback TCP: the broker (``kvroute.broker.Broker``), an echo worker (a DEALER
on the backend that answers each TURN with ``--tokens`` TOKEN frames and an END, without decoding
anything) and, for the baseline, a direct echo server (a ROUTER answering the same way). The
client runs in this process and never decodes bodies either, and client and echo processes use
the broker's own lean multipart calls (``kvroute.broker.wire``), so on a machine with few cores
they take as little CPU from the broker as possible. ``cpu_*`` fields say who used the cores
during each run (``cpu_foreign``: other processes on the machine, which make the figures
pessimistic).

- throughput: ``--window`` sessions each keep one turn in flight for ``--seconds``; frames/s
  counts every message through the broker (requests in + replies out). Two shapes: ``echo``
  (TURN -> END) and ``stream`` (TURN -> 16 TOKEN + END, the chat-like one). The same streaming
  load against the direct server is reported for reference.
- latency: sequential TURN -> END round trips, alternating blocks through the broker and direct
  (so drift hits both). Added latency per frame = half the round-trip difference (a round trip
  through the broker is two broker hops).

Targets: >= 50k frames/s, <= 0.2 ms p50 added per frame; the direct server's figures from the
same run say how much of that the machine itself allows.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import threading
import time
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

import psutil
import zmq
from _common import emit

from kvroute.broker import Broker, BrokerConfig, wire
from kvroute.proto import (
    CachePath,
    ChatMessage,
    ColdReason,
    FinishReason,
    Heartbeat,
    Kind,
    Ready,
    Role,
    Token,
    TurnEnd,
    TurnRequest,
    TurnStats,
    control_frames,
    reply_sha256,
)
from kvroute.proto.kinds import HEADERS

TURN_H, TOKEN_H, END_H = HEADERS[Kind.TURN], HEADERS[Kind.TOKEN], HEADERS[Kind.END]
TURN_BODY = TurnRequest([ChatMessage(Role.USER, "hello there")], max_tokens=16).encode()
TOKEN_BODY = Token(0, " word", (1234,)).encode()
END_BODY = TurnEnd(
    16,
    FinishReason.LENGTH,
    reply_sha256("x"),
    TurnStats(20, 0, 20, 16, CachePath.COLD, ColdReason.NEW, 1.0, 2.0, "echo"),
).encode()


# How the fake peers send and receive: the broker's lean calls, or stock pyzmq (--plain-peers).
send_multipart: Any = wire.send_multipart
recv_multipart: Any = wire.recv_multipart


def _plain_send(sock: zmq.Socket[bytes], frames: list[bytes], flags: int = 0) -> None:
    sock.send_multipart(frames, flags)


def _plain_recv(sock: zmq.Socket[bytes], flags: int = zmq.NOBLOCK) -> list[bytes]:
    return sock.recv_multipart(flags)


def use_plain_pyzmq() -> None:
    global send_multipart, recv_multipart
    send_multipart, recv_multipart = _plain_send, _plain_recv


def _socket(ctx: zmq.Context[zmq.Socket[bytes]], kind: int) -> zmq.Socket[bytes]:
    s = ctx.socket(kind)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.SNDHWM, 100_000)
    s.setsockopt(zmq.RCVHWM, 100_000)
    return s


# --- child processes --------------------------------------------------------------------------


def run_broker(q: mp.Queue[Any], stop: Event) -> None:
    b = Broker(BrokerConfig(frontend="tcp://127.0.0.1:*", backend="tcp://127.0.0.1:*"))
    threading.Thread(target=lambda: (stop.wait(), b.close()), daemon=True).start()
    threading.Thread(target=lambda: q.put(b.wait_bound(10.0)), daemon=True).start()
    b.run()


def _echo(sock: zmq.Socket[bytes], frames: list[bytes], routed: bool, tokens: int) -> None:
    """Answer one TURN with ``tokens`` TOKEN frames and an END (bodies prebuilt)."""
    if routed:  # direct server's ROUTER: [client, header, sid, rid, body]
        client, header, sid, rid, _ = frames
        token = [client, TOKEN_H, sid, rid, TOKEN_BODY]
        end = [client, END_H, sid, rid, END_BODY]
    else:  # worker's DEALER behind the broker: [header, client, sid, rid, flags, body]
        header, client, sid, rid, _, _ = frames
        token = [TOKEN_H, client, sid, rid, TOKEN_BODY]
        end = [END_H, client, sid, rid, END_BODY]
    if header != TURN_H:
        return
    for _ in range(tokens):
        send_multipart(sock, token, 0)
    send_multipart(sock, end, 0)


def run_echo(
    address: str, bind: bool, q: mp.Queue[Any] | None, stop: Event, tokens: int, plain: bool
) -> None:
    if plain:
        use_plain_pyzmq()
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    sock = _socket(ctx, zmq.ROUTER if bind else zmq.DEALER)
    if bind:
        sock.bind(address)
        assert q is not None
        q.put(sock.getsockopt_string(zmq.LAST_ENDPOINT))
    else:
        sock.connect(address)
        ready = Ready("echo", os.getpid(), time.time_ns(), 64, "none", 2048)
        sock.send_multipart(control_frames(Kind.READY, ready.encode()))
    beat = control_frames(Kind.HEARTBEAT, Heartbeat().encode())
    next_beat = time.monotonic() + 1.0
    while not stop.is_set():
        if sock.poll(100):
            for _ in range(256):
                try:
                    frames = recv_multipart(sock)
                except zmq.Again:
                    break
                if len(frames) in (5, 6):
                    _echo(sock, frames, bind, tokens)
        if not bind and time.monotonic() >= next_beat:
            next_beat = time.monotonic() + 1.0
            sock.send_multipart(beat)
    sock.close()
    ctx.term()


# --- measurements -----------------------------------------------------------------------------


def round_trips(sock: zmq.Socket[bytes], n: int, tag: bytes = b"") -> list[float]:
    """``n`` sequential TURN -> END round trips on one session; seconds each.

    ``tag`` prefixes session ids: each client socket needs its own, as sessions belong to the
    client that created them (docs/design.md, *Security*) and a new socket is a new client."""
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        sock.send_multipart([TURN_H, tag + b"lat", b"%d" % i, TURN_BODY])
        while True:
            assert sock.poll(5000), "no reply"
            if sock.recv_multipart()[0] == END_H:
                break
        out.append(time.perf_counter() - t0)
    return out


def throughput(
    sock: zmq.Socket[bytes], window: int, seconds: float, tag: bytes = b""
) -> dict[str, float]:
    """Keep ``window`` sessions busy for ``seconds``; messages counted both ways (``tag``: as
    in :func:`round_trips`)."""
    seq = [0] * window
    index = {tag + b"s%d" % s: s for s in range(window)}
    for sid in index:
        sock.send_multipart([TURN_H, sid, b"0", TURN_BODY])
    sent = received = turns = 0
    t0 = time.perf_counter()
    deadline = t0 + seconds
    while True:
        try:
            header, sid, _, _ = recv_multipart(sock)
        except zmq.Again:  # poll only when the queue is empty: the client must stay cheap
            if not sock.poll(5000):
                raise RuntimeError("throughput run stalled") from None
            continue
        received += 1
        if header == END_H:
            turns += 1
            now = time.perf_counter()
            if now >= deadline:
                break
            s = index[sid]
            seq[s] += 1
            send_multipart(sock, [TURN_H, sid, b"%d" % seq[s], TURN_BODY], 0)
            sent += 1
    elapsed = time.perf_counter() - t0
    # Drain what is still in flight so the next run starts clean (not counted).
    ends = 1
    while ends < window and sock.poll(5000):
        ends += sock.recv_multipart()[0] == END_H
    return {
        "frames_per_s": round((sent + received) / elapsed),
        "turns_per_s": round(turns / elapsed),
    }


class CpuMeter:
    """CPU used during a block: by the first process (the broker, or the direct server), by all
    of ours, and by everything else on the machine (other work makes the figures pessimistic)."""

    def __init__(self, procs: list[psutil.Process]) -> None:
        self.procs = procs
        self.result: dict[str, float] = {}

    @staticmethod
    def _busy(t: Any) -> float:
        return float(t.user + t.system + getattr(t, "nice", 0.0))

    def __enter__(self) -> CpuMeter:
        self.t0 = time.perf_counter()
        self.sys0 = self._busy(psutil.cpu_times())
        self.p0 = [self._busy(p.cpu_times()) for p in self.procs]
        return self

    def __exit__(self, *exc: object) -> None:
        dt = time.perf_counter() - self.t0
        used = [self._busy(p.cpu_times()) - c for p, c in zip(self.procs, self.p0, strict=True)]
        system = self._busy(psutil.cpu_times()) - self.sys0
        self.result = {
            "cpu_first": round(used[0] / dt, 2),
            "cpu_ours": round(sum(used) / dt, 2),
            "cpu_foreign": round(max(0.0, system - sum(used)) / dt, 2),
        }


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=3.0, help="Per throughput run.")
    ap.add_argument("--samples", type=int, default=10_000, help="Round trips per path.")
    ap.add_argument("--window", type=int, default=64, help="Sessions in flight.")
    ap.add_argument("--tokens", type=int, default=16, help="TOKEN frames per turn (stream).")
    ap.add_argument(
        "--plain-peers",
        action="store_true",
        help="Fake client and worker use stock pyzmq send/recv_multipart (they cost more CPU).",
    )
    ap.add_argument("--json", type=Path, help="Also write the result here.")
    args = ap.parse_args()
    if args.plain_peers:
        use_plain_pyzmq()

    mpc = mp.get_context("spawn")
    stop = mpc.Event()
    q: mp.Queue[Any] = mpc.Queue()
    broker = mpc.Process(target=run_broker, args=(q, stop), name="broker")
    broker.start()
    frontend, backend = q.get(timeout=20)
    direct_q: mp.Queue[Any] = mpc.Queue()
    procs = [broker]
    results: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "window": args.window,
        "tokens_per_turn": args.tokens,
        "peers": "pyzmq" if args.plain_peers else "wire",
    }
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        for tokens, name in ((0, "echo"), (args.tokens, "stream")):
            stop_w = mpc.Event()
            worker_args = (backend, False, None, stop_w, tokens, args.plain_peers)
            worker = mpc.Process(target=run_echo, args=worker_args)
            direct_args = ("tcp://127.0.0.1:*", True, direct_q, stop_w, tokens, args.plain_peers)
            direct = mpc.Process(target=run_echo, args=direct_args)
            worker.start()
            direct.start()
            procs += [worker, direct]
            direct_addr = direct_q.get(timeout=20)
            via_broker, via_direct = _socket(ctx, zmq.DEALER), _socket(ctx, zmq.DEALER)
            via_broker.connect(frontend)
            via_direct.connect(direct_addr)
            time.sleep(0.5)  # the worker registers
            round_trips(via_broker, 500, name.encode())  # warm-up
            round_trips(via_direct, 500)
            if name == "echo":
                rtt_b: list[float] = []
                rtt_d: list[float] = []
                block = max(1, args.samples // 10)
                for _ in range(10):
                    rtt_b += round_trips(via_broker, block, name.encode())
                    rtt_d += round_trips(via_direct, block)
                lat = {
                    "direct_rtt_ms": {"p50": pct(rtt_d, 0.5) * 1e3, "p99": pct(rtt_d, 0.99) * 1e3},
                    "broker_rtt_ms": {"p50": pct(rtt_b, 0.5) * 1e3, "p99": pct(rtt_b, 0.99) * 1e3},
                }
                lat["added_per_frame_ms"] = {
                    q: (lat["broker_rtt_ms"][q] - lat["direct_rtt_ms"][q]) / 2
                    for q in ("p50", "p99")
                }
                results["latency"] = {
                    k: {q: round(v, 4) for q, v in d.items()} for k, d in lat.items()
                }
            ours = [psutil.Process(p.pid) for p in (broker, worker)] + [psutil.Process()]
            with CpuMeter(ours) as cpu:
                tp = throughput(via_broker, args.window, args.seconds, name.encode())
            results[f"{name}_via_broker"] = {**tp, **cpu.result}
            with CpuMeter([psutil.Process(direct.pid), psutil.Process()]) as cpu:
                tp = throughput(via_direct, args.window, args.seconds)
            results[f"{name}_direct"] = {**tp, **cpu.result}
            via_broker.close()
            via_direct.close()
            stop_w.set()
            worker.join(5)
            direct.join(5)
    finally:
        stop.set()
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()
        ctx.term()
    frames = results["stream_via_broker"]["frames_per_s"]
    added = results["latency"]["added_per_frame_ms"]["p50"]
    results["targets"] = {
        "frames_per_s>=50000": frames >= 50_000,
        "added_p50_ms<=0.2": added <= 0.2,
    }
    emit(results, args.json)


if __name__ == "__main__":
    main()
