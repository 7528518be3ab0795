"""What a worker reports of itself for the fleet view, with its heartbeats (I/O-free).

The broker never reads a TURN or an END, so the worker counts its own finished turns (by cache
path and cold reason, and their tokens) and adds what its scheduler knows at heartbeat time:
KV budget, evictions, turns waiting. Counters cover the life of the process, never reset (a
re-registration keeps them), so the broker can tell one process from the next by
``started_ns`` and add them up without counting anything twice.
"""

from __future__ import annotations

import socket
import time

from kvroute.proto.limits import MAX_COUNT, MAX_NAME_CHARS
from kvroute.proto.messages import CachePath, ColdReason, TurnStats
from kvroute.proto.status import WorkerCounters, WorkerGauges

from .scheduler import Scheduler


class WorkerMeter:
    """Counters of one worker process's finished turns, and its gauges for a HEARTBEAT.

    Parameters
    ----------
    host
        Where the worker runs (the host name if None).
    started_ns
        When the process started (wall clock, ns since the epoch; now if None).
    """

    def __init__(self, host: str | None = None, started_ns: int | None = None) -> None:
        self.host = (socket.gethostname() if host is None else host)[:MAX_NAME_CHARS]
        self.started_ns = time.time_ns() if started_ns is None else started_ns
        self.paths: dict[CachePath, int] = {}
        self.cold_reasons: dict[ColdReason, int] = {}
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.prefill_tokens = 0
        self.generated_tokens = 0

    def on_end(self, stats: TurnStats) -> None:
        """Count a finished turn (its END's stats)."""
        self.paths[stats.path] = self.paths.get(stats.path, 0) + 1
        if stats.cold_reason is not None:
            reason = stats.cold_reason
            self.cold_reasons[reason] = self.cold_reasons.get(reason, 0) + 1
        self.prompt_tokens += stats.prompt_tokens
        self.cached_tokens += stats.cached_tokens
        self.prefill_tokens += stats.prefill_tokens
        self.generated_tokens += stats.generated_tokens

    def counters(self, evictions: int = 0) -> WorkerCounters:
        """The counters so far (``evictions`` from the session store)."""
        return WorkerCounters(
            dict(self.paths),
            dict(self.cold_reasons),
            min(self.prompt_tokens, MAX_COUNT),
            min(self.cached_tokens, MAX_COUNT),
            min(self.prefill_tokens, MAX_COUNT),
            min(self.generated_tokens, MAX_COUNT),
            min(evictions, MAX_COUNT),
        )

    def gauges(self, scheduler: Scheduler) -> WorkerGauges:
        """What the next HEARTBEAT carries."""
        store = scheduler.store
        return WorkerGauges(
            host=self.host,
            started_ns=self.started_ns,
            kv_budget_bytes=store.kv_budget_bytes or 0,
            queue_depth=len(scheduler.admission),
            counters=self.counters(store.evictions),
        )
