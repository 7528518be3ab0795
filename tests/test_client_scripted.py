"""Replies a real service never sends, from a scripted broker, for both clients: every ERROR
code, BUSY, SESSION_LOST mid-stream, sequence gaps, bad reply hashes, stray frames; and a
broker that never answers a request, until the next call settles it with a CANCEL."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import pytest
import zmq
from test_client import Connect, connect_fixture  # noqa: F401  (the fixture)

from kvroute import (
    KvrouteError,
    LimitReached,
    NotOwner,
    ProtocolError,
    ServiceUnavailable,
    SessionBusy,
    SessionLost,
    Timeout,
)
from kvroute.proto import (
    EMPTY_BODY,
    HEADERS,
    CachePath,
    ColdReason,
    ErrorCode,
    FinishReason,
    Kind,
    LostReason,
    Token,
    TurnEnd,
    TurnStats,
    error_body,
    reply_sha256,
)
from kvroute.proto import SessionLost as LostBody

pytestmark = pytest.mark.timeout(60)

ScriptedReply = tuple[Kind, bytes] | tuple[Kind, bytes, bytes, bytes]  # kind, body[, sid, rid]
Script = Callable[[Kind, int], list[ScriptedReply]]  # (request kind, TURNs so far) -> replies


class FakeBroker:
    """A ROUTER thread answering each client request with scripted replies."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.turns = 0
        self.seen: list[tuple[Kind, bytes]] = []  # (kind, request id) of each request
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        # A ROUTER drops what it cannot queue: a script that answers with more messages than
        # the high-water mark would look like a client that lost them.
        self._sock.setsockopt(zmq.SNDHWM, 0)
        self._sock.bind("tcp://127.0.0.1:0")
        self.url = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self._sock.poll(20):
                continue
            peer, header, sid, rid, _body = self._sock.recv_multipart()
            kind = Kind(header[4])
            self.seen.append((kind, rid))
            self.turns += kind is Kind.TURN
            for k, body, *ids in self.script(kind, self.turns):
                self._sock.send_multipart([peer, HEADERS[k], *(ids or (sid, rid)), body])

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sock.close()
        self._ctx.term()


@pytest.fixture
def fake() -> Iterator[Callable[[Script], FakeBroker]]:
    made: list[FakeBroker] = []

    def make(script: Script) -> FakeBroker:
        made.append(FakeBroker(script))
        return made[-1]

    yield make
    for f in made:
        f.close()


def end_body(text: str, seq: int, digest: str | None = None) -> bytes:
    stats = TurnStats(3, 0, 3, seq, CachePath.COLD, ColdReason.NEW, 1.0, 2.0, "fake")
    return TurnEnd(seq, FinishReason.STOP, digest or reply_sha256(text), stats).encode()


def tokens(*texts: str, start: int = 0) -> list[ScriptedReply]:
    return [(Kind.TOKEN, Token(start + i, t, (1,)).encode()) for i, t in enumerate(texts)]


Outcome = str | KvrouteError


def converse(connect: Connect, url: str, steps: list[str]) -> tuple[list[Outcome], list[object]]:
    """Run ``steps`` on one session: ``/ping``, ``/reset`` or a user message. Returns what each
    step gave (reply text or exception) and the final history."""
    out: list[Outcome] = []
    with connect(url) as client:
        s = client.session(session_id="shared")
        for step in steps:
            try:
                if step == "/ping":
                    out.append(str(client.ping() >= 0))
                elif step == "/reset":
                    out.append(str(s.reset()))
                else:
                    out.append("".join(s.send(step)))
            except KvrouteError as exc:
                out.append(exc)
        return out, list(s.history)


@pytest.mark.parametrize(
    ("code", "exc"),
    [
        (ErrorCode.NO_WORKER, ServiceUnavailable),
        (ErrorCode.OVERLOADED, ServiceUnavailable),
        (ErrorCode.SHUTTING_DOWN, ServiceUnavailable),
        (ErrorCode.BAD_BODY, ProtocolError),
        (ErrorCode.INTERNAL, ProtocolError),
        (ErrorCode.NOT_OWNER, NotOwner),
        (ErrorCode.LIMIT, LimitReached),
    ],
)
def test_error_codes_map_to_types(
    fake: Callable[[Script], FakeBroker],
    connect: Connect,
    code: ErrorCode,
    exc: type[KvrouteError],
) -> None:
    broker = fake(lambda kind, n: [(Kind.ERROR, error_body(code, "scripted"))])
    (err,), history = converse(connect, broker.url, ["x"])
    assert isinstance(err, exc) and err.code == code  # type: ignore[attr-defined]
    assert "scripted" in str(err) and history == []


def test_busy_and_session_lost(fake: Callable[[Script], FakeBroker], connect: Connect) -> None:
    lost = LostBody("w9", LostReason.EXITED, True).encode()

    def script(kind: Kind, turns: int) -> list[ScriptedReply]:
        if kind is Kind.RESET or turns == 1:
            return [(Kind.BUSY, EMPTY_BODY)]
        return [*tokens("par", "tial"), (Kind.SESSION_LOST, lost)]

    broker = fake(script)
    (busy, busy_reset, gone), history = converse(connect, broker.url, ["x", "/reset", "y"])
    assert isinstance(busy, SessionBusy) and isinstance(busy_reset, SessionBusy)
    assert "'shared' is busy" in str(busy)
    assert isinstance(gone, SessionLost)
    assert (gone.worker, gone.reason, gone.retryable) == ("w9", "exited", True)
    assert history == []  # the partial reply was not kept


