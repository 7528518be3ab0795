"""The broker's I/O-free core: which worker holds which session, who owns it, what is in flight.

The socket adapter (:mod:`kvroute.broker.service`) polls, parses frames, asks this table what to
do, and sends what it says. Nothing here touches a socket or a clock: every method takes ``now``
(seconds, any monotonic origin), so tests drive time by hand.

Vocabulary (the records are in :mod:`kvroute.broker.records`):

- a *worker* is one registration: a ROUTER routing id (``key``) announced by READY with a worker
  id and an epoch. The same key and epoch again changes nothing. A READY reusing the id of a
  registration that is still connected and heard from is refused (nobody takes over a live
  worker's sessions by naming it); once that one is gone it is a restart: the old registration
  is lost with its turns in flight.
- *announced sessions*: a READY lists the sessions the worker still holds, with their owners
  (a worker that lost its broker keeps its caches). Each is pinned to it again unless the table
  knows the session under another owner, has routed a request for it since, or another worker
  announced a later turn of it (wall-clock time of the turn; the later one wins and the other
  worker drops its copy). Refused ones come back as drops: the adapter sends the worker a CLOSE.
- a *pin* maps a session id to the worker holding its KV cache and to its owner, the *principal*
  that created it. Every request of a pinned session goes to that worker (stickiness); new
  sessions are placed on the least-loaded live worker.
- *ownership* (docs/design.md, *Security*): TURN, RESET, CLOSE and CANCEL on a session owned by
  another principal are rejected with ``not_owner`` before anything else is looked at (a
  stranger learns nothing, not even BUSY). A session nobody owns (never created, closed,
  forgotten) belongs to whoever creates it with a TURN.
- a *CANCEL* goes to the worker running that very request. A CANCEL of a request that is not
  in flight (it ended, never ran, or ran at the broker before a restart) is answered ERROR
  ``not_in_flight`` under its own request id, so a client waiting for that request's end is not
  left waiting; it says nothing about other principals' sessions (ownership is checked first,
  and the answer only echoes the caller's own ids).
- *limits* per principal: sessions pinned (a new one beyond gets ``limit``) and requests in
  flight (``limit``).
- an *in-flight* record is a TURN, RESET or CLOSE forwarded and not yet answered by a terminal
  reply. One per session: another request on the session gets BUSY.
- when a worker is lost, its in-flight requests are returned (the adapter ends each with
  SESSION_LOST), its sessions are unpinned and remembered with their owner, so the next request
  of each carries the ``worker_lost`` flag to whichever worker it lands on and only the owner
  can make it.
- a *refused first turn*: when the TURN that created a pin ends with OVERFLOW or an ERROR whose
  code is in :data:`~kvroute.broker.records.REFUSED_UNRUN`, the worker refused it before it ran
  and kept nothing for the session; so does a TURN the broker could not deliver
  (:meth:`RoutingTable.abort`). The pin is dropped and the principal's session count freed: the
  id is as it was before that TURN (free, or still remembered as a lost worker's session with
  its owner), and its next TURN is placed anew. A refused later turn keeps the pin: the worker
  holds the session's earlier turns. To tell ERROR codes apart, the body of an ERROR answering
  such a first TURN is decoded (rare); every other reply is accounted for by its kind alone.
- *forgetting*: pins are kept in least-recently-used order; :meth:`RoutingTable.sweep` drops
  idle ones unused for ``pin_ttl_s``, or the oldest idle ones beyond ``max_pins``, together
  with their owner. The adapter sends CLOSE for each to its worker, so no KV state outlives
  the broker's memory of its owner: the session's next TURN creates it anew, placed on the
  least-loaded worker and cold (``new``), and whoever sends it owns it.
"""

from __future__ import annotations

import logging
import sys
from collections import OrderedDict
from collections.abc import Sequence

from kvroute.proto.control import ErrorReply, Heartbeat, LostReason, Ready, Resident
from kvroute.proto.errors import ProtocolViolation
from kvroute.proto.kinds import FLAG_WORKER_LOST, Kind

