"""Soak: many sessions x many turns on a served model, checking every turn.

    python benchmarks/soak.py [--sessions 64] [--turns 20] [--workers 2] [--model default]
                              [--max-tokens 24] [--concurrency 16] [--json OUT]

Starts a broker and N worker processes with :class:`kvroute.cli.supervisor.Supervisor`, then runs
``--sessions`` chat sessions of ``--turns`` turns each, ``--concurrency`` sessions at a time, on
one :class:`kvroute.AsyncClient`; a session CLOSEs after its last turn and the next one starts,
so the KV caches in use stay bounded and worker memory should reach a plateau. Every turn is
checked:

- lost: a turn that does not END (a SessionLost is a failover: resent once, and counted);
- duplicated / lost / reordered tokens: the client checks TOKEN sequence numbers and that the
  concatenated texts hash to END ``reply_sha256``; any ProtocolError is counted by cause;
- crossed sessions: every user message carries a nonce unique to its session and turn; a reply
  containing another session's nonce is crossed. And from turn 2 on, every turn must take the
  text-prefix path reusing at least the whole previous prompt, which a worker holding another
  session's cache under this id could not do;
- stickiness: END's worker never changes within a session unless a failover was reported;
- worker RSS (psutil on the supervisor's worker pids, every ``--sample-s``) and the KV bytes
  the workers report in their heartbeats: before the first turn, the peak of every wave of
  ``--concurrency`` sessions (wave 0 is the warm-up; a leak shows as peaks that keep climbing
  while later waves run the same workload), and once idle at the end.

Prints one JSON object (also written to ``--json``); exits 1 if an invariant was broken. Not
part of the test suite: it takes minutes with the real model.

    python benchmarks/soak.py --flood [--workers 1] [--kv-budget-mb 256] [--quiet-turns 16]
                              [--flood-warmup-s 10] [--flood-max-tokens 16]

``--flood`` runs the flood phase instead (``soak_flood.py``): a quiet client's TTFT beside one
client flooding at its limits, vs alone, and each worker's peak RSS against its KV budget.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import random
import re
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from kvroute import (
    AsyncClient,
    AsyncSession,
    KvrouteError,
    ProtocolError,
    SessionLost,
    TurnResult,
)
from kvroute.broker import BrokerConfig
from kvroute.cli.supervisor import Supervisor
from kvroute.engine.engine import DEFAULT_N_CTX
from kvroute.engine.model_store import resolve_model
from kvroute.proto import CachePath
from kvroute.worker.config import WorkerConfig

MIB = 1 << 20
NONCE = re.compile(r"Q[0-9A-Fa-f]{6}")
TOPICS = ("the sea", "bread", "trains", "winter", "bees", "music", "maps", "clocks", "salt")


@dataclass
class Tally:
    """What the soak saw; every field but the figures must stay at zero."""

    turns_planned: int = 0
    turns_ended: int = 0
    turns_lost: int = 0  # no END, even after one resend
    failovers: int = 0  # SessionLost reported (the turn was resent)
    protocol_errors: dict[str, int] = field(default_factory=dict)  # by cause
    other_errors: dict[str, int] = field(default_factory=dict)  # by exception type
    crossed: int = 0  # replies holding another session's nonce
    path_violations: int = 0  # turn >= 2 not text_prefix, or reused less than the last prompt
    stickiness_violations: int = 0  # END worker changed without a failover
    nonce_echoed: int = 0  # replies repeating their own nonce (informational: a 135M model)
    generated_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    ttft_ms: list[float] = field(default_factory=list)
    turn_ms: list[float] = field(default_factory=list)

    def count(self, table: dict[str, int], key: str) -> None:
        table[key] = table.get(key, 0) + 1


def protocol_cause(exc: ProtocolError) -> str:
    """Name what a client-side check caught (sequence gap, hash, count) or the remote code."""
    if exc.remote:
        return f"remote:{exc.code}"
    for needle, cause in (("seq", "seq_gap"), ("hash", "hash_mismatch"), ("END says", "count")):
        if needle in exc.message:
            return cause
    return f"client:{exc.code}"


# --- memory sampling ------------------------------------------------------------------------


class Sampler(threading.Thread):
    """Samples worker RSS and the KV bytes workers report in heartbeats every ``every`` seconds,
    tagged with how many sessions had closed (``progress.done``); restarts dead workers through
    the supervisor, and counts it (a soak must not need one)."""

    def __init__(self, sup: Supervisor, every: float, progress: Progress) -> None:
        super().__init__(name="soak-sampler", daemon=True)
        self.sup, self.every, self.progress = sup, every, progress
        self.samples: list[dict[str, Any]] = []  # {t, done, rss: {wid: B}, kv: {wid: B}}
        self.restarts: list[str] = []
        self.stop = threading.Event()
        self.t0 = time.monotonic()

    def run(self) -> None:
        while not self.stop.wait(self.every):
            self.restarts += self.sup.check()
            self.samples.append(self.sample())

    def sample(self) -> dict[str, Any]:
        rss = {}
        for wid, wp in self.sup.workers.items():
            with contextlib.suppress(psutil.Error, TypeError):
                rss[wid] = psutil.Process(wp.process.pid).memory_info().rss
        kv = {}
        with contextlib.suppress(RuntimeError):  # the broker thread may resize the dict
            for w in list(self.sup.broker.table.workers.values()):
                kv[w.worker_id] = int(getattr(w, "kv_bytes", 0))
        t = round(time.monotonic() - self.t0, 2)
        return {"t": t, "done": self.progress.done, "rss": rss, "kv": kv}


def mib(n: int) -> float:
    return round(n / MIB, 1)


def memory_report(
    samples: list[dict[str, Any]], idle: dict[str, Any], wave: int, sessions: int
) -> dict[str, Any]:
    """Per worker, in MiB: RSS before the first turn, the peak RSS (and peak reported KV) of
    every wave of ``wave`` sessions, the overall peak, and RSS once idle at the end.

    Wave 0 is the warm-up (allocator pools, first KV growth); a leak shows as peaks that keep
    climbing over the later waves, which run the same workload: ``growth_after_warmup`` is the
    last wave's peak minus the second's.
    """
    out: dict[str, Any] = {}
    for wid in sorted({w for s in samples for w in s["rss"]}):
        series = [s for s in samples if wid in s["rss"]]
        peaks: dict[int, tuple[int, int]] = {}
        for s in series:
            # The wave running at sample time (the last one until the very end).
            w = min(s["done"] // wave, (sessions - 1) // wave)
            rss, kv = peaks.get(w, (0, 0))
            peaks[w] = (max(rss, s["rss"][wid]), max(kv, s["kv"].get(wid, 0)))
        waves = [peaks[w] for w in sorted(peaks)]
        out[wid] = {
            "before_mib": mib(series[0]["rss"][wid]),
            "wave_peak_mib": [mib(r) for r, _ in waves],
            "wave_peak_kv_mib": [mib(k) for _, k in waves],
            "max_mib": mib(max(s["rss"][wid] for s in series)),
            "idle_after_mib": mib(idle["rss"].get(wid, 0)),
            "idle_kv_after_mib": mib(idle["kv"].get(wid, 0)),
            "growth_after_warmup_mib": mib(waves[-1][0] - waves[1][0]) if len(waves) > 2 else None,
        }
    return out


# --- the workload ---------------------------------------------------------------------------


@dataclass
class SessionPlan:
    """One session's script: a nonce per turn (unique over the whole soak)."""

    index: int
    nonces: list[str]

    def message(self, turn: int) -> str:
        topic = TOPICS[(self.index + turn) % len(TOPICS)]
        return f"My code is {self.nonces[turn]}. Repeat my code, then say one thing about {topic}."


