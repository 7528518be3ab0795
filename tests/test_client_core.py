"""The client's turn lifecycle machine, without sockets: replies in, actions out.

Each test plays the driver's part by hand (``step`` performs nothing; it only reads the next
action), so every branch of the lifecycle is reached deterministically, with a fake clock.
"""

from __future__ import annotations

import logging

import pytest

from kvroute.client import (
    ContextOverflow,
    NotOwner,
    ProtocolError,
    SessionBusy,
    SessionLost,
    Timeout,
)
from kvroute.client.actions import Action, Discard, Done, Phase, Raise, Receive, Send, Yield
from kvroute.client.conversation import Conversation
from kvroute.client.core import PingMachine, RequestMachine, SessionCore
from kvroute.client.demux import RequestIds
from kvroute.proto import (
    EMPTY_BODY,
    HEADERS,
    CachePath,
    ColdReason,
    ErrorCode,
    FinishReason,
    Kind,
    LostReason,
    Overflow,
    Reply,
    Token,
    TurnEnd,
    TurnRequest,
    TurnStats,
    error_body,
    reply_sha256,
)
from kvroute.proto import SessionLost as LostBody


class Clock:
    """A clock that moves only when told to."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make_session(
    history: list[dict[str, str]] | None = None, system: str | None = None
) -> tuple[SessionCore, Clock]:
    clock = Clock()
    return SessionCore(Conversation("s", system, history), RequestIds(), clock), clock


def turn(core: SessionCore, text: str = "hi", on_overflow: str = "raise") -> RequestMachine:
    attempt = core.conv.attempt(
        text,
        max_tokens=8,
        temperature=0.0,
        top_p=1.0,
        top_k=0,
        seed=None,
        on_overflow=on_overflow,  # type: ignore[arg-type]
    )
    return core.turn(attempt)


def sent_turn(m: RequestMachine) -> tuple[Send, TurnRequest]:
    """Start ``m`` and take its TURN (the session must be free)."""
    m.start()
    act = m.next_action()
    assert isinstance(act, Send) and act.key is not None and act.frames[0] == HEADERS[Kind.TURN]
    return act, TurnRequest.decode(act.frames[3])


def reply(send: Send, kind: Kind, body: bytes = EMPTY_BODY) -> Reply:
    assert send.key is not None
    return Reply(kind, send.key[0], send.key[1], body)


def token(send: Send, seq: int, text: str) -> Reply:
    return reply(send, Kind.TOKEN, Token(seq, text, (1,)).encode())


def end(send: Send, text: str, seq: int, reason: FinishReason = FinishReason.STOP) -> Reply:
    stats = TurnStats(3, 0, 3, seq, CachePath.COLD, ColdReason.NEW, 1.0, 2.0, "w1")
    return reply(send, Kind.END, TurnEnd(seq, reason, reply_sha256(text), stats).encode())


def receive(m: RequestMachine, send: Send, *, draining: bool = False) -> None:
    act = m.next_action()
    assert isinstance(act, Receive) and act.key == send.key and act.draining is draining


def settle(m: RequestMachine, pending: Send) -> None:
    """``m`` has just started on a session whose ``pending`` request an earlier call left:
    it sends that request's CANCEL again, then waits it out."""
    assert is_cancel_of(m.next_action(), pending)
    receive(m, pending, draining=True)


def feed(m: RequestMachine, r: Reply) -> Action:
    """Give ``m`` a reply it waits for; returns its next action."""
    act = m.next_action()
    assert isinstance(act, Receive) and (act.key[1] == r.request_id), act
    m.on_reply(r)
    return m.next_action()


def is_cancel_of(act: object, send: Send) -> bool:
    return (
        isinstance(act, Send)
        and act.frames[0] == HEADERS[Kind.CANCEL]
        and act.frames[1:3] == list(send.key or ())
    )


# --- a turn ------------------------------------------------------------------------------------


