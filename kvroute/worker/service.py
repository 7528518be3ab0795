"""The worker's socket adapter: a DEALER to the broker around the I/O-free `Scheduler`.

The loop polls, drains every pending frame without blocking, runs one scheduler step (one
forward pass: a prefill chunk and/or a batched decode step), sends what it produced, and keeps the
heartbeat both ways. Polling between steps is what keeps a worker in a long prefill alive in the
broker's eyes. If the broker falls silent for ``liveness`` intervals (or tells us it does not
know us), the worker rebuilds its socket and registers again with a new epoch (the guide's
Paranoid Pirate): ZeroMQ reconnects sockets, but only READY re-registers. It ends its turns in
flight first (nobody can receive their replies any more) but keeps its sessions, and READY
announces them with their owners, so a restarted broker pins them here again and their next
turns stay warm; the broker sends a CLOSE for each one it gives to someone else instead.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import assert_never

import zmq

from kvroute.engine.engine import Engine
from kvroute.engine.errors import EngineError
from kvroute.engine.sampling import SamplingParams
from kvroute.proto import (
    EMPTY_BODY,
    Control,
    Delivery,
    Heartbeat,
    Kind,
    ProtocolViolation,
    Ready,
    Token,
    TurnEnd,
    TurnRequest,
    control_frames,
    error_body,
    parse_delivery,
    reply_frames,
)
from kvroute.proto.control import Disconnect, Resident
from kvroute.proto.errors import ErrorCode
from kvroute.proto.identity import CurveClient, KeyFileError
from kvroute.proto.limits import MAX_IDLE_MS, MAX_RESIDENT_SESSIONS

from .assembly import build_scheduler
from .config import WorkerConfig
from .events import BusyEvent, EndEvent, ErrorEvent, Event, OverflowEvent, TokenEvent
from .gauges import WorkerMeter
from .process import setup_worker_process

logger = logging.getLogger(__name__)


class WorkerService:
    """Serve one engine to the broker until stopped.

    Parameters
    ----------
    engine:
        The loaded model (the service never reloads it, even when re-registering).
    config:
        Address, heartbeat and scheduling knobs.
    stop:
        Set it (from any thread) to end `run`; one is made if not given.

    Raises
    ------
    KeyFileError
        ``config`` names CURVE keys that cannot be used.
    """

    def __init__(
        self, engine: Engine, config: WorkerConfig, stop: threading.Event | None = None
    ) -> None:
        self.engine = engine
        self.config = config
        self.curve = CurveClient.load(config.server_key, config.key)
        self.worker_id = config.worker_id or f"w{os.getpid()}"
        self.epoch = 0
        self.registrations = 0
        self.scheduler = build_scheduler(engine, config, self.worker_id)
        logger.info("worker %s: %s", self.worker_id, config.describe_kv_budget())
        self._announce = True  # announce resident sessions in the next READY
        self._announced = 0  # sessions the last READY announced
        self.meter = WorkerMeter()  # the fleet view's gauges, sent with each HEARTBEAT
        self._send_gauges = True  # False once a broker refused them (an older release)
        self._stop = stop or threading.Event()
        self._sock: zmq.Socket[bytes] | None = None

    def stop(self) -> None:
        """Ask the loop to end (thread- and signal-safe)."""
        self._stop.set()

    # --- loop ---------------------------------------------------------------------------------

    def run(self) -> None:
        """Connect, register and serve until `stop`; the context lives and dies in this call."""
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        try:
            self._connect(ctx)
            self._loop(ctx)
        finally:
            if self._sock is not None:
                self._send(control_frames(Kind.DISCONNECT, Disconnect("stopping").encode()))
                self._sock.close(linger=self.config.linger_ms)
                self._sock = None
            ctx.term()

    def _connect(self, ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, self.config.linger_ms)
        sock.setsockopt(zmq.SNDHWM, self.config.hwm)
        sock.setsockopt(zmq.RCVHWM, self.config.hwm)
        if self.curve is not None:
            # A broker that refuses our key stays silent: READY goes nowhere, and the liveness
            # check keeps re-registering (logged) until someone fixes the keys.
            self.curve.apply(sock)
        sock.connect(self.config.connect)
        self._sock = sock
        self.epoch = time.time_ns()
        self.registrations += 1
        ready = Ready(
            self.worker_id,
            os.getpid(),
            self.epoch,
            self.config.capacity,
            self.engine.model_name,
            self.engine.n_ctx,
            self._resident(),
        )
        self._send(control_frames(Kind.READY, ready.encode()))
        logger.info(
            "worker %s: READY to %s (epoch %d, %d sessions announced)",
            self.worker_id,
            self.config.connect,
            self.epoch,
            len(ready.sessions),
        )

    def _resident(self) -> tuple[Resident, ...]:
        """The sessions READY announces: the most recently used ones with an owner and a
        cache, up to the protocol's cap. Every other session is dropped here: one the broker
        does not know must not linger, where a later session with the same id would find it."""
        store = self.scheduler.store
        now, wall = time.monotonic(), time.time_ns()
        announced: list[Resident] = []
        announce, self._announce = self._announce, True
        for session in store.recent(MAX_RESIDENT_SESSIONS if announce else 0):
            if session.owner and session.tokens and session.in_flight is None:
                idle_ms = min(max(0.0, (now - session.last_used) * 1e3), MAX_IDLE_MS)
                turn_ns = session.last_turn_ns or wall
                announced.append(
                    Resident(
                        session.session_id, session.owner, session.cache.nbytes, idle_ms, turn_ns
                    )
                )
        keep = {r.session_id for r in announced}
        for session in store:
            if session.session_id not in keep:
                self.scheduler.close(session.session_id)
        self._announced = len(announced)
        return tuple(announced)

    def _reconnect(self, ctx: zmq.Context[zmq.Socket[bytes]], why: str) -> None:
        # The turns in flight answer a broker connection that is gone: end them now (what they
        # fed is committed or rolled back as for a CANCEL), so their sessions can be announced.
        in_flight = [s.session_id for s in self.scheduler.store if s.in_flight is not None]
        for session_id in in_flight:
            self.scheduler.cancel(session_id)
        if in_flight:
            self.scheduler.step()  # ends the cancelled turns; their events have nowhere to go
        logger.warning(
            "worker %s: %s; ended %d turns in flight, re-registering with %d sessions",
            self.worker_id,
            why,
            len(in_flight),
            len(self.scheduler.store),
        )
        self._connect(ctx)

    def _loop(self, ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
        interval = self.config.heartbeat_interval
        expiry = interval * self.config.liveness
        last_heard = next_beat = time.monotonic()
        while not self._stop.is_set():
            assert self._sock is not None
            wait = 0 if self.scheduler.busy else max(0.0, next_beat - time.monotonic())
            if self._sock.poll(int(wait * 1000), zmq.POLLIN):
                last_heard = time.monotonic()
                if not self._drain():
                    self._reconnect(ctx, "the broker does not know us")
                    last_heard = next_beat = time.monotonic()
                    continue
            if self.scheduler.busy:
                self._emit(self.scheduler.step())
            now = time.monotonic()
            if now >= next_beat:
                s = self.scheduler
                gauges = self.meter.gauges(s) if self._send_gauges else None
                hb = Heartbeat(len(s.turns), len(s.store), s.store.kv_bytes, gauges)
                self._send(control_frames(Kind.HEARTBEAT, hb.encode()))
                next_beat = now + interval
                if s.config.checkpoints is not None:
                    s.config.checkpoints.maybe_sweep()  # expiry goes on while no turn ends
            if now - last_heard > expiry:
                self._reconnect(ctx, f"broker silent for {now - last_heard:.1f} s")
                last_heard = next_beat = time.monotonic()

    def _drain(self) -> bool:
        """Handle every frame waiting; False if the broker told us to re-register."""
        assert self._sock is not None
        while True:
            try:
                frames = self._sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return True
            try:
                msg = parse_delivery(frames)
            except ProtocolViolation as exc:
                # Only the broker talks to us; a bad frame is a bug there. Say so, keep going.
                logger.error("worker %s: bad frame from broker: %s", self.worker_id, exc)
                continue
            if isinstance(msg, Control):
                if msg.kind == Kind.DISCONNECT:
                    return False
                if msg.kind == Kind.ERROR:
                    logger.error("worker %s: broker says %r", self.worker_id, msg.body[:200])
                    if self._send_gauges and b"gauges" in msg.body:
                        self._send_gauges = False  # an older broker: plain heartbeats from now
                        continue
                    if self._announced and b"sessions" in msg.body:
                        # A broker of an older release rejects READY's sessions field: register
                        # once more without it (the sessions are dropped; next turns run cold).
                        self._announce = False
                        return False
                continue
            try:
                self._handle(msg)
            except Exception:
                # Our bug while serving one request: that request fails, the worker goes on.
                logger.exception(
                    "worker %s: handling %s for session %r failed",
                    self.worker_id,
                    msg.kind.name,
                    msg.session_id,
                )
                self._fail_request(msg.session_id, msg.request_id, msg.client)

    def _handle(self, d: Delivery) -> None:
        if d.kind == Kind.TURN:
            try:
                req = TurnRequest.decode(d.body)
            except ProtocolViolation as exc:
                self._reply(
                    d.client,
                    d.session_id,
                    d.request_id,
                    Kind.ERROR,
                    error_body(exc.code, exc.message),
                )
                return
            params = SamplingParams(
                max_tokens=req.max_tokens,
                temperature=req.temperature,
                top_k=req.top_k,
                top_p=req.top_p,
                seed=req.seed,
                stop=req.stop,
            )
            events = self.scheduler.submit(
                d.request_id,
                d.session_id,
                req.message_dicts(),
                params,
                worker_lost=d.worker_lost,
                client=d.owner,  # waiting turns start round-robin over owners
                reply_to=d.client,  # every event of this request says where it goes
            )
            held = self.scheduler.store.get(d.session_id)
            if held is not None and held.in_flight == d.request_id:  # accepted (run or queued)
                held.owner, held.last_turn_ns = d.owner, time.time_ns()  # for a later READY
            self._emit(events)
        elif d.kind == Kind.CANCEL:
            self.scheduler.cancel(d.session_id, d.request_id)
        elif d.kind == Kind.RESET:
            self._emit(self.scheduler.reset(d.session_id))  # the next turn says cold "reset"
            self._reply(d.client, d.session_id, d.request_id, Kind.RESET_OK, EMPTY_BODY)
        elif d.kind == Kind.CLOSE:
            # Forgotten entirely: whoever uses this id next (maybe another client) starts "new".
            self._emit(self.scheduler.close(d.session_id))
            self._reply(d.client, d.session_id, d.request_id, Kind.CLOSE_OK, EMPTY_BODY)

    # --- sending --------------------------------------------------------------------------------

    def _emit(self, events: list[Event]) -> None:
        for e in events:
            try:
                self._emit_one(e)
            except Exception:
                # One event we cannot send (our bug) fails its request only.
                logger.exception(
                    "worker %s: sending %s for session %r failed",
                    self.worker_id,
                    type(e).__name__,
                    e.session_id,
                )
                self._fail_request(e.session_id, e.request_id, e.reply_to)

    def _emit_one(self, e: Event) -> None:
        key, client = (e.session_id, e.request_id), e.reply_to
        if isinstance(e, TokenEvent):
            self._reply(client, *key, Kind.TOKEN, Token(e.seq, e.text, e.token_ids).encode())
            return
        if isinstance(e, EndEvent):
            self.meter.on_end(e.stats)
            body = TurnEnd(e.seq, e.finish_reason, e.reply_sha256, e.stats).encode()
            kind = Kind.END
        elif isinstance(e, OverflowEvent):
            body = e.overflow.encode()
            kind = Kind.OVERFLOW
        elif isinstance(e, BusyEvent):
            body, kind = EMPTY_BODY, Kind.BUSY
        elif isinstance(e, ErrorEvent):
            body, kind = error_body(e.code, e.message), Kind.ERROR
        else:
            assert_never(e)
        self._reply(client, *key, kind, body)

    def _fail_request(self, session_id: bytes, request_id: bytes, client: bytes) -> None:
        """Drop a request we failed (its turn, and its session's state) and answer ERROR
        ``internal``; nothing more is sent for it."""
        try:
            self.scheduler.fail_request(request_id, session_id, client)
            body = error_body(ErrorCode.INTERNAL, "the worker failed this request")
            self._reply(client, session_id, request_id, Kind.ERROR, body)
        except Exception:
            logger.exception("worker %s: could not fail request %r", self.worker_id, request_id)

    def _reply(
        self, client: bytes, session_id: bytes, request_id: bytes, kind: Kind, body: bytes
    ) -> None:
        self._send(reply_frames(kind, client, session_id, request_id, body))

    def _send(self, frames: list[bytes]) -> None:
        assert self._sock is not None
        try:
            self._sock.send_multipart(frames, zmq.NOBLOCK)
        except zmq.Again:
            # The broker is not reading (gone or stalled): dropping is right, the liveness
            # check will re-register us and the broker ends the turns with SESSION_LOST.
            logger.warning(
                "worker %s: broker not reading; dropped a %d-frame message",
                self.worker_id,
                len(frames),
            )


def serve_worker(
    config: WorkerConfig,
    stop: threading.Event | None = None,
    on_loaded: Callable[[WorkerService], None] | None = None,
) -> None:
    """Load the model with ``config.threads`` BLAS threads and serve until stopped.

    Used as a spawned process's target by ``kvroute serve`` and run directly by
    ``kvroute worker``. SIGINT/SIGTERM stop it cleanly (when run in a main thread).
    ``on_loaded`` is called once the model is loaded, before connecting.
    """
    import signal

    from threadpoolctl import threadpool_limits

    from kvroute.engine.model_store import resolve_model

    CurveClient.load(config.server_key, config.key)  # bad keys: fail before the slow load
    threadpool_limits(config.threads)
    engine = Engine.load(resolve_model(config.model), n_ctx=config.n_ctx, kernels=config.kernels)
    service = WorkerService(engine, config, stop)
    if on_loaded is not None:
        on_loaded(service)
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: service.stop())
    service.run()


def worker_process_main(config: WorkerConfig) -> None:
    """Entry point of a spawned worker process: a bad model or key is one log line, exit 2."""
    setup_worker_process(config.worker_id)  # a title for ps; exit when serve is gone
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    try:
        serve_worker(config)
    except (EngineError, KeyFileError) as exc:
        logger.error("worker %s: %s", config.worker_id, exc)
        raise SystemExit(2) from None
