"""The fuzz's peers: a client attacker, a never-registered and a registered rogue worker, and
the oversize sender. Each sends hostile messages and checks every answer against
:mod:`fuzz_oracle`, tallying what happened in :class:`Counts` (failures are collected, not raised,
so one run reports them all).
"""

from __future__ import annotations

import contextlib
import os
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import zmq
import zmq.utils.monitor
from fuzz_frames import Case
from fuzz_oracle import TURN_RAN, Expect, error
from fuzz_values import Rand, pack, valid_ready
from service_harness import Harness

from kvroute.proto import (
    EMPTY_BODY,
    ChatMessage,
    Control,
    ErrorCode,
    ErrorReply,
    Kind,
    Reply,
    Role,
    Token,
    TurnEnd,
    TurnRequest,
    parse_delivery,
    parse_reply,
    reply_sha256,
    request_frames,
)
from kvroute.proto.kinds import HEADERS, REPLY_KINDS

Ctx = zmq.Context[zmq.Socket[bytes]]
Sock = zmq.Socket[bytes]

WAIT = 5.0  # upper bound of any single wait for an answer
BARRIER = [HEADERS[Kind.HEARTBEAT], b"\xc1"]  # a stranger's bad HEARTBEAT: always ERROR bad_body


@dataclass
class Counts:
    """What the fuzz did and what came back."""

    frames_tried: int = 0  # hostile multipart messages sent (both hops)
    errors_returned: int = 0  # ERROR answers to them
    disconnects: int = 0  # DISCONNECT "unknown worker" answers on the backend
    acks: int = 0  # RESET_OK / CLOSE_OK / PONG answers
    turns_ran: int = 0  # hostile-but-valid TURNs answered END / OVERFLOW / BUSY
    silent: int = 0  # messages the protocol does not answer (CANCEL, stale replies...)
    oversize_dropped: int = 0  # frames over MAXMSGSIZE: no answer, sender disconnected
    crashes: int = 0  # dead threads + uncaught thread exceptions + ERROR log records
    tokens_lost: int = 0  # honest tokens missing or different vs the reference run
    failures: list[str] = field(default_factory=list)  # answers that broke the oracle
    categories: Counter[str] = field(default_factory=Counter)

    def summary(self) -> str:
        top = ", ".join(f"{k} {v}" for k, v in sorted(self.categories.items()))
        return (
            f"frames tried {self.frames_tried}, errors returned {self.errors_returned}, "
            f"disconnects {self.disconnects}, acks {self.acks}, valid turns {self.turns_ran}, "
            f"unanswered by design {self.silent}, oversize dropped {self.oversize_dropped}, "
            f"crashes {self.crashes}, tokens lost {self.tokens_lost}, "
            f"oracle failures {len(self.failures)}\n  by category: {top}"
        )


def dealer(ctx: Ctx, url: str) -> Sock:
    """A DEALER whose sends and close never block for long (receives are polled with WAIT)."""
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.SNDTIMEO, int(WAIT * 1000))
    s.connect(url)
    return s


def wait_until(cond: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.002)


def snapshot(get: Callable[[], Any]) -> Any:
    """Read a structure the broker thread mutates (a copy may race with a resize: retry)."""
    for _ in range(100):
        with contextlib.suppress(RuntimeError):
            return get()
    raise AssertionError("could not snapshot broker state")


def answer(sock: Sock) -> Reply | None:
    """The next answer that is not a TOKEN, or None if nothing came within WAIT."""
    while sock.poll(WAIT * 1000):
        r = parse_reply(sock.recv_multipart())
        if r.kind is not Kind.TOKEN:
            return r
    return None


@dataclass
class Pending:
    """A request awaiting its answer (and, for a TURN that runs, its stream)."""

    expect: Expect
    category: str
    seq: int = 0
    text: str = ""