def test_a_turn_yields_pieces_commits_and_times_itself() -> None:
    core, clock = make_session(system="sys")
    m = turn(core, "hello")
    send, req = sent_turn(m)
    assert [x.content for x in req.messages] == ["sys", "hello"]
    assert m.phase is Phase.RUNNING and core.holder is m
    clock.now += 0.5
    assert feed(m, token(send, 0, "")) == Receive(send.key, "TURN reply")  # type: ignore[arg-type]
    m.on_reply(token(send, 1, "Hel"))
    assert m.next_action() == Yield("Hel")
    clock.now += 0.25
    assert feed(m, token(send, 2, "lo")) == Yield("lo")
    act = feed(m, end(send, "Hello", 3))
    assert isinstance(act, Done) and act.result is not None
    result = act.result
    assert result.reply == "Hello" and result.client_ttft_ms == 500.0
    assert result.elapsed_ms == 750.0
    assert core.conv.last is result and core.holder is None and core.request is None
    assert core.conv.history[1:] == [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "Hello"},
    ]
    assert m.phase is Phase.DONE and m.fail(KeyboardInterrupt()) == []  # after the commit


def test_a_second_call_is_busy_until_the_first_ends() -> None:
    core, _ = make_session()
    m = turn(core)
    send, _req = sent_turn(m)
    other = core.reset(keep_history=False)
    with pytest.raises(SessionBusy):
        other.start()
    assert other.fail(SessionBusy("s")) == []  # it never held the session: nothing to undo
    assert core.holder is m
    feed(m, end(send, "", 0))
    again = core.reset(keep_history=False)
    again.start()
    assert isinstance(again.next_action(), Send)


def test_the_history_is_read_when_the_turn_starts() -> None:
    core, _ = make_session()
    m = turn(core, "now")
    core.conv.history = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    _send, req = sent_turn(m)
    assert [x.content for x in req.messages] == ["q", "a", "now"]


# --- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "body", "error"),
    [
        (Kind.BUSY, EMPTY_BODY, SessionBusy),
        (Kind.ERROR, error_body(ErrorCode.NOT_OWNER, "not yours"), NotOwner),
        (Kind.SESSION_LOST, LostBody("w9", LostReason.EXITED, True).encode(), SessionLost),
        (Kind.OVERFLOW, Overflow(300, 8, 256).encode(), ContextOverflow),
        (Kind.END, b"\x93", ProtocolError),  # not a body at all
        (Kind.PONG, EMPTY_BODY, ProtocolError),  # not a reply to a TURN
    ],
)
def test_a_terminal_error_raises_and_changes_nothing(
    kind: Kind, body: bytes, error: type[Exception]
) -> None:
    core, _ = make_session(history=[{"role": "user", "content": "q"}])
    before = list(core.conv.history)
    m = turn(core)
    send, _ = sent_turn(m)
    feed(m, token(send, 0, "partial"))
    act = feed(m, reply(send, kind, body))
    assert isinstance(act, Raise) and isinstance(act.error, error)
    assert core.request is None  # it ended: nothing to cancel or wait for
    assert m.fail(act.error) == [] and core.holder is None
    assert core.conv.history == before and core.conv.last is None


def test_a_broken_stream_raises_cancels_and_is_waited_out() -> None:
    core, _ = make_session()
    m = turn(core)
    send, _ = sent_turn(m)
    act = feed(m, token(send, 1, "gap"))  # TOKEN 0 never came
    assert isinstance(act, Raise) and "seq 1, expected 0" in str(act.error)
    (cancel,) = m.fail(act.error)
    assert is_cancel_of(cancel, send) and core.request is not None  # still pending
    nxt = turn(core, "again")
    nxt.start()
    settle(nxt, send)
    nxt.on_reply(end(send, "xgap", 2, FinishReason.CANCELLED))  # dropped, never committed
    send2 = nxt.next_action()
    assert isinstance(send2, Send) and send2.key != send.key
    assert core.conv.history == []


def test_an_end_with_another_hash_is_not_committed() -> None:
    core, _ = make_session()
    m = turn(core)
    send, _ = sent_turn(m)
    feed(m, token(send, 0, "ab"))
    act = feed(m, end(send, "xx", 1))
    assert isinstance(act, Raise) and "hash mismatch" in str(act.error)
    assert m.fail(act.error) == [] and core.conv.history == []


# --- overflow ----------------------------------------------------------------------------------