def test_sequence_gap_and_bad_hash(fake: Callable[[Script], FakeBroker], connect: Connect) -> None:
    def script(kind: Kind, turns: int) -> list[ScriptedReply]:
        if turns == 1:  # TOKEN 0, TOKEN 2 (1 lost), END
            return [*tokens("a"), *tokens("c", start=2), (Kind.END, end_body("ac", 3))]
        if turns == 2:  # END with the hash of another text
            return [*tokens("a", "b"), (Kind.END, end_body("ab", 2, reply_sha256("xx")))]
        return [*tokens("o", "k"), (Kind.END, end_body("ok", 2))]

    broker = fake(script)
    (gap, bad_hash, ok), history = converse(connect, broker.url, ["x", "x", "x"])
    assert isinstance(gap, ProtocolError) and not gap.remote and "seq 2, expected 1" in str(gap)
    assert isinstance(bad_hash, ProtocolError) and "hash mismatch" in str(bad_hash)
    assert ok == "ok" and len(history) == 2  # usable afterwards; failed turns left no trace


def test_replies_for_other_requests_are_not_misrouted(
    fake: Callable[[Script], FakeBroker], connect: Connect
) -> None:
    stray = (Kind.TOKEN, Token(0, "stray", ()).encode(), b"someone-else", b"99")

    def script(kind: Kind, turns: int) -> list[ScriptedReply]:
        if kind is Kind.PING:
            return [stray, (Kind.PONG, EMPTY_BODY)]
        return [stray, *tokens("o", "k"), stray, (Kind.END, end_body("ok", 2))]

    broker = fake(script)
    assert converse(connect, broker.url, ["/ping", "x"])[0] == ["True", "ok"]


# --- settling a request an earlier call left pending --------------------------------------------

SHORT = 1.0  # client timeout: the first call of each test below waits it out once
NOT_IN_FLIGHT = (Kind.ERROR, error_body(ErrorCode.NOT_IN_FLIGHT, "no such request in flight"))


def test_a_pending_turn_whose_cancel_was_lost_settles_at_once(
    fake: Callable[[Script], FakeBroker], connect: Connect
) -> None:
    """The CANCEL sent when a turn is left is lost (as in a dying broker's buffers): the next
    call sends it again, and the broker's not_in_flight ends the wait at once (without it, that
    call would wait out its timeout and raise Timeout)."""
    cancels: list[int] = []

    def script(kind: Kind, turns: int) -> list[ScriptedReply]:
        if kind is Kind.CANCEL:
            cancels.append(1)
            return [] if len(cancels) == 1 else [NOT_IN_FLIGHT]  # the first one is lost
        if turns == 1:
            return tokens("par")  # and then nothing: the client times out
        return [*tokens("o", "k"), (Kind.END, end_body("ok", 2))]

    broker = fake(script)
    with connect(broker.url, timeout=SHORT) as client:
        s = client.session(session_id="shared")
        stream = s.send("first")
        assert next(stream) == "par"
        with pytest.raises(Timeout):
            list(stream)
        assert s.ask("second") == "ok"
        assert s.history == [
            {"role": "user", "content": "second"},
            {"role": "assistant", "content": "ok"},
        ]
    (k1, r1), (k2, r2), (k3, r3), (k4, r4) = broker.seen
    assert (k1, k2, k3, k4) == (Kind.TURN, Kind.CANCEL, Kind.CANCEL, Kind.TURN)
    assert r1 == r2 == r3 != r4


@pytest.mark.parametrize("kind", [Kind.RESET, Kind.CLOSE], ids=["reset", "close"])
def test_a_pending_reset_or_close_settles_at_once_after_a_restart(
    fake: Callable[[Script], FakeBroker], connect: Connect, kind: Kind
) -> None:
    """A RESET or CLOSE the broker never answers (it was in flight at a broker that died): the
    next call sends a CANCEL with its request id, which a broker that never saw it answers
    not_in_flight, so that call goes on at once instead of timing out."""

    def script(k: Kind, turns: int) -> list[ScriptedReply]:
        if k is Kind.CANCEL:
            return [NOT_IN_FLIGHT]
        if k is Kind.TURN:
            return [*tokens("o", "k"), (Kind.END, end_body("ok", 2))]
        return []  # the RESET or CLOSE: silence

    broker = fake(script)
    with connect(broker.url, timeout=SHORT) as client:
        s = client.session(session_id="shared", history=[{"role": "user", "content": "q"}])
        with pytest.raises(Timeout):
            s.reset() if kind is Kind.RESET else s.close()
        assert s.history == [{"role": "user", "content": "q"}]  # interrupted: unchanged
        assert s.ask("next") == "ok"
        assert [m["content"] for m in s.history] == ["q", "next", "ok"]
    (k1, r1), (k2, r2), (k3, r3) = broker.seen  # no CANCEL when the call was left
    assert (k1, k2, k3) == (kind, Kind.CANCEL, Kind.TURN)
    assert r1 == r2 != r3
