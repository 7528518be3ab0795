"""Turn records in, load-test statistics out: no sockets, no clocks, no printing.

The runner appends one :class:`TurnRecord` per request (a warm turn of a simulated user, or a
``--compare-cold`` probe); :func:`summarize` turns them into a :class:`Summary`. Warm-up records
are dropped first, so every number here describes the measured sessions only.

Definitions (all client-side unless marked worker-side):

- TTFT: TURN sent -> first text piece (-> END if the turn streamed no text: its first token was
  still computed). ITL: gaps between consecutive pieces of a turn, pooled over turns. TPOT: per
  turn, (last piece - first piece) / (generated tokens - 1). End-to-end: TURN sent -> END.
- Output tok/s and turns/s: generated tokens and finished warm turns over the measured window
  (first measured send -> last measured END). Probes add load but not tokens.
- Cache hit: cached / prompt tokens (per turn index: mean over turns; overall: token-weighted).
- Stickiness violation: a session's turn served by a worker other than the one that served its
  previous successful turn, without a reported failover in between (a SessionLost on that
  session, or the turn itself cold with reason ``worker_lost``).
- Error rate: (failed requests + violations) / requests, probes included.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from kvroute.client.errors import ContextOverflow, SessionBusy, SessionLost
from kvroute.proto import ColdReason

ERROR_KINDS: tuple[str, ...] = ("overflow", "busy", "lost", "timeout", "other")
"""How failed requests are counted (see :func:`classify_error`)."""
QUANTILES: tuple[int, ...] = (50, 90, 99)
TIMELINE_BINS = 60  # enough resolution for a plot, few enough to keep the JSON small


def classify_error(exc: BaseException) -> str:
    """The :data:`ERROR_KINDS` bucket of an exception a turn raised."""
    if isinstance(exc, ContextOverflow):
        return "overflow"
    if isinstance(exc, SessionBusy):
        return "busy"
    if isinstance(exc, SessionLost):
        return "lost"
    if isinstance(exc, TimeoutError):  # the client's Timeout derives from it
        return "timeout"
    return "other"


@dataclass(slots=True)
class TurnRecord:
    """One request as the runner saw it. Times are seconds since the run started.

    Attributes
    ----------
    session, turn
        Session index (0-based) and turn index (1-based) within it.
    probe
        A ``--compare-cold`` probe: the warm turn's history sent to a fresh session.
    warmup
        Belongs to a warm-up session (excluded from every statistic).
    start, end
        TURN sent; END (or the error) received.
    pieces
        Arrival time of every text piece.
    error, error_detail
        :data:`ERROR_KINDS` bucket and message of a failed request; None / "" for a successful
        one.
    worker .. worker_ttft_ms
        From the END's stats (unset for a failed request).
    cache_reported
        False when the server did not say how many prompt tokens came from its cache (an
        OpenAI-compatible server without ``cached_tokens``): left out of the cache hit.
    """

    session: int
    turn: int
    probe: bool = False
    warmup: bool = False
    start: float = 0.0
    end: float = 0.0
    pieces: list[float] = field(default_factory=list)
    error: str | None = None
    error_detail: str = ""
    worker: str | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    prefill_tokens: int = 0
    generated_tokens: int = 0
    path: str | None = None
    cold_reason: str | None = None
    finish_reason: str | None = None
    worker_ttft_ms: float | None = None
    cache_reported: bool = True

    @property
    def ok(self) -> bool:
        """The request ended with END."""
        return self.error is None

    @property
    def ttft_ms(self) -> float | None:
        """Client-side time to first piece (to END if no text streamed); None if it failed."""
        if not self.ok:
            return None
        first = self.pieces[0] if self.pieces else self.end
        return (first - self.start) * 1e3

    @property
    def e2e_ms(self) -> float | None:
        """Client-side TURN -> END time; None if it failed."""
        return (self.end - self.start) * 1e3 if self.ok else None

    @property
    def itl_ms(self) -> list[float]:
        """Gaps between consecutive pieces."""
        p = self.pieces
        return [(b - a) * 1e3 for a, b in itertools.pairwise(p)]

    @property
    def tpot_ms(self) -> float | None:
        """Decode time per output token after the first; None when unmeasurable."""
        if not self.ok or self.generated_tokens < 2 or len(self.pieces) < 2:
            return None
        return (self.pieces[-1] - self.pieces[0]) * 1e3 / (self.generated_tokens - 1)

    @property
    def cache_hit(self) -> float | None:
        """cached / prompt tokens; None if it failed."""
        if not (self.ok and self.prompt_tokens and self.cache_reported):
            return None
        return self.cached_tokens / self.prompt_tokens


@dataclass(frozen=True, slots=True)
class Violation:
    """A turn that moved to another worker without a reported failover."""

    session: int
    turn: int
    previous_worker: str
    worker: str


@dataclass(slots=True)
class TurnIndexStats:
    """Statistics of every measured session's turn ``turn`` (1-based)."""

    turn: int
    n: int
    errors: int
    prompt_tokens: float | None  # mean: the history length this turn index carries
    cache_hit: float | None  # mean of cached / prompt
    ttft_ms: dict[str, float | None]
    worker_ttft_ms: float | None  # p50
    cold_ttft_ms: dict[str, float | None]  # probes; all None without --compare-cold
    cold_worker_ttft_ms: float | None  # p50
    speedup: float | None  # cold p50 / warm p50 TTFT (client-side)
    worker_speedup: float | None  # the same on the workers' own TTFT (no queueing in the broker)


