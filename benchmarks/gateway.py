"""The HTTP gateway's cost: TTFT it adds, SSE chunks/s it sustains, keyless vs keyed affinity.

    python benchmarks/gateway.py [--model default] [--pairs 30] [--rounds 6] [--seconds 5]
                                 [--only {added,fleet-view}] [--json OUT]

Everything runs as separate processes on loopback, as deployed: ``kvroute broker``,
``kvroute worker`` (real model, 1 BLAS thread) and ``kvroute gateway``; the clients run here.
One run measures:

1. **TTFT added by the gateway** over the client library on the same warm turns: two copies of
   one conversation advance turn by turn, one through the library (``kvroute.Client``), one
   through the gateway (httpx, streamed, no session key). For each pair, the time outside the
   worker (client TTFT minus the worker's own TTFT, which END reports) is compared; the median
   difference is what the gateway adds (target <= 3 ms p50).
2. **SSE chunks/s** one gateway process sustains, with a fake worker (no engine) that answers
   every turn with ``--tokens`` TOKEN frames at once and a broker with deep queues. ``--streams``
   lean raw-socket HTTP clients keep a turn each in flight for ``--seconds``; chunks/s counts
   ``data:`` events received. Also reported per CPU-second of the gateway process, since the
   fake worker, the broker and the clients share the machine's cores (target >= 5,000/s).
   The gateway runs with a 3 s reply timeout: a turn that gets no reply in time is counted in
   ``failed_turns`` (and its wait in the wall time) instead of stalling the run.
3. **Turn-10 warm TTFT over HTTP with no session key vs with one** (``X-Session-ID``): pairs of
   10-turn conversations, turns interleaved; the ratio of the median turn-10 TTFTs (target <=
   1.1x), and of all warm turns. A third conversation per round has no key either and
   alternates between two gateways sharing an owner token (``--owner-token-file``): its ratio
   to the keyed one says what finding the session through the broker's index costs when the
   previous turn went through another gateway. Each kind's turn-10 TTFT is also split into the
   worker's own (END's ``ttft_ms``) and the rest (gateway, broker, lookup, HTTP): a gap between
   kinds in the first is the engine's step varying, in the second what the kind costs.
4. **The cost of the fleet view** (heartbeat gauges, STATUS, ``GET /metrics``), in one run:
   (a) frames/s through the broker from the fake worker (64 TOKENs and an END per turn, 8
   sessions of a raw DEALER client), in alternating rounds with the view off (plain
   heartbeats, nobody asking) and on (heartbeats carrying gauges, STATUS ``--status-hz``
   times a second); target <= 3% throughput loss. The broker's per-message counts are always
   on, so this is the view's cost on top of them. (b) warm TTFT of the real model through the
   library, two conversations advancing turn by turn, each turn of one with ``GET /metrics``
   scraped ``--status-hz`` times a second (every scrape a STATUS), of the other without.
   ``--only fleet-view`` runs this alone.

``--only added`` runs measurement 1 alone (one gateway, no fleet view): the quick check of the
gateway's per-request cost.

Prints one JSON object (also written to ``--json``). Measurement 4 lives in ``gateway_fleet.py``,
the fake broker and worker (2 and 4a) in ``fake_fleet.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import psutil
from _common import SHORT_TURNS, emit, p50
from fake_fleet import run_broker, run_fake_worker
from gateway_fleet import fleet_view_cpu, fleet_view_frames, fleet_view_ttft

from kvroute import Client, ServiceUnavailable

KVROUTE = [sys.executable, "-m", "kvroute"]
SYSTEM = "You are a travel assistant (conversation {}). Answer in a few sentences."
USER_TURNS = [
    "I am planning a week-long trip to Portugal next spring. Which cities would you suggest "
    "for someone who likes history, food and walking?",
    "Lisbon sounds great. What are three neighbourhoods there that are worth exploring on foot?",
    "How many days should I spend in Porto if I also want a day trip to the Douro valley?",
    "What is the best way to travel between Lisbon and Porto: train, bus or a rental car?",
    "Which traditional Portuguese dishes should I try, and are there vegetarian options?",
    "I have heard about pastel de nata. Where did it come from?",
    "Could you suggest a relaxing beach town within two hours of Lisbon?",
    "What phrases in Portuguese would be most useful for a tourist to learn?",
    "What should I pack for the weather in April on the coast and around Sintra?",
    "Thank you. Could you summarise the whole itinerary in a short list?",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Proc:
    """A ``kvroute`` subprocess whose stdout lines can be awaited; stopped with SIGTERM."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        self.p = subprocess.Popen(
            [*KVROUTE, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
        assert self.p.stdout is not None
        os.set_blocking(self.p.stdout.fileno(), False)

    def wait_line(self, pattern: str, timeout: float = 120.0) -> re.Match[str]:
        assert self.p.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.p.stdout.readline()
            if line:
                m = re.search(pattern, line)
                if m:
                    return m
                continue
            if self.p.poll() is not None:
                break
            time.sleep(0.02)
        raise RuntimeError(f"no line matching {pattern!r} from {self.p.args}")

    def cpu_s(self) -> float:
        t = psutil.Process(self.p.pid).cpu_times()
        return t.user + t.system

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.p.pid, signal.SIGKILL)
                self.p.wait(5)