from .records import (
    BUSY,
    CLOSE_OK,
    DROP,
    NO_WORKER,
    NOT_IN_FLIGHT,
    NOT_OWNER,
    REFUSED_UNRUN,
    RESET_OK,
    Action,
    Forgotten,
    InFlight,
    LostWorker,
    Orphan,
    Pin,
    Registration,
    Route,
    Tally,
    WorkerState,
)

__all__ = [
    "Action",
    "Forgotten",
    "InFlight",
    "LostWorker",
    "Orphan",
    "Registration",
    "Route",
    "RoutingTable",
]

logger = logging.getLogger(__name__)

UNLIMITED: int = sys.maxsize


class RoutingTable:
    """Sessions, owners, workers and requests in flight; placement, stickiness, liveness, limits.

    Parameters
    ----------
    expiry_s
        A worker silent for longer than this is lost (heartbeat interval x liveness).
    lost_memory
        How many unpinned lost sessions to remember for the ``worker_lost`` flag and their owner
        (oldest forgotten first; a forgotten one reports cold ``new`` instead, and is free).
    max_sessions_per_client, max_requests_per_client
        Limits per principal (see :mod:`kvroute.broker.records`); unlimited by default.
    pin_ttl_s, max_pins
        When :meth:`sweep` forgets idle pins; never by default.
    """

    def __init__(
        self,
        expiry_s: float,
        lost_memory: int = 65536,
        *,
        max_sessions_per_client: int = UNLIMITED,
        max_requests_per_client: int = UNLIMITED,
        pin_ttl_s: float = float("inf"),
        max_pins: int = UNLIMITED,
    ) -> None:
        assert expiry_s > 0, "expiry must be positive"
        self.expiry_s = expiry_s
        self.lost_memory = lost_memory
        self.pin_ttl_s = pin_ttl_s
        self.max_pins = max_pins
        self.workers: dict[bytes, WorkerState] = {}
        # Least recently used first: a request moves its pin to the end, so sweep() reads the
        # idlest pins off the front without scanning.
        self.pins: OrderedDict[bytes, Pin] = OrderedDict()
        self.in_flight: dict[bytes, InFlight] = {}
        self.sessions_of = Tally(max_sessions_per_client, "sessions")  # pins per principal
        self.requests_of = Tally(max_requests_per_client, "requests in flight")
        self._by_id: dict[str, bytes] = {}
        self._lost: OrderedDict[bytes, bytes] = OrderedDict()  # session -> its principal
        self._order = 0

    # --- workers ----------------------------------------------------------------------------

    def register(
        self, key: bytes, ready: Ready, now: float, *, other_connected: bool = True
    ) -> Registration:
        """Register a worker after READY, and re-pin the sessions it announces.

        The same connection (``key``) and epoch again is a retransmission: nothing changes. A
        READY with the worker id of another registration is refused if that one is still
        connected (``other_connected``: the adapter asks ZeroMQ) and was heard from within
        ``expiry_s``: a live worker's sessions are not handed to whoever claims its name.
        Otherwise every registration with this key or this worker id is lost (``restarted``),
        and the announced sessions are re-pinned here, or returned as drops (see
        :meth:`_claim`).
        """
        old = self.workers.get(key)
        if old is not None and old.worker_id == ready.worker and old.epoch == ready.epoch:
            old.last_seen = now
            return Registration()
        other = self._by_id.get(ready.worker)
        if (
            other is not None
            and other != key
            and other_connected
            and now - self.workers[other].last_seen <= self.expiry_s
        ):
            logger.warning(
                "READY for worker id %s refused: a live connection holds that id", ready.worker
            )
            return Registration(
                refused=f"worker id {ready.worker!r} is registered from another live connection"
            )
        lost = tuple(
            self._drop(stale, LostReason.RESTARTED)
            for stale in (key, other)
            if stale is not None and stale in self.workers
        )
        self._order += 1
        w = self.workers[key] = WorkerState(
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
        drops = self._claim(w, ready.sessions, now)
        repinned = len(ready.sessions) - sum(f.worker == key for f in drops)
        logger.info(
            "worker %s registered (epoch %s, pid %s, capacity %s, model %s, n_ctx %s);"
            " %d of %d announced sessions pinned",
            ready.worker,
            ready.epoch,
            ready.pid,
            ready.capacity,
            ready.model,
            ready.n_ctx,
            repinned,
            len(ready.sessions),
        )
        return Registration(lost, tuple(drops), repinned)

    def _claim(self, w: WorkerState, sessions: Sequence[Resident], now: float) -> list[Forgotten]:
        """Pin announced sessions to ``w``; returns the sessions some worker must drop.

        An announced session is refused (dropped on ``w``) if the table knows it under another
        owner (a pin, or the memory of a lost worker's sessions), if its owner is a routing id
        ZeroMQ generated (first byte zero) that this broker does not know (such an id only meant
        something to the broker that made it), if the owner is at its session limit, or if the
        session is pinned elsewhere more recently: by a request this broker routed, or by an
        announcement of a later turn. An announcement of a later turn than the pin's takes the
        pin over, and the worker that had it drops it instead. Owners never change here.
        """
        drops: list[Forgotten] = []
        moved = False
        for s in sessions:
            sid, owner = s.session_id, s.owner
            pin = self.pins.get(sid)
            known = pin.principal if pin is not None else self._lost.get(sid)
            if known != owner if known is not None else owner[0] == 0:
                drops.append(Forgotten(sid, w.key))
                continue
            used = now - s.idle_ms / 1000
            if pin is not None:
                if pin.announced is None or pin.announced >= s.last_turn_ns:
                    drops.append(Forgotten(sid, w.key))
                    continue
                assert sid not in self.in_flight, "an announced pin has had nothing routed"
                self.workers[pin.worker].sessions.discard(sid)
                drops.append(Forgotten(sid, pin.worker))
                pin.worker, pin.announced, pin.last_used = w.key, s.last_turn_ns, used
            else:
                if self.sessions_of.full(owner):
                    drops.append(Forgotten(sid, w.key))
                    continue
                self._lost.pop(sid, None)
                self.pins[sid] = Pin(w.key, owner, used, announced=s.last_turn_ns)
                self.sessions_of.add(owner)
            w.sessions.add(sid)
            w.kv_bytes += s.kv_bytes
            moved = True
        if moved:
            # Keep the pins ordered by last use, as sweep() expects: the announced ones were used
            # in the past. Two sorted runs (the old order, the new batch), so the sort is a merge.
            ordered = sorted(self.pins.items(), key=lambda item: item[1].last_used)
            self.pins.clear()
            self.pins.update(ordered)
        return drops

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
        for fl in in_flight:
            self.requests_of.remove(fl.principal)
        for s in w.sessions:
            pin = self.pins.pop(s)
            self.sessions_of.remove(pin.principal)
            self._remember_lost(s, pin.principal)
        if reason is LostReason.DISCONNECTED:  # it said goodbye: an orderly stop, not a loss
            logger.info(
                "worker %s left (disconnected): %d requests in flight, %d sessions unpinned",
                w.worker_id,
                len(in_flight),
                len(w.sessions),
            )
        else:
            logger.warning(
                "worker %s lost (%s): %d requests in flight, %d sessions unpinned",
                w.worker_id,
                reason,
                len(in_flight),
                len(w.sessions),
            )
        return LostWorker(w, reason, in_flight, tuple(w.sessions))

    def _remember_lost(self, session_id: bytes, principal: bytes) -> None:
        self._lost[session_id] = principal
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
        self,
        kind: Kind,
        session_id: bytes,
        request_id: bytes,
        client: bytes,
        now: float,
        principal: bytes | None = None,
    ) -> Route:
        """Decide what to do with a TURN, RESET, CLOSE or CANCEL from a client.

        ``principal`` is the sender's identity (its CURVE key); None means its routing id
        ``client``. First ownership: any request on a session another principal owns is
        rejected ``not_owner``. TURN: BUSY if the session has a request in flight; ``limit`` if
        the principal has too many requests in flight (or, for a new session, too many
        sessions); else deliver to its pinned worker or place it (ERROR ``no_worker`` if none
        is live). RESET / CLOSE of an unpinned session are answered by the broker. CANCEL goes
        to the worker running that very request; it is dropped if the broker already cancelled
        that request (its client was unreachable: its terminal is on the way), and rejected
        ``not_in_flight`` if that request is not in flight. Delivered TURN / RESET / CLOSE are
        recorded in flight until :meth:`on_reply` sees their terminal (or :meth:`abort` undoes
        the delivery).
        """
        if principal is None:
            principal = client
        pin = self.pins.get(session_id)
        if pin is not None:
            if pin.principal != principal:
                return NOT_OWNER
        elif self._lost.get(session_id, principal) != principal:
            return NOT_OWNER
        if kind is Kind.CANCEL:
            fl = self.in_flight.get(session_id)
            if fl is None or fl.request_id != request_id:
                # Its terminal went out already, or it never ran here (it may have been in
                # flight at this broker's predecessor): answer for it, or a client waiting for
                # its end would wait in vain. A client that saw the end drops this answer.
                return NOT_IN_FLIGHT
            if fl.orphaned is not None:
                return DROP  # already cancelled on the worker
            return Route(Action.DELIVER, worker=fl.worker)
        if session_id in self.in_flight:
            return BUSY
        if pin is None:
            if kind is not Kind.TURN:
                # Nothing to forget anywhere; a RESET also clears the worker_lost memory (the
                # next turn is cold either way) and with it the owner: the id is free again.
                self._lost.pop(session_id, None)
                return RESET_OK if kind is Kind.RESET else CLOSE_OK
            if self.requests_of.full(principal):
                return self.requests_of.reject(principal)
            if self.sessions_of.full(principal):
                return self.sessions_of.reject(principal)
            w = self._place(now)
            if w is None:
                return NO_WORKER
            was_lost = session_id in self._lost
            if was_lost:
                del self._lost[session_id]
            pin = self.pins[session_id] = Pin(w.key, principal, now, lost=was_lost)
            self.sessions_of.add(principal)
            w.sessions.add(session_id)
            first = True
        else:
            if self.requests_of.full(principal):
                return self.requests_of.reject(principal)
            w = self.workers[pin.worker]
            pin.last_used = now
            pin.announced = None  # routed by this broker: newer than any announcement
            self.pins.move_to_end(session_id)
            first = False
        self.requests_of.add(principal)
        self.in_flight[session_id] = InFlight(
            session_id, request_id, client, kind, w.key, principal, first=first
        )
        w.turns.add(session_id)
        return Route(Action.DELIVER, worker=w.key, flags=FLAG_WORKER_LOST if pin.lost else 0)

    def abort(self, session_id: bytes) -> None:
        """Undo the in-flight record of a delivery that could not be sent.

        The pin stays, unless that request created it: then no worker ever saw the session,
        and the pin goes too (see :meth:`_unpin_unrun`).
        """
        fl = self.in_flight.pop(session_id, None)
        if fl is not None:
            self.workers[fl.worker].turns.discard(session_id)
            self.requests_of.remove(fl.principal)
            if fl.first:
                self._unpin_unrun(session_id)

    def orphan(self, session_id: bytes, reason: Orphan) -> InFlight | None:
        """Mark a request's client unreachable; returns it if it was in flight and not yet
        orphaned (the adapter then sends CANCEL to its worker, once)."""
        fl = self.in_flight.get(session_id)
        if fl is None or fl.orphaned is not None:
            return None
        fl.orphaned = reason
        return fl

    def sweep(self, now: float) -> list[Forgotten]:
        """Forget idle pins unused for more than ``pin_ttl_s``, and the least recently used idle
        ones beyond ``max_pins``; returns them (the adapter sends CLOSE to each worker).

        A pin with a request in flight is never forgotten: it counts as used now.
        """
        out: list[Forgotten] = []
        pins, deadline = self.pins, now - self.pin_ttl_s
        for _ in range(len(pins)):  # each pin looked at once at most
            session_id, pin = next(iter(pins.items()))
            if len(pins) <= self.max_pins and pin.last_used >= deadline:
                break  # the rest were used more recently
            if session_id in self.in_flight:
                pin.last_used = now
                pins.move_to_end(session_id)
                continue
            self._unpin(session_id)
            out.append(Forgotten(session_id, pin.worker))
        if out:
            logger.info("forgot %d idle sessions (%d pinned)", len(out), len(pins))
        return out

    # --- worker replies ---------------------------------------------------------------------

    def on_reply(
        self,
        key: bytes,
        kind: Kind,
        session_id: bytes,
        request_id: bytes,
        client: bytes,
        now: float,
        body: bytes = b"",
    ) -> InFlight | None:
        """Account for a reply from a worker; returns the request it answers, or None to drop it.

        A reply is accepted only from the worker running that request, for that client: frames
        from a worker declared lost, or for a request already ended, are stale. A terminal reply
        clears the in-flight record; END and RESET_OK clear the pin's ``lost`` flag; CLOSE_OK
        unpins the session (and frees its id). OVERFLOW, or an ERROR with a code in
        :data:`~kvroute.broker.records.REFUSED_UNRUN`, answering the TURN that created the pin
        drops the pin (see :meth:`_unpin_unrun`). ``body`` is the reply's body; it is decoded
        only for an ERROR answering such a first TURN, to read its code.
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
        self.requests_of.remove(fl.principal)
        if kind is Kind.END or kind is Kind.RESET_OK:
            self.pins[session_id].lost = False
        elif kind is Kind.CLOSE_OK and fl.kind is Kind.CLOSE:
            self._unpin(session_id)
        elif fl.first and (kind is Kind.OVERFLOW or (kind is Kind.ERROR and _unrun(body))):
            self._unpin_unrun(session_id)
        return fl

    def _unpin(self, session_id: bytes) -> Pin:
        """Drop a session's pin, freeing its slot in its owner's session count."""
        pin = self.pins.pop(session_id)
        self.sessions_of.remove(pin.principal)
        self.workers[pin.worker].sessions.discard(session_id)
        return pin

    def _unpin_unrun(self, session_id: bytes) -> None:
        """Forget the pin the session's first TURN created, now that the TURN was refused
        before it ran: the worker kept nothing, so nothing is lost. The id goes back to what it
        was before that TURN: free, or remembered as a lost worker's session (its owner and the
        ``worker_lost`` flag stay for its next TURN)."""
        pin = self._unpin(session_id)
        if pin.lost:
            self._remember_lost(session_id, pin.principal)

    # --- introspection ----------------------------------------------------------------------

    def owner(self, session_id: bytes) -> WorkerState | None:
        """The worker a session is pinned to, if any."""
        pin = self.pins.get(session_id)
        return self.workers[pin.worker] if pin is not None else None

    def principal(self, session_id: bytes) -> bytes | None:
        """The client identity owning a session (None: nobody, the id is free)."""
        pin = self.pins.get(session_id)
        return pin.principal if pin is not None else self._lost.get(session_id)

    def is_lost(self, session_id: bytes) -> bool:
        """Whether the session's next request will carry the ``worker_lost`` flag."""
        pin = self.pins.get(session_id)
        return pin.lost if pin is not None else session_id in self._lost


def _unrun(error_body: bytes) -> bool:
    """Whether an ERROR body says the worker refused its TURN before it ran (a code in
    :data:`~kvroute.broker.records.REFUSED_UNRUN`); an unreadable body says nothing."""
    try:
        return ErrorReply.decode(error_body).code in REFUSED_UNRUN
    except ProtocolViolation:
        return False
