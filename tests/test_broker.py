"""The broker over real sockets, with fake workers (threads speaking the protocol, no engine).

Heartbeats run at 0.2 s (liveness 3) so loss is detected in well under a second. Every socket
has a linger, every receive is bounded by a poll timeout, fixtures stop what they start.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import msgpack
import pytest
import zmq
from broker_service import Ctx, add_worker, run_broker, zmq_context
from fake_peers import INTERVAL, TIMEOUT, Client, FakeWorker, error_code, turn_body, wait_until

from kvroute.broker import Broker, BrokerConfig, BrokerError
from kvroute.proto import (
    EMPTY_BODY,
    CachePath,
    ChatMessage,
    ColdReason,
    Control,
    Delivery,
    Disconnect,
    ErrorCode,
    ErrorReply,
    FinishReason,
    Heartbeat,
    Kind,
    LostReason,
    Overflow,
    Ready,
    Role,
    SessionLost,
    TurnEnd,
    TurnRequest,
    TurnStats,
    control_frames,
    error_body,
    parse_delivery,
    reply_frames,
    reply_sha256,
)
from kvroute.proto.control import Resident
from kvroute.proto.kinds import HEADERS

StartBroker = Callable[..., Broker]
StartWorker = Callable[..., FakeWorker]
MakeClient = Callable[[Broker], Client]

# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture
def ctx() -> Iterator[Ctx]:
    yield from zmq_context()


@pytest.fixture
def start_broker() -> Iterator[StartBroker]:
    started: list[tuple[Broker, threading.Thread]] = []
    crashes: list[BaseException] = []

    def start(
        sentinels: dict[int, str] | None = None,
        on_worker_exit: Callable[[str], None] | None = None,
        **config: Any,
    ) -> Broker:
        # Random loopback ports; a 2 MiB MAXMSGSIZE so 1..2 MiB bodies test ERROR too_large.
        config = {"max_msg_size": 2 << 20, **config}
        cfg = BrokerConfig("tcp://127.0.0.1:*", "tcp://127.0.0.1:*", INTERVAL, **config)
        b = Broker(cfg, sentinels=sentinels, on_worker_exit=on_worker_exit)
        t = run_broker(b, crashes)
        b.wait_bound(TIMEOUT)
        started.append((b, t))
        return b

    yield start
    for b, t in started:
        b.close(), b.close()  # idempotent
        t.join(TIMEOUT)
        assert not t.is_alive(), "broker did not stop"
    assert not crashes, f"broker died: {crashes!r}"


@pytest.fixture
def start_worker() -> Iterator[StartWorker]:
    workers: list[FakeWorker] = []

    def start(b: Broker, name: str, token_delay: float = 0.0) -> FakeWorker:
        assert b.endpoints is not None
        return add_worker(b, b.endpoints[1], workers, name, token_delay)

    yield start
    for w in workers:
        w.join()
    for w in workers:
        assert w.exc is None, f"fake worker {w.name} failed: {w.exc!r}"


@pytest.fixture
def client(ctx: Ctx) -> MakeClient:
    def make(b: Broker) -> Client:
        assert b.endpoints is not None
        return Client(ctx, b.endpoints[0])

    return make


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
    finally:  # (closing a still-watched fd also counts as an exit, and must not crash the loop)
        for fd in (r0, r1, w0, w1):
            with contextlib.suppress(OSError):
                os.close(fd)


def raw_worker(ctx: Ctx, b: Broker) -> zmq.Socket[bytes]:
    assert b.endpoints is not None
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(b.endpoints[1])
    return sock


def control_reply(sock: zmq.Socket[bytes], timeout: float = TIMEOUT) -> Control:
    assert sock.poll(timeout * 1000), "no answer from the broker"
    msg = parse_delivery(sock.recv_multipart())
    assert isinstance(msg, Control), msg
    return msg


def test_a_live_worker_id_cannot_be_claimed(
    start_broker: StartBroker, start_worker: StartWorker, client: MakeClient, ctx: Ctx
) -> None:
    """A READY with a live worker's id from another connection is refused; nothing moves."""
    b = start_broker()
    w = start_worker(b, "w0", token_delay=0.02)
    c = client(b)
    c.send(Kind.TURN, b"s", b"r1", turn_body(max_tokens=40))
    assert c.recv(b"r1").kind is Kind.TOKEN
    key = b.table.worker_key("w0")
    impostor = raw_worker(ctx, b)
    claim = Ready("w0", 1, time.time_ns(), 4, "fake", 2048, (Resident(b"s", b"me", 1, 0.0, 1),))
    impostor.send_multipart(control_frames(Kind.READY, claim.encode()))
    reply = control_reply(impostor)
    assert reply.kind is Kind.ERROR
    err = ErrorReply.decode(reply.body)
    assert err.code is ErrorCode.NOT_OWNER and "another live connection" in err.message
    _, term = c.collect(b"r1")  # the turn goes on: no SESSION_LOST
    assert term.kind is Kind.END and TurnEnd.decode(term.body).seq == 40
    assert b.table.worker_key("w0") == key and b.table.principal(b"s") != b"me"
    c.send(Kind.TURN, b"s", b"r2", turn_body())
    assert TurnEnd.decode(c.collect(b"r2")[1].body).stats.path is CachePath.TEXT_PREFIX
    assert w.disconnects == 0 and [d.kind for d in w.deliveries] == [Kind.TURN, Kind.TURN]


