"""The broker over real sockets, with fake workers (threads speaking the protocol, no engine).

Heartbeats run at 0.2 s (liveness 3) so loss is detected in well under a second.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import msgpack
import pytest
import zmq

from kvroute.broker import Broker, BrokerConfig, BrokerError
from kvroute.proto import (
    EMPTY_BODY,
    CachePath,
    ChatMessage,
    ColdReason,
    Delivery,
    Disconnect,
    ErrorCode,
    ErrorReply,
    FinishReason,
    Heartbeat,
    Kind,
    LostReason,
    ProtocolViolation,
    Ready,
    Reply,
    Role,
    SessionLost,
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
from kvroute.proto.kinds import HEADERS, TERMINAL_KINDS

INTERVAL = 0.2  # heartbeat interval in these tests
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


# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture
def ctx() -> Iterator[zmq.Context[zmq.Socket[bytes]]]:
    c: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    yield c
    c.destroy(linger=0)


@pytest.fixture
def start_broker() -> Iterator[Callable[..., Broker]]:
    started: list[tuple[Broker, threading.Thread]] = []

    def start(**kw: object) -> Broker:
        cfg = BrokerConfig(
            frontend="tcp://127.0.0.1:*",
            backend="tcp://127.0.0.1:*",
            heartbeat_interval=INTERVAL,
            max_msg_size=2 << 20,
        )
        sentinels = kw.pop("sentinels", None)
        on_exit = kw.pop("on_worker_exit", None)
        for k, v in kw.items():
            setattr(cfg, k, v)
        b = Broker(cfg, sentinels=sentinels, on_worker_exit=on_exit)  # type: ignore[arg-type]
        t = threading.Thread(target=b.run, name="broker", daemon=True)
        t.start()
        b.wait_bound(TIMEOUT)
        started.append((b, t))
        return b

    yield start
    for b, t in started:
        b.close()
        b.close()  # idempotent
        t.join(TIMEOUT)
        assert not t.is_alive(), "broker did not stop"


@pytest.fixture
def start_worker() -> Iterator[Callable[..., FakeWorker]]:
    workers: list[FakeWorker] = []

    def start(b: Broker, name: str, **kw: object) -> FakeWorker:
        assert b.endpoints is not None
        w = FakeWorker(b.endpoints[1], name, **kw)  # type: ignore[arg-type]
        w.start()
        workers.append(w)
        wait_until(lambda: b.table.worker_key(name) is not None)
        return w

    yield start
    for w in workers:
        w.join()
    for w in workers:
        assert w.exc is None, f"fake worker {w.name} failed: {w.exc!r}"


@pytest.fixture
def client(ctx: zmq.Context[zmq.Socket[bytes]]) -> Callable[[Broker], Client]:
    def make(b: Broker) -> Client:
        assert b.endpoints is not None
        return Client(ctx, b.endpoints[0])

    return make


Ctx = zmq.Context[zmq.Socket[bytes]]
StartBroker = Callable[..., Broker]
StartWorker = Callable[..., FakeWorker]
MakeClient = Callable[[Broker], Client]


# --- tests ------------------------------------------------------------------------------------


def test_two_clients_two_workers_sticky(
    start_broker: StartBroker, start_worker: StartWorker, client: MakeClient
) -> None:
    b = start_broker()
    w0, w1 = start_worker(b, "w0"), start_worker(b, "w1")
    c0, c1 = client(b), client(b)
    sessions = {(c0, b"a"): [], (c0, b"b"): [], (c1, b"c"): [], (c1, b"d"): []}
    for turn in range(4):
        for (c, sid), _ in sessions.items():  # all four sessions in flight at once
            c.send(Kind.TURN, sid, sid + b"%d" % turn, turn_body(max_tokens=turn + 2))
        for (c, sid), owners in sessions.items():
            tokens, term = c.collect(sid + b"%d" % turn)
            assert term.kind is Kind.END and term.session_id == sid
            end = TurnEnd.decode(term.body)
            assert [t.seq for t in tokens] == list(range(turn + 2)) == list(range(end.seq))
            assert reply_sha256("".join(t.text for t in tokens)) == end.reply_sha256
            expected_path = CachePath.COLD if turn == 0 else CachePath.TEXT_PREFIX
            assert end.stats.path is expected_path
            owners.append(end.stats.worker)
    for owners in sessions.values():
        assert len(set(owners)) == 1  # every turn of a session on the same worker
    assert {o[0] for o in sessions.values()} == {"w0", "w1"}  # and both workers used
    seen = [{d.session_id for d in w.deliveries} for w in (w0, w1)]
    assert not seen[0] & seen[1]
    assert all(d.flags == 0 for w in (w0, w1) for d in w.deliveries)


def test_ping_reset_close_and_no_worker(start_broker: StartBroker, client: MakeClient) -> None:
    b = start_broker()
    c = client(b)
    c.send(Kind.PING, b"", b"p1")
    assert c.recv(b"p1").kind is Kind.PONG
    c.send(Kind.TURN, b"s", b"r1", turn_body())
    assert error_code(c.recv(b"r1")) is ErrorCode.NO_WORKER
    c.send(Kind.RESET, b"s", b"r2")
    assert c.recv(b"r2").kind is Kind.RESET_OK
    c.send(Kind.CLOSE, b"s", b"r3")
    assert c.recv(b"r3").kind is Kind.CLOSE_OK


def test_reset_and_close_go_to_the_owner(
    start_broker: StartBroker, start_worker: StartWorker, client: MakeClient
) -> None:
    b = start_broker()
    w = start_worker(b, "w0")
    c = client(b)
    c.send(Kind.TURN, b"s", b"r1", turn_body())
    assert c.collect(b"r1")[1].kind is Kind.END
    c.send(Kind.RESET, b"s", b"r2")
    assert c.recv(b"r2").kind is Kind.RESET_OK
    c.send(Kind.CLOSE, b"s", b"r3")
    assert c.recv(b"r3").kind is Kind.CLOSE_OK
    assert [d.kind for d in w.deliveries] == [Kind.TURN, Kind.RESET, Kind.CLOSE]
    wait_until(lambda: b.table.owner(b"s") is None)


def test_busy_and_cancel(
    start_broker: StartBroker, start_worker: StartWorker, client: MakeClient
) -> None:
    b = start_broker()
    w = start_worker(b, "w0", token_delay=0.02)
    c = client(b)
    c.send(Kind.TURN, b"s", b"r1", turn_body(max_tokens=200))
    assert c.recv(b"r1").kind is Kind.TOKEN
    c.send(Kind.TURN, b"s", b"r2", turn_body())
    assert c.recv(b"r2").kind is Kind.BUSY
    c.send(Kind.RESET, b"s", b"r3")
    assert c.recv(b"r3").kind is Kind.BUSY
    c.send(Kind.CANCEL, b"s", b"r1")
    tokens, term = c.collect(b"r1")
    end = TurnEnd.decode(term.body)
    assert end.finish_reason is FinishReason.CANCELLED
    assert end.seq == len(tokens) + 1 < 200  # one token was read before the loop
    assert w.cancels == [b"r1"]
    assert [d.kind for d in w.deliveries] == [Kind.TURN, Kind.CANCEL]  # BUSY never reached it
    c.send(Kind.TURN, b"s", b"r4", turn_body())  # the session is free again
    assert c.collect(b"r4")[1].kind is Kind.END


def test_garbage_gets_error_and_others_unaffected(
    start_broker: StartBroker, start_worker: StartWorker, client: MakeClient
) -> None:
    b = start_broker()
    start_worker(b, "w0", token_delay=0.01)
    honest, attacker = client(b), client(b)
    honest.send(Kind.TURN, b"honest", b"h1", turn_body(max_tokens=60))
    nan_turn = msgpack.packb(
        {**TurnRequest([ChatMessage(Role.USER, "x")]).to_map(), "temperature": math.nan}
    )
    cases: list[tuple[list[bytes], ErrorCode]] = [
        ([b"XYZ\x01\x01", b"s", b"g1", EMPTY_BODY], ErrorCode.BAD_FRAME),
        ([b"KVR\x09\x01", b"s", b"g2", EMPTY_BODY], ErrorCode.BAD_VERSION),
        ([b"KVR\x01\x7f", b"s", b"g3", EMPTY_BODY], ErrorCode.UNKNOWN_KIND),
        ([HEADERS[Kind.TOKEN], b"s", b"g4", EMPTY_BODY], ErrorCode.UNKNOWN_KIND),
        ([HEADERS[Kind.TURN], b"s", b"g5"], ErrorCode.BAD_FRAME),
        ([HEADERS[Kind.TURN], b"s" * 65, b"g6", EMPTY_BODY], ErrorCode.BAD_FRAME),
        ([HEADERS[Kind.TURN], b"s", b"g7", b"x" * ((1 << 20) + 1)], ErrorCode.TOO_LARGE),
        ([HEADERS[Kind.TURN], b"g8", b"g8", b"\xc1garbage"], ErrorCode.BAD_BODY),  # worker says
        ([HEADERS[Kind.TURN], b"g9", b"g9", nan_turn], ErrorCode.OUT_OF_RANGE),  # worker says
        (
            [HEADERS[Kind.TURN], b"g10", b"g10", msgpack.packb({"max_tokens": 10**9})],
            ErrorCode.BAD_BODY,
        ),
    ]
    for frames, code in cases:
        attacker.sock.send_multipart(frames)
        r = attacker.recv(frames[2] if len(frames) > 3 and len(frames[1]) <= 64 else None)
        assert error_code(r) is code, frames[:3]
    assert attacker.silence(0.1)
    # A frame over MAXMSGSIZE is dropped by ZeroMQ (connection reset): no reply, no harm.
    attacker.sock.send_multipart([HEADERS[Kind.TURN], b"s", b"big", b"x" * (3 << 20)])
    assert attacker.silence(0.3)
    tokens, term = honest.collect(b"h1")
    assert term.kind is Kind.END and [t.seq for t in tokens] == list(range(60))
    assert b.stats.errors_sent == 7  # the broker's own; the worker answered the last three


def test_garbage_from_a_worker(start_broker: StartBroker, ctx: Ctx) -> None:
    b = start_broker()
    assert b.endpoints is not None
    rogue = ctx.socket(zmq.DEALER)
    rogue.setsockopt(zmq.LINGER, 0)
    rogue.connect(b.endpoints[1])
    for frames in ([b"junk"], [HEADERS[Kind.TURN], b"x"], [HEADERS[Kind.READY], b"\x80"]):
        rogue.send_multipart(frames)
        assert rogue.poll(TIMEOUT * 1000)
        msg = parse_delivery(rogue.recv_multipart())
        assert msg.kind is Kind.ERROR
    # A heartbeat or reply from a worker the broker does not know: register again.
    rogue.send_multipart(control_frames(Kind.HEARTBEAT, Heartbeat().encode()))
    assert rogue.poll(TIMEOUT * 1000)
    msg = parse_delivery(rogue.recv_multipart())
    assert msg.kind is Kind.DISCONNECT and Disconnect.decode(msg.body).reason
    assert not b.table.workers


def lost_within(c: Client, request: bytes, since: float) -> tuple[SessionLost, float]:
    _, term = c.collect(request)
    assert term.kind is Kind.SESSION_LOST, term.kind
    return SessionLost.decode(term.body), time.monotonic() - since


def pinned_turn(b: Broker, c: Client, workers: dict[str, FakeWorker]) -> FakeWorker:
    """Run a first turn on session b"s" and return the worker that owns it."""
    c.send(Kind.TURN, b"s", b"r0", turn_body())
    end = TurnEnd.decode(c.collect(b"r0")[1].body)
    return workers[end.stats.worker]


def test_silent_worker_lost_then_failover(
    start_broker: StartBroker, start_worker: StartWorker, client: MakeClient
) -> None:
    b = start_broker()
    ws = {n: start_worker(b, n, token_delay=0.02) for n in ("w0", "w1")}
    c = client(b)
    owner = pinned_turn(b, c, ws)
    other = next(w for w in ws.values() if w is not owner)
    c.send(Kind.TURN, b"s", b"r1", turn_body(max_tokens=500))
    assert c.recv(b"r1").kind is Kind.TOKEN
    owner.silent.set()
    since = time.monotonic()
    lost, elapsed = lost_within(c, b"r1", since)
    assert lost.worker == owner.name and lost.reason is LostReason.HEARTBEAT_TIMEOUT
    assert lost.retryable
    # Silence since the last token (<= since); liveness 3 x 0.2 s + one 0.05 s tick + slack.
    assert elapsed < 3 * INTERVAL + 0.05 + 0.15, elapsed
    # The retry goes to the other worker, flagged, and reports cold worker_lost.
    c.send(Kind.TURN, b"s", b"r2", turn_body())
    end = TurnEnd.decode(c.collect(b"r2")[1].body)
    assert end.stats.worker == other.name
    assert (end.stats.path, end.stats.cold_reason) == (CachePath.COLD, ColdReason.WORKER_LOST)
    assert other.deliveries[-1].worker_lost
    c.send(Kind.TURN, b"s", b"r3", turn_body())  # flag cleared after one END
    assert TurnEnd.decode(c.collect(b"r3")[1].body).stats.path is CachePath.TEXT_PREFIX
    assert not other.deliveries[-1].worker_lost
    # The hung worker wakes up: its stale frames are dropped, it is told to re-register.
    owner.silent.clear()
    wait_until(lambda: owner.registrations == 2 and b.table.worker_key(owner.name) is not None)
    assert owner.disconnects >= 1
    assert c.silence(0.2)  # none of its stale tokens reached the client


def test_crashed_worker_is_unreachable(
    start_broker: StartBroker, start_worker: StartWorker, client: MakeClient
) -> None:
    b = start_broker()
    ws = {n: start_worker(b, n, token_delay=0.02) for n in ("w0", "w1")}
    c = client(b)
    owner = pinned_turn(b, c, ws)
    c.send(Kind.TURN, b"s", b"r1", turn_body(max_tokens=500))
    assert c.recv(b"r1").kind is Kind.TOKEN
    owner.crash.set()  # closes its socket: the next heartbeat send finds no such peer
    lost, elapsed = lost_within(c, b"r1", time.monotonic())
    assert lost.reason in (LostReason.UNREACHABLE, LostReason.HEARTBEAT_TIMEOUT)
    assert elapsed < 3 * INTERVAL + 0.2, elapsed
    c.send(Kind.TURN, b"s", b"r2", turn_body())
    end = TurnEnd.decode(c.collect(b"r2")[1].body)
    assert end.stats.cold_reason is ColdReason.WORKER_LOST and end.stats.worker != owner.name


def test_process_sentinel_is_instant(
    start_broker: StartBroker, start_worker: StartWorker, client: MakeClient
) -> None:
    r0, w0 = os.pipe()
    r1, w1 = os.pipe()
    exited: list[str] = []
    b = start_broker(sentinels={r0: "w0"}, on_worker_exit=exited.append)
    b.watch(r1, "w1")  # added while running
    ws = {n: start_worker(b, n, token_delay=0.02) for n in ("w0", "w1")}
    c = client(b)
    try:
        owner = pinned_turn(b, c, ws)
        c.send(Kind.TURN, b"s", b"r1", turn_body(max_tokens=500))
        assert c.recv(b"r1").kind is Kind.TOKEN
        os.close(w0 if owner.name == "w0" else w1)  # the "process" exits: its sentinel fires
        lost, elapsed = lost_within(c, b"r1", time.monotonic())
        assert lost.reason is LostReason.EXITED and elapsed < INTERVAL, elapsed
        wait_until(lambda: exited == [owner.name])  # called after clients were told
    finally:
        for fd in (r0, r1, w0, w1):
            with contextlib.suppress(OSError):
                os.close(fd)


def test_restarted_worker_ends_old_turns(
    start_broker: StartBroker, start_worker: StartWorker, client: MakeClient, ctx: Ctx
) -> None:
    b = start_broker()
    start_worker(b, "w0", token_delay=0.05)
    c = client(b)
    c.send(Kind.TURN, b"s", b"r1", turn_body(max_tokens=100))
    assert c.recv(b"r1").kind is Kind.TOKEN
    assert b.endpoints is not None
    again = ctx.socket(zmq.DEALER)  # "w0" again, new process: new epoch, new connection
    again.setsockopt(zmq.LINGER, 0)
    again.connect(b.endpoints[1])
    ready = Ready("w0", 1, time.time_ns(), 4, "fake", 2048)
    again.send_multipart(control_frames(Kind.READY, ready.encode()))
    lost, _ = lost_within(c, b"r1", time.monotonic())
    assert lost.reason is LostReason.RESTARTED


def test_client_gone_mid_stream_cancels(
    start_broker: StartBroker, start_worker: StartWorker, client: MakeClient
) -> None:
    b = start_broker()
    w = start_worker(b, "w0", token_delay=0.01)
    c = client(b)
    c.send(Kind.TURN, b"s", b"r1", turn_body(max_tokens=1000))
    assert c.recv(b"r1").kind is Kind.TOKEN
    c.sock.close(0)
    wait_until(lambda: w.cancels == [b"r1"])
    assert b.stats.cancels_sent == 1
    wait_until(lambda: not b.table.in_flight)  # the END (cancelled) closed the request


def test_lifecycle(start_broker: StartBroker) -> None:
    closed = Broker(BrokerConfig(frontend="tcp://127.0.0.1:*", backend="tcp://127.0.0.1:*"))
    closed.close()
    with pytest.raises(BrokerError):
        closed.run()
    b = start_broker()
    assert b.endpoints is not None
    clash = Broker(BrokerConfig(frontend=b.endpoints[0], backend="tcp://127.0.0.1:*"))
    failures: list[BaseException] = []

    def run() -> None:
        try:
            clash.run()
        except BrokerError as exc:
            failures.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    with pytest.raises(BrokerError):
        clash.wait_bound(TIMEOUT)
    t.join(TIMEOUT)
    assert not t.is_alive() and len(failures) == 1  # run() raised too, and did not hang