def start_gateway(frontend: str, *extra: str) -> tuple[Proc, str]:
    gw = Proc(["gateway", "--connect", frontend, "--http", "127.0.0.1:0", *extra])
    return gw, gw.wait_line(r"^http (http://\S+)")[1]


def wait_for_worker(frontend: str, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    with Client(frontend, timeout=60) as c:
        while True:
            try:
                c.session().ask("hi", max_tokens=1)
                return
            except ServiceUnavailable:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)


# --- 1 and 3: real model -------------------------------------------------------------------


def http_turn(
    http: httpx.Client, msgs: list[dict[str, str]], max_tokens: int, headers: dict[str, str]
) -> tuple[str, float, dict[str, Any]]:
    """One streamed turn: reply, client TTFT (ms), the kvroute object."""
    body = {"model": "m", "messages": msgs, "max_tokens": max_tokens, "temperature": 0}
    body["stream"] = True
    parts: list[str] = []
    ttft: float | None = None
    info: dict[str, Any] = {}
    t0 = time.perf_counter()
    with http.stream("POST", "/v1/chat/completions", json=body, headers=headers) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"the turn failed mid-stream: {chunk['error']}")
            if chunk.get("kvroute"):
                info = chunk["kvroute"]
            for c in chunk["choices"]:
                text = c["delta"].get("content")
                if text:
                    if ttft is None:
                        ttft = (time.perf_counter() - t0) * 1e3
                    parts.append(text)
    assert info, "the last chunk carries the kvroute object"
    return "".join(parts), ttft if ttft is not None else (time.perf_counter() - t0) * 1e3, info


def added_ttft(frontend: str, url: str, pairs: int) -> dict[str, Any]:
    """Measurement 1: the same warm turns through the library and through the gateway."""
    lib_out, http_out, lib_ttft, http_ttft = [], [], [], []
    msgs: list[dict[str, str]] = []  # the library's session starts without a system prompt too
    with Client(frontend, timeout=60) as client, httpx.Client(base_url=url, timeout=60) as http:
        chat = client.session()
        for i in range(pairs + 2):
            text = SHORT_TURNS[i % len(SHORT_TURNS)]
            t0 = time.perf_counter()
            first: float | None = None
            for _ in chat.send(text, max_tokens=4, temperature=0):
                if first is None:
                    first = (time.perf_counter() - t0) * 1e3
            last = chat.last
            assert last is not None
            lt = first if first is not None else (time.perf_counter() - t0) * 1e3
            msgs.append({"role": "user", "content": text})
            reply, ht, info = http_turn(http, msgs, 4, {})
            msgs.append({"role": "assistant", "content": reply})
            if i < 2:
                continue  # turn 1 is cold; turn 2 settles
            assert info["path"] == "text_prefix", info
            lib_ttft.append(lt)
            http_ttft.append(ht)
            lib_out.append(lt - last.ttft_ms)
            http_out.append(ht - info["ttft_ms"])
    added = [h - lo for h, lo in zip(http_out, lib_out, strict=True)]
    return {
        "pairs": len(added),
        "added_ms_p50": p50(added),
        "added_ms_p90": statistics.quantiles(added, n=10)[-1],
        "lib_ttft_ms_p50": p50(lib_ttft),
        "http_ttft_ms_p50": p50(http_ttft),
        "http_vs_lib_ttft": p50(http_ttft) / p50(lib_ttft),
        "outside_worker_ms_p50": {"library": p50(lib_out), "gateway": p50(http_out)},
        "target_added_ms_p50": 3.0,
    }


