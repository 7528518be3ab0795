"""What the broker does with each message, given its two sockets: parse, ask the table, send.

Every send is ``NOBLOCK`` on a ``ROUTER_MANDATORY`` socket and its failure means something:
``zmq.Again`` is a peer whose queue is full (a slow client has its turn cancelled; a TURN for a
full worker gets ERROR ``overloaded``), ``EHOSTUNREACH`` a peer that is gone (a vanished client
has its turn cancelled; a vanished worker is lost, its turns end with SESSION_LOST).

Ownership costs nothing here without CURVE: a client's identity is its routing id, the first
frame the ROUTER hands over anyway, or the owner token it presents in an owner frame. With CURVE
the service passes the authenticated key along (and an owner frame is refused).

LOOKUP and INDEX are answered here from the transcript index
(:class:`~kvroute.broker.transcripts.TranscriptIndex`), which forgets a session whenever the
table does (CLOSE, idle expiry).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from enum import Enum

import zmq

from kvroute.proto.control import Disconnect, ErrorReply, Heartbeat, LostReason, Ready, SessionLost
from kvroute.proto.control import error_body as _error_body
from kvroute.proto.errors import ErrorCode, ProtocolViolation
from kvroute.proto.fields import EMPTY_BODY
from kvroute.proto.frames import (
    ClientRequest,
    WorkerControl,
    WorkerReply,
    client_frames,
    delivery_frames,
    parse_backend,
    parse_frontend,
)
from kvroute.proto.kinds import HEADERS, TERMINAL_KINDS, Kind
from kvroute.proto.limits import MAX_BODY_BYTES
from kvroute.proto.transcripts import Found, Index, Lookup

from .config import BrokerStats
from .fleet import FleetLedger
from .records import NOT_OWNER, Action, Forgotten, InFlight, LostWorker, Orphan, Route
from .routing import RoutingTable
from .transcripts import TranscriptIndex
from .wire import send_multipart

logger = logging.getLogger(__name__)


_WITH_BODY = frozenset({Kind.TURN, Kind.LOOKUP, Kind.INDEX})
"""Client kinds whose body is not the empty map."""


class Sent(Enum):
    """Outcome of a non-blocking send."""

    OK = "ok"
    FULL = "full"  # zmq.Again: the peer's queue is at its high-water mark
    GONE = "gone"  # EHOSTUNREACH: no such peer (any more)


def send(sock: zmq.Socket[bytes], frames: list[bytes]) -> Sent:
    """Send without blocking; other errors than Again / EHOSTUNREACH propagate (bugs)."""
    try:
        send_multipart(sock, frames)
        return Sent.OK
    except zmq.Again:
        return Sent.FULL
    except zmq.ZMQError as exc:
        if exc.errno != zmq.EHOSTUNREACH:
            raise
        return Sent.GONE


class Forwarder:
    """The broker's behaviour per message; owned by the broker thread.

    Parameters
    ----------
    front, back
        The bound frontend (clients) and backend (workers) ROUTER sockets.
    table
        The routing table.
    stats
        Counters to update.
    on_worker_exit
        Called with the worker id when a watched process exits.
    max_body_bytes
        Request bodies above this get ERROR ``too_large`` (the protocol's own cap is 1 MiB).
    transcripts
        The transcript index LOOKUP and INDEX use (a default-sized one if None).
    fleet
        What STATUS answers (:mod:`~kvroute.broker.fleet`); a new one if None.
    """

    def __init__(
        self,
        front: zmq.Socket[bytes],
        back: zmq.Socket[bytes],
        table: RoutingTable,
        stats: BrokerStats,
        on_worker_exit: Callable[[str], None] | None = None,
        max_body_bytes: int = MAX_BODY_BYTES,
        *,
        transcripts: TranscriptIndex | None = None,
        fleet: FleetLedger | None = None,
    ) -> None:
        self.front, self.back, self.table, self.stats = front, back, table, stats
        self.transcripts = transcripts if transcripts is not None else TranscriptIndex(65536)
        self.fleet = fleet if fleet is not None else FleetLedger()
        self._on_worker_exit = on_worker_exit
        self._max_body = max_body_bytes

    # --- clients ----------------------------------------------------------------------------

    def on_client(self, frames: list[bytes], now: float, principal: bytes | None = None) -> None:
        """Handle one message from the frontend (``frames[0]`` is the client's routing id).

        ``principal`` is the sender's authenticated CURVE key; None means the owner token it
        presented, else its routing id.
        """
        self.stats.client_messages += 1
        try:
            req = parse_frontend(frames)
        except ProtocolViolation as exc:
            logger.debug("bad client message: %s", exc)
            self._error_to_client(frames[0], exc.session_id, exc.request_id, exc.code, exc.message)
            return
        if req.body != EMPTY_BODY and req.kind not in _WITH_BODY:
            # PING, CANCEL, RESET and CLOSE carry an empty map: anything else is a client bug
            # (or a probe), stopped here so the worker never sees it. A byte compare, no decode.
            # A CANCEL is dropped, not answered: it shares the TURN's request id, and an ERROR
            # would read as that turn's terminal frame while the turn goes on.
            if req.kind is Kind.CANCEL:
                logger.debug("CANCEL with a non-empty body dropped (session %r)", req.session_id)
                return
            message = f"{req.kind.name} body must be an empty map"
            self._error_to_client(
                req.client, req.session_id, req.request_id, ErrorCode.BAD_BODY, message
            )
            return
        if req.owner:
            if principal is not None:
                message = "owner frames are refused under CURVE: the client's key owns sessions"
                self._error_to_client(
                    req.client, req.session_id, req.request_id, ErrorCode.BAD_FRAME, message
                )
                return
            principal = req.owner
        if req.kind is Kind.PING:
            send(self.front, client_frames(req.client, Kind.PONG, req.session_id, req.request_id))
            return
        if req.kind is Kind.STATUS:
            self._on_status(req, now)
            return
        if req.kind is Kind.LOOKUP or req.kind is Kind.INDEX:
            self._on_transcript(req, principal if principal is not None else req.client)
            return
        if len(req.body) > self._max_body:
            message = f"body of {len(req.body)} bytes > {self._max_body}"
            if req.kind is Kind.TURN:
                self.fleet.turn_ended(Kind.ERROR)
            self._error_to_client(
                req.client, req.session_id, req.request_id, ErrorCode.TOO_LARGE, message
            )
            return
        route = self.table.route(
            req.kind, req.session_id, req.request_id, req.client, now, principal
        )
        if req.kind is Kind.TURN and route.action is not Action.DELIVER:
            self.fleet.turn_ended(Kind.BUSY if route.kind is Kind.BUSY else Kind.ERROR)
        if route.action is Action.DELIVER:
            # A TURN tells the worker the session's owner when it is not the client frame, so
            # the worker can announce it if it ever registers again (see Ready.sessions).
            self._deliver(req, route, principal if req.kind is Kind.TURN else None)
        elif route.action is Action.REPLY:
            assert route.kind is not None
            if route.kind is Kind.CLOSE_OK:  # a session the table did not know: nothing kept
                self.transcripts.forget(req.session_id)
            frames = client_frames(req.client, route.kind, req.session_id, req.request_id)
            send(self.front, frames)
        elif route.action is Action.REJECT:
            assert route.code is not None
            self._error_to_client(
                req.client, req.session_id, req.request_id, route.code, route.message
            )

    def _on_transcript(self, req: ClientRequest, principal: bytes) -> None:
        """LOOKUP: the caller's session recorded for a digest (checked to still be the caller's);
        INDEX: record one for a session the caller owns."""
        try:
            if req.kind is Kind.LOOKUP:
                digest = Lookup.decode(req.body).digest
            else:
                digest = Index.decode(req.body).digest
        except ProtocolViolation as exc:
            self._error_to_client(req.client, req.session_id, req.request_id, exc.code, exc.message)
            return
        if req.kind is Kind.LOOKUP:
            self.stats.lookups += 1
            sid = self.transcripts.lookup(principal, digest)
            if sid is not None and self.table.principal(sid) != principal:
                self.transcripts.forget(sid)  # forgotten, or the id now belongs to another
                sid = None
            self.stats.lookups_found += sid is not None
            body = Found(sid).encode()
            send(self.front, client_frames(req.client, Kind.FOUND, b"", req.request_id, body))
            return
        owner = self.table.principal(req.session_id)
        if owner is not None and owner != principal:
            self._error_to_client(
                req.client, req.session_id, req.request_id, ErrorCode.NOT_OWNER, NOT_OWNER.message
            )
            return
        if owner is not None:
            self.transcripts.record(principal, digest, req.session_id)
        send(self.front, client_frames(req.client, Kind.INDEX_OK, req.session_id, req.request_id))

    def _on_status(self, req: ClientRequest, now: float) -> None:
        """STATUS: answer FLEET, the fleet view (see :mod:`~kvroute.broker.fleet`)."""
        try:
            body = self.fleet.view(self.table, self.stats, now).encode()
        except ProtocolViolation as exc:  # a worker reported something the view cannot carry
            logger.error("fleet view not encodable: %s", exc)
            self._error_to_client(
                req.client, req.session_id, req.request_id, ErrorCode.INTERNAL, exc.message
            )
            return
        send(
            self.front, client_frames(req.client, Kind.FLEET, req.session_id, req.request_id, body)
        )

    def _deliver(self, req: ClientRequest, route: Route, principal: bytes | None) -> None:
        frames = delivery_frames(
            route.worker,
            req.header,  # the client's own header: same version, same kind
            req.client,
            req.session_id,
            req.request_id,
            route.flags,
            req.body,
            principal,
        )
        sent = send(self.back, frames)
        if sent is Sent.OK:
            return
        if sent is Sent.GONE:
            # Gone without a goodbye: lose it now; its in-flight list includes this request.
            self._lose(route.worker, LostReason.UNREACHABLE)
        elif req.kind is Kind.CANCEL:
            logger.warning("CANCEL for session %r dropped: worker queue full", req.session_id)
        else:
            self.table.abort(req.session_id)
            if req.kind is Kind.TURN:
                self.fleet.turn_ended(Kind.ERROR)
            self._error_to_client(
                req.client,
                req.session_id,
                req.request_id,
                ErrorCode.OVERLOADED,
                "the session's worker has a full queue",
            )

    def _error_to_client(
        self, client: bytes, session_id: bytes, request_id: bytes, code: ErrorCode, message: str
    ) -> None:
        self.stats.errors_sent += 1
        self.fleet.error_sent(code)
        body = _error_body(code, message)
        send(self.front, client_frames(client, Kind.ERROR, session_id, request_id, body))

    # --- workers ----------------------------------------------------------------------------

    def on_worker(self, frames: list[bytes], now: float) -> None:
        """Handle one message from the backend (``frames[0]`` is the worker's routing id)."""
        self.stats.worker_messages += 1
        try:
            msg = parse_backend(frames)
            if type(msg) is WorkerReply:
                self._on_reply(msg, now)
            else:
                assert isinstance(msg, WorkerControl)
                self._on_control(msg, now)
        except ProtocolViolation as exc:
            logger.warning("bad message from a worker: %s", exc)
            self._error_to_worker(frames[0], exc.code, exc.message)

    def _on_reply(self, msg: WorkerReply, now: float) -> None:
        kind = msg.kind
        fl = self.table.on_reply(
            msg.worker, kind, msg.session_id, msg.request_id, msg.client, now, msg.body
        )
        if fl is None:
            if msg.worker not in self.table.workers:
                self._to_worker(msg.worker, Kind.DISCONNECT, Disconnect("unknown worker").encode())
            else:
                logger.debug("stale %s for session %r dropped", kind.name, msg.session_id)
            return
        if kind is not Kind.TOKEN:  # a terminal: one test per TOKEN, the rest once per request
            if fl.kind is Kind.TURN:
                self.fleet.turn_ended(kind)
            elif kind is Kind.CLOSE_OK and fl.kind is Kind.CLOSE:
                self.transcripts.forget(fl.session_id)  # the table has just forgotten it
        if fl.orphaned is not None:
            if fl.orphaned is Orphan.SLOW_CLIENT and kind in TERMINAL_KINDS:
                # Best effort: tell the client why its stream stopped (if its queue has room).
                self._error_to_client(
                    fl.client,
                    fl.session_id,
                    fl.request_id,
                    ErrorCode.SLOW_CONSUMER,
                    "client did not read its stream; the turn was cancelled",
                )
            return
        # The hot path (every TOKEN): send inline rather than through send().
        try:
            send_multipart(
                self.front, [fl.client, msg.header, msg.session_id, msg.request_id, msg.body]
            )
            return
        except zmq.Again:
            reason = Orphan.SLOW_CLIENT
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EHOSTUNREACH:
                raise
            reason = Orphan.CLIENT_GONE
        if kind in TERMINAL_KINDS:
            logger.info("%s for session %r lost: %s", kind.name, fl.session_id, reason.value)
        elif self.table.orphan(fl.session_id, reason) is not None:
            logger.info("session %r: %s, cancelling its turn", fl.session_id, reason.value)
            self._cancel_on_worker(fl)

    def _cancel_on_worker(self, fl: InFlight) -> None:
        self.stats.cancels_sent += 1
        cancel = delivery_frames(
            fl.worker, HEADERS[Kind.CANCEL], fl.client, fl.session_id, fl.request_id, 0, EMPTY_BODY
        )
        send(self.back, cancel)

    def _on_control(self, msg: WorkerControl, now: float) -> None:
        key, kind = msg.worker, msg.kind
        if kind is Kind.READY:
            self._on_ready(key, Ready.decode(msg.body), now)
        elif kind is Kind.HEARTBEAT:
            hb = Heartbeat.decode(msg.body)
            if not self.table.heartbeat(key, hb, now):
                # Paranoid Pirate: a worker we do not know (we restarted, or declared it lost)
                # must register again rather than believe it still owns sessions.
                self._to_worker(key, Kind.DISCONNECT, Disconnect("unknown worker").encode())
            else:
                self.fleet.heartbeat(self.table.workers[key], hb)
        elif kind is Kind.DISCONNECT:
            self._lose(key, LostReason.DISCONNECTED)
        else:  # ERROR answering something we sent: a bug on one side, worth a log line
            self.table.touch(key, now)
            err = ErrorReply.decode(msg.body)
            logger.warning("worker %r reports %s: %s", key, err.code, err.message)

    def _on_ready(self, key: bytes, ready: Ready, now: float) -> None:
        other = self.table.worker_key(ready.worker)
        connected = True
        if other is not None and other != key:
            # Another connection holds this worker id. Is it still there? Under ROUTER_MANDATORY
            # a send to a peer that is gone fails at once; a heartbeat is harmless to one that
            # is not (and then the table refuses the READY: a live worker keeps its sessions).
            connected = (
                send(self.back, [other, HEADERS[Kind.HEARTBEAT], EMPTY_BODY]) is not Sent.GONE
            )
        reg = self.table.register(key, ready, now, other_connected=connected)
        if reg.refused:
            self._error_to_worker(key, ErrorCode.NOT_OWNER, reg.refused)
            return
        # Answer at once: the worker counts us silent from the moment it sent READY, and one
        # that waited up to a heartbeat interval for our first heartbeat could give up just as
        # it was registered, and register a second time.
        self._to_worker(key, Kind.HEARTBEAT, EMPTY_BODY)
        for lost in reg.lost:
            self._report_lost(lost)
        self.stats.sessions_repinned += reg.repinned
        for f in reg.drops:
            self._close_on_worker(f)

    def _error_to_worker(self, key: bytes, code: ErrorCode, message: str) -> None:
        self.stats.errors_sent += 1
        self.fleet.error_sent(code)
        self._to_worker(key, Kind.ERROR, _error_body(code, message))

    def _to_worker(self, key: bytes, kind: Kind, body: bytes) -> None:
        if send(self.back, [key, HEADERS[kind], body]) is not Sent.OK:
            logger.debug("%s to worker %r dropped", kind.name, key)

    def beat(self) -> None:
        """Send HEARTBEAT to every worker; a worker that is gone is lost at once."""
        for key in list(self.table.workers):
            # FULL is fine: a worker with a full queue has work, and will answer later.
            if send(self.back, [key, HEADERS[Kind.HEARTBEAT], EMPTY_BODY]) is Sent.GONE:
                self._lose(key, LostReason.UNREACHABLE)

    def expire(self, now: float) -> None:
        """Lose the workers silent for too long; forget idle pins (and close them on workers)."""
        for lost in self.table.expire(now):
            self._report_lost(lost)
        for f in self.table.sweep(now):
            self._close_forgotten(f)

    def _close_forgotten(self, f: Forgotten) -> None:
        # CLOSE frees the worker's KV at once, and makes sure nobody who later creates this
        # session id (maybe another client) can reuse what the old owner left in the cache. No
        # client waits for the CLOSE_OK (client frame empty): on_reply drops it as stale.
        self.stats.pins_forgotten += 1
        self.transcripts.forget(f.session_id)
        self._close_on_worker(f)

    def _close_on_worker(self, f: Forgotten) -> None:
        """Tell a worker to drop a session nobody will route to it (an unawaited CLOSE)."""
        close = delivery_frames(
            f.worker, HEADERS[Kind.CLOSE], b"", f.session_id, b"forget", 0, EMPTY_BODY
        )
        sent = send(self.back, close)
        if sent is Sent.GONE:
            self._lose(f.worker, LostReason.UNREACHABLE)
        elif sent is Sent.FULL:
            logger.warning("CLOSE of session %r dropped: worker queue full", f.session_id)

    def worker_exited(self, worker_id: str) -> None:
        """A watched worker process exited: lose it now, without waiting for heartbeats."""
        key = self.table.worker_key(worker_id)
        if key is not None:
            logger.warning("worker %s process exited", worker_id)
            self._lose(key, LostReason.EXITED)
        else:  # it had said goodbye (DISCONNECT) or never registered: nothing is lost
            logger.info("worker %s process exited", worker_id)
        if self._on_worker_exit is not None:
            self._on_worker_exit(worker_id)

    def _lose(self, key: bytes, reason: LostReason) -> None:
        lost = self.table.remove(key, reason)
        if lost is not None:
            self._report_lost(lost)

    def _report_lost(self, lost: LostWorker) -> None:
        self.stats.workers_lost += 1
        self.fleet.worker_gone(lost.worker.key, lost.reason)
        body = SessionLost(lost.worker.worker_id, lost.reason, retryable=True).encode()
        for fl in lost.in_flight:
            if fl.kind is Kind.TURN:
                self.fleet.turn_ended(Kind.SESSION_LOST)
            if fl.orphaned is None:
                self.stats.sessions_lost_sent += 1
                frames = client_frames(
                    fl.client, Kind.SESSION_LOST, fl.session_id, fl.request_id, body
                )
                send(self.front, frames)
        key = lost.worker.key
        if lost.reason is LostReason.HEARTBEAT_TIMEOUT and key not in self.table.workers:
            # It may only be hung: when it wakes it reads this first, ends its turns and
            # registers again (announcing its sessions) instead of streaming into the void.
            self._to_worker(key, Kind.DISCONNECT, Disconnect("declared lost").encode())

    def goodbye(self) -> None:
        """On shutdown: end every request in flight (ERROR shutting_down) and cancel its turn."""
        for fl in list(self.table.in_flight.values()):
            if fl.orphaned is None:
                self._error_to_client(
                    fl.client,
                    fl.session_id,
                    fl.request_id,
                    ErrorCode.SHUTTING_DOWN,
                    "broker stopping",
                )
            if fl.kind is Kind.TURN:
                self._cancel_on_worker(fl)