@dataclass(slots=True)
class WorkerLoad:
    """What one worker served (measured requests)."""

    turns: int = 0
    sessions: int = 0
    generated_tokens: int = 0
    prefill_tokens: int = 0
    probes: int = 0


@dataclass(slots=True)
class Summary:
    """Everything the report shows; :func:`summarize` builds it."""

    requests: int
    turns: int
    turns_ok: int
    probes: int
    errors: dict[str, int]
    probe_errors: dict[str, int]
    violations: list[Violation]
    error_rate: float
    duration_s: float
    output_tokens: int
    output_tok_s: float
    turns_s: float
    ttft_ms: dict[str, float | None]
    worker_ttft_ms: dict[str, float | None]
    itl_ms: dict[str, float | None]
    tpot_ms: dict[str, float | None]
    e2e_ms: dict[str, float | None]
    cache_hit: float | None
    paths: dict[str, int]
    cold_reasons: dict[str, int]
    finish_reasons: dict[str, int]
    per_turn: list[TurnIndexStats]
    workers: dict[str, WorkerLoad]
    timeline: list[tuple[float, float]]  # (bin start s, output tok/s in the bin)
    timeline_bin_s: float
    error_examples: dict[str, str]  # one message per error kind, to tell the user what failed


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0..100) with linear interpolation between ranks (numpy's
    default); None for no values."""
    if not values:
        return None
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be within 0..100, got {q}")
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def percentiles(values: Sequence[float], qs: Iterable[int] = QUANTILES) -> dict[str, float | None]:
    """``{"p50": .., "p90": .., "p99": ..}`` (None for no values)."""
    return {f"p{q}": percentile(values, q) for q in qs}


def find_violations(records: Iterable[TurnRecord]) -> list[Violation]:
    """Stickiness violations among warm turns (see the module docstring), in session order."""
    by_session: dict[int, list[TurnRecord]] = defaultdict(list)
    for r in records:
        if not r.probe:
            by_session[r.session].append(r)
    found = []
    for sid in sorted(by_session):
        owner: str | None = None
        failover = False  # a SessionLost since the owner's last turn excuses a move
        for r in sorted(by_session[sid], key=lambda r: r.turn):
            if r.error == "lost":
                failover = True
                continue
            if not r.ok or r.worker is None:
                continue  # other errors say nothing about placement
            excused = failover or r.cold_reason == ColdReason.WORKER_LOST
            if owner is not None and r.worker != owner and not excused:
                found.append(Violation(sid, r.turn, owner, r.worker))
            owner, failover = r.worker, False
    return found


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _ratio(num: float | None, den: float | None) -> float | None:
    return num / den if num is not None and den else None


def _count_errors(records: Iterable[TurnRecord]) -> dict[str, int]:
    c = Counter(r.error for r in records if r.error is not None)
    return {k: c.get(k, 0) for k in ERROR_KINDS}


def _per_turn(warm: list[TurnRecord], probes: list[TurnRecord]) -> list[TurnIndexStats]:
    warm_by: dict[int, list[TurnRecord]] = defaultdict(list)
    probe_by: dict[int, list[TurnRecord]] = defaultdict(list)
    for r in warm:
        warm_by[r.turn].append(r)
    for r in probes:
        probe_by[r.turn].append(r)
    rows = []
    for t in sorted(warm_by):
        rs = warm_by[t]
        ok = [r for r in rs if r.ok]
        cold = [r for r in probe_by.get(t, []) if r.ok]
        ttft = [r.ttft_ms for r in ok if r.ttft_ms is not None]
        wttft = [r.worker_ttft_ms for r in ok if r.worker_ttft_ms is not None]
        cttft = [r.ttft_ms for r in cold if r.ttft_ms is not None]
        cwttft = [r.worker_ttft_ms for r in cold if r.worker_ttft_ms is not None]
        warm_p50, wwarm_p50 = percentile(ttft, 50), percentile(wttft, 50)
        cold_p50, wcold_p50 = percentile(cttft, 50), percentile(cwttft, 50)
        rows.append(
            TurnIndexStats(
                turn=t,
                n=len(rs),
                errors=len(rs) - len(ok),
                prompt_tokens=_mean([r.prompt_tokens for r in ok]),
                cache_hit=_mean([h for r in ok if (h := r.cache_hit) is not None]),
                ttft_ms=percentiles(ttft),
                worker_ttft_ms=wwarm_p50,
                cold_ttft_ms=percentiles(cttft),
                cold_worker_ttft_ms=wcold_p50,
                speedup=_ratio(cold_p50, warm_p50),
                worker_speedup=_ratio(wcold_p50, wwarm_p50),
            )
        )
    return rows


def _workers(warm: list[TurnRecord], probes: list[TurnRecord]) -> dict[str, WorkerLoad]:
    load: dict[str, WorkerLoad] = defaultdict(WorkerLoad)
    sessions: dict[str, set[int]] = defaultdict(set)
    for r in warm:
        if r.ok and r.worker is not None:
            w = load[r.worker]
            w.turns += 1
            w.generated_tokens += r.generated_tokens
            w.prefill_tokens += r.prefill_tokens
            sessions[r.worker].add(r.session)
    for r in probes:
        if r.ok and r.worker is not None:
            load[r.worker].probes += 1
            load[r.worker].prefill_tokens += r.prefill_tokens
    for wid, ids in sessions.items():
        load[wid].sessions = len(ids)
    return dict(sorted(load.items()))


def _timeline(warm: list[TurnRecord], t0: float, width: float) -> list[tuple[float, float]]:
    """Output tok/s per time bin of ``width`` s; a turn's tokens are spread evenly over its
    pieces (a piece can carry several tokens when a character spans them)."""
    if width <= 0:
        return []
    bins = [0.0] * TIMELINE_BINS
    for r in warm:
        if r.ok and r.pieces:
            per_piece = r.generated_tokens / len(r.pieces)
            for t in r.pieces:
                bins[min(int((t - t0) / width), TIMELINE_BINS - 1)] += per_piece
    return [(i * width, n / width) for i, n in enumerate(bins)]


def summarize(records: Iterable[TurnRecord]) -> Summary:
    """Statistics of the measured (non-warm-up) records; see the module docstring."""
    measured = [r for r in records if not r.warmup]
    warm = [r for r in measured if not r.probe]
    probes = [r for r in measured if r.probe]
    ok = [r for r in warm if r.ok]
    violations = find_violations(warm)
    errors, probe_errors = _count_errors(warm), _count_errors(probes)
    failures = sum(errors.values()) + sum(probe_errors.values()) + len(violations)
    t0 = min((r.start for r in measured), default=0.0)
    duration = max((r.end for r in measured), default=0.0) - t0
    tokens = sum(r.generated_tokens for r in ok)
    reported = [r for r in ok if r.cache_reported]
    prompt = sum(r.prompt_tokens for r in reported)
    examples: dict[str, str] = {}
    for r in measured:
        if r.error is not None:
            examples.setdefault(r.error, r.error_detail)
    return Summary(
        requests=len(measured),
        turns=len(warm),
        turns_ok=len(ok),
        probes=len(probes),
        errors=errors,
        probe_errors=probe_errors,
        violations=violations,
        error_rate=failures / len(measured) if measured else 0.0,
        duration_s=duration,
        output_tokens=tokens,
        output_tok_s=tokens / duration if duration > 0 else 0.0,
        turns_s=len(ok) / duration if duration > 0 else 0.0,
        ttft_ms=percentiles([x for r in ok if (x := r.ttft_ms) is not None]),
        worker_ttft_ms=percentiles([x for r in ok if (x := r.worker_ttft_ms) is not None]),
        itl_ms=percentiles([g for r in ok for g in r.itl_ms], (50, 99)),
        tpot_ms=percentiles([x for r in ok if (x := r.tpot_ms) is not None], (50, 99)),
        e2e_ms=percentiles([x for r in ok if (x := r.e2e_ms) is not None]),
        cache_hit=sum(r.cached_tokens for r in reported) / prompt if prompt else None,
        paths=dict(Counter(r.path for r in ok if r.path is not None)),
        cold_reasons=dict(Counter(r.cold_reason for r in ok if r.cold_reason is not None)),
        finish_reasons=dict(Counter(r.finish_reason for r in ok if r.finish_reason is not None)),
        per_turn=_per_turn(warm, probes),
        workers=_workers(warm, probes),
        timeline=_timeline(warm, t0, duration / TIMELINE_BINS),
        timeline_bin_s=duration / TIMELINE_BINS,
        error_examples=examples,
    )