def keyless_vs_keyed(url: str, url2: str, rounds: int) -> dict[str, Any]:
    """Measurement 3: 10-turn conversations with and without X-Session-ID, interleaved; the
    ``two_gateways`` one has no key and alternates between ``url`` and ``url2``."""
    kinds = ("keyless", "keyed", "two_gateways")
    t10: dict[str, list[float]] = {k: [] for k in kinds}
    t10_worker: dict[str, list[float]] = {k: [] for k in kinds}  # END's ttft_ms
    warm: dict[str, list[float]] = {k: [] for k in kinds}
    with (
        httpx.Client(base_url=url, timeout=120) as http,
        httpx.Client(base_url=url2, timeout=120) as http2,
    ):
        for r in range(rounds):
            # Within a round the conversations differ by one word of the system prompt (keyless
            # ones must not meet in the transcript index), and so do their greedy replies and
            # prompt lengths: each kind takes each word in turn over the rounds, so that no kind
            # keeps the conversation that happens to be longest. Rounds differ, or a later
            # round would continue an earlier one's session.
            convs = {
                k: [{"role": "system", "content": SYSTEM.format(f"{r}{'abc'[(i + r) % 3]}")}]
                for i, k in enumerate(kinds)
            }
            headers: dict[str, dict[str, str]] = {k: {} for k in kinds}
            headers["keyed"] = {"X-Session-ID": f"bench-{uuid.uuid4().hex}"}
            order = list(kinds[r % 3 :] + kinds[: r % 3])
            for turn, text in enumerate(USER_TURNS, start=1):
                for kind in order:
                    msgs = convs[kind]
                    msgs.append({"role": "user", "content": text})
                    client = http2 if kind == "two_gateways" and turn % 2 == 0 else http
                    reply, ttft, info = http_turn(client, msgs, 32, headers[kind])
                    msgs.append({"role": "assistant", "content": reply})
                    if turn > 1:
                        assert info["path"] == "text_prefix", (kind, info)
                        warm[kind].append(ttft)
                    if turn == len(USER_TURNS):
                        t10[kind].append(ttft)
                        t10_worker[kind].append(info["ttft_ms"])
    return {
        "rounds": rounds,
        "turn10_ttft_ms_p50": {k: p50(v) for k, v in t10.items()},
        "turn10_worker_ttft_ms_p50": {k: p50(v) for k, v in t10_worker.items()},
        "turn10_outside_worker_ms_p50": {
            k: p50([c - w for c, w in zip(t10[k], t10_worker[k], strict=True)]) for k in kinds
        },
        "turn10_keyless_vs_keyed": p50(t10["keyless"]) / p50(t10["keyed"]),
        "turn10_two_gateways_vs_keyed": p50(t10["two_gateways"]) / p50(t10["keyed"]),
        "warm_turns_keyless_vs_keyed": p50(warm["keyless"]) / p50(warm["keyed"]),
        "warm_turns_two_gateways_vs_keyed": p50(warm["two_gateways"]) / p50(warm["keyed"]),
        "target_ratio": 1.1,
    }


# --- 2: SSE chunks/s with a fake worker ----------------------------------------------------


async def sse_client(host: str, port: int, deadline: float, counts: list[int]) -> None:
    """Keep one streamed turn in flight until ``deadline``; count ``data:`` events, turns and
    failed turns (``counts``)."""
    body = json.dumps(
        {"model": "m", "messages": [{"role": "user", "content": "go"}], "stream": True}
    ).encode()
    request = (
        f"POST /v1/chat/completions HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json"
        f"\r\ncontent-length: {len(body)}\r\n\r\n"
    ).encode() + body
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while time.perf_counter() < deadline:
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = re.search(rb"content-length: (\d+)", head, re.I)
            if length:  # an error answer (JSON), not a stream
                await reader.readexactly(int(length[1]))
                counts[2] += 1
                continue
            buf = b""
            while not buf.endswith(b"0\r\n\r\n"):  # the chunked body's last chunk
                data = await reader.read(1 << 16)
                if not data:
                    raise RuntimeError("connection closed mid-stream")
                buf += data
            counts[0] += buf.count(b"data: ")
            counts[1] += 1
    finally:
        writer.close()


