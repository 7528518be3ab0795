"""The broker's I/O-free core: which worker owns which session, and what is in flight.

The socket adapter (:mod:`kvroute.broker.service`) polls, parses frames, asks this table what to
do, and sends what it says. Nothing here touches a socket or a clock: every method takes ``now``
(seconds, any monotonic origin), so tests drive time by hand.

Vocabulary:

- a *worker* is one registration: a ROUTER routing id (``key``) announced by READY with a worker
  id and an epoch. A READY reusing a live worker id with another epoch is a restart: the old
  registration is lost and the new one starts empty.
- a *pin* maps a session id to the worker holding its KV cache. Every request of a pinned
  session goes to that worker (stickiness); new sessions are placed on the least-loaded live
  worker.
- an *in-flight* record is a TURN, RESET or CLOSE forwarded and not yet answered by a terminal
  reply. One per session: another request on the session gets BUSY.
- when a worker is lost, its in-flight requests are returned (the adapter ends each with
  SESSION_LOST), its sessions are unpinned and remembered, so the next request of each carries
  the ``worker_lost`` flag to whichever worker it lands on.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from enum import Enum
from typing import NamedTuple

from kvroute.proto.control import Heartbeat, LostReason, Ready
from kvroute.proto.errors import ErrorCode
from kvroute.proto.kinds import FLAG_WORKER_LOST, Kind

logger = logging.getLogger(__name__)


class Orphan(Enum):
    """Why a request's replies can no longer reach its client."""

    CLIENT_GONE = "client_gone"  # EHOSTUNREACH: the client's connection is gone
    SLOW_CLIENT = "slow_client"  # zmq.Again: the client's queue is full (it stopped reading)


@dataclass(slots=True)
class InFlight:
    """A forwarded request awaiting its terminal reply."""

    session_id: bytes
    request_id: bytes
    client: bytes  # frontend routing id to send replies to
    kind: Kind  # TURN, RESET or CLOSE
    worker: bytes  # backend routing id of the worker running it
    orphaned: Orphan | None = None  # set once replies cannot be delivered: drop them


@dataclass(slots=True)
class Pin:
    """A session's owner. ``lost`` stays set until the new owner ENDs a turn (or resets), so a
    request that failed before reaching a fresh worker still carries the flag next time."""

    worker: bytes
    lost: bool = False


@dataclass(slots=True)
class WorkerState:
    """One registered worker, as the broker sees it."""

    key: bytes  # backend routing id
    worker_id: str
    epoch: int
    pid: int
    capacity: int
    model: str
    n_ctx: int
    last_seen: float
    order: int  # registration order: the last tie-breaker of placement
    kv_bytes: int = 0  # from HEARTBEAT
    reported_load: int = 0  # from HEARTBEAT (informational; placement uses broker counts)
    reported_sessions: int = 0  # from HEARTBEAT
    sessions: set[bytes] = field(default_factory=set)  # pinned here
    turns: set[bytes] = field(default_factory=set)  # sessions with a request in flight here


@dataclass(frozen=True, slots=True)
class LostWorker:
    """What a lost worker leaves behind for the adapter to clean up."""

    worker: WorkerState
    reason: LostReason
    in_flight: tuple[InFlight, ...]  # end each (unless orphaned) with SESSION_LOST
    sessions: tuple[bytes, ...]  # unpinned; their next request carries the worker_lost flag


class Action(Enum):
    """What the adapter does with a client request."""

    DELIVER = "deliver"  # forward to ``Route.worker`` with ``Route.flags``
    REPLY = "reply"  # answer the client with ``Route.kind`` (empty body)
    REJECT = "reject"  # answer the client with ERROR ``Route.code``
    DROP = "drop"  # nothing to do (e.g. CANCEL of a turn that already ended)


class Route(NamedTuple):
    """The table's answer to a client request (a NamedTuple: cheap to build per message)."""

    action: Action
    worker: bytes = b""
    flags: int = 0
    kind: Kind | None = None
    code: ErrorCode | None = None
    message: str = ""


# Preallocated answers: the hot path returns these instead of building new objects.
_DROP = Route(Action.DROP)
_BUSY = Route(Action.REPLY, kind=Kind.BUSY)
_RESET_OK = Route(Action.REPLY, kind=Kind.RESET_OK)
_CLOSE_OK = Route(Action.REPLY, kind=Kind.CLOSE_OK)
_NO_WORKER = Route(Action.REJECT, code=ErrorCode.NO_WORKER, message="no live worker")