def test_restarted_worker_ends_old_turns(
    start_broker: StartBroker, start_worker: StartWorker, client: MakeClient, ctx: Ctx
) -> None:
    """Once the old connection is gone, a READY with its id is a restart, not an impostor."""
    b = start_broker()
    w = start_worker(b, "w0", token_delay=0.05)
    c = client(b)
    c.send(Kind.TURN, b"s", b"r1", turn_body(max_tokens=100))
    assert c.recv(b"r1").kind is Kind.TOKEN
    again = raw_worker(ctx, b)  # "w0" again, new process: new epoch, new connection
    again.send_multipart(control_frames(Kind.HEARTBEAT, Heartbeat().encode()))
    assert control_reply(again).kind is Kind.DISCONNECT  # connected: "unknown worker"
    w.crash.set()  # the old process dies: its connection closes
    w._thread.join(TIMEOUT)
    ready = Ready("w0", 1, time.time_ns(), 4, "fake", 2048)
    again.send_multipart(control_frames(Kind.READY, ready.encode()))
    assert control_reply(again).kind is Kind.HEARTBEAT  # accepted (and acknowledged at once)
    lost, _ = lost_within(c, b"r1", time.monotonic())
    # Normally the broker finds the old connection gone when the READY comes ("restarted"); its
    # own heartbeat may have found it first ("unreachable").
    assert lost.reason in (LostReason.RESTARTED, LostReason.UNREACHABLE)
    assert b.table.worker_key("w0") is not None and len(b.table.workers) == 1


def test_ready_is_acknowledged_at_once_and_idempotent(ctx: Ctx) -> None:
    """A worker hears from the broker as soon as it registers, not a heartbeat interval later
    (or it may give up and register twice); the same READY again changes nothing."""
    slow = 5.0  # the broker's own heartbeats are far apart
    cfg = BrokerConfig("tcp://127.0.0.1:*", "tcp://127.0.0.1:*", heartbeat_interval=slow)
    b = Broker(cfg)
    t = threading.Thread(target=b.run, daemon=True)
    t.start()
    try:
        b.wait_bound(TIMEOUT)
        w = raw_worker(ctx, b)
        frames = control_frames(Kind.READY, Ready("w0", 1, 7, 4, "fake", 2048).encode())
        w.send_multipart(frames)
        assert control_reply(w, timeout=slow / 2).kind is Kind.HEARTBEAT
        key = b.table.worker_key("w0")
        assert key is not None
        order = b.table.workers[key].order
        w.send_multipart(frames)  # the same connection and epoch: a retransmission
        assert control_reply(w, timeout=slow / 2).kind is Kind.HEARTBEAT
        assert b.table.worker_key("w0") == key and b.table.workers[key].order == order
        assert b.stats.workers_lost == 0
    finally:
        b.close()
        t.join(TIMEOUT)


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


# --- a TURN refused before it ran leaves no pin ------------------------------------------------