def test_drop_oldest_resends_a_smaller_turn() -> None:
    old = []
    for i in range(3):
        old += [{"role": "user", "content": f"q{i} " * 20}, {"role": "assistant", "content": "a"}]
    core, _ = make_session(history=old, system="sys")
    m = turn(core, "now", on_overflow="drop_oldest")
    send, first = sent_turn(m)
    act = feed(m, reply(send, Kind.OVERFLOW, Overflow(100, 8, 90).encode()))
    assert isinstance(act, Send) and act.key != send.key  # the smaller TURN, a new request
    smaller = TurnRequest.decode(act.frames[3])
    assert len(smaller.messages) < len(first.messages) and smaller.messages[0].content == "sys"
    assert feed(m, token(act, 0, "ok")) == Yield("ok")
    done = feed(m, end(act, "ok", 1))
    assert isinstance(done, Done) and done.result is not None
    assert done.result.dropped == len(first.messages) - len(smaller.messages) > 0
    assert core.conv.dropped == done.result.dropped


def test_drop_oldest_warns_with_the_numbers(caplog: pytest.LogCaptureFixture) -> None:
    old = []
    for i in range(3):
        old += [{"role": "user", "content": f"q{i} " * 20}, {"role": "assistant", "content": "a"}]
    core, _ = make_session(history=old)
    m = turn(core, "now", on_overflow="drop_oldest")
    send, first = sent_turn(m)
    with caplog.at_level(logging.WARNING, logger="kvroute.client"):
        act = feed(m, reply(send, Kind.OVERFLOW, Overflow(130, 8, 100).encode()))
    assert isinstance(act, Send)
    dropped = len(first.messages) - len(TurnRequest.decode(act.frames[3]).messages)
    (rec,) = [r for r in caplog.records if r.name.startswith("kvroute.client")]
    assert rec.levelno == logging.WARNING
    msg = rec.getMessage()
    assert "session s:" in msg and "130 prompt tokens + max_tokens 8 exceed n_ctx 100 by 38" in msg
    assert f"{dropped // 2} turn(s) ({dropped} messages" in msg and dropped > 0


def test_drop_oldest_raises_when_nothing_is_left_to_drop() -> None:
    core, _ = make_session(system="sys")
    m = turn(core, on_overflow="drop_oldest")
    send, _ = sent_turn(m)
    act = feed(m, reply(send, Kind.OVERFLOW, Overflow(100, 8, 90).encode()))
    assert isinstance(act, Raise) and isinstance(act.error, ContextOverflow)
    assert act.error.excess == 18


# --- leaving early -----------------------------------------------------------------------------


def test_an_interrupted_turn_is_cancelled_kept_out_and_waited_out_next_time() -> None:
    core, _ = make_session()
    m = turn(core, "one")
    send, _ = sent_turn(m)
    assert feed(m, token(send, 0, "par")) == Yield("par")
    (cancel,) = m.fail(KeyboardInterrupt())
    assert is_cancel_of(cancel, send) and core.holder is None and m.phase is Phase.DONE
    nxt = turn(core, "two")
    nxt.start()
    settle(nxt, send)
    nxt.on_reply(token(send, 1, "tial"))
    receive(nxt, send, draining=True)
    nxt.on_reply(end(send, "partial", 2, FinishReason.CANCELLED))
    send2 = nxt.next_action()
    assert isinstance(send2, Send)
    assert [x.content for x in TurnRequest.decode(send2.frames[3]).messages] == ["two"]


def test_close_cancels_waits_and_keeps_the_partial_reply() -> None:
    core, _ = make_session()
    m = turn(core, "long")
    send, _ = sent_turn(m)
    feed(m, token(send, 0, "par"))
    assert m.close()
    assert is_cancel_of(m.next_action(), send)
    feed(m, token(send, 1, "tial"))  # streamed before the CANCEL arrived: kept too
    act = feed(m, end(send, "partial", 2, FinishReason.CANCELLED))
    assert isinstance(act, Done) and act.result is not None and act.result.reply == "partial"
    assert core.conv.history[-1] == {"role": "assistant", "content": "partial"}
    assert core.holder is None and not m.close()


def test_close_before_starting_sends_nothing() -> None:
    core, _ = make_session()
    m = turn(core)
    assert not m.close() and m.phase is Phase.DONE and core.holder is None


def test_an_abandoned_turn_is_kept_when_the_next_call_sees_its_end() -> None:
    core, _ = make_session()
    m = turn(core, "dropped")
    send, _ = sent_turn(m)
    feed(m, token(send, 0, "par"))
    (cancel,) = m.abandon()
    assert is_cancel_of(cancel, send) and core.holder is None
    nxt = core.reset(keep_history=True)
    nxt.start()
    settle(nxt, send)
    nxt.on_reply(end(send, "par", 1, FinishReason.CANCELLED))
    assert core.conv.history == [
        {"role": "user", "content": "dropped"},
        {"role": "assistant", "content": "par"},
    ]
    assert core.conv.last is not None and core.conv.last.finish_reason is FinishReason.CANCELLED


