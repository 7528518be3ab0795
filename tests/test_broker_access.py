"""Session ownership, per-client limits and forgotten pins, over real sockets.

Fake workers and raw DEALER clients (``fake_peers``), as in test_broker.py. A raw DEALER sets no
routing id, so ZeroMQ gives each connection its own: each client here is its own principal. The
unit-level rules are in test_routing.py; these check that the broker applies them on the wire,
that a refused request reaches no worker, and that honest streams alongside are untouched.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from broker_service import Ctx, Service, broker_service, connect, zmq_context
from fake_peers import Client, error_code, turn_body, wait_until

from kvroute.proto import EMPTY_BODY, ColdReason, ErrorCode, ErrorReply, Kind, TurnEnd
from kvroute.proto.kinds import HEADERS


@pytest.fixture
def ctx() -> Iterator[Ctx]:
    yield from zmq_context()


@pytest.fixture
def service(ctx: Ctx) -> Iterator[Service]:
    """``service(**BrokerConfig overrides)`` -> a running broker and one fake worker w0."""
    with broker_service(token_delay=0.01) as start:
        yield start


def end_of(c: Client, request: bytes, read: int = 0) -> TurnEnd:
    """The END of a turn whose first ``read`` TOKENs were taken already; no token missing."""
    tokens, term = c.collect(request)
    assert term.kind is Kind.END, term.kind
    end = TurnEnd.decode(term.body)
    assert [t.seq for t in tokens] == list(range(read, end.seq))
    return end


def test_a_stranger_cannot_touch_a_session(service: Callable[..., Any], ctx: Ctx) -> None:
    b, w = service()
    owner, stranger = connect(ctx, b), connect(ctx, b)
    owner.send(Kind.TURN, b"s", b"r1", turn_body(max_tokens=40))
    assert owner.recv(b"r1").kind is Kind.TOKEN
    for kind, rid in ((Kind.TURN, b"x1"), (Kind.RESET, b"x2"), (Kind.CLOSE, b"x3")):
        stranger.send(kind, b"s", rid, turn_body() if kind is Kind.TURN else EMPTY_BODY)
        r = stranger.recv(rid)
        assert error_code(r) is ErrorCode.NOT_OWNER, kind  # not BUSY: it learns nothing
        assert r.session_id == b"s"
    stranger.send(Kind.CANCEL, b"s", b"r1")  # the owner's very request id
    assert error_code(stranger.recv(b"r1")) is ErrorCode.NOT_OWNER
    end = end_of(owner, b"r1", read=1)
    assert end.seq == 40 and end.finish_reason == "length"  # not cancelled, nothing lost
    assert [d.kind for d in w.deliveries] == [Kind.TURN]  # no refused request reached it
    # The owner goes on; once it CLOSEs, the id is free for anyone.
    owner.send(Kind.RESET, b"s", b"r2")
    assert owner.recv(b"r2").kind is Kind.RESET_OK
    owner.send(Kind.CLOSE, b"s", b"r3")
    assert owner.recv(b"r3").kind is Kind.CLOSE_OK
    stranger.send(Kind.TURN, b"s", b"x4", turn_body())
    assert end_of(stranger, b"x4").stats.cold_reason is ColdReason.NEW
    owner.send(Kind.TURN, b"s", b"r4", turn_body())
    assert error_code(owner.recv(b"r4")) is ErrorCode.NOT_OWNER
    assert owner.silence(0.1) and stranger.silence(0.1)


def test_sessions_per_client_limit(service: Callable[..., Any], ctx: Ctx) -> None:
    b, _ = service(max_sessions_per_client=2)
    c, other = connect(ctx, b), connect(ctx, b)
    for sid in (b"a", b"b"):
        c.send(Kind.TURN, sid, sid, turn_body())
        end_of(c, sid)
    c.send(Kind.TURN, b"c", b"c", turn_body())
    r = c.recv(b"c")
    assert error_code(r) is ErrorCode.LIMIT
    assert "limit 2" in ErrorReply.decode(r.body).message
    assert b.table.owner(b"c") is None
    c.send(Kind.TURN, b"a", b"a2", turn_body())  # its sessions still work
    end_of(c, b"a2")
    other.send(Kind.TURN, b"c", b"c", turn_body())  # and other clients are not affected
    end_of(other, b"c")
    c.send(Kind.CLOSE, b"b", b"b2")
    assert c.recv(b"b2").kind is Kind.CLOSE_OK
    c.send(Kind.TURN, b"d", b"d", turn_body())
    end_of(c, b"d")


def test_requests_in_flight_limit(service: Callable[..., Any], ctx: Ctx) -> None:
    b, _ = service(max_requests_per_client=1)
    c, other = connect(ctx, b), connect(ctx, b)
    c.send(Kind.TURN, b"a", b"a1", turn_body(max_tokens=30))
    assert c.recv(b"a1").kind is Kind.TOKEN
    c.send(Kind.TURN, b"b", b"b1", turn_body())
    assert error_code(c.recv(b"b1")) is ErrorCode.LIMIT
    other.send(Kind.TURN, b"o", b"o1", turn_body())
    end_of(other, b"o1")
    assert end_of(c, b"a1", read=1).seq == 30
    c.send(Kind.TURN, b"b", b"b2", turn_body())  # the turn ended: room again
    end_of(c, b"b2")


def test_body_size_limit(service: Callable[..., Any], ctx: Ctx) -> None:
    b, w = service(max_body_bytes=1000)
    c = connect(ctx, b)
    c.sock.send_multipart([HEADERS[Kind.TURN], b"s", b"big", b"\x80" + b"x" * 1000])
    r = c.recv(b"big")
    assert error_code(r) is ErrorCode.TOO_LARGE
    assert "> 1000" in ErrorReply.decode(r.body).message
    c.send(Kind.TURN, b"s", b"ok", turn_body())
    end_of(c, b"ok")
    assert len(w.deliveries) == 1


def test_idle_pins_are_forgotten_and_closed(service: Callable[..., Any], ctx: Ctx) -> None:
    b, w = service(pin_ttl_s=0.2)
    first, later = connect(ctx, b), connect(ctx, b)
    first.send(Kind.TURN, b"s", b"r1", turn_body())
    end_of(first, b"r1")
    wait_until(lambda: b.table.owner(b"s") is None)
    # The worker was told to forget the session (a CLOSE nobody waits for) ...
    wait_until(lambda: [d.kind for d in w.deliveries] == [Kind.TURN, Kind.CLOSE])
    close = w.deliveries[-1]
    assert (close.session_id, close.client) == (b"s", b"")
    assert b.stats.pins_forgotten == 1
    # ... so the next TURN starts the session anew, cold, for whoever sends it.
    later.send(Kind.TURN, b"s", b"r2", turn_body())
    assert end_of(later, b"r2").stats.cold_reason is ColdReason.NEW
    assert first.silence(0.1)  # the worker's CLOSE_OK went nowhere
    assert w.disconnects == 0 and not w.errors
