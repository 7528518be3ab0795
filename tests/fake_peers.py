"""Fake protocol peers for broker tests: a worker thread without an engine, and a test client.

Both speak only through :mod:`kvroute.proto`, so they double as executable documentation of the
worker and client sides of the protocol (and as honest peers next to the fuzzing in test_fuzz.py).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import zmq

from kvroute.proto import (
    EMPTY_BODY,
    CachePath,
    ChatMessage,
    ColdReason,
    Delivery,
    ErrorCode,
    ErrorReply,
    FinishReason,
    Heartbeat,
    Kind,
    ProtocolViolation,
    Ready,
    Reply,
    Role,
    Token,
    TurnEnd,
    TurnRequest,
    TurnStats,
    control_frames,
    parse_delivery,
    parse_reply,
    reply_frames,
    reply_sha256,
    request_frames,
)
from kvroute.proto.kinds import TERMINAL_KINDS

INTERVAL = 0.2  # heartbeat interval of the fake workers (and of the broker in the tests)
TIMEOUT = 3.0  # upper bound of any single wait


def wait_until(cond: Callable[[], bool], timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.005)


def turn_body(max_tokens: int = 3) -> bytes:
    return TurnRequest([ChatMessage(Role.USER, "hi")], max_tokens=max_tokens).encode()


# --- fake worker ------------------------------------------------------------------------------


@dataclass
class Stream:
    d: Delivery
    n: int
    cold_reason: ColdReason | None
    seq: int = 0
    text: str = ""
    next_at: float = 0.0


@dataclass
class FakeWorker:
    """Speaks the worker side of the protocol: READY, heartbeats, TOKEN x max_tokens, END."""

    backend: str
    name: str
    token_delay: float = 0.0
    deliveries: list[Delivery] = field(default_factory=list)
    cancels: list[bytes] = field(default_factory=list)
    registrations: int = 0
    disconnects: int = 0
    errors: list[ErrorReply] = field(default_factory=list)
    silent: threading.Event = field(default_factory=threading.Event)  # hung: no I/O at all
    crash: threading.Event = field(default_factory=threading.Event)  # close the socket, exit
    stop: threading.Event = field(default_factory=threading.Event)
    exc: BaseException | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._main, name=f"fake-{self.name}", daemon=True)
        self._thread.start()

    def join(self) -> None:
        self.stop.set()
        self._thread.join(TIMEOUT)
        assert not self._thread.is_alive()

    def _main(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # reported by the fixture
            self.exc = exc

    def _connect(self) -> zmq.Socket[bytes]:
        s = self._ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(self.backend)
        self.registrations += 1
        ready = Ready(self.name, os.getpid(), time.time_ns(), 4, "fake", 2048)
        s.send_multipart(control_frames(Kind.READY, ready.encode()))
        return s

    def _run(self) -> None:
        self._ctx = zmq.Context()
        self._sock = self._connect()
        self._known: set[bytes] = set()
        self._streams: dict[bytes, Stream] = {}
        next_beat = time.monotonic() + INTERVAL
        try:
            while not self.stop.is_set():
                if self.crash.is_set():
                    return
                if self.silent.is_set():
                    time.sleep(0.005)
                    continue
                if self._sock.poll(5):
                    while self._sock.poll(0):
                        self._on_message(self._sock.recv_multipart())
                now = time.monotonic()
                for st in list(self._streams.values()):
                    while st.next_at <= now and st.d.session_id in self._streams:
                        self._emit(st)
                        st.next_at = now + self.token_delay
                if now >= next_beat:
                    next_beat = now + INTERVAL
                    hb = Heartbeat(len(self._streams), len(self._known), 1000 * len(self._known))
                    self._sock.send_multipart(control_frames(Kind.HEARTBEAT, hb.encode()))
        finally:
            self._sock.close(0)
            self._ctx.term()

    def _reply(self, d: Delivery, kind: Kind, body: bytes = EMPTY_BODY) -> None:
        self._sock.send_multipart(reply_frames(kind, d.client, d.session_id, d.request_id, body))

    def _on_message(self, frames: list[bytes]) -> None:
        msg = parse_delivery(frames)
        if not isinstance(msg, Delivery):
            if msg.kind is Kind.DISCONNECT:  # forget everything, new socket, READY again
                self.disconnects += 1
                self._known.clear()
                self._streams.clear()
                self._sock.close(0)
                self._sock = self._connect()
            elif msg.kind is Kind.ERROR:
                self.errors.append(ErrorReply.decode(msg.body))
            return
        self.deliveries.append(msg)
        sid = msg.session_id
        if msg.kind is Kind.TURN:
            try:
                req = TurnRequest.decode(msg.body)
            except ProtocolViolation as exc:
                self._reply(msg, Kind.ERROR, ErrorReply.of(exc).encode())
                return
            if sid in self._streams:
                self._reply(msg, Kind.BUSY)
                return
            if msg.worker_lost:
                self._known.discard(sid)
            if sid in self._known:
                reason = None
            else:
                reason = ColdReason.WORKER_LOST if msg.worker_lost else ColdReason.NEW
            self._known.add(sid)
            self._streams[sid] = Stream(msg, req.max_tokens, reason)
        elif msg.kind is Kind.CANCEL:
            st = self._streams.get(sid)
            self.cancels.append(msg.request_id)
            if st is not None and st.d.request_id == msg.request_id:
                self._end(st, FinishReason.CANCELLED)
        else:  # RESET / CLOSE
            self._known.discard(sid)
            self._reply(msg, Kind.RESET_OK if msg.kind is Kind.RESET else Kind.CLOSE_OK)

    def _emit(self, st: Stream) -> None:
        piece = f"t{st.seq} "
        self._reply(st.d, Kind.TOKEN, Token(st.seq, piece, (st.seq,)).encode())
        st.seq += 1
        st.text += piece
        if st.seq == st.n:
            self._end(st, FinishReason.LENGTH)

    def _end(self, st: Stream, finish: FinishReason) -> None:
        cold = st.cold_reason is not None
        stats = TurnStats(
            prompt_tokens=10,
            cached_tokens=0 if cold else 6,
            prefill_tokens=10 if cold else 4,
            generated_tokens=st.seq,
            path=CachePath.COLD if cold else CachePath.TEXT_PREFIX,
            cold_reason=st.cold_reason,
            ttft_ms=1.0,
            decode_ms=2.0,
            worker=self.name,
        )
        end = TurnEnd(st.seq, finish, reply_sha256(st.text), stats)
        self._reply(st.d, Kind.END, end.encode())
        del self._streams[st.d.session_id]


# --- client -----------------------------------------------------------------------------------


class Client:
    """A DEALER speaking the client side; replies for other requests wait in ``pending``."""

    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]], frontend: str) -> None:
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(frontend)
        self.pending: list[Reply] = []

    def send(self, kind: Kind, session: bytes, request: bytes, body: bytes = EMPTY_BODY) -> None:
        self.sock.send_multipart(request_frames(kind, session, request, body))

    def recv(self, request: bytes | None = None, timeout: float = TIMEOUT) -> Reply:
        for i, r in enumerate(self.pending):
            if request is None or r.request_id == request:
                return self.pending.pop(i)
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            assert left > 0 and self.sock.poll(left * 1000), f"no reply for {request!r}"
            r = parse_reply(self.sock.recv_multipart())
            if request is None or r.request_id == request:
                return r
            self.pending.append(r)

    def silence(self, timeout: float = 0.3) -> bool:
        return not self.pending and not self.sock.poll(timeout * 1000)

    def collect(self, request: bytes, timeout: float = TIMEOUT) -> tuple[list[Token], Reply]:
        tokens = []
        while True:
            r = self.recv(request, timeout)
            if r.kind is Kind.TOKEN:
                tokens.append(Token.decode(r.body))
            else:
                assert r.kind in TERMINAL_KINDS
                return tokens, r


def error_code(r: Reply) -> ErrorCode:
    assert r.kind is Kind.ERROR, r.kind
    return ErrorReply.decode(r.body).code