@pytest.mark.parametrize("overflow", [False, True])
def test_a_closed_turn_builds_on_the_committed_history_less_only_what_it_drops(
    overflow: bool,
) -> None:
    # A dropped stream's turn is committed by the next call; the closed turn after it extends
    # that history, and loses only the oldest turn drop_oldest reports when it had to shrink.
    core, _ = make_session()
    m = turn(core, "break")
    send, _ = sent_turn(m)
    feed(m, token(send, 0, "par"))
    m.abandon()
    reset = core.reset(keep_history=True)
    reset.start()
    settle(reset, send)
    reset.on_reply(end(send, "par", 1, FinishReason.CANCELLED))
    sent_reset = reset.next_action()
    assert isinstance(sent_reset, Send) and sent_reset.frames[0] == HEADERS[Kind.RESET]
    assert isinstance(feed(reset, reply(sent_reset, Kind.RESET_OK)), Done)
    before = list(core.conv.history)
    assert [x["content"] for x in before] == ["break", "par"]
    m = turn(core, "close", on_overflow="drop_oldest")
    send, first = sent_turn(m)
    assert [x.content for x in first.messages] == ["break", "par", "close"]
    if overflow:
        act = feed(m, reply(send, Kind.OVERFLOW, Overflow(100, 8, 90).encode()))
        assert isinstance(act, Send) and act.key != send.key
        send = act
        assert [x.content for x in TurnRequest.decode(act.frames[3]).messages] == ["close"]
    assert feed(m, token(send, 0, "ta")) == Yield("ta")
    assert m.close() and is_cancel_of(m.next_action(), send)
    act = feed(m, end(send, "ta", 1, FinishReason.CANCELLED))
    assert isinstance(act, Done) and act.result is not None
    dropped = 2 if overflow else 0
    assert act.result.dropped == core.conv.dropped == dropped
    assert core.conv.history == [
        *before[dropped:],
        {"role": "user", "content": "close"},
        {"role": "assistant", "content": "ta"},
    ]


def test_a_timeout_while_waiting_one_out_gives_up_on_it() -> None:
    core, _ = make_session()
    m = turn(core)
    send, _ = sent_turn(m)
    m.fail(Timeout(5.0, "TURN reply", "tcp://x"))  # our own turn: still pending
    assert core.request is not None
    nxt = turn(core)
    nxt.start()
    settle(nxt, send)
    assert nxt.fail(Timeout(5.0, "end", "tcp://x")) == [Discard(send.key)]  # type: ignore[arg-type]
    assert core.request is None and core.holder is None
    third = turn(core)
    third.start()
    assert isinstance(third.next_action(), Send)  # at once: nothing left to wait for


def test_an_end_taken_by_an_interrupted_reader_is_not_waited_for() -> None:
    core, _ = make_session()
    m = turn(core)
    send, _ = sent_turn(m)
    m.fail(KeyboardInterrupt())
    nxt = turn(core)
    nxt.start()
    settle(nxt, send)
    nxt.on_reply(None)  # the transport says nothing more will come
    assert nxt.next_action() == Discard(send.key)  # type: ignore[arg-type]
    assert isinstance(nxt.next_action(), Send)


def test_a_pending_turn_is_cancelled_again_once_and_an_error_ends_it() -> None:
    core, _ = make_session()
    m = turn(core, "one")
    send, _ = sent_turn(m)
    (cancel,) = m.fail(Timeout(5.0, "TURN reply", "tcp://x"))  # this CANCEL may be lost
    assert is_cancel_of(cancel, send) and core.request is not None
    nxt = turn(core, "two")
    nxt.start()
    settle(nxt, send)  # sent again before waiting
    nxt.on_reply(token(send, 0, "par"))
    receive(nxt, send, draining=True)  # once: not again for each reply
    nxt.on_reply(reply(send, Kind.ERROR, error_body(ErrorCode.NOT_IN_FLIGHT, "restarted")))
    act = nxt.next_action()  # a terminal ERROR for the pending request is its end
    assert isinstance(act, Send) and act.frames[0] == HEADERS[Kind.TURN] and act.key != send.key
    assert core.request is not None and core.request.key == act.key
    assert core.conv.history == []


