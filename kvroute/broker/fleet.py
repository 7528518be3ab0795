"""The broker's fleet view: what STATUS answers (I/O-free, like the routing table).

The broker routes frames without reading bodies, so most of what an operator wants to see comes
from the workers: each HEARTBEAT may carry :class:`~kvroute.proto.status.WorkerGauges` (sessions
resident, KV bytes and budget, evictions, turns by cache path, token counts, queue depth).
:class:`FleetLedger` keeps the latest gauges per registered worker and adds what only the broker
knows: how each TURN ended (its terminal kind, a byte the broker reads anyway), the ERRORs it
sent itself by code, workers lost. :meth:`FleetLedger.view` joins that with the routing table
(workers, requests in flight, sessions pinned) into the FLEET body.

Fleet-wide counters must never go back, or a dashboard reads a dying worker as negative
traffic. Each worker process is named by (worker id, ``started_ns``), and the ledger keeps the
last counters of every process it heard from, gone ones included; a worker that re-registers
(same process) just updates its entry. Beyond ``max_processes`` entries, the oldest ones that
are not live are folded into one sum.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict

from kvroute.proto.control import Heartbeat, LostReason
from kvroute.proto.errors import ErrorCode
from kvroute.proto.kinds import Kind
from kvroute.proto.limits import MAX_COUNT, MAX_FLEET_WORKERS, MAX_IDLE_MS
from kvroute.proto.status import (
    NO_COUNTS,
    OUTCOME_OF,
    BrokerCounters,
    Fleet,
    WorkerCounters,
    WorkerGauges,
    WorkerView,
)

from .config import BrokerStats
from .records import WorkerState
from .routing import RoutingTable

logger = logging.getLogger(__name__)

Process = tuple[str, int]
"""One worker process: its worker id and ``started_ns``."""


class FleetLedger:
    """Latest gauges per worker, counters per worker process, and the broker's own tallies.

    Parameters
    ----------
    started_ns
        When the broker started (wall clock, ns since the epoch); now if None.
    max_processes
        Worker processes whose counters are kept apart (older gone ones are summed).
    """

    def __init__(self, started_ns: int | None = None, max_processes: int = 1024) -> None:
        self.started_ns = time.time_ns() if started_ns is None else started_ns
        self.max_processes = max_processes
        self.requests: dict[Kind, int] = {}  # TURNs by the terminal kind that ended them
        self.errors: dict[ErrorCode, int] = {}  # ERRORs the broker sent, by code
        self.workers_lost = 0  # registrations lost (an orderly DISCONNECT is not a loss)
        self._gauges: dict[bytes, tuple[Process, WorkerGauges]] = {}  # by routing id
        self._key_of: dict[str, bytes] = {}  # worker id -> routing id of its gauges
        self._processes: OrderedDict[Process, WorkerCounters] = OrderedDict()
        self._folded = NO_COUNTS

    # --- updates (called by the forwarder) ---------------------------------------------------

    def heartbeat(self, worker: WorkerState, hb: Heartbeat) -> None:
        """Record a registered worker's HEARTBEAT gauges (a HEARTBEAT without any keeps the
        last ones)."""
        g = hb.gauges
        if g is None:
            return
        process = (worker.worker_id, g.started_ns)
        stale = self._key_of.get(worker.worker_id)
        if stale is not None and stale != worker.key:  # one registration per worker id
            self._gauges.pop(stale, None)
        self._key_of[worker.worker_id] = worker.key
        self._gauges[worker.key] = (process, g)
        self._processes[process] = g.counters
        self._processes.move_to_end(process)
        if len(self._processes) > self.max_processes:
            self._fold()

    def turn_ended(self, kind: Kind) -> None:
        """A TURN ended with a terminal of ``kind`` (END, OVERFLOW, ERROR, SESSION_LOST, BUSY)."""
        self.requests[kind] = self.requests.get(kind, 0) + 1

    def error_sent(self, code: ErrorCode) -> None:
        """The broker sent an ERROR with ``code`` (to a client or a worker)."""
        self.errors[code] = self.errors.get(code, 0) + 1

    def worker_gone(self, key: bytes, reason: LostReason) -> None:
        """A registration ended; its gauges leave the view (its counters stay in the totals)."""
        entry = self._gauges.pop(key, None)
        if entry is not None and self._key_of.get(entry[0][0]) == key:
            del self._key_of[entry[0][0]]
        if reason is not LostReason.DISCONNECTED:
            self.workers_lost += 1

    def _fold(self) -> None:
        live = {process for process, _ in self._gauges.values()}
        for process in list(self._processes):
            if len(self._processes) <= self.max_processes:
                break
            if process not in live:
                self._folded = self._folded + self._processes.pop(process)

    # --- the view -----------------------------------------------------------------------------

    def totals(self) -> WorkerCounters:
        """Counters added up over every worker process heard from (gone ones included)."""
        total = self._folded
        for counters in self._processes.values():
            total = total + counters
        return total

    def view(self, table: RoutingTable, stats: BrokerStats, now: float) -> Fleet:
        """The FLEET body: workers in registration order (at most ``MAX_FLEET_WORKERS``), the
        broker's counters and the totals. ``now`` is the table's clock."""
        registered = sorted(table.workers.values(), key=lambda w: w.order)
        workers = tuple(self._worker(w, now) for w in registered[:MAX_FLEET_WORKERS])
        broker = BrokerCounters(
            started_ns=self.started_ns,
            messages=_count(stats.client_messages + stats.worker_messages),
            requests_in_flight=len(table.in_flight),
            sessions_pinned=len(table.pins),
            workers_lost=self.workers_lost,
            requests={
                OUTCOME_OF[k]: _count(n) for k, n in self.requests.items() if k in OUTCOME_OF
            },
            errors={code: _count(n) for code, n in self.errors.items()},
        )
        unlisted = len(registered) - len(workers)
        return Fleet(broker, workers, unlisted, _clamped(self.totals()))

    def _worker(self, w: WorkerState, now: float) -> WorkerView:
        entry = self._gauges.get(w.key)
        return WorkerView(
            worker=w.worker_id,
            pid=w.pid,
            epoch=w.epoch,
            model=w.model,
            n_ctx=w.n_ctx,
            capacity=w.capacity,
            heard_ms=min(max(0.0, (now - w.last_seen) * 1e3), MAX_IDLE_MS),
            in_flight=len(w.turns),
            pinned=len(w.sessions),
            load=w.reported_load,
            sessions=w.reported_sessions,
            kv_bytes=_count(w.kv_bytes),  # announced sessions add up in READY
            gauges=entry[1] if entry is not None else None,
        )


def _count(n: int) -> int:
    return min(n, MAX_COUNT)


def _clamped(c: WorkerCounters) -> WorkerCounters:
    """Sums within the protocol's bound: only absurd reports (a worker claiming 2**62 tokens)
    get there, and then the view says so in a log line rather than failing to encode."""
    fields = (c.prompt_tokens, c.cached_tokens, c.prefill_tokens, c.generated_tokens, c.evictions)
    counts = [*c.paths.values(), *c.cold_reasons.values(), *fields]
    if max(counts, default=0) <= MAX_COUNT:
        return c
    logger.warning("fleet totals overflow the protocol's counters; reporting none")
    return NO_COUNTS
