"""The worker's socket adapter: a DEALER to the broker around the I/O-free `Scheduler`.

The loop polls, drains every pending frame without blocking, runs one scheduler step (one
forward pass: a prefill chunk and/or a batched decode step), sends what it produced, and keeps the
heartbeat both ways. Polling between steps is what keeps a worker in a long prefill alive in the
broker's eyes. If the broker falls silent for ``liveness`` intervals (or tells us it does not
know us), the worker drops its sessions, rebuilds its socket and registers again with a new
epoch (the guide's Paranoid Pirate): ZeroMQ reconnects sockets, but only READY re-registers.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable

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
    Overflow,
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
from kvroute.proto.control import Disconnect
from kvroute.proto.identity import CurveClient, KeyFileError

from .config import WorkerConfig
from .events import BusyEvent, EndEvent, ErrorEvent, Event, OverflowEvent, TokenEvent
from .scheduler import Scheduler, SchedulerConfig

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
        self.scheduler = self._new_scheduler()
        self._clients: dict[tuple[bytes, bytes], bytes] = {}  # (session, request) -> client
        self._stop = stop or threading.Event()
        self._sock: zmq.Socket[bytes] | None = None

    def _new_scheduler(self) -> Scheduler:
        cfg = SchedulerConfig(self.config.prefill_chunk, self.config.kv_budget_bytes)
        return Scheduler(self.engine, cfg, self.worker_id)

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
        )
        self._send(control_frames(Kind.READY, ready.encode()))
        logger.info(
            "worker %s: READY to %s (epoch %d)", self.worker_id, self.config.connect, self.epoch
        )

    def _reconnect(self, ctx: zmq.Context[zmq.Socket[bytes]], why: str) -> None:
        logger.warning(
            "worker %s: %s; dropping %d sessions and re-registering",
            self.worker_id,
            why,
            len(self.scheduler.store),
        )
        self.scheduler = self._new_scheduler()
        self._clients.clear()
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
                hb = Heartbeat(len(s.turns), len(s.store), s.store.kv_bytes)
                self._send(control_frames(Kind.HEARTBEAT, hb.encode()))
                next_beat = now + interval
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
                continue
            self._handle(msg)

    def _handle(self, d: Delivery) -> None:
        key = (d.session_id, d.request_id)
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
            )
            self._clients[key] = d.client
            events = self.scheduler.submit(
                d.request_id, d.session_id, req.message_dicts(), params, worker_lost=d.worker_lost
            )
            self._emit(events)
        elif d.kind == Kind.CANCEL:
            self.scheduler.cancel(d.session_id, d.request_id)
        elif d.kind in (Kind.RESET, Kind.CLOSE):
            self._emit(self.scheduler.reset(d.session_id))
            ok = Kind.RESET_OK if d.kind == Kind.RESET else Kind.CLOSE_OK
            self._reply(d.client, d.session_id, d.request_id, ok, EMPTY_BODY)

    # --- sending --------------------------------------------------------------------------------

    def _emit(self, events: list[Event]) -> None:
        for e in events:
            key = (e.session_id, e.request_id)
            client = self._clients.get(key)
            if client is None:
                logger.error("worker %s: no client for %s", self.worker_id, key)
                continue
            if isinstance(e, TokenEvent):
                self._reply(client, *key, Kind.TOKEN, Token(e.seq, e.text, e.token_ids).encode())
                continue
            del self._clients[key]  # every other event ends the request
            if isinstance(e, EndEvent):
                body = TurnEnd(e.seq, e.finish_reason, e.reply_sha256, e.stats).encode()
                self._reply(client, *key, Kind.END, body)
            elif isinstance(e, OverflowEvent):
                body = Overflow(e.prompt_tokens, e.max_tokens, e.n_ctx).encode()
                self._reply(client, *key, Kind.OVERFLOW, body)
            elif isinstance(e, BusyEvent):
                self._reply(client, *key, Kind.BUSY, EMPTY_BODY)
            elif isinstance(e, ErrorEvent):
                self._reply(client, *key, Kind.ERROR, error_body(e.code, e.message))

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
    engine = Engine.load(resolve_model(config.model), n_ctx=config.n_ctx)
    service = WorkerService(engine, config, stop)
    if on_loaded is not None:
        on_loaded(service)
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: service.stop())
    service.run()


def worker_process_main(config: WorkerConfig) -> None:
    """Entry point of a spawned worker process: a bad model or key is one log line, exit 2."""
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    try:
        serve_worker(config)
    except (EngineError, KeyFileError) as exc:
        logger.error("worker %s: %s", config.worker_id, exc)
        raise SystemExit(2) from None
