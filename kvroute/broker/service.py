"""The broker's lifetime and poll loop: two ROUTER sockets, a wake-up pipe, process sentinels.

:class:`Broker` creates its context and sockets inside :meth:`Broker.run` (in the thread that
uses them), polls the frontend (clients), the backend (workers), the wake-up pipe and any child
process sentinels, drains each ready socket with non-blocking receives and hands every message
to :class:`~kvroute.broker.forwarder.Forwarder`, which parses headers and sizes only (bodies are
forwarded untouched, except control bodies addressed to the broker), asks the
:class:`~kvroute.broker.routing.RoutingTable` and sends with ``NOBLOCK``. Every
``heartbeat_interval`` it sends HEARTBEAT to each worker; every tick it expires silent workers.

Both ROUTERs set ``ROUTER_MANDATORY`` (unroutable sends raise instead of vanishing), a linger
(close never hangs) and ``MAXMSGSIZE`` (a hostile peer cannot make us buffer huge frames). With
CURVE configured both are CURVE servers behind a ZAP handler (:mod:`kvroute.broker.curve`), and
each client message is received with its authenticated key, which owns the sessions it creates.
Every tick also forgets idle session pins (``pin_ttl_s``, ``max_pins``).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Mapping

import zmq
from zmq.utils.monitor import recv_monitor_message

from .config import BrokerConfig, BrokerStats
from .curve import BACKEND_DOMAIN, FRONTEND_DOMAIN, CurveServer
from .forwarder import Forwarder
from .routing import RoutingTable
from .transcripts import TranscriptIndex
from .watch import Watch
from .wire import recv_multipart, recv_multipart_user

logger = logging.getLogger(__name__)


class BrokerError(RuntimeError):
    """The broker could not start (e.g. an address already in use)."""


class Broker:
    """Routes sessions between clients and workers. Run it in one thread; stop it from any.

    Parameters
    ----------
    config
        Addresses and knobs; defaults to :class:`BrokerConfig`.
    sentinels
        ``{fd: worker_id}`` of child processes (``multiprocessing.Process.sentinel``): when the fd
        becomes readable the process exited and its worker is lost at once, without waiting
        for heartbeats. More can be added while running with :meth:`watch`.
    on_worker_exit
        Called (in the broker thread) with the worker id whose sentinel fired.

    Raises
    ------
    KeyFileError
        CURVE is configured and a key file or the allowed-keys directory cannot be used.
    """

    def __init__(
        self,
        config: BrokerConfig | None = None,
        *,
        sentinels: Mapping[int, str] | None = None,
        on_worker_exit: Callable[[str], None] | None = None,
    ) -> None:
        cfg = self.config = config or BrokerConfig()
        self.table = RoutingTable(
            cfg.expiry_s,
            cfg.lost_memory,
            max_sessions_per_client=cfg.max_sessions_per_client,
            max_requests_per_client=cfg.max_requests_per_client,
            pin_ttl_s=cfg.pin_ttl_s,
            max_pins=cfg.max_pins,
        )
        self.stats = BrokerStats()
        # Keys are read here, in the caller's thread: a bad file is an exception at once.
        self.curve: CurveServer | None = CurveServer.load(cfg, self.stats)
        self.endpoints: tuple[str, str] | None = None  # (frontend, backend) once bound
        self._watch = Watch(sentinels)  # so close() and watch() take effect at once
        self._on_worker_exit = on_worker_exit
        self._stop = threading.Event()
        self._bound = threading.Event()
        self._error: BaseException | None = None
        self._lock = threading.Lock()
        self._started = False
        self._front: zmq.Socket[bytes] | None = None
        self._back: zmq.Socket[bytes] | None = None
        self._forwarder: Forwarder | None = None

    # --- control from other threads ---------------------------------------------------------

    def wait_bound(self, timeout: float | None = None) -> tuple[str, str]:
        """Block until both sockets are bound; returns the (frontend, backend) endpoints.

        Raises
        ------
        BrokerError
            If binding failed, or on timeout.
        """
        if not self._bound.wait(timeout):
            raise BrokerError(f"broker not bound after {timeout} s")
        if self._error is not None or self.endpoints is None:
            raise BrokerError(f"broker failed to start: {self._error}") from self._error
        return self.endpoints

    def watch(self, fd: int, worker_id: str) -> None:
        """Watch another child-process sentinel (thread-safe)."""
        self._watch.watch(fd, worker_id)

    def close(self) -> None:
        """Stop the loop (idempotent, thread-safe); :meth:`run` closes its sockets on the way
        out. A broker closed before it ran never runs."""
        self._stop.set()
        with self._lock:
            if not self._started:
                self._started = True
                self._watch.close()
                return
        self._watch.wake()

    # --- the loop ---------------------------------------------------------------------------

    def run(self, stop_event: threading.Event | None = None) -> None:
        """Bind, serve until :meth:`close` or ``stop_event``, then close every socket.

        A Broker runs once. Raises :class:`BrokerError` if the sockets cannot be bound.
        """
        with self._lock:
            if self._started:
                raise BrokerError("a Broker runs once (and not after close())")
            self._started = True
        cfg = self.config
        ctx = zmq.Context()
        try:
            if self.curve is not None:
                self.curve.start(ctx)  # ZAP must answer from the first handshake on
            self._front = self._router(ctx, cfg.frontend, FRONTEND_DOMAIN)
            self._back = self._router(ctx, cfg.backend, BACKEND_DOMAIN)
            self.endpoints = (
                self._front.getsockopt_string(zmq.LAST_ENDPOINT),
                self._back.getsockopt_string(zmq.LAST_ENDPOINT),
            )
        except zmq.ZMQError as exc:
            self._error = exc
            self._bound.set()
            self._shutdown(ctx)
            raise BrokerError(f"cannot bind {cfg.frontend} / {cfg.backend}: {exc}") from exc
        self._bound.set()
        logger.info("broker frontend %s backend %s", *self.endpoints)
        try:
            self._loop(stop_event)
        finally:
            if self._forwarder is not None:
                self._forwarder.goodbye()
            self._shutdown(ctx)

    def _router(
        self, ctx: zmq.Context[zmq.Socket[bytes]], addr: str, domain: str
    ) -> zmq.Socket[bytes]:
        s = ctx.socket(zmq.ROUTER)
        s.setsockopt(zmq.LINGER, self.config.linger_ms)
        s.setsockopt(zmq.ROUTER_MANDATORY, 1)
        s.setsockopt(zmq.MAXMSGSIZE, self.config.max_msg_size)
        s.setsockopt(zmq.SNDHWM, self.config.hwm)
        s.setsockopt(zmq.RCVHWM, self.config.hwm)
        if self.curve is not None:
            self.curve.apply(s, domain)
        try:
            s.bind(addr)
        except zmq.ZMQError:
            s.close()  # or ctx.term() waits for it forever
            raise
        return s

    def _shutdown(self, ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
        for s in (self._front, self._back):
            if s is not None:
                s.close()
        if self.curve is not None:
            self.curve.stop()  # its sockets live in ctx: stop it before term() waits for them
        ctx.term()  # waits at most linger_ms for goodbyes
        self._watch.close()

    def _loop(self, stop_event: threading.Event | None) -> None:
        assert self._front is not None and self._back is not None
        front, back, batch = self._front, self._back, self.config.batch
        fw = Forwarder(
            front,
            back,
            self.table,
            self.stats,
            self._on_worker_exit,
            self.config.max_body_bytes,
            transcripts=TranscriptIndex(self.config.max_transcripts),
        )
        curve = self.curve is not None
        self._forwarder = fw
        poller = zmq.Poller()
        poller.register(front, zmq.POLLIN)
        poller.register(back, zmq.POLLIN)
        # ZeroMQ drops a frame over MAXMSGSIZE by closing the sender's connection and tells
        # nobody; a monitor counts and logs every closed connection (see _log_disconnects).
        monitors = {
            front.get_monitor_socket(zmq.EVENT_DISCONNECTED): "frontend",
            back.get_monitor_socket(zmq.EVENT_DISCONNECTED): "backend",
        }
        for mon in monitors:
            poller.register(mon, zmq.POLLIN)
        wake_fd = self._watch.wake_fd
        poller.register(wake_fd, zmq.POLLIN)
        self._watch.refresh(poller)
        interval = self.config.heartbeat_interval
        # Expiry is checked every tick, so a silent worker is lost within expiry_s + tick.
        tick = min(0.1, interval / 4)
        now = time.monotonic()
        next_tick, next_beat = now + tick, now
        while not self._stop.is_set() and not (stop_event is not None and stop_event.is_set()):
            events = poller.poll(math.ceil(max(0.0, next_tick - now) * 1000))
            now = time.monotonic()
            for sock, _ in events:
                if sock is back:
                    _drain(back, fw.on_worker, batch, now)
                elif sock is front:
                    if curve:
                        _drain_authenticated(front, fw.on_client, batch, now)
                    else:
                        _drain(front, fw.on_client, batch, now)
                elif sock in monitors:
                    self.stats.connections_closed += _log_disconnects(sock, monitors[sock])
                elif sock == wake_fd:
                    self._watch.refresh(poller)
                else:
                    worker_id = self._watch.fired(poller, sock)
                    if worker_id is not None:
                        fw.worker_exited(worker_id)
            if now >= next_tick:
                next_tick = now + tick
                fw.expire(now)
                if now >= next_beat:
                    next_beat = now + interval
                    fw.beat()
        for sock in (front, back):
            sock.disable_monitor()
        for mon in monitors:
            mon.close(linger=0)


def _log_disconnects(mon: zmq.Socket[bytes], hop: str) -> int:
    """Log every connection the monitor saw close; returns how many.

    A peer that disconnects and one ZeroMQ cut off for a frame over MAXMSGSIZE look exactly the
    same here (one DISCONNECTED event, nothing else), so the line says only what is known: a
    connection closed. Blaming the size would make every ordinary client exit read like a
    violation; saying nothing would hide the drops. (Workers that go away are also logged by the
    routing table, with the reason it knows.)
    """
    n = 0
    while True:
        try:
            event = recv_monitor_message(mon, zmq.NOBLOCK)
        except zmq.Again:
            return n
        n += 1
        endpoint: object = event.get("endpoint", b"?")
        if isinstance(endpoint, bytes):
            endpoint = endpoint.decode(errors="replace")
        logger.info("%s: a connection closed (%s)", hop, endpoint)


def _drain(
    sock: zmq.Socket[bytes], handle: Callable[[list[bytes], float], None], batch: int, now: float
) -> None:
    """Receive and handle up to ``batch`` messages without blocking (then let the other socket
    have a turn: one flooding peer must not starve the rest)."""
    for _ in range(batch):
        try:
            frames = recv_multipart(sock)
        except zmq.Again:
            return
        try:
            handle(frames, now)
        except Exception:  # a bug on one message must not take the service down
            logger.exception("broker failed to handle a message; dropped it")


def _drain_authenticated(
    sock: zmq.Socket[bytes],
    handle: Callable[[list[bytes], float, bytes], None],
    batch: int,
    now: float,
) -> None:
    """:func:`_drain` for a CURVE frontend: each message comes with its sender's key."""
    for _ in range(batch):
        try:
            frames, user = recv_multipart_user(sock)
        except zmq.Again:
            return
        except zmq.ZMQError:  # no User-Id: cannot happen behind ZAP; never guess an owner
            logger.exception("client message without an authenticated key; dropped it")
            continue
        try:
            handle(frames, now, user)
        except Exception:
            logger.exception("broker failed to handle a message; dropped it")