class FrontAttacker:
    """A client DEALER sending :class:`Case` s and checking every answer."""

    def __init__(self, ctx: Ctx, url: str, counts: Counts) -> None:
        self.sock = dealer(ctx, url)
        self.counts = counts
        self.pending: list[Pending] = []
        self.maybe: dict[bytes | None, Expect] = {}  # optional answers, until the barrier
        self.barriers = 0
        self.workers_seen: set[str] = set()

    def run(self, case: Case) -> None:
        c = self.counts
        c.categories[case.category] += 1
        for req in case.requests:
            if req.wait:
                self.collect()
            self.sock.send_multipart(req.frames)
            c.frames_tried += 1
            if req.expect.silent:
                c.silent += 1
            elif req.expect.optional:
                self.maybe[req.expect.echo] = req.expect
            else:
                self.pending.append(Pending(req.expect, case.category))
        self.collect()
        self.barrier()
        c.silent += len(self.maybe)  # those that were not answered
        self.maybe.clear()

    def fail(self, message: str) -> None:
        self.counts.failures.append(message)

    def start_stream(self, sid: bytes) -> None:
        """Send a long greedy TURN and return once its first answer arrived (usually a TOKEN:
        the turn is then in flight for another ~100 steps)."""
        body = TurnRequest([ChatMessage(Role.USER, "Tell a long story.")], max_tokens=150)
        self.sock.send_multipart(request_frames(Kind.TURN, sid, b"victim", body.encode()))
        self.counts.frames_tried += 1
        p = Pending(Expect(TURN_RAN, echo=b"victim"), "victim")
        self.pending.append(p)
        while p in self.pending and p.seq == 0:
            if not self.sock.poll(WAIT * 1000):
                self.fail("victim: no answer")
                self.pending.clear()
                return
            self.on_reply(parse_reply(self.sock.recv_multipart()))

    def collect(self) -> None:
        """Read answers until every pending request has its terminal."""
        while self.pending:
            if not self.sock.poll(WAIT * 1000):
                self.fail(f"no answer for {[p.category for p in self.pending]}")
                self.pending.clear()
                return
            self.on_reply(parse_reply(self.sock.recv_multipart()))

    def barrier(self) -> None:
        """PING and wait for its PONG: anything else arriving first was not expected (it
        answers a message that must go unanswered, or answers one twice)."""
        self.barriers += 1
        rid = b"bar%x" % self.barriers
        self.sock.send_multipart(request_frames(Kind.PING, b"", rid))
        while True:
            if not self.sock.poll(WAIT * 1000):
                self.fail("no PONG for a barrier PING")
                return
            r = parse_reply(self.sock.recv_multipart())
            if r.kind is Kind.PONG and r.request_id == rid:
                return
            if not self.optional_answer(r):
                self.fail(f"unexpected {r.kind.name} for {r.request_id!r} {r.body[:80]!r}")

    def optional_answer(self, r: Reply) -> bool:
        """Check and count ``r`` if it is the answer of a request whose answer was optional."""
        want = self.maybe.pop(r.request_id, None)
        if want is None:
            return False
        code = ErrorReply.decode(r.body).code if r.kind is Kind.ERROR else None
        if r.kind not in want.kinds or (code is not None and code not in want.codes):
            self.fail(f"optional answer {r.kind.name} {code} for {r.request_id!r}, want {want}")
        self.counts.errors_returned += r.kind is Kind.ERROR
        return True

    def on_reply(self, r: Reply) -> None:
        p = next((p for p in self.pending if p.expect.echo == r.request_id), None)
        if p is None and self.optional_answer(r):
            return
        if p is None and r.kind is Kind.ERROR:
            p = next((p for p in self.pending if p.expect.echo is None), None)
        if p is None:
            self.fail(f"unexpected {r.kind.name} for {r.request_id!r}: {r.body[:80]!r}")
            return
        if r.kind is Kind.TOKEN and Kind.END in p.expect.kinds:
            tok = Token.decode(r.body)
            if tok.seq != p.seq:
                self.fail(f"{p.category}: TOKEN seq {tok.seq}, expected {p.seq}")
            p.seq, p.text = p.seq + 1, p.text + tok.text
            return
        self.pending.remove(p)
        c = self.counts
        if r.kind not in p.expect.kinds:
            self.fail(f"{p.category}: got {r.kind.name} {r.body[:120]!r}, want {p.expect}")
        elif r.kind is Kind.ERROR:
            c.errors_returned += 1
            code = ErrorReply.decode(r.body).code
            if code not in p.expect.codes:
                self.fail(f"{p.category}: ERROR {code}, want {sorted(p.expect.codes)}")
        elif r.kind is Kind.END:
            c.turns_ran += 1
            end = TurnEnd.decode(r.body)
            self.workers_seen.add(end.stats.worker)
            if end.seq != p.seq or end.reply_sha256 != reply_sha256(p.text):
                self.fail(f"{p.category}: END does not match its stream")
        elif r.kind in (Kind.OVERFLOW, Kind.BUSY):
            c.turns_ran += 1
        else:
            c.acks += 1


class BackAttacker:
    """A DEALER on the backend that never registers, checking every answer in order."""

    def __init__(self, ctx: Ctx, url: str, counts: Counts) -> None:
        self.sock = dealer(ctx, url)
        self.counts = counts

    def run(self, category: str, frames: list[bytes], expect: Expect) -> None:
        c = self.counts
        c.categories[f"backend:{category}"] += 1
        self.sock.send_multipart(frames)
        self.sock.send_multipart(BARRIER)
        c.frames_tried += 1
        wanted = [] if expect.silent else [expect]
        for want in [*wanted, error(ErrorCode.BAD_BODY)]:
            if not self.sock.poll(WAIT * 1000):
                c.failures.append(f"backend {category}: no answer")
                return
            msg = parse_delivery(self.sock.recv_multipart())
            if not isinstance(msg, Control) or msg.kind not in want.kinds:
                c.failures.append(f"backend {category}: got {msg.kind.name}, want {want}")
                continue
            if msg.kind is Kind.ERROR:
                code = ErrorReply.decode(msg.body).code
                if code not in want.codes:
                    c.failures.append(f"backend {category}: ERROR {code}, want {want.codes}")
        if expect.silent:
            c.silent += 1
        elif Kind.ERROR in expect.kinds:
            c.errors_returned += 1
        else:
            c.disconnects += 1