async def one_turn(
    s: AsyncSession, text: str, args: argparse.Namespace, tally: Tally
) -> tuple[TurnResult | None, bool]:
    """Run one turn, resending once after a SessionLost; (its result or None, failed over)."""
    failover = False
    for _ in range(2):
        try:
            pieces = [p async for p in s.send(text, max_tokens=args.max_tokens)]
        except SessionLost:
            tally.failovers += 1
            failover = True
            continue
        except ProtocolError as exc:
            tally.count(tally.protocol_errors, protocol_cause(exc))
            return None, failover
        except KvrouteError as exc:
            tally.count(tally.other_errors, type(exc).__name__)
            return None, failover
        assert s.last is not None and s.last.reply == "".join(pieces)
        return s.last, failover
    return None, failover


async def run_session(
    client: AsyncClient,
    plan: SessionPlan,
    owner: dict[str, int],
    args: argparse.Namespace,
    tally: Tally,
) -> None:
    """All turns of one session, each checked; then CLOSE (frees its KV on the worker)."""
    s = client.session(session_id=f"soak-{plan.index:04d}")
    worker: str | None = None
    prev_prompt = 0
    for turn in range(args.turns):
        last, failover = await one_turn(s, plan.message(turn), args, tally)
        if last is None:
            tally.turns_lost += 1
            continue
        tally.turns_ended += 1
        tally.generated_tokens += last.generated_tokens
        tally.prompt_tokens += last.prompt_tokens
        tally.cached_tokens += last.cached_tokens
        tally.turn_ms.append(last.elapsed_ms)
        if last.client_ttft_ms is not None:
            tally.ttft_ms.append(last.client_ttft_ms)
        seen = {n.upper() for n in NONCE.findall(last.reply)}
        tally.nonce_echoed += plan.nonces[turn] in seen
        tally.crossed += any(owner.get(n, plan.index) != plan.index for n in seen)
        if worker is not None and last.worker != worker and not failover:
            tally.stickiness_violations += 1
        # From turn 2 on, the whole previous prompt must be reused, by text prefix.
        reused = last.path == CachePath.TEXT_PREFIX and last.cached_tokens >= prev_prompt
        if worker is not None and not failover and not reused:
            tally.path_violations += 1
        worker, prev_prompt = last.worker, last.prompt_tokens
    with contextlib.suppress(KvrouteError):
        await s.close()


