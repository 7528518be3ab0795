"""The soak's flood phase: fairness and the memory bound under one client's flood.

    python benchmarks/soak.py --flood [--workers 1] [--kv-budget-mb 256] [--quiet-turns 16]

A quiet client runs short chat turns (4-word questions, a new chat every 4 turns) alone, then
again while a second client floods at the broker's per-client limits:
``max_requests_per_client`` turns in flight, each on a new session that stays open (up to
``max_sessions_per_client``), retrying after ``overloaded`` or ``limit``. Reports the quiet
client's TTFT p50 beside the flood vs alone (the target: within 3x), and each worker's peak RSS
and reported KV bytes against its KV budget.

The flood runs in a process of its own, speaking the protocol on one DEALER, so its client-side
work stays small and off this process's interpreter (the broker thread, the quiet client).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import random
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import zmq
from soak import Progress, Sampler, mib, percentile

from kvroute import Client, KvrouteError, TurnResult
from kvroute.broker import BrokerConfig
from kvroute.cli.supervisor import Supervisor
from kvroute.engine.model_store import resolve_model
from kvroute.proto import (
    ChatMessage,
    ErrorReply,
    Kind,
    Role,
    TurnEnd,
    TurnRequest,
    parse_reply,
    request_frames,
)
from kvroute.proto.identity import new_owner_token
from kvroute.proto.kinds import TERMINAL_KINDS
from kvroute.worker.config import WorkerConfig

QUIET_TURNS = ("Name a fruit.", "Name a colour.", "Name a planet.", "Name an animal.")


def flood_process(
    frontend: str, max_tokens: int, retry_s: float, timeout: float, stop: Any, out: Any, seed: int
) -> None:
    """Spawned: keep the broker's per-client limits full until ``stop`` is set, then put what
    happened on ``out``.

    The flood speaks the protocol on one DEALER (one client identity) with no threads: a client
    library with a thread or task per request would spend a core of its own on 256 requests in
    flight, which a worker on a machine with few cores would feel more than the flood itself.
    Every turn is the first of a new session, which stays open (up to the sessions limit; the
    oldest are then closed); a refused turn is sent again on the same session after a pause (a
    new id per attempt would pin a session at the broker for every refusal).
    """
    limits = BrokerConfig(frontend="tcp://127.0.0.1:0", backend="tcp://127.0.0.1:0")
    rng = random.Random(seed)
    tally: Counter[str] = Counter()
    prompt_tokens: list[int] = []
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.ROUTING_ID, new_owner_token())
    sock.connect(frontend)
    open_sessions: list[bytes] = []
    in_flight: dict[bytes, tuple[float, bytes]] = {}  # request id -> (sent at, session id)
    # Free request slots: (when to send, the session to retry or b"" for a new one).
    retry_at: list[tuple[float, bytes]] = [(0.0, b"")] * limits.max_requests_per_client
    n = 0

    def send_turn(sid: bytes) -> None:
        nonlocal n
        n += 1
        sid, rid = sid or b"flood-%d" % n, b"%x" % n
        text = f"Hello {sid.decode()}, say hi."
        body = TurnRequest((ChatMessage(Role.USER, text),), max_tokens=max_tokens).encode()
        sock.send_multipart(request_frames(Kind.TURN, sid, rid, body))
        in_flight[rid] = (time.monotonic(), sid)

    try:
        while not stop.is_set():
            now = time.monotonic()
            while retry_at and retry_at[-1][0] <= now:
                _, sid = retry_at.pop()
                if len(open_sessions) + len(in_flight) >= limits.max_sessions_per_client:
                    oldest = open_sessions.pop(0)
                    sock.send_multipart(request_frames(Kind.CLOSE, oldest, b"close"))
                send_turn(sid)
            for rid, (sent, _sid) in list(in_flight.items()):
                if now - sent > timeout:  # lost: free its slot
                    del in_flight[rid]
                    tally["timeout"] += 1
                    retry_at.append((now, b""))
            if not sock.poll(50, zmq.POLLIN):
                continue
            while True:
                try:
                    reply = parse_reply(sock.recv_multipart(zmq.NOBLOCK))
                except zmq.Again:
                    break
                if reply.kind not in TERMINAL_KINDS or reply.request_id not in in_flight:
                    continue  # a TOKEN, or a CLOSE_OK
                _, sid = in_flight.pop(reply.request_id)
                if reply.kind is Kind.END:
                    tally["ok"] += 1
                    prompt_tokens.append(TurnEnd.decode(reply.body).stats.prompt_tokens)
                    open_sessions.append(sid)
                    retry_at.append((0.0, b""))
                    continue
                if reply.kind is Kind.ERROR:
                    tally[str(ErrorReply.decode(reply.body).code)] += 1
                else:
                    tally[reply.kind.name.lower()] += 1
                # A client at its limits comes back soon, with the same turn.
                retry_at.append((time.monotonic() + rng.uniform(0.5, 1.5) * retry_s, sid))
            retry_at.sort(reverse=True)
        out.put({"tally": dict(tally), "prompt_tokens": prompt_tokens, "open": len(open_sessions)})
    finally:
        sock.close()
        ctx.term()


def quiet_client(frontend: str, args: argparse.Namespace, n: int) -> list[TurnResult]:
    """``n`` short chat turns, a new chat every ``len(QUIET_TURNS)``, with a pause between."""
    results: list[TurnResult] = []
    with Client(frontend, timeout=args.timeout) as client:
        s = client.session()
        for k in range(n):
            if k and k % len(QUIET_TURNS) == 0:
                with contextlib.suppress(KvrouteError):
                    s.close()
                s = client.session()
            try:
                for _ in s.send(QUIET_TURNS[k % len(QUIET_TURNS)], max_tokens=args.max_tokens):
                    pass
            except KvrouteError as exc:
                print(f"flood: quiet turn {k} failed: {exc!r}", file=sys.stderr)
                continue
            assert s.last is not None
            results.append(s.last)
            time.sleep(args.think_s)
    return results


def flood_phases(frontend: str, args: argparse.Namespace, progress: Progress) -> dict[str, Any]:
    """Warm-up, the quiet client alone, then again beside the flood (``progress.done`` tags the
    memory samples: 0 before the flood, 1 during it, 2 after)."""
    quiet_client(frontend, args, len(QUIET_TURNS))  # warm-up, left out
    alone = quiet_client(frontend, args, args.quiet_turns)
    ctx = mp.get_context("spawn")
    stop, out = ctx.Event(), ctx.Queue()
    proc = ctx.Process(
        target=flood_process,
        args=(
            frontend,
            args.flood_max_tokens,
            args.flood_retry_s,
            args.timeout,
            stop,
            out,
            args.seed,
        ),
        name="soak-flood",
    )
    progress.done = 1
    proc.start()
    time.sleep(args.flood_warmup_s)
    t0 = time.monotonic()
    loaded = quiet_client(frontend, args, args.quiet_turns)
    flood_s = args.flood_warmup_s + time.monotonic() - t0
    stop.set()
    flood: dict[str, Any] = {"tally": {}, "prompt_tokens": [], "open": 0}
    with contextlib.suppress(Exception):
        flood = out.get(timeout=30.0)
    proc.join(10.0)
    if proc.is_alive():
        proc.kill()
    progress.done = 2

    def ttft(rs: list[TurnResult], client_side: bool = True) -> list[float]:
        return [(r.client_ttft_ms if client_side else r.ttft_ms) or 0.0 for r in rs]

    phases = (("alone", alone), ("loaded", loaded))
    p50 = {k: percentile(ttft(rs), 50) for k, rs in phases}
    ok = flood["tally"].get("ok", 0)
    return {
        "quiet": {
            "turns": {"alone": len(alone), "loaded": len(loaded), "planned": args.quiet_turns},
            "ttft_ms_p50": p50,
            "ttft_ms_p90": {k: percentile(ttft(rs), 90) for k, rs in phases},
            "worker_ttft_ms_p50": {k: percentile(ttft(rs, False), 50) for k, rs in phases},
            "ratio_p50": round(p50["loaded"] / p50["alone"], 2)
            if p50["alone"] and p50["loaded"]
            else None,
            "paths_loaded": dict(Counter(str(r.path) for r in loaded)),
        },
        "flood": {
            "seconds": round(flood_s, 1),
            "turns_ok": ok,
            "turns_per_s": round(ok / flood_s, 2),
            "refused": {k: v for k, v in flood["tally"].items() if k != "ok"},
            "open_sessions": flood["open"],
            "prompt_tokens_p50": percentile([float(x) for x in flood["prompt_tokens"]], 50),
        },
    }


def flood_main(args: argparse.Namespace) -> int:
    """Run the flood phase on its own service; print the JSON report (and write ``--json``)."""
    model = resolve_model(args.model)
    addresses = {"frontend": "tcp://127.0.0.1:0", "backend": "tcp://127.0.0.1:0"}
    bcfg = BrokerConfig(**addresses, liveness=args.liveness)
    wcfg = WorkerConfig(
        liveness=args.liveness,
        model=str(model),
        n_ctx=args.ctx,
        threads=1,
        kv_budget_mb=args.kv_budget_mb,
        capacity=args.capacity,
        prefill_chunk=args.prefill_chunk,
        host_workers=args.workers,
    )
    sup = Supervisor(args.workers, bcfg, wcfg)
    progress = Progress()
    try:
        sup.start()
        sampler = Sampler(sup, args.sample_s, progress)
        sampler.samples.append(sampler.sample())
        sampler.start()
        result = flood_phases(sup.frontend, args, progress)
        sampler.stop.set()
        sampler.join(10)
    finally:
        sup.close()
    budget = wcfg.kv_budget_bytes
    memory = {}
    for wid in sorted({w for s in sampler.samples for w in s["rss"]}):
        before = [s["rss"][wid] for s in sampler.samples if s["done"] == 0 and wid in s["rss"]]
        during = [s for s in sampler.samples if s["done"] == 1 and wid in s["rss"]]
        peak = max((s["rss"][wid] for s in during), default=0)
        peak_kv = max((s["kv"].get(wid, 0) for s in during), default=0)
        memory[wid] = {
            "rss_before_flood_mib": mib(before[-1]) if before else None,
            "peak_rss_mib": mib(peak),
            "peak_rss_growth_mib": mib(peak - before[-1]) if before and peak else None,
            "peak_reported_kv_mib": mib(peak_kv),
            "kv_budget_mib": mib(budget),
            "peak_kv_over_budget": round(peak_kv / budget, 3),
        }
    report = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "model": Path(model).name,
        "kv_budget": wcfg.describe_kv_budget(),
        "capacity": wcfg.capacity,
        "prefill_chunk": wcfg.prefill_chunk,
        **result,
        "worker_memory": memory,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0
