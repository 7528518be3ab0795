"""Workers keep their sessions across a broker restart; registration is orderly and quiet.

- The wire: READY's resident sessions and the 7-frame delivery that tells a worker a session's
  owner, checked at the edge like every other body.
- kill -9 of a ``kvroute broker`` process between turns: the workers (threads serving the tiny
  model) register with the new broker and announce what they hold, so the next turn of every
  session is text_prefix on the same worker, still owned by its client, and each worker
  registers once.
- Two workers holding one session after a failover: at the new broker the newest turn wins and
  the other worker drops its copy.
- Log levels: a worker that says goodbye and a client that disconnects are not warnings.
- A broker of an older release, which rejects READY's new field: the worker registers without it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import msgpack
import pytest
import zmq
from fake_peers import TIMEOUT, wait_until
from procs import KvProc, Procs, free_port, wait_for

from kvroute import Client, NotOwner
from kvroute.broker import Broker, BrokerConfig
from kvroute.engine.engine import Engine
from kvroute.proto import (
    EMPTY_BODY,
    CachePath,
    ChatMessage,
    ColdReason,
    ErrorCode,
    Kind,
    ProtocolViolation,
    Ready,
    Role,
    TurnRequest,
    control_frames,
    error_body,
    parse_delivery,
    request_frames,
)
from kvroute.proto.control import Disconnect, Resident
from kvroute.proto.frames import delivery_frames
from kvroute.proto.kinds import HEADERS
from kvroute.proto.limits import (
    MAX_BODY_BYTES,
    MAX_COUNT,
    MAX_IDLE_MS,
    MAX_OWNER_BYTES,
    MAX_RESIDENT_SESSIONS,
    MAX_SESSION_ID_BYTES,
)
from kvroute.worker.config import WorkerConfig
from kvroute.worker.service import WorkerService

HB = 0.2  # heartbeat of the broker and the workers here (liveness 3)
LIVENESS = 3

# --- the wire -----------------------------------------------------------------------------------


def test_ready_announces_sessions_and_stays_compatible() -> None:
    sessions = (
        Resident(b"s1", b"owner-token", 123, 4.5, 1_700_000_000_000_000_000),
        Resident(b"\x00\xff" * 32, b"K" * 40, 0, 0.0, 0),
    )
    ready = Ready("w0", 1, 2, 3, "m", 64, sessions)
    assert Ready.decode(ready.encode()) == ready
    # Without sessions the body is the READY of before (no new field), and such a body decodes.
    bare = Ready("w0", 1, 2, 3, "m", 64)
    assert "sessions" not in msgpack.unpackb(bare.encode())
    old = msgpack.packb(
        {"worker": "w0", "pid": 1, "epoch": 2, "capacity": 3, "model": "m", "n_ctx": 64}
    )
    assert Ready.decode(old) == bare and bare.sessions == ()


def worst_case(n: int) -> tuple[Resident, ...]:
    return tuple(
        Resident(
            i.to_bytes(4) * (MAX_SESSION_ID_BYTES // 4),
            b"o" * MAX_OWNER_BYTES,
            MAX_COUNT,
            MAX_IDLE_MS,
            MAX_COUNT,
        )
        for i in range(n)
    )


def test_the_largest_ready_fits_in_one_body() -> None:
    """The cap on announced sessions is what keeps READY one message (no chunking needed)."""
    ready = Ready(
        "w" * 128, MAX_COUNT, MAX_COUNT, 4096, "m" * 128, 1 << 24, worst_case(MAX_RESIDENT_SESSIONS)
    )
    body = ready.encode()
    assert len(body) <= MAX_BODY_BYTES
    assert len(Ready.decode(body).sessions) == MAX_RESIDENT_SESSIONS
    with pytest.raises(ProtocolViolation) as err:
        Ready("w", 1, 1, 1, "m", 1, worst_case(MAX_RESIDENT_SESSIONS + 1)).encode()
    assert err.value.code is ErrorCode.TOO_LARGE


GOOD = [b"s", b"owner", 1, 1.0, 1]


@pytest.mark.parametrize(
    ("entry", "code"),
    [
        ({"id": b"s"}, ErrorCode.BAD_BODY),  # a map, not the array
        (GOOD[:4], ErrorCode.BAD_BODY),  # one field short
        (["s", *GOOD[1:]], ErrorCode.BAD_BODY),  # id as text
        ([b"", *GOOD[1:]], ErrorCode.OUT_OF_RANGE),
        ([b"s" * (MAX_SESSION_ID_BYTES + 1), *GOOD[1:]], ErrorCode.TOO_LARGE),
        ([b"s", b"", *GOOD[2:]], ErrorCode.OUT_OF_RANGE),
        ([b"s", b"o" * (MAX_OWNER_BYTES + 1), *GOOD[2:]], ErrorCode.TOO_LARGE),
        ([*GOOD[:2], -1, *GOOD[3:]], ErrorCode.OUT_OF_RANGE),
        ([*GOOD[:2], True, *GOOD[3:]], ErrorCode.BAD_BODY),  # a bool is no count
        ([*GOOD[:3], math.nan, 1], ErrorCode.OUT_OF_RANGE),
        ([*GOOD[:3], -1.0, 1], ErrorCode.OUT_OF_RANGE),
        ([*GOOD[:3], MAX_IDLE_MS * 2, 1], ErrorCode.OUT_OF_RANGE),
        ([*GOOD[:4], 1.5], ErrorCode.BAD_BODY),
    ],
)
def test_bad_announcements_are_rejected(entry: object, code: ErrorCode) -> None:
    body = {"worker": "w0", "pid": 1, "epoch": 2, "capacity": 3, "model": "m", "n_ctx": 64}
    with pytest.raises(ProtocolViolation) as err:
        Ready.decode(msgpack.packb({**body, "sessions": [GOOD, entry]}, use_bin_type=True))
    assert err.value.code is code and "READY.sessions[1]" in err.value.message
    twice = msgpack.packb({**body, "sessions": [GOOD, GOOD]}, use_bin_type=True)
    with pytest.raises(ProtocolViolation, match="repeats"):
        Ready.decode(twice)


def test_a_delivery_tells_the_worker_the_owner() -> None:
    header = HEADERS[Kind.TURN]
    plain = parse_delivery(delivery_frames(b"W", header, b"C", b"s", b"r", 0, b"\x80")[1:])
    assert plain.kind is Kind.TURN and plain.owner == b"C" and plain.principal == b""
    key = b"K" * 40
    frames = delivery_frames(b"W", header, b"C", b"s", b"r", 1, b"\x80", key)[1:]
    assert len(frames) == 7
    d = parse_delivery(frames)
    assert (d.owner, d.principal, d.body, d.worker_lost) == (key, key, b"\x80", True)
    for principal in (b"", b"x" * (MAX_OWNER_BYTES + 1)):
        with pytest.raises(ProtocolViolation) as err:
            parse_delivery([*frames[:5], principal, frames[6]])
        assert err.value.code is ErrorCode.BAD_FRAME
    with pytest.raises(ProtocolViolation, match="expected 2, 6 or 7"):
        parse_delivery([*frames, b""])


# --- a broker process, killed and restarted; workers as threads ----------------------------------


@dataclass
class Fleet:
    """A ``kvroute broker`` process and tiny-model workers (threads of this process)."""

    procs: Procs
    engine: Engine
    front: str = field(default_factory=lambda: f"tcp://127.0.0.1:{free_port()}")
    back: str = field(default_factory=lambda: f"tcp://127.0.0.1:{free_port()}")
    broker: KvProc | None = None
    workers: dict[str, WorkerService] = field(default_factory=dict)
    stops: dict[str, threading.Event] = field(default_factory=dict)
    threads: dict[str, threading.Thread] = field(default_factory=dict)

    def start_broker(self) -> KvProc:
        args = ["broker", "--frontend", self.front, "--backend", self.back]
        args += ["--heartbeat", str(HB), "--liveness", str(LIVENESS)]
        self.broker = self.procs.start("broker", args)
        self.broker.wait_log(r"broker frontend", timeout=30)
        return self.broker

    def kill_broker(self) -> None:
        assert self.broker is not None
        self.broker.signal(signal.SIGKILL)
        self.broker.p.wait(10)

    def run_worker(self, worker_id: str) -> None:
        """Start a worker thread (again, for a worker stopped before: same sessions)."""
        if worker_id not in self.workers:
            cfg = WorkerConfig(
                connect=self.back, worker_id=worker_id, heartbeat_interval=HB, liveness=LIVENESS
            )
            self.stops[worker_id] = threading.Event()
            self.workers[worker_id] = WorkerService(self.engine, cfg, self.stops[worker_id])
        self.stops[worker_id].clear()
        t = threading.Thread(target=self.workers[worker_id].run, name=worker_id, daemon=True)
        t.start()
        self.threads[worker_id] = t

    def stop_worker(self, worker_id: str) -> None:
        """An orderly stop: the worker says DISCONNECT; it keeps its sessions in memory."""
        self.stops[worker_id].set()
        self.threads[worker_id].join(10)
        assert not self.threads[worker_id].is_alive()

    def wait_registered(self, *names: str, timeout: float = 30) -> None:
        assert self.broker is not None
        broker = self.broker
        wait_for(lambda: set(names) <= broker.live_workers(), f"{names} registered", timeout)

    def close(self) -> None:
        for stop in self.stops.values():
            stop.set()
        for t in self.threads.values():
            t.join(10)


@pytest.fixture
def fleet(tmp_path: Path, tiny_engine: Engine) -> Iterator[Fleet]:
    procs = Procs(tmp_path)
    f = Fleet(procs, tiny_engine)
    try:
        yield f
    finally:
        f.close()
        procs.close()


def pinned_lines(broker: KvProc) -> list[tuple[str, int, int]]:
    """(worker, pinned, announced) of every registration the broker logged."""
    rx = re.compile(r"worker (\S+) registered .*; (\d+) of (\d+) announced sessions pinned")
    return [(m[1], int(m[2]), int(m[3])) for m in rx.finditer(broker.text())]


def test_kill9_broker_between_turns_keeps_every_session_warm(fleet: Fleet) -> None:
    fleet.start_broker()
    for w in ("w0", "w1"):
        fleet.run_worker(w)
    fleet.wait_registered("w0", "w1")
    with Client(fleet.front, timeout=10) as client, Client(fleet.front, timeout=10) as stranger:
        chats = [client.session() for _ in range(4)]
        for chat in chats:
            list(chat.send("hello", max_tokens=4))
        for chat in chats:
            list(chat.send("and then?", max_tokens=4))
            assert chat.last is not None and chat.last.path == CachePath.TEXT_PREFIX
        where = {chat.id: chat.last.worker for chat in chats if chat.last is not None}
        assert set(where.values()) == {"w0", "w1"}
        fleet.kill_broker()
        broker = fleet.start_broker()
        fleet.wait_registered("w0", "w1")
        # Every session was announced by the worker holding it and pinned there again.
        pinned = pinned_lines(broker)
        assert sum(n for _, n, _ in pinned) == len(chats) == sum(m for _, _, m in pinned)
        for chat in chats:
            list(chat.send("go on", max_tokens=4))
            assert chat.last is not None
            assert (chat.last.worker, chat.last.path) == (where[chat.id], CachePath.TEXT_PREFIX)
        # Still the client's: its owner token came back with the session.
        theirs = stranger.session(session_id=chats[0].id, history=chats[0].history)
        with pytest.raises(NotOwner):
            list(theirs.send("mine now?", max_tokens=2))
    # Once each: the broker answers READY at once, so no worker gives up on it and re-registers.
    time.sleep(2 * LIVENESS * HB)
    assert Counter(r.worker for r in broker.registrations()) == {"w0": 1, "w1": 1}


def test_after_a_failover_the_newest_turn_wins_at_the_new_broker(fleet: Fleet) -> None:
    fleet.start_broker()
    for w in ("w0", "w1"):
        fleet.run_worker(w)
    fleet.wait_registered("w0", "w1")
    with Client(fleet.front, timeout=10) as client:
        chat = client.session()
        list(chat.send("hello", max_tokens=4))
        assert chat.last is not None
        first = chat.last.worker
        second = "w1" if first == "w0" else "w0"
        fleet.stop_worker(first)  # says goodbye; keeps the session in memory
        assert fleet.broker is not None
        fleet.broker.wait_log(rf"worker {first} left \(disconnected\)")
        list(chat.send("are you there?", max_tokens=4))
        assert chat.last is not None and chat.last.worker == second
        assert (chat.last.path, chat.last.cold_reason) == (CachePath.COLD, ColdReason.WORKER_LOST)
        stale = fleet.workers[first].scheduler.store.get(chat.id.encode())
        newest = fleet.workers[second].scheduler.store.get(chat.id.encode())
        assert stale is not None and newest is not None
        assert stale.last_turn_ns < newest.last_turn_ns
        # Now both hold the session: the first an older turn, the second the newest.
        fleet.kill_broker()
        fleet.start_broker()
        fleet.run_worker(first)
        fleet.wait_registered("w0", "w1")
        wait_until(lambda: fleet.workers[first].scheduler.store.get(chat.id.encode()) is None, 10)
        list(chat.send("go on", max_tokens=4))
        assert (chat.last.worker, chat.last.path) == (second, CachePath.TEXT_PREFIX)
    assert "WARNING" not in "".join(
        line for line in fleet.broker.text().splitlines(True) if "disconnected" in line
    )


# --- log levels ----------------------------------------------------------------------------------


@pytest.fixture
def broker_thread() -> Iterator[tuple[Broker, int]]:
    """A broker in a thread watching a pipe as worker w0's process sentinel; yields the broker
    and the pipe's write end (close it and "w0's process" has exited)."""
    r, w = os.pipe()
    b = Broker(
        BrokerConfig("tcp://127.0.0.1:*", "tcp://127.0.0.1:*", heartbeat_interval=HB),
        sentinels={r: "w0"},
    )
    t = threading.Thread(target=b.run, name="broker", daemon=True)
    t.start()
    b.wait_bound(TIMEOUT)
    try:
        yield b, w
    finally:
        b.close()
        t.join(TIMEOUT)
        for fd in (r, w):
            with contextlib.suppress(OSError):
                os.close(fd)