def make_plans(args: argparse.Namespace) -> tuple[list[SessionPlan], dict[str, int]]:
    """Every session's nonces (unique over the soak), and which session owns each nonce."""
    rng = random.Random(args.seed)
    owner: dict[str, int] = {}
    plans = []
    for i in range(args.sessions):
        nonces = []
        while len(nonces) < args.turns:
            n = f"Q{rng.randrange(16**6):06X}"
            if n not in owner:
                owner[n] = i
                nonces.append(n)
        plans.append(SessionPlan(i, nonces))
    return plans, owner


@dataclass
class Progress:
    """Sessions closed so far (written by the event loop, read by the sampler thread)."""

    done: int = 0


async def soak(frontend: str, args: argparse.Namespace, tally: Tally, progress: Progress) -> None:
    """``--concurrency`` users, each taking the next session script until none is left."""
    plans, owner = make_plans(args)
    tally.turns_planned = args.sessions * args.turns
    todo = list(reversed(plans))

    async def user(client: AsyncClient) -> None:
        while todo:
            await run_session(client, todo.pop(), owner, args, tally)
            progress.done += 1
            if progress.done % max(1, args.sessions // 8) == 0:
                print(
                    f"soak: {progress.done}/{args.sessions} sessions,"
                    f" {tally.turns_ended} turns ended",
                    file=sys.stderr,
                )

    async with AsyncClient(frontend, timeout=args.timeout) as client:
        await asyncio.gather(*(user(client) for _ in range(args.concurrency)))


def percentile(xs: list[float], q: int) -> float | None:
    """The q-th percentile (1..99), None for no data."""
    if len(xs) < 2:
        return round(xs[0], 1) if xs else None
    return round(statistics.quantiles(xs, n=100, method="inclusive")[q - 1], 1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sessions", type=int, default=64)
    ap.add_argument("--turns", type=int, default=20)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--model", default="default", help="GGUF path or 'default'")
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--concurrency", type=int, default=16, help="sessions running at once")
    ap.add_argument("--ctx", type=int, default=DEFAULT_N_CTX, help="n_ctx per session")
    ap.add_argument("--timeout", type=float, default=120.0, help="client timeout per frame (s)")
    ap.add_argument("--sample-s", type=float, default=1.0, help="RSS sampling period (s)")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--json", type=Path, help="also write the JSON report here")
    flood = ap.add_argument_group("flood phase (--flood)")
    flood.add_argument("--flood", action="store_true", help="run the flood phase, not the soak")
    flood.add_argument("--quiet-turns", type=int, default=16, help="quiet turns per phase")
    flood.add_argument("--think-s", type=float, default=0.3, help="quiet client's pause (s)")
    flood.add_argument("--flood-warmup-s", type=float, default=10.0, help="flood before measuring")
    flood.add_argument("--flood-max-tokens", type=int, default=16)
    flood.add_argument(
        "--flood-retry-s", type=float, default=0.5, help="mean pause after a refusal"
    )
    flood.add_argument("--kv-budget-mb", type=float, default=None, help="default: the machine's")
    flood.add_argument("--capacity", type=int, default=WorkerConfig.capacity)
    flood.add_argument("--prefill-chunk", type=int, default=WorkerConfig.prefill_chunk)
    flood.add_argument(
        "--liveness",
        type=int,
        default=WorkerConfig.liveness,
        help="heartbeats missed before a peer is lost (raise it on a machine shared with others)",
    )
    args = ap.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    if args.flood:
        from soak_flood import flood_main  # its own module: a phase of its own

        return flood_main(args)

    model = resolve_model(args.model)
    bcfg = BrokerConfig(frontend="tcp://127.0.0.1:0", backend="tcp://127.0.0.1:0")
    wcfg = WorkerConfig(model=str(model), n_ctx=args.ctx, threads=1)
    sup = Supervisor(args.workers, bcfg, wcfg)
    tally = Tally()
    progress = Progress()
    t_start = time.monotonic()
    try:
        sup.start()
        print(
            f"soak: {args.workers} workers up after {time.monotonic() - t_start:.1f} s",
            file=sys.stderr,
        )
        sampler = Sampler(sup, args.sample_s, progress)
        sampler.samples.append(sampler.sample())
        sampler.start()
        t0 = time.monotonic()
        asyncio.run(soak(sup.frontend, args, tally, progress))
        elapsed = time.monotonic() - t0
        # Every session is closed: give the workers a few heartbeats to free and report.
        time.sleep(3 * bcfg.heartbeat_interval + 0.5)
        sampler.stop.set()
        sampler.join(10)
        idle = sampler.sample()
    finally:
        sup.close()
    memory = memory_report(sampler.samples, idle, args.concurrency, args.sessions)
    wall = time.monotonic() - t_start
    report = build_report(args, tally, len(sampler.restarts), memory, elapsed, wall, str(model))
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0 if report["ok"] else 1


def build_report(
    args: argparse.Namespace,
    tally: Tally,
    restarts: int,
    memory: dict[str, Any],
    elapsed: float,
    wall: float,
    model: str,
) -> dict[str, Any]:
    """The JSON report; ``ok`` is true when every invariant held and every turn ended."""
    invariants = {
        "turns_lost": tally.turns_lost,
        "protocol_errors": sum(tally.protocol_errors.values()),
        "other_errors": sum(tally.other_errors.values()),
        "crossed": tally.crossed,
        "path_violations": tally.path_violations,
        "stickiness_violations": tally.stickiness_violations,
        "worker_restarts": restarts,
    }
    return {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "model": Path(model).name,
        "elapsed_s": round(elapsed, 1),
        "wall_s": round(wall, 1),
        "turns": {
            "planned": tally.turns_planned,
            "ended": tally.turns_ended,
            "lost": tally.turns_lost,
            "failovers": tally.failovers,
        },
        **invariants,
        "protocol_error_causes": tally.protocol_errors,
        "other_error_types": tally.other_errors,
        "tokens": {
            "generated": tally.generated_tokens,
            "tok_per_s": round(tally.generated_tokens / elapsed, 1) if elapsed else None,
            "prompt": tally.prompt_tokens,
            "cached": tally.cached_tokens,
            "cache_hit": round(tally.cached_tokens / max(1, tally.prompt_tokens), 3),
        },
        "latency_ms": {
            "ttft_p50": percentile(tally.ttft_ms, 50),
            "ttft_p90": percentile(tally.ttft_ms, 90),
            "turn_p50": percentile(tally.turn_ms, 50),
            "turn_p90": percentile(tally.turn_ms, 90),
        },
        "nonce_echo_rate": round(tally.nonce_echoed / max(1, tally.turns_ended), 3),
        "worker_memory": memory,
        "ok": all(v == 0 for v in invariants.values()) and tally.turns_ended == tally.turns_planned,
    }


if __name__ == "__main__":
    sys.exit(main())
