"""llama.cpp's speed on the same GGUF and token ids, for `benchmarks/engine.py` to compare with.

Runs under a separate interpreter that has llama-cpp-python (never a kvroute dependency):

    python3 -m venv /tmp/llama-venv && /tmp/llama-venv/bin/pip install llama-cpp-python
    /tmp/llama-venv/bin/python benchmarks/llamacpp_probe.py < request.json

Reads one JSON request on stdin ({"model", "ids", "prefill_lengths", "decode_prompt",
"decode_steps", "repeats", "threads"}) and prints one JSON object: prefill tok/s per length and
single-stream greedy decode tok/s, each the best of ``repeats``, like the engine's own figures.
Imports nothing from kvroute, so it runs wherever llama_cpp is installed.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any


def main() -> None:
    """Measure and print."""
    import numpy as np
    from llama_cpp import Llama

    req: dict[str, Any] = json.load(sys.stdin)
    ids: list[int] = req["ids"]
    threads = int(req.get("threads", 1))
    llm = Llama(
        model_path=req["model"],
        n_ctx=max(req["prefill_lengths"] + [req["decode_prompt"] + req["decode_steps"]]) + 8,
        n_batch=512,
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )
    repeats = int(req["repeats"])

    def prefill_s(n: int) -> float:
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids[:n])
        return time.perf_counter() - t0

    def decode_s(prompt: int, steps: int) -> float:
        llm.reset()
        llm.eval(ids[:prompt])
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        t0 = time.perf_counter()
        for _ in range(steps):
            llm.eval([tok])
            tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        return time.perf_counter() - t0

    prefill_s(32)  # warm-up
    prefill = {
        str(n): n / min(prefill_s(n) for _ in range(repeats)) for n in req["prefill_lengths"]
    }
    steps = int(req["decode_steps"])
    decode = steps / min(decode_s(int(req["decode_prompt"]), steps) for _ in range(repeats))
    import llama_cpp

    out = {
        "version": getattr(llama_cpp, "__version__", "?"),
        "threads": threads,
        "prefill_tok_s": prefill,
        "decode_tok_s_single_stream": decode,
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