class RoutingTable:
    """Sessions, workers and requests in flight; placement, stickiness, liveness.

    Parameters
    ----------
    expiry_s
        A worker silent for longer than this is lost (heartbeat interval x liveness).
    lost_memory
        How many unpinned lost sessions to remember for the ``worker_lost`` flag (oldest
        forgotten first; a forgotten one just reports cold ``new`` instead).
    """

    def __init__(self, expiry_s: float, lost_memory: int = 65536) -> None:
        assert expiry_s > 0, "expiry must be positive"
        self.expiry_s = expiry_s
        self.lost_memory = lost_memory
        self.workers: dict[bytes, WorkerState] = {}
        self.pins: dict[bytes, Pin] = {}
        self.in_flight: dict[bytes, InFlight] = {}
        self._by_id: dict[str, bytes] = {}
        self._lost: OrderedDict[bytes, None] = OrderedDict()
        self._order = 0

    # --- workers ----------------------------------------------------------------------------

    def register(self, key: bytes, ready: Ready, now: float) -> list[LostWorker]:
        """Register a worker after READY; returns registrations this one replaces.

        The same key and epoch again is a retransmission (no change). Otherwise any registration
        with this key or this worker id is lost with reason ``restarted``: the new one holds no
        sessions.
        """
        old = self.workers.get(key)
        if old is not None and old.worker_id == ready.worker and old.epoch == ready.epoch:
            old.last_seen = now
            return []
        lost = []
        other = self._by_id.get(ready.worker)
        if (
            other is not None
            and other != key
            and now - self.workers[other].last_seen < self.expiry_s / 3
        ):
            # A restart normally comes after the old connection went quiet; one heard from in
            # the last heartbeat interval or so usually means two workers share an id (they
            # will keep replacing each other).
            logger.warning("worker id %s registered from a second, live connection", ready.worker)
        for stale in {key, other}:
            if stale is not None and stale in self.workers:
                lost.append(self._drop(stale, LostReason.RESTARTED))
        self._order += 1
        self.workers[key] = WorkerState(
            key=key,
            worker_id=ready.worker,
            epoch=ready.epoch,
            pid=ready.pid,
            capacity=ready.capacity,
            model=ready.model,
            n_ctx=ready.n_ctx,
            last_seen=now,
            order=self._order,
        )
        self._by_id[ready.worker] = key
        logger.info(
            "worker %s registered (epoch %s, pid %s, capacity %s, model %s, n_ctx %s)",
            ready.worker,
            ready.epoch,
            ready.pid,
            ready.capacity,
            ready.model,
            ready.n_ctx,
        )
        return lost

    def heartbeat(self, key: bytes, hb: Heartbeat, now: float) -> bool:
        """Record a worker's HEARTBEAT; False if the key is not registered (send DISCONNECT)."""
        w = self.workers.get(key)
        if w is None:
            return False
        w.last_seen = now
        w.reported_load, w.reported_sessions, w.kv_bytes = hb.load, hb.sessions, hb.kv_bytes
        return True

    def touch(self, key: bytes, now: float) -> bool:
        """Any traffic from a worker counts as a heartbeat; False if the key is unknown."""
        w = self.workers.get(key)
        if w is None:
            return False
        w.last_seen = now
        return True

    def worker_key(self, worker_id: str) -> bytes | None:
        """The routing id registered under ``worker_id``, if any."""
        return self._by_id.get(worker_id)

    def expire(self, now: float) -> list[LostWorker]:
        """Declare lost every worker silent for more than ``expiry_s``."""
        dead = [k for k, w in self.workers.items() if now - w.last_seen > self.expiry_s]
        return [self._drop(k, LostReason.HEARTBEAT_TIMEOUT) for k in dead]

    def remove(self, key: bytes, reason: LostReason) -> LostWorker | None:
        """Declare a worker lost now (it disconnected, exited or became unreachable)."""
        return self._drop(key, reason) if key in self.workers else None

    def _drop(self, key: bytes, reason: LostReason) -> LostWorker:
        w = self.workers.pop(key)
        if self._by_id.get(w.worker_id) == key:
            del self._by_id[w.worker_id]
        in_flight = tuple(self.in_flight.pop(s) for s in w.turns)
        for s in w.sessions:
            del self.pins[s]
            self._remember_lost(s)
        logger.warning(
            "worker %s lost (%s): %d requests in flight, %d sessions unpinned",
            w.worker_id,
            reason,
            len(in_flight),
            len(w.sessions),
        )
        return LostWorker(w, reason, in_flight, tuple(w.sessions))

    def _remember_lost(self, session_id: bytes) -> None:
        self._lost[session_id] = None
        if len(self._lost) > self.lost_memory:
            self._lost.popitem(last=False)

    def _place(self, now: float) -> WorkerState | None:
        """The least-loaded live worker for a new session.

        Order: turns in flight relative to capacity, then pinned sessions, then KV bytes, then
        registration order. In-flight and session counts are the broker's own (exact at this
        instant) rather than the workers' heartbeats, which lag: sessions created in a burst
        would otherwise all land on the same worker. KV bytes only the worker knows.
        """
        live = [w for w in self.workers.values() if now - w.last_seen <= self.expiry_s]
        if not live:
            return None
        return min(
            live,
            key=lambda w: (len(w.turns) / w.capacity, len(w.sessions), w.kv_bytes, w.order),
        )

    # --- client requests --------------------------------------------------------------------

    def route(
        self, kind: Kind, session_id: bytes, request_id: bytes, client: bytes, now: float
    ) -> Route:
        """Decide what to do with a TURN, RESET, CLOSE or CANCEL from a client.

        TURN: BUSY if the session has a request in flight; else deliver to its pinned worker or
        place it (ERROR ``no_worker`` if none is live). RESET / CLOSE of an unpinned session are
        answered by the broker. CANCEL goes to the worker running that very request, else drops.
        Delivered TURN / RESET / CLOSE are recorded in flight until :meth:`on_reply` sees their
        terminal (or :meth:`abort` undoes the delivery).
        """
        if kind is Kind.CANCEL:
            fl = self.in_flight.get(session_id)
            if fl is None or fl.request_id != request_id or fl.orphaned is not None:
                return _DROP
            return Route(Action.DELIVER, worker=fl.worker)
        if session_id in self.in_flight:
            return _BUSY
        pin = self.pins.get(session_id)
        if pin is None:
            if kind is not Kind.TURN:
                # Nothing to forget anywhere; a RESET also clears the worker_lost memory (the
                # next turn is cold either way).
                self._lost.pop(session_id, None)
                return _RESET_OK if kind is Kind.RESET else _CLOSE_OK
            w = self._place(now)
            if w is None:
                return _NO_WORKER
            was_lost = session_id in self._lost
            if was_lost:
                del self._lost[session_id]
            pin = self.pins[session_id] = Pin(w.key, lost=was_lost)
            w.sessions.add(session_id)
        else:
            w = self.workers[pin.worker]
        self.in_flight[session_id] = InFlight(session_id, request_id, client, kind, w.key)
        w.turns.add(session_id)
        return Route(Action.DELIVER, worker=w.key, flags=FLAG_WORKER_LOST if pin.lost else 0)

    def abort(self, session_id: bytes) -> None:
        """Undo the in-flight record of a delivery that could not be sent (the pin stays)."""
        fl = self.in_flight.pop(session_id, None)
        if fl is not None:
            self.workers[fl.worker].turns.discard(session_id)

    def orphan(self, session_id: bytes, reason: Orphan) -> InFlight | None:
        """Mark a request's client unreachable; returns it if it was in flight and not yet
        orphaned (the adapter then sends CANCEL to its worker, once)."""
        fl = self.in_flight.get(session_id)
        if fl is None or fl.orphaned is not None:
            return None
        fl.orphaned = reason
        return fl

    # --- worker replies ---------------------------------------------------------------------

    def on_reply(
        self,
        key: bytes,
        kind: Kind,
        session_id: bytes,
        request_id: bytes,
        client: bytes,
        now: float,
    ) -> InFlight | None:
        """Account for a reply from a worker; returns the request it answers, or None to drop it.

        A reply is accepted only from the worker running that request, for that client: frames
        from a worker declared lost, or for a request already ended, are stale. A terminal reply
        clears the in-flight record; END and RESET_OK clear the pin's ``lost`` flag; CLOSE_OK
        unpins the session.
        """
        w = self.workers.get(key)
        if w is None:
            return None
        w.last_seen = now
        fl = self.in_flight.get(session_id)
        if fl is None or fl.worker != key or fl.request_id != request_id or fl.client != client:
            return None
        if kind is Kind.TOKEN:
            return fl
        del self.in_flight[session_id]
        w.turns.discard(session_id)
        if kind is Kind.END or kind is Kind.RESET_OK:
            self.pins[session_id].lost = False
        elif kind is Kind.CLOSE_OK and fl.kind is Kind.CLOSE:
            del self.pins[session_id]
            w.sessions.discard(session_id)
        return fl

    # --- introspection ----------------------------------------------------------------------

    def owner(self, session_id: bytes) -> WorkerState | None:
        """The worker a session is pinned to, if any."""
        pin = self.pins.get(session_id)
        return self.workers[pin.worker] if pin is not None else None

    def is_lost(self, session_id: bytes) -> bool:
        """Whether the session's next request will carry the ``worker_lost`` flag."""
        pin = self.pins.get(session_id)
        return pin.lost if pin is not None else session_id in self._lost