def next_delivery(w: zmq.Socket[bytes]) -> Delivery:
    """The next request the broker delivers to a raw worker, which keeps sending heartbeats."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        w.send_multipart(control_frames(Kind.HEARTBEAT, Heartbeat().encode()))
        if w.poll(INTERVAL * 1000):
            msg = parse_delivery(w.recv_multipart())
            if isinstance(msg, Delivery):
                return msg
    raise AssertionError("nothing delivered")


def end_body() -> bytes:
    stats = TurnStats(
        prompt_tokens=10,
        cached_tokens=0,
        prefill_tokens=10,
        generated_tokens=0,
        path=CachePath.COLD,
        cold_reason=ColdReason.NEW,
        ttft_ms=1.0,
        decode_ms=0.0,
        worker="w0",
    )
    return TurnEnd(0, FinishReason.LENGTH, reply_sha256(""), stats).encode()


def test_a_refused_first_turn_leaves_no_pin(
    start_broker: StartBroker, client: MakeClient, ctx: Ctx
) -> None:
    """The worker's refusals of a new session's TURN (what its scheduler answers when its queue
    is full, or the prompt overflows) free the id and the client's session count."""
    b = start_broker(max_sessions_per_client=1, liveness=25)  # the raw worker is never lost
    w = raw_worker(ctx, b)
    w.send_multipart(control_frames(Kind.READY, Ready("w0", 1, 7, 4, "fake", 2048).encode()))
    assert control_reply(w).kind is Kind.HEARTBEAT
    c, other = client(b), client(b)

    def serve(c: Client, sid: bytes, rid: bytes, kind: Kind, body: bytes) -> None:
        c.send(Kind.TURN, sid, rid, turn_body())
        d = next_delivery(w)
        assert (d.kind, d.session_id, d.request_id) == (Kind.TURN, sid, rid)
        w.send_multipart(reply_frames(kind, d.client, sid, rid, body))
        assert c.recv(rid).kind is kind

    overloaded = error_body(ErrorCode.OVERLOADED, "the worker's queue is full; retry later")
    overflow = Overflow(prompt_tokens=2000, max_tokens=100, n_ctx=2048).encode()
    for sid, kind, body in ((b"s0", Kind.ERROR, overloaded), (b"s1", Kind.OVERFLOW, overflow)):
        serve(c, sid, b"first-" + sid, kind, body)  # a new id each time: never ERROR limit
        assert b.table.owner(sid) is None and b.table.principal(sid) is None
    assert not b.table.sessions_of.counts and not b.table.pins
    # The same id again is placed anew; once a turn ran there, a refusal keeps the pin.
    serve(c, b"s0", b"again", Kind.END, end_body())
    serve(c, b"s0", b"later", Kind.ERROR, overloaded)
    assert b.table.owner(b"s0") is not None and list(b.table.sessions_of.counts.values()) == [1]
    c.send(Kind.TURN, b"s2", b"one-too-many", turn_body())
    assert error_code(c.recv(b"one-too-many")) is ErrorCode.LIMIT  # the limit still holds
    # A refused id belongs to nobody: another client creates it.
    serve(other, b"s1", b"theirs", Kind.END, end_body())
    assert b.table.principal(b"s1") not in (None, b.table.principal(b"s0"))


def test_a_refused_body_keeps_a_running_session(
    start_broker: StartBroker, start_worker: StartWorker, client: MakeClient
) -> None:
    """A body the worker refuses (ERROR bad_body) drops a new session's pin, but not the pin of
    a session that has run turns: its next turn still finds its cache."""
    b = start_broker()
    w = start_worker(b, "w0")
    c = client(b)
    c.send(Kind.TURN, b"g", b"r1", b"\xc1garbage")
    assert error_code(c.recv(b"r1")) is ErrorCode.BAD_BODY
    assert b.table.owner(b"g") is None and not b.table.sessions_of.counts
    c.send(Kind.TURN, b"g", b"r2", turn_body())
    assert TurnEnd.decode(c.collect(b"r2")[1].body).stats.cold_reason is ColdReason.NEW
    c.send(Kind.TURN, b"g", b"r3", b"\xc1garbage")
    assert error_code(c.recv(b"r3")) is ErrorCode.BAD_BODY
    assert b.table.owner(b"g") is not None
    c.send(Kind.TURN, b"g", b"r4", turn_body())
    assert TurnEnd.decode(c.collect(b"r4")[1].body).stats.path is CachePath.TEXT_PREFIX
    assert [d.request_id for d in w.deliveries] == [b"r1", b"r2", b"r3", b"r4"]