def test_an_orderly_worker_stop_is_not_a_warning(
    broker_thread: tuple[Broker, int], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="kvroute.broker")
    b, sentinel = broker_thread
    assert b.endpoints is not None
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        w = ctx.socket(zmq.DEALER)
        w.setsockopt(zmq.LINGER, 0)
        w.connect(b.endpoints[1])
        w.send_multipart(control_frames(Kind.READY, Ready("w0", 1, 1, 4, "fake", 64).encode()))
        wait_until(lambda: b.table.worker_key("w0") is not None)
        w.send_multipart(control_frames(Kind.DISCONNECT, Disconnect("stopping").encode()))
        wait_until(lambda: b.table.worker_key("w0") is None)
        os.close(sentinel)  # and then its process exits
        wait_until(lambda: any("process exited" in r.getMessage() for r in caplog.records))
    finally:
        ctx.destroy(linger=0)
    broker_records = [r for r in caplog.records if r.name.startswith("kvroute.broker")]
    assert [r.levelname for r in broker_records if r.levelno >= logging.WARNING] == []
    messages = {r.getMessage(): r.levelname for r in broker_records}
    left = "worker w0 left (disconnected): 0 requests in flight, 0 sessions unpinned"
    assert messages[left] == "INFO"
    assert messages["worker w0 process exited"] == "INFO"
    assert b.stats.workers_lost == 1  # still accounted as gone, just not alarmed about


