"""KV at rest: bytes held, restore time against a cold prefill, idle sessions per budget.

    python benchmarks/kv_rest.py [--model default] [--tokens 1500] [--json OUT]
                                 [--only checkpoint|decode]

BLAS is pinned to one thread, as in a worker. Every figure is a ratio against a baseline
measured in the same run. Prints one JSON object:

- ``bytes_per_token``: resident bytes per token of a parked session, per rest dtype, against
  float32 (targets: q8_0 <= 0.27x, q4_0 <= 0.16x);
- ``restore``: for a ``--tokens`` session, the time to bring its KV back against the cold
  prefill of the same ids: from RAM (decode a parked cache) and from disk (read, check and
  decode its spill file) per rest dtype (targets <= 0.10x from RAM, <= 0.25x from disk);
- ``idle_sessions``: sessions of 1,000 tokens one worker's store holds in 256 MiB before any
  leaves RAM, per rest dtype, against ``none`` (target >= 4x);
- ``decode``: decode step time with ``--kv-dtype f16`` against f32 at ``--tokens`` of context
  (target: f16 tok/s >= 0.95x of f32), alternating rounds, best of each;
- ``checkpoint``: the TTFT of a session's next turn on a worker that did not hold it (the turn
  flagged worker_lost, as after kill -9 of its worker), warm from the checkpoint the lost
  worker wrote against cold without one (target <= 0.25x); and the time to append a warm
  turn's positions to the checkpoint against that turn's TTFT (target <= 5%). The kill itself
  is exercised by ``tests/test_checkpoint_serve.py``; here both workers are schedulers in this
  process, so that only the turn is timed.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, limit_blas_threads

limit_blas_threads(1)

from kvroute.engine.cache import KVCache  # noqa: E402
from kvroute.engine.engine import Engine  # noqa: E402
from kvroute.engine.kv_codec import RestDtype  # noqa: E402
from kvroute.engine.model_store import resolve_model  # noqa: E402
from kvroute.engine.sampling import SamplingParams  # noqa: E402
from kvroute.worker.checkpoint import Checkpoints  # noqa: E402
from kvroute.worker.events import EndEvent  # noqa: E402
from kvroute.worker.scheduler import Scheduler, SchedulerConfig  # noqa: E402
from kvroute.worker.sessions import SessionStore  # noqa: E402
from kvroute.worker.spill import SpillDir, SpillIdentity  # noqa: E402

MIB = 1 << 20
LOSSY = [RestDtype.F16, RestDtype.Q8_0, RestDtype.Q4_0]
TARGETS = {
    "bytes_q8_0": 0.27,
    "bytes_q4_0": 0.16,
    "restore_ram": 0.10,
    "restore_disk": 0.25,
    "idle_sessions": 4.0,
    "decode_f16": 0.95,
    "checkpoint_ttft": 0.25,
    "checkpoint_write": 0.05,
}


def long_chat(engine: Engine, n: int) -> tuple[list[dict[str, str]], list[int]]:
    """A chat history of at least ``n`` tokens (reference questions and answers) ending with a
    user message, and its prompt ids."""
    cases = json.loads(
        (Path(__file__).resolve().parent.parent / "tests/data/llamacpp_cases.json").read_text()
    )["cases"]
    msgs: list[dict[str, str]] = []
    ids: list[int] = []
    i = 0
    while len(ids) < n:
        c = cases[i % len(cases)]
        msgs += [
            {"role": "user", "content": c["question"]},
            {"role": "assistant", "content": c["greedy_text"]},
        ]
        ids = engine.encode_prompt(engine.render_prompt([*msgs, {"role": "user", "content": "?"}]))
        i += 1
    msgs.append({"role": "user", "content": "?"})
    return msgs, ids


def long_prompt(engine: Engine, n: int) -> list[int]:
    """Ids of a chat history of at least ``n`` tokens, cut to n."""
    return long_chat(engine, n)[1][:n]


def turn(
    sched: Scheduler, sid: bytes, msgs: list[dict[str, str]], worker_lost: bool = False
) -> tuple[str, EndEvent]:
    """Run one greedy turn of 8 tokens; its reply and END."""
    events = list(sched.submit(b"r", sid, msgs, SamplingParams(8), worker_lost))
    while sched.busy:
        events.extend(sched.step())
    end = next(e for e in events if isinstance(e, EndEvent))
    return "".join(getattr(e, "text", "") for e in events), end


def checkpoint_figures(engine: Engine, n: int, directory: Path) -> dict[str, Any]:
    a = engine.model.args
    ident = SpillIdentity("0" * 64, engine.n_ctx, a.n_layers, a.n_kv_heads, a.head_dim)
    msgs, _ = long_chat(engine, n)
    ckpt = Checkpoints(directory, ident, RestDtype.Q8_0)
    lost = Scheduler(engine, SchedulerConfig(kv_rest=RestDtype.Q8_0, checkpoints=ckpt))
    reply, _ = turn(lost, b"s", msgs)  # the worker that will be lost: it checkpoints the turn
    nxt = [*msgs, {"role": "assistant", "content": reply}, {"role": "user", "content": "Why?"}]
    plain = Scheduler(engine)
    _, cold = turn(plain, b"s", nxt, worker_lost=True)
    ckpt2 = Checkpoints(directory, ident, RestDtype.Q8_0)
    heir = Scheduler(engine, SchedulerConfig(kv_rest=RestDtype.Q8_0, checkpoints=ckpt2))
    reply2, warm = turn(heir, b"s", nxt, worker_lost=True)
    assert warm.stats.kv_source == "checkpoint", warm.stats
    # A warm turn on the heir, with the time its checkpoint append takes.
    saves: list[float] = []
    save = ckpt2.save

    def timed_save(*args: Any) -> None:
        t = time.perf_counter()
        save(*args)
        saves.append(time.perf_counter() - t)

    ckpt2.save = timed_save  # type: ignore[method-assign,assignment]
    more = [*nxt, {"role": "assistant", "content": reply2}, {"role": "user", "content": "Sure?"}]
    _, hot = turn(heir, b"s", more)
    return {
        "tokens": cold.stats.prompt_tokens,
        "cold_ttft_ms": cold.stats.ttft_ms,
        "checkpoint_ttft_ms": warm.stats.ttft_ms,
        "checkpoint_restore_ms": warm.stats.restore_ms,
        "checkpoint_vs_cold": round(warm.stats.ttft_ms / cold.stats.ttft_ms, 4),
        "warm_ttft_ms": hot.stats.ttft_ms,
        "append_ms": round(saves[0] * 1e3, 2),
        "append_vs_warm_ttft": round(saves[0] * 1e3 / hot.stats.ttft_ms, 4),
    }


def restore_figures(engine: Engine, ids: list[int], spill_dir: Path) -> dict[str, Any]:
    base = engine.new_cache()
    t0 = time.perf_counter()
    engine.prefill(base, ids)
    cold_s = time.perf_counter() - t0
    a = engine.model.args
    ident = SpillIdentity("0" * 64, engine.n_ctx, a.n_layers, a.n_kv_heads, a.head_dim)
    out: dict[str, Any] = {"tokens": len(ids), "cold_prefill_ms": round(cold_s * 1e3, 1)}
    f32_per_token = base.bytes_per_token
    out["bytes_per_token"] = {"f32": f32_per_token}
    for dtype in RestDtype:
        parked = base.copy()
        parked.park(dtype)
        out["bytes_per_token"][dtype.value] = round(parked.nbytes / len(ids) / f32_per_token, 4)

        def from_ram(dtype: RestDtype = dtype) -> float:
            c = base.copy()
            c.park(dtype)
            t = time.perf_counter()
            c.unpark(16)
            return time.perf_counter() - t

        ram = min(from_ram() for _ in range(3))
        spill = SpillDir(spill_dir / dtype.value, 1 << 40, ident)

        def from_disk(dtype: RestDtype = dtype, spill: SpillDir = spill) -> float:
            c = base.copy()
            c.park(dtype)
            assert c.rest is not None
            spill.write(b"s", "", ids, c.rest)
            t = time.perf_counter()
            back = engine.new_cache()
            back.load(spill.take(b"s").rest)
            back.unpark(16)
            return time.perf_counter() - t

        disk = min(from_disk() for _ in range(3))
        out[f"restore_{dtype.value}"] = {
            "ram_ms": round(ram * 1e3, 1),
            "disk_ms": round(disk * 1e3, 1),
            "ram_vs_cold": round(ram / cold_s, 4),
            "disk_vs_cold": round(disk / cold_s, 4),
        }
    return out


def decode_figures(engine: Engine, ids: list[int], steps: int = 24) -> dict[str, Any]:
    caches = {}
    for dtype in ("f32", "f16"):
        caches[dtype] = engine.new_cache(dtype)
        engine.prefill(caches[dtype], ids)
    best = {"f32": float("inf"), "f16": float("inf")}
    for _ in range(3):
        for dtype, cache in caches.items():
            cache.truncate(len(ids))
            t0 = time.perf_counter()
            for i in range(steps):
                engine.forward([(cache, [100 + i])])
            best[dtype] = min(best[dtype], (time.perf_counter() - t0) / steps)
    return {
        "context": len(ids),
        "f32_step_ms": round(best["f32"] * 1e3, 2),
        "f16_step_ms": round(best["f16"] * 1e3, 2),
        "f16_vs_f32_tok_s": round(best["f32"] / best["f16"], 3),
    }


def idle_sessions(engine: Engine, base: KVCache, tokens: int, budget_mib: int) -> dict[str, Any]:
    """Sessions of ``tokens`` positions held in the budget before the first leaves RAM."""
    out: dict[str, Any] = {}
    for dtype in RestDtype:
        store = SessionStore(engine.new_cache, budget_mib * MIB, rest=dtype)
        n = 0
        while store.evictions == 0 and n < 10_000:
            s = store.acquire(f"s{n}".encode())
            cache = s.cache
            cache.reserve(tokens)  # as a turn leaves it: grown geometrically while it fed
            cache.k[:, :, :tokens] = base.k[:, :, :tokens]
            cache.v[:, :, :tokens] = base.v[:, :, :tokens]
            cache.advance(tokens)
            s.tokens = list(range(tokens))
            store.evict_to_fit()
            n += 1
        out[dtype.value] = n - 1
    base_n = max(1, out[RestDtype.NONE.value])
    out["ratio"] = {d.value: round(out[d.value] / base_n, 2) for d in LOSSY}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--tokens", type=int, default=1500)
    ap.add_argument("--budget-mib", type=int, default=256)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--only", choices=["checkpoint", "decode"], help="run one part alone")
    args = ap.parse_args()
    engine = Engine.load(resolve_model(args.model))
    ids = long_prompt(engine, args.tokens)
    if args.only == "checkpoint":
        with tempfile.TemporaryDirectory(prefix="kv_ckpt_") as tmp:
            print(json.dumps(checkpoint_figures(engine, args.tokens, Path(tmp)), indent=1))
        return
    if args.only == "decode":
        print(json.dumps(decode_figures(engine, ids), indent=1))
        return
    with tempfile.TemporaryDirectory(prefix="kv_rest_") as tmp:
        report = restore_figures(engine, ids, Path(tmp))
    base = engine.new_cache()
    engine.prefill(base, ids[:1000])
    report["idle_sessions"] = idle_sessions(engine, base, 1000, args.budget_mib)
    report["decode"] = decode_figures(engine, ids)
    with tempfile.TemporaryDirectory(prefix="kv_ckpt_") as tmp:
        report["checkpoint"] = checkpoint_figures(engine, args.tokens, Path(tmp))
    report["targets"] = {
        "bytes_q8_0<=0.27": report["bytes_per_token"]["q8_0"] <= TARGETS["bytes_q8_0"],
        "bytes_q4_0<=0.16": report["bytes_per_token"]["q4_0"] <= TARGETS["bytes_q4_0"],
        "restore_ram<=0.10": all(
            report[f"restore_{d.value}"]["ram_vs_cold"] <= TARGETS["restore_ram"] for d in LOSSY
        ),
        "restore_disk<=0.25": all(
            report[f"restore_{d.value}"]["disk_vs_cold"] <= TARGETS["restore_disk"] for d in LOSSY
        ),
        "idle_sessions>=4x": report["idle_sessions"]["ratio"]["q8_0"] >= TARGETS["idle_sessions"],
        "decode_f16>=0.95x": report["decode"]["f16_vs_f32_tok_s"] >= TARGETS["decode_f16"],
        "checkpoint_ttft<=0.25": report["checkpoint"]["checkpoint_vs_cold"]
        <= TARGETS["checkpoint_ttft"],
        "checkpoint_write<=5%": report["checkpoint"]["append_vs_warm_ttft"]
        <= TARGETS["checkpoint_write"],
    }
    emit(report, args.json)


if __name__ == "__main__":
    main()