def sse_rate(tokens: int, streams: int, seconds: float) -> dict[str, Any]:
    """Measurement 2."""
    ctx = mp.get_context("spawn")
    q, stop = ctx.Queue(), ctx.Event()
    broker = ctx.Process(target=run_broker, args=(q, stop), daemon=True)
    broker.start()
    frontend, backend = q.get(timeout=30)
    worker = ctx.Process(target=run_fake_worker, args=(backend, tokens, stop), daemon=True)
    worker.start()
    # A short reply timeout: a turn that stalls fails fast and is counted, not waited for.
    gw, url = start_gateway(frontend, "--timeout", "3")
    try:
        host, port = url.removeprefix("http://").rsplit(":", 1)
        with httpx.Client(base_url=url, timeout=30) as http:  # warm-up: registration, caches
            for _ in range(50):
                try:
                    r = http.post(
                        "/v1/chat/completions",
                        json={"model": "m", "messages": [{"role": "user", "content": "go"}]},
                    )
                except httpx.HTTPError:
                    r = None
                if r is not None and r.status_code == 200:
                    break
                time.sleep(0.1)
        counts = [0, 0, 0]
        cpu0, t0 = gw.cpu_s(), time.perf_counter()

        async def main() -> None:
            deadline = time.perf_counter() + seconds
            await asyncio.gather(
                *(sse_client(host, int(port), deadline, counts) for _ in range(streams))
            )

        asyncio.run(main())
        wall, cpu = time.perf_counter() - t0, gw.cpu_s() - cpu0
    finally:
        gw.stop()
        stop.set()
        worker.join(5)
        broker.join(5)
    return {
        "streams": streams,
        "tokens_per_turn": tokens,
        "turns": counts[1],
        "failed_turns": counts[2],
        "chunks_per_s": counts[0] / wall,
        "gateway_cpu_s": cpu,
        "gateway_cpu_share": cpu / wall,
        "chunks_per_gateway_cpu_s": counts[0] / cpu if cpu > 0 else None,
        "target_chunks_per_s": 5000,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--pairs", type=int, default=30, help="warm turn pairs for measurement 1")
    ap.add_argument("--rounds", type=int, default=6, help="conversation pairs for measurement 3")
    ap.add_argument("--seconds", type=float, default=5.0, help="SSE load duration")
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--status-hz", type=float, default=10.0, help="fleet view polls a second (4)")
    ap.add_argument(
        "--only",
        choices=("added", "fleet-view"),
        help="run one measurement alone (quicker): 1 (added TTFT) or 4 (the fleet view)",
    )
    args = ap.parse_args()
    only = args.only

    out: dict[str, Any] = {}
    if only is None:
        out["sse"] = sse_rate(args.tokens, args.streams, args.seconds)
    if only != "added":
        out["fleet_view"] = {
            "broker_cpu": fleet_view_cpu(hz=args.status_hz),
            "frames": fleet_view_frames(1.0, 10 * args.rounds, args.status_hz),
        }
    front, back = free_port(), free_port()
    frontend = f"tcp://127.0.0.1:{front}"
    procs = [Proc(["broker", "--frontend", frontend, "--backend", f"tcp://127.0.0.1:{back}"])]
    try:
        procs.append(
            Proc(
                [
                    "worker",
                    "--connect",
                    f"tcp://127.0.0.1:{back}",
                    "--model",
                    args.model,
                    "--id",
                    "w0",
                ],
                env={"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"},
            )
        )
        wait_for_worker(frontend)
        with tempfile.TemporaryDirectory() as tmp:
            token = f"{tmp}/owner.token"  # the first gateway creates it, the second reads it
            gw, url = start_gateway(frontend, "--owner-token-file", token)
            procs.append(gw)
            if only == "added":
                out["added_ttft"] = added_ttft(frontend, url, args.pairs)
            else:
                gw2, url2 = start_gateway(frontend, "--owner-token-file", token)
                procs.append(gw2)
                ttft = fleet_view_ttft(frontend, url, args.pairs, args.status_hz)
                out["fleet_view"]["ttft"] = ttft
                if only is None:
                    out["added_ttft"] = added_ttft(frontend, url, args.pairs)
                    out["keyless_vs_keyed"] = keyless_vs_keyed(url, url2, args.rounds)
    finally:
        for p in reversed(procs):
            p.stop()
    out["meta"] = {"cpus": os.cpu_count(), **{k: str(v) for k, v in vars(args).items()}}
    emit(out, args.json)


if __name__ == "__main__":
    main()