def test_a_client_disconnect_is_not_a_size_violation(
    broker_thread: tuple[Broker, int], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="kvroute.broker")
    b, _ = broker_thread
    assert b.endpoints is not None
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        c = ctx.socket(zmq.DEALER)
        c.setsockopt(zmq.LINGER, 0)
        c.connect(b.endpoints[0])
        c.send_multipart(request_frames(Kind.PING, b"", b"p", EMPTY_BODY))
        assert c.poll(TIMEOUT * 1000)
        c.close()
        wait_until(lambda: b.stats.connections_closed >= 1)
    finally:
        ctx.destroy(linger=0)
    # Said as it is known: a connection closed, at info level; no size violation is blamed.
    closed = [r.getMessage() for r in caplog.records if "connection closed" in r.getMessage()]
    assert closed and all(m.startswith("frontend: a connection closed (tcp://") for m in closed)
    assert not [r for r in caplog.records if "MAXMSGSIZE" in r.getMessage()]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_a_worker_falls_back_for_a_broker_that_predates_announcements(
    tiny_engine: Engine,
) -> None:
    """An older broker rejects READY's sessions field (unknown fields are errors): the worker
    registers once more without it instead of being refused forever."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    stop = threading.Event()
    try:
        old = ctx.socket(zmq.ROUTER)
        old.setsockopt(zmq.LINGER, 0)
        old.bind("tcp://127.0.0.1:*")
        cfg = WorkerConfig(
            connect=old.getsockopt_string(zmq.LAST_ENDPOINT), worker_id="w0", heartbeat_interval=HB
        )
        service = WorkerService(tiny_engine, cfg, stop)
        t = threading.Thread(target=service.run, name="w0", daemon=True)
        t.start()

        def next_ready() -> tuple[bytes, dict[str, object]]:
            while True:  # (heartbeats come and go meanwhile)
                assert old.poll(TIMEOUT * 1000), "no READY"
                key, header, body = old.recv_multipart()
                if header == HEADERS[Kind.READY]:
                    return key, msgpack.unpackb(body)

        key, first = next_ready()
        assert "sessions" not in first  # nothing to announce yet: the READY of before
        old.send_multipart([key, HEADERS[Kind.HEARTBEAT], EMPTY_BODY])
        turn = TurnRequest([ChatMessage(Role.USER, "hi")], max_tokens=2).encode()
        old.send_multipart(delivery_frames(key, HEADERS[Kind.TURN], b"tok", b"s1", b"r1", 0, turn))
        while True:
            assert old.poll(TIMEOUT * 1000), "no END"
            frames = old.recv_multipart()
            if frames[1] == HEADERS[Kind.END]:
                break
        # Silence: the worker gives up on us and registers again, announcing its session.
        key, second = next_ready()
        assert second["sessions"] == [[b"s1", b"tok", ANY_INT, ANY_FLOAT, ANY_INT]]
        refusal = error_body(ErrorCode.BAD_BODY, "READY: unknown field(s) 'sessions'")
        old.send_multipart([key, HEADERS[Kind.ERROR], refusal])
        key, third = next_ready()
        assert "sessions" not in third and third["epoch"] != second["epoch"]
        assert len(service.scheduler.store) == 0  # dropped: this broker could not re-pin them
    finally:
        stop.set()
        ctx.destroy(linger=0)


class _AnyOf:
    def __init__(self, *types: type) -> None:
        self.types = types

    def __eq__(self, other: object) -> bool:
        return type(other) in self.types

    def __repr__(self) -> str:
        return f"<any {'/'.join(t.__name__ for t in self.types)}>"


ANY_INT = _AnyOf(int)
ANY_FLOAT = _AnyOf(float)