@pytest.mark.parametrize("kind", [Kind.RESET, Kind.CLOSE], ids=["reset", "close"])
@pytest.mark.parametrize("broker_knew_it", [False, True])
def test_a_pending_reset_or_close_is_cancelled_when_settled(
    kind: Kind, broker_knew_it: bool
) -> None:
    core, _ = make_session(history=[{"role": "user", "content": "q"}])
    m = core.reset(keep_history=False) if kind is Kind.RESET else core.close()
    m.start()
    send = m.next_action()
    assert isinstance(send, Send) and send.frames[0] == HEADERS[kind]
    receive(m, send)
    assert m.fail(KeyboardInterrupt()) == []  # nothing can stop a RESET or CLOSE
    assert core.request is not None and core.holder is None
    nxt = turn(core, "next")
    nxt.start()
    settle(nxt, send)  # a CANCEL with its request id: a broker that never saw it says so
    if broker_knew_it:  # it forwarded the CANCEL: the worker ignores it, the ack comes
        nxt.on_reply(reply(send, Kind.RESET_OK if kind is Kind.RESET else Kind.CLOSE_OK))
    else:
        nxt.on_reply(reply(send, Kind.ERROR, error_body(ErrorCode.NOT_IN_FLIGHT, "unknown")))
    act = nxt.next_action()
    assert isinstance(act, Send) and act.frames[0] == HEADERS[Kind.TURN]
    # An interrupted call changes no history, whatever became of it.
    assert [x.content for x in TurnRequest.decode(act.frames[3]).messages] == ["q", "next"]


# --- cancel ------------------------------------------------------------------------------------


def test_cancel_before_the_turn_is_out_follows_it() -> None:
    core, _ = make_session()
    m = turn(core)
    assert core.cancel() is None  # not started: nothing runs
    send, _ = sent_turn(m)
    assert core.cancel() == []  # its TURN may not be out yet: the machine sends CANCEL after
    assert is_cancel_of(m.next_action(), send)
    assert isinstance(m.next_action(), Receive)
    again = core.cancel()  # out now: send it at once
    assert again is not None and len(again) == 1 and is_cancel_of(again[0], send)
    act = feed(m, end(send, "", 0, FinishReason.CANCELLED))
    assert isinstance(act, Done) and core.cancel() is None


def test_reset_and_close() -> None:
    core, _ = make_session(system="sys", history=[{"role": "user", "content": "q"}])
    m = core.reset(keep_history=True)
    m.start()
    send = m.next_action()
    assert isinstance(send, Send) and send.frames[0] == HEADERS[Kind.RESET]
    assert feed(m, reply(send, Kind.RESET_OK)) == Done() and len(core.conv.history) == 2
    m = core.reset(keep_history=False)
    m.start()
    send = m.next_action()
    assert isinstance(send, Send)
    assert feed(m, reply(send, Kind.RESET_OK)) == Done()
    assert core.conv.history == [{"role": "system", "content": "sys"}]
    m = core.close()
    m.start()
    send = m.next_action()
    assert isinstance(send, Send) and send.frames[0] == HEADERS[Kind.CLOSE]
    act = feed(m, reply(send, Kind.BUSY))
    assert isinstance(act, Raise) and isinstance(act.error, SessionBusy)
    assert m.fail(act.error) == [] and core.holder is None and core.request is None


def test_ping() -> None:
    clock = Clock()
    m = PingMachine(b"7", clock)
    m.start()
    send = m.next_action()
    assert isinstance(send, Send) and send.key == (b"", b"7")
    assert m.next_action() == Receive((b"", b"7"), "PONG")
    clock.now += 0.002
    m.on_reply(Reply(Kind.PONG, b"", b"7", EMPTY_BODY))
    assert m.next_action() == Done() and m.rtt == pytest.approx(0.002)
    bad = PingMachine(b"8", clock)
    bad.start()
    bad.next_action()
    bad.on_reply(Reply(Kind.PONG, b"", b"8", b"\x81\xa1x\x01"))  # a PONG with a body
    act = bad.next_action()
    assert isinstance(act, Raise) and isinstance(act.error, ProtocolError)
    assert bad.fail(act.error) == [Discard((b"", b"8"))]