def rogue_worker_round(
    ctx: Ctx, h: Harness, fa: FrontAttacker, rng: random.Random, n: int, counts: Counts
) -> None:
    """Register a rogue worker and make it send replies for requests it was never given,
    including exact copies of the routing ids of requests in flight on the real workers (read
    from the broker's table): a long TURN of the attacker started just before, and any honest
    turn running then. The broker must drop them all: a stream that received one would fail
    its sequence or hash check (the attacker checks its own; honest texts are compared)."""
    name = f"rogue-{n}"
    r = Rand(rng)
    # Started before the rogue registers, so placement cannot put it on the rogue.
    fa.start_stream(b"fz-victim-%d" % n)
    sock = dealer(ctx, h.backend)
    try:
        sock.send_multipart([HEADERS[Kind.READY], pack(valid_ready(name, r))])
        counts.frames_tried += 1
        wait_until(lambda: h.broker.table.worker_key(name) is not None, f"{name} registered")
        in_flight = snapshot(lambda: list(h.broker.table.in_flight.values()))
        targets = [(f.client, f.session_id, f.request_id) for f in in_flight]
        targets += [(b"\x00" + rng.randbytes(4), b"honest-0", b"1"), (b"", b"fz", b"2")]
        for _ in range(30):
            target = rng.choice(targets)
            client, sid, rid = target
            if target in targets[: len(in_flight)]:
                counts.categories["rogue:spoofed_live_request"] += 1
            kind = rng.choice(sorted(REPLY_KINDS))
            body = rng.choice([Token(0, "pwned", (1,)).encode(), EMPTY_BODY, r.raw(0, 30)])
            sock.send_multipart([HEADERS[kind], client, sid, rid, body])
            counts.frames_tried += 1
            counts.silent += 1  # stale replies are dropped without an answer
            counts.categories["rogue:spoofed_reply"] += 1
        # Bad control bodies from a registered worker still get ERROR, and it stays registered.
        for frames in (BARRIER, [HEADERS[Kind.READY], b"\xc1"]):
            sock.send_multipart(frames)
            counts.frames_tried += 1
            counts.categories["rogue:bad_control"] += 1
        got: list[Control] = []
        deadline = time.monotonic() + WAIT
        while len(got) < 2 and sock.poll(max(0.0, deadline - time.monotonic()) * 1000):
            msg = parse_delivery(sock.recv_multipart())
            if isinstance(msg, Control) and msg.kind is Kind.HEARTBEAT:
                continue  # the broker's own heartbeats to its (rogue) worker
            assert isinstance(msg, Control), f"{name} was sent a request: {msg}"
            got.append(msg)
        kinds = [
            (m.kind, ErrorReply.decode(m.body).code if m.kind is Kind.ERROR else None) for m in got
        ]
        want = [(Kind.ERROR, ErrorCode.BAD_BODY)] * 2
        if kinds != want:
            counts.failures.append(f"{name}: answers {kinds}, want {want}")
        counts.errors_returned += sum(k is Kind.ERROR for k, _ in kinds)
        if h.broker.table.worker_key(name) is None:
            counts.failures.append(f"{name} was dropped by its bad control messages")
        sock.send_multipart([HEADERS[Kind.DISCONNECT], pack({"reason": "bye"})])
        wait_until(lambda: h.broker.table.worker_key(name) is None, f"{name} gone")
    finally:
        sock.close(0)
    fa.collect()  # the victim's stream, checked token by token
    fa.barrier()


def oversize(ctx: Ctx, url: str, frames: list[bytes], counts: Counts, hop: str) -> None:
    """A message with a frame over MAXMSGSIZE, from its own DEALER: ZeroMQ drops it and
    disconnects that peer (seen on a socket monitor); nothing answers it."""
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.SNDTIMEO, int(WAIT * 1000))
    # A unique inproc name: pyzmq's default is derived from the fd, which the next socket may
    # reuse while the previous monitor endpoint is still being torn down.
    addr = f"inproc://fuzz-monitor-{os.urandom(8).hex()}"
    s.monitor(addr, zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
    mon = ctx.socket(zmq.PAIR)
    mon.setsockopt(zmq.LINGER, 0)
    mon.connect(addr)
    s.connect(url)
    try:
        assert mon.poll(WAIT * 1000), "oversize sender never connected"
        assert zmq.utils.monitor.recv_monitor_message(mon)["event"] == zmq.EVENT_CONNECTED
        s.send_multipart(frames)
        counts.frames_tried += 1
        counts.categories[f"{hop}:oversize"] += 1
        assert mon.poll(WAIT * 1000), f"{hop}: oversize sender not disconnected"
        event = zmq.utils.monitor.recv_monitor_message(mon)["event"]
        if event != zmq.EVENT_DISCONNECTED or s.poll(100):
            counts.failures.append(f"{hop}: oversize frame answered or not dropped ({event})")
        else:
            counts.oversize_dropped += 1
    finally:
        s.disable_monitor()
        mon.close(0)
        s.close(0)
