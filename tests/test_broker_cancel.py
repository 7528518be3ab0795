"""CANCEL of a request the broker has no record of in flight: ERROR ``not_in_flight`` at once.

A CANCEL is how a client settles a request it stopped waiting for: it cancels it and waits for
the request's terminal reply. A broker that never saw the request (it was in flight at the
broker before a restart) or that has already ended it must answer, or the client waits in vain.
On the wire with raw DEALERs (``fake_peers``), then with the library client: the answer that
races a turn's END is dropped, and the turn a broker's death cut off settles at the next send.
The unit-level rules (and that a stranger learns nothing) are in test_routing.py.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
import zmq
from broker_service import Ctx, Service, broker_service, connect, zmq_context
from fake_peers import TIMEOUT, Client, error_code, turn_body, wait_until

from kvroute import Client as LibClient
from kvroute import Timeout
from kvroute.proto import EMPTY_BODY, ErrorCode, FinishReason, Kind, Token, TurnEnd
from kvroute.proto.frames import client_frames


@pytest.fixture
def ctx() -> Iterator[Ctx]:
    yield from zmq_context()


@pytest.fixture
def service() -> Iterator[Service]:
    """``service(frontend=..., token_delay=...)`` -> a running broker and one fake worker w0."""
    with broker_service() as start:
        yield start


def not_in_flight(c: Client, session: bytes, request: bytes) -> None:
    """The next reply for ``request`` is ERROR not_in_flight, echoing both ids."""
    r = c.recv(request)
    assert error_code(r) is ErrorCode.NOT_IN_FLIGHT
    assert (r.session_id, r.request_id) == (session, request)


# --- on the wire --------------------------------------------------------------------------------


def test_cancel_of_a_request_not_in_flight_is_answered_at_once(service: Service, ctx: Ctx) -> None:
    b, w = service(token_delay=0.01)
    c, stranger = connect(ctx, b), connect(ctx, b)
    # A session nobody has (as after a broker restart): answered, and nothing is created.
    c.send(Kind.CANCEL, b"nobody", b"c1")
    not_in_flight(c, b"nobody", b"c1")
    assert b.table.owner(b"nobody") is None and b.table.principal(b"nobody") is None
    # A turn that ended before its CANCEL came: the END first, then the answer.
    c.send(Kind.TURN, b"s", b"r1", turn_body())
    tokens, term = c.collect(b"r1")
    assert term.kind is Kind.END and len(tokens) == 3
    c.send(Kind.CANCEL, b"s", b"r1")
    not_in_flight(c, b"s", b"r1")
    # A stranger naming that ended request learns only that the session is not its own.
    stranger.send(Kind.CANCEL, b"s", b"r1")
    assert error_code(stranger.recv(b"r1")) is ErrorCode.NOT_OWNER
    # Another request id while a turn runs: the turn goes on untouched.
    c.send(Kind.TURN, b"s", b"r2", turn_body(max_tokens=30))
    assert c.recv(b"r2").kind is Kind.TOKEN
    c.send(Kind.CANCEL, b"s", b"other")
    not_in_flight(c, b"s", b"other")
    tokens, term = c.collect(b"r2")
    end = TurnEnd.decode(term.body)
    assert (end.seq, end.finish_reason) == (30, FinishReason.LENGTH)
    assert [t.seq for t in tokens] == list(range(1, 30))
    # No CANCEL reached the worker, and nothing else came.
    assert [d.kind for d in w.deliveries] == [Kind.TURN, Kind.TURN] and not w.cancels
    assert b.stats.errors_sent == 4
    assert c.silence(0.1) and stranger.silence(0.1)


def test_a_cancel_with_a_body_is_still_dropped(service: Service, ctx: Ctx) -> None:
    # Unchanged: an ERROR for it could not be told from the answer to a well-formed CANCEL.
    b, w = service()
    c = connect(ctx, b)
    c.send(Kind.CANCEL, b"nobody", b"c1", b"\x81\xa1x\x01")
    c.send(Kind.CANCEL, b"nobody", b"c2", EMPTY_BODY)
    not_in_flight(c, b"nobody", b"c2")  # the first one got nothing
    assert c.silence(0.1) and not w.deliveries


# --- with the library client ----------------------------------------------------------------------


def test_the_client_drops_the_answer_of_a_cancel_that_raced_the_end(service: Service) -> None:
    b, _ = service()
    assert b.endpoints is not None
    with LibClient(b.endpoints[0], timeout=TIMEOUT) as client:
        s = client.session()
        stream = s.send("hi", max_tokens=3)
        assert [next(stream) for _ in range(3)] == ["t0 ", "t1 ", "t2 "]
        # The END went past the broker; the client has not read it: its CANCEL comes too late.
        wait_until(lambda: not b.table.in_flight)
        assert s.cancel()
        wait_until(lambda: b.stats.errors_sent == 1)  # ERROR not_in_flight, after the END
        assert list(stream) == []
        assert s.last is not None and s.last.finish_reason == FinishReason.LENGTH
        assert s.last.reply == "t0 t1 t2 "
        # The stray terminal reached neither this turn nor the next.
        assert "".join(s.send("more", max_tokens=2)) == "t0 t1 "
        assert s.last.finish_reason == FinishReason.LENGTH
        assert [m["role"] for m in s.history] == ["user", "assistant"] * 2


def test_a_turn_cut_off_by_a_broker_death_settles_at_the_next_send(service: Service) -> None:
    # A stand-in for the old broker: it takes the TURN, streams one token and dies (its socket
    # closes) with the turn in flight, so nobody will ever send that turn's END.
    bound = threading.Event()
    died = threading.Event()
    front: list[str] = []

    def dying_broker() -> None:
        ctx: Ctx = zmq.Context()
        router = ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 1000)
        try:
            router.bind("tcp://127.0.0.1:*")
            front.append(router.getsockopt_string(zmq.LAST_ENDPOINT))
            bound.set()
            if router.poll(int(TIMEOUT * 1000)):
                client, _, sid, rid, _ = router.recv_multipart()
                token = Token(0, "t0 ", (0,)).encode()
                router.send_multipart(client_frames(client, Kind.TOKEN, sid, rid, token))
                died.wait(TIMEOUT)
        finally:
            router.close()
            ctx.term()

    old = threading.Thread(target=dying_broker, name="dying-broker", daemon=True)
    old.start()
    assert bound.wait(TIMEOUT)
    with LibClient(front[0], timeout=2.0) as client:
        s = client.session()
        stream = s.send("hi", max_tokens=50)
        assert next(stream) == "t0 "
        died.set()
        old.join(TIMEOUT)
        assert not old.is_alive()
        with pytest.raises(Timeout):
            list(stream)
        assert s.history == []
        # A new broker on the same address never saw that turn. The next send first settles
        # it (CANCEL, then wait for its end): answered not_in_flight at once, it goes on.
        b, w = service(frontend=front[0])
        assert "".join(s.send("again", max_tokens=2)) == "t0 t1 "
        assert s.last is not None and s.last.finish_reason == FinishReason.LENGTH
        assert [m["content"] for m in s.history] == ["again", "t0 t1 "]
        assert [d.kind for d in w.deliveries] == [Kind.TURN] and not w.cancels
        assert b.stats.errors_sent >= 1
