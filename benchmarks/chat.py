"""Multi-turn chat on the worker core: per-turn TTFT warm vs cold, batched decode throughput.

    python benchmarks/chat.py [--model default] [--turns 10] [--json OUT]

One run measures, on 1 BLAS thread:
- a 10-turn chat (system + ~30-token user turns, 32-token greedy replies): time to first token of
  every turn in the warm session, and of the same history sent to a fresh session (cold);
- aggregate decode tok/s with 1 and with 8 concurrent sessions.
It prints one JSON object with the ratios and their targets, and llama.cpp's turn-10 TTFT with
its KV kept (1 thread) on a conversation of the same shape, from tests/data/llamacpp_speed.json:
recorded once on another machine, so context for the ratios rather than a same-run baseline.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, limit_blas_threads, llamacpp_reference

limit_blas_threads(1)

from kvroute.engine.engine import Engine  # noqa: E402
from kvroute.engine.model_store import resolve_model  # noqa: E402
from kvroute.engine.sampling import SamplingParams  # noqa: E402
from kvroute.worker.events import EndEvent, TokenEvent  # noqa: E402
from kvroute.worker.scheduler import Scheduler  # noqa: E402

SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
USER_TURNS = [
    "I am planning a week-long trip to Portugal next spring. Which cities would you suggest "
    "for someone who likes history, food and walking?",
    "Lisbon sounds great. What are three neighbourhoods there that are worth exploring on "
    "foot, and what is special about each of them?",
    "How many days should I spend in Porto if I also want to take a day trip along the "
    "Douro valley to see the vineyards?",
    "What is the best way to travel between Lisbon and Porto: train, bus or a rental car? "
    "Please compare the cost and the time.",
    "Which traditional Portuguese dishes should I try, and are there any good vegetarian "
    "options in the local cuisine?",
    "I have heard about pastel de nata. Where did it come from and which bakery in Lisbon is "
    "most famous for making it?",
    "Could you suggest a relaxing beach town within two hours of Lisbon where I could spend "
    "the last two days of the trip?",
    "What phrases in Portuguese would be most useful for a tourist to learn before arriving, "
    "for example in restaurants?",
    "What should I pack for the weather in April, considering both the coast and the hills "
    "around Sintra and Porto?",
    "Thank you. Could you summarise the whole itinerary we discussed in a short list, one "
    "line for each day of the week?",
]


def run_turn(
    sched: Scheduler, sid: bytes, messages: list[dict[str, str]], max_tokens: int
) -> tuple[str, EndEvent]:
    sched.submit(b"r", sid, messages, SamplingParams(max_tokens=max_tokens))
    text, end = "", None
    while sched.busy:
        for e in sched.step():
            if isinstance(e, TokenEvent):
                text += e.text
            elif isinstance(e, EndEvent):
                end = e
    assert end is not None
    return text, end


def chat_ttft(engine: Engine, turns: int, max_tokens: int) -> list[dict[str, float]]:
    """Per turn: warm TTFT in one session, cold TTFT of the same history in a fresh session."""
    warm = Scheduler(engine)
    history = [{"role": "system", "content": SYSTEM}]
    rows = []
    for i in range(turns):
        history.append({"role": "user", "content": USER_TURNS[i % len(USER_TURNS)]})
        reply, end = run_turn(warm, b"warm", history, max_tokens)
        cold = Scheduler(engine)
        _, cold_end = run_turn(cold, b"cold", history, 1)
        rows.append(
            {
                "turn": i + 1,
                "prompt_tokens": end.stats.prompt_tokens,
                "cached_tokens": end.stats.cached_tokens,
                "path": end.stats.path,
                "warm_ttft_ms": end.stats.ttft_ms,
                "cold_ttft_ms": cold_end.stats.ttft_ms,
                "reply_tokens": end.stats.generated_tokens,
            }
        )
        history.append({"role": "assistant", "content": reply})
    return rows


def decode_throughput(engine: Engine, n_sessions: int, new_tokens: int) -> float:
    """Aggregate decode tok/s with ``n_sessions`` generating together (prefill excluded)."""
    sched = Scheduler(engine)
    for i in range(n_sessions):
        msgs = [{"role": "user", "content": USER_TURNS[i % len(USER_TURNS)]}]
        sched.submit(b"r", b"s%d" % i, msgs, SamplingParams(max_tokens=new_tokens, ignore_eos=True))
    while any(t.prefilling for t in sched.turns.values()):
        sched.step()
    produced, t0 = 0, time.perf_counter()
    while sched.busy:
        produced += sum(isinstance(e, TokenEvent) for e in sched.step())
    return produced / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--turns", type=int, default=10)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--json", type=Path, help="Also write the result here.")
    args = ap.parse_args()
    engine = Engine.load(resolve_model(args.model))
    rows = chat_ttft(engine, args.turns, args.max_tokens)
    one = decode_throughput(engine, 1, 48)
    eight = decode_throughput(engine, 8, 48)
    ref = llamacpp_reference()["threads"]["1"]
    last, second = rows[-1], rows[1] if len(rows) > 1 else rows[0]
    out = {
        "turns": rows,
        "turn_last_warm_ttft_ms": last["warm_ttft_ms"],
        "turn_last_cold_ttft_ms": last["cold_ttft_ms"],
        "turn_last_cold_over_warm": round(last["cold_ttft_ms"] / last["warm_ttft_ms"], 2),
        "turn_last_warm_over_turn2_warm": round(last["warm_ttft_ms"] / second["warm_ttft_ms"], 2),
        "llamacpp_turn10_ttft_ms_kv_kept": ref["chat_10_turns_ttft_ms_kv_kept"][-1],
        "llamacpp_prompt_tokens_per_turn": ref["chat_prompt_tokens_per_turn"],
        "decode_tok_s_1_session": round(one, 1),
        "decode_tok_s_8_sessions": round(eight, 1),
        "decode_8_over_1": round(eight / one, 2),
        "targets": {
            "cold_over_warm_turn10": ">= 10",
            "warm_turn10_over_turn2": "<= 1.5",
            "warm_turn10_ms": "<= llama.cpp turn 10 (kv kept)",
            "decode_8_over_1": ">= 2.5",
        },
    }
    emit(out, args.json)


if __name__ == "__main__":
    main()
