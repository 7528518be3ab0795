"""Token sampling: greedy at temperature 0, otherwise temperature / top-k / top-p with a seed."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    """How to pick the next token and when to stop.

    Attributes
    ----------
    max_tokens:
        Upper bound on generated tokens (the stop token is not counted).
    temperature:
        0 means greedy argmax; otherwise logits are divided by it before softmax.
    top_k:
        Keep only the k most likely tokens (0 = no limit).
    top_p:
        Keep the smallest set of tokens whose probability reaches top_p (1.0 = no limit).
    seed:
        Seed of the sampler's random generator; None draws one from the OS.
    ignore_eos:
        Keep generating past end-of-turn tokens (benchmarks, conformance runs).
    stop:
        Strings that end a worker's turn before their first occurrence in the reply (the
        engine's own ``generate`` does not look at them).
    """

    max_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False
    stop: tuple[str, ...] = ()


class Sampler:
    """Stateful sampler: one per generation so a seed gives a reproducible sequence."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self._rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray) -> int:
        """Pick a token id from one position's logits ``(V,)``."""
        p = self.params
        if p.temperature <= 0.0:
            return int(np.argmax(logits))
        # Shift before dividing: a tiny temperature (even a subnormal one) then sends every
        # logit but the best towards -inf instead of overflowing them all to +inf (NaN probs).
        logits = logits.astype(np.float64)
        with np.errstate(over="ignore", divide="ignore"):
            scaled = (logits - logits.max()) / p.temperature
        scaled = np.nan_to_num(scaled, nan=-np.inf, neginf=-np.inf)
        ids = np.arange(scaled.shape[0])
        if 0 < p.top_k < scaled.shape[0]:
            ids = np.argpartition(scaled, -p.top_k)[-p.top_k :]
            scaled = scaled[ids]
        order = np.argsort(-scaled)
        ids, scaled = ids[order], scaled[order]
        probs = np.exp(scaled - scaled[0])
        probs /= probs.sum()
        if p.top_p < 1.0:
            # Keep tokens up to and including the one that reaches top_p.
            keep = int(np.searchsorted(np.cumsum(probs), p.top_p)) + 1
            ids, probs = ids[:keep], probs[:keep] / probs[:keep].sum()
        return int(ids[self._rng.choice(len(ids), p=probs)])
