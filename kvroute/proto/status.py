"""Bodies of the fleet view: the gauges a worker adds to its HEARTBEAT, and FLEET, the broker's
answer to STATUS.

The broker never reads a TURN or a TOKEN, so what only workers know (sessions resident, KV bytes
and budget, evictions, turns by cache path, token counts, the waiting queue) travels in their
heartbeats as :class:`WorkerGauges`. The broker keeps the latest per worker, adds its own counts
(messages, requests in flight and their outcomes, errors it sent, workers lost, sessions
pinned), and answers STATUS (empty body, empty session id allowed) with :class:`Fleet`.

Counters only grow for the life of a worker process (``started_ns`` tells one process from the
next). ``Fleet.totals`` adds up every worker process this broker has heard from, gone ones
included, so fleet-wide counters never go back when a worker dies or restarts; turns a worker
finished after its last heartbeat before dying are not in them.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import Annotated, ClassVar, TypeVar

import msgspec
from msgspec import Meta

from . import limits as L
from .errors import ErrorCode, ProtocolViolation
from .fields import Body, Count, Name, NCtx, WorkerId
from .kinds import Kind
from .messages import CachePath, ColdReason


class TurnOutcome(StrEnum):
    """How a TURN ended, as the broker saw its terminal reply (FLEET ``broker.requests``)."""

    END = "end"  # the reply finished (any finish reason, cancelled included)
    OVERFLOW = "overflow"  # prompt + max_tokens did not fit n_ctx; nothing ran
    ERROR = "error"  # ERROR from the worker or the broker (no_worker, limit, bad_body, ...)
    SESSION_LOST = "session_lost"  # the worker was lost with the turn in flight
    BUSY = "busy"  # the session already had a request in flight


OUTCOME_OF: dict[Kind, TurnOutcome] = {
    Kind.END: TurnOutcome.END,
    Kind.OVERFLOW: TurnOutcome.OVERFLOW,
    Kind.ERROR: TurnOutcome.ERROR,
    Kind.SESSION_LOST: TurnOutcome.SESSION_LOST,
    Kind.BUSY: TurnOutcome.BUSY,
}
"""The outcome each terminal kind means for a TURN."""

K = TypeVar("K")


class WorkerCounters(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What a worker process did since it started: turns it finished (END) by cache path and,
    for cold ones, by reason; their prompt, cached, prefilled and generated tokens; the idle
    sessions it evicted to stay within its KV budget. A path or reason a map leaves out counts
    0."""

    paths: dict[CachePath, Count]
    cold_reasons: dict[ColdReason, Count]
    prompt_tokens: Count
    cached_tokens: Count
    prefill_tokens: Count
    generated_tokens: Count
    evictions: Count

    @property
    def turns(self) -> int:
        """Turns finished, all paths."""
        return sum(self.paths.values())

    def check(self, what: str) -> None:
        """The cold reasons add up to the cold turns, and cached + prefill tokens to prompt
        tokens (``out_of_range``)."""
        cold = self.paths.get(CachePath.COLD, 0)
        if sum(self.cold_reasons.values()) != cold:
            raise ProtocolViolation(
                ErrorCode.OUT_OF_RANGE, f"{what}: cold reasons do not add up to {cold} cold turns"
            )
        if self.cached_tokens + self.prefill_tokens != self.prompt_tokens:
            raise ProtocolViolation(
                ErrorCode.OUT_OF_RANGE, f"{what}: cached + prefill tokens != prompt tokens"
            )

    def __add__(self, other: WorkerCounters) -> WorkerCounters:
        return WorkerCounters(
            _merged(self.paths, other.paths),
            _merged(self.cold_reasons, other.cold_reasons),
            self.prompt_tokens + other.prompt_tokens,
            self.cached_tokens + other.cached_tokens,
            self.prefill_tokens + other.prefill_tokens,
            self.generated_tokens + other.generated_tokens,
            self.evictions + other.evictions,
        )


def _merged(a: Mapping[K, int], b: Mapping[K, int]) -> dict[K, int]:
    return {k: a.get(k, 0) + b.get(k, 0) for k in a.keys() | b.keys()}


NO_COUNTS = WorkerCounters({}, {}, 0, 0, 0, 0, 0)
"""Counters of a process that has done nothing yet."""


class WorkerGauges(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What a worker adds to its HEARTBEAT for the fleet view: its host and start time (wall
    clock, ns since the epoch: with the worker id it names one worker process), its KV budget
    (0: none), the turns waiting for a slot or KV room, and its :class:`WorkerCounters`."""

    host: Name
    started_ns: Count
    kv_budget_bytes: Count
    queue_depth: Count
    counters: WorkerCounters


class WorkerView(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One registered worker in FLEET: what its READY said, the broker's own counts (requests
    in flight on it, sessions pinned to it, milliseconds since it was last heard from), its
    last HEARTBEAT (turns running, sessions resident, KV bytes) and the gauges that came with
    it (nil while none did: an older worker, or no heartbeat yet)."""

    worker: WorkerId
    pid: Count
    epoch: Count
    model: Name
    n_ctx: NCtx
    capacity: Annotated[int, Meta(ge=1, le=L.MAX_CAPACITY)]
    heard_ms: Annotated[float, Meta(ge=0.0, le=L.MAX_IDLE_MS)]
    in_flight: Count
    pinned: Count
    load: Count
    sessions: Count
    kv_bytes: Count
    gauges: WorkerGauges | None


class BrokerCounters(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The broker's own view in FLEET: when it started (ns since the epoch), messages received
    from clients and workers, requests in flight, sessions pinned, workers lost, TURNs by
    :class:`TurnOutcome`, and the ERRORs it sent itself by code."""

    started_ns: Count
    messages: Count
    requests_in_flight: Count
    sessions_pinned: Count
    workers_lost: Count
    requests: dict[TurnOutcome, Count]
    errors: dict[ErrorCode, Count]


class Fleet(Body, frozen=True):
    """FLEET body: the broker's answer to STATUS.

    ``workers`` lists the registered workers, at most ``MAX_FLEET_WORKERS`` (``unlisted``
    counts the others); ``totals`` adds up the counters of every worker process the broker has
    heard from since it started, gone ones included.
    """

    WHAT: ClassVar[str] = "FLEET"
    broker: BrokerCounters
    workers: Annotated[tuple[WorkerView, ...], Meta(max_length=L.MAX_FLEET_WORKERS)]
    unlisted: Count
    totals: WorkerCounters

    def check(self) -> None:
        """No worker id twice (``bad_body``); every counters' cold reasons add up to their cold
        turns and cached + prefill tokens to prompt tokens (``out_of_range``)."""
        if len({w.worker for w in self.workers}) != len(self.workers):
            raise ProtocolViolation(ErrorCode.BAD_BODY, "FLEET.workers: a worker id repeats")
        self.totals.check("FLEET.totals")
        for w in self.workers:
            if w.gauges is not None:
                w.gauges.counters.check(f"FLEET.workers[{w.worker}]")
