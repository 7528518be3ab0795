"""The broker's transcript index (LOOKUP / INDEX) and shared owner tokens (the owner frame).

The index alone (:class:`TranscriptIndex`), then over a real broker with a fake worker: the
library's ``lookup`` / ``index`` calls, entries per principal, forgetting with the session, and
several client connections sharing sessions through one owner token.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import zmq
from fake_peers import INTERVAL, TIMEOUT, FakeWorker, wait_until

from kvroute import Client, NotOwner
from kvroute.broker import Broker, BrokerConfig
from kvroute.broker.transcripts import TranscriptIndex
from kvroute.proto import EMPTY_BODY, ErrorCode, ErrorReply, Found, Kind, parse_reply
from kvroute.proto.frames import request_frames

# --- the index alone ---------------------------------------------------------------------------

D1, D2, D3 = (bytes([i]) * 16 for i in (1, 2, 3))


def test_entries_are_per_principal() -> None:
    idx = TranscriptIndex(10)
    idx.record(b"alice", D1, b"s1")
    assert idx.lookup(b"alice", D1) == b"s1"
    assert idx.lookup(b"bob", D1) is None  # the same transcript, another identity: nothing
    idx.record(b"bob", D1, b"s2")
    assert (idx.lookup(b"alice", D1), idx.lookup(b"bob", D1)) == (b"s1", b"s2")


def test_a_session_keeps_every_transcript_and_is_forgotten_whole() -> None:
    idx = TranscriptIndex(10)
    for d in (D1, D2):
        idx.record(b"p", d, b"s1")
    idx.record(b"p", D3, b"s2")
    assert idx.sessions() == 2 and len(idx) == 3
    assert idx.forget(b"s1") == 2
    assert idx.lookup(b"p", D1) is None and idx.lookup(b"p", D2) is None
    assert idx.lookup(b"p", D3) == b"s2"
    assert idx.forget(b"s1") == 0


def test_the_later_session_wins_a_digest() -> None:
    idx = TranscriptIndex(10)
    idx.record(b"p", D1, b"s1")
    idx.record(b"p", D1, b"s2")
    assert idx.lookup(b"p", D1) == b"s2" and idx.sessions() == 1
    assert idx.forget(b"s1") == 0 and idx.lookup(b"p", D1) == b"s2"


def test_bounded_least_recently_used_out() -> None:
    idx = TranscriptIndex(2)
    idx.record(b"p", D1, b"s1")
    idx.record(b"p", D2, b"s2")
    assert idx.lookup(b"p", D1) == b"s1"  # used: D2 is now the oldest
    idx.record(b"p", D3, b"s3")
    assert len(idx) == 2 and idx.lookup(b"p", D2) is None and idx.sessions() == 2
    assert idx.lookup(b"p", D1) == b"s1" and idx.lookup(b"p", D3) == b"s3"


# --- over a broker ----------------------------------------------------------------------------


@contextmanager
def service(**config: object) -> Iterator[tuple[Broker, FakeWorker, str]]:
    cfg = BrokerConfig("tcp://127.0.0.1:*", "tcp://127.0.0.1:*", INTERVAL, **config)  # type: ignore[arg-type]
    b = Broker(cfg)
    t = threading.Thread(target=b.run, name="broker", daemon=True)
    t.start()
    frontend, backend = b.wait_bound(TIMEOUT)
    w = FakeWorker(backend, "w0")
    w.start()
    try:
        wait_until(lambda: b.table.worker_key("w0") is not None)
        yield b, w, frontend
    finally:
        w.join()
        b.close()
        t.join(TIMEOUT)
        assert not t.is_alive() and w.exc is None


TOKEN = b"shared-owner-token-0001"


def test_clients_sharing_a_token_share_sessions_and_transcripts() -> None:
    with service() as (b, w, url):
        with (
            Client(url, TIMEOUT, owner_token=TOKEN) as one,
            Client(url, TIMEOUT, owner_token=TOKEN) as two,  # connected at the same time
            Client(url, TIMEOUT) as stranger,
        ):
            chat = one.session()
            chat.ask("hi", max_tokens=2)
            one.index(chat.id, D1)
            assert two.lookup(D1) == chat.id
            assert stranger.lookup(D1) is None  # entries are per principal
            with pytest.raises(NotOwner):
                stranger.index(chat.id, D2)
            # the other connection drives the session (its TURN reaches the same worker)
            again = two.session(chat.id, history=chat.history)
            again.ask("more", max_tokens=2)
            assert again.last is not None and again.last.worker == "w0"
            turns = [d for d in w.deliveries if d.kind is Kind.TURN]
            assert [d.owner for d in turns] == [TOKEN, TOKEN]  # the principal the worker keeps
            assert turns[0].client != turns[1].client  # two connections, one owner
            with pytest.raises(NotOwner):
                stranger.session(chat.id, history=chat.history).ask("mine?", max_tokens=2)
            # closing the session forgets its transcripts
            two.index(chat.id, D2)
            again.close()
            assert one.lookup(D1) is None and one.lookup(D2) is None
            # a session nobody owns is not recorded
            one.index("never-created", D3)
            assert one.lookup(D3) is None
        assert b.stats.lookups >= 5 and b.stats.lookups_found == 1


def test_idle_sessions_forgotten_by_the_broker_leave_the_index() -> None:
    with service(pin_ttl_s=0.2) as (b, _, url), Client(url, TIMEOUT, owner_token=TOKEN) as c:
        chat = c.session()
        chat.ask("hi", max_tokens=1)
        c.index(chat.id, D1)
        assert c.lookup(D1) == chat.id
        wait_until(lambda: b.table.owner(chat.id.encode()) is None)
        assert c.lookup(D1) is None


def test_bad_digests_are_refused() -> None:
    with service() as (_, _, url), Client(url, TIMEOUT) as c:
        for bad in (b"", b"x" * 15, b"x" * 33):
            with pytest.raises(ValueError):
                c.lookup(bad)
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(url)
        try:
            for kind, sid in ((Kind.LOOKUP, b""), (Kind.INDEX, b"s")):
                sock.send_multipart(request_frames(kind, sid, b"r1", EMPTY_BODY))
                assert sock.poll(TIMEOUT * 1000)
                reply = parse_reply(sock.recv_multipart())
                assert reply.kind is Kind.ERROR, reply
                assert ErrorReply.decode(reply.body).code is ErrorCode.BAD_BODY
            # a well-formed LOOKUP from a bare DEALER: nothing recorded for it
            body = b"\x81\xa6digest\xc4\x10" + D1
            sock.send_multipart(request_frames(Kind.LOOKUP, b"", b"r2", body))
            assert sock.poll(TIMEOUT * 1000)
            reply = parse_reply(sock.recv_multipart())
            assert reply.kind is Kind.FOUND and Found.decode(reply.body).session is None
            # a malformed owner frame is a bad frame
            sock.send_multipart([*request_frames(Kind.PING, b"", b"r3")[:3], b"\0x", EMPTY_BODY])
            assert sock.poll(TIMEOUT * 1000)
            reply = parse_reply(sock.recv_multipart())
            assert ErrorReply.decode(reply.body).code is ErrorCode.BAD_FRAME
        finally:
            sock.close()
            ctx.term()
