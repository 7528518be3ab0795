"""Exception safety of both clients: an exception landing anywhere never breaks them.

The transports call a fault-injection hook at every point where an exception can land (waiting
for the socket, between received parts, after taking a reply, between sent parts) and the
drivers at theirs (after claiming the session, before handing out a piece, after a commit).
Each test runs a turn with an exception raised at the k-th such point, for every k a turn
reaches, then checks that the same session serves a new turn (no BUSY, no stale frame: the
stream checks sequence numbers and the reply hash), that a new session works, and that the
history obeys the rule: unchanged, or the turn appended exactly as the worker committed it.
Against the tiny model served by a broker and two worker threads (``tiny_service``).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import re
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from service_harness import Harness
from test_client import Connect, connect_fixture  # noqa: F401  (the fixture)

from kvroute import AsyncClient, Client, SessionBusy
from kvroute.client import AsyncSession, Session, TurnResult
from kvroute.client.demux import Demux, Outbox
from kvroute.proto import (
    EMPTY_BODY,
    HEADERS,
    CachePath,
    ColdReason,
    FinishReason,
    Kind,
    Token,
    TurnEnd,
    TurnStats,
    reply_sha256,
)

pytestmark = pytest.mark.timeout(240)
TIMEOUT = 5.0
MAX_TOKENS = 4
POINTS = {"claim", "send", "poll", "frame", "pop", "yield", "commit"}  # reached by one turn


class Injector:
    """A fault hook: calls ``action(point)`` once, at the k-th call at ``only`` (or at any
    point if ``only`` is None), in the thread that made it."""

    def __init__(self, k: int, action: Callable[[str], None], only: str | None = None) -> None:
        self.k, self.action, self.only = k, action, only
        self.calls = 0
        self.fired: str | None = None
        self.owner = threading.current_thread()

    def __call__(self, point: str) -> None:
        if threading.current_thread() is not self.owner:
            return  # other threads run undisturbed
        if self.only is not None and point != self.only:
            return
        self.calls += 1
        if self.calls == self.k and self.fired is None:
            self.fired = point
            self.action(point)


def raiser(exc: type[BaseException]) -> Callable[[str], None]:
    def act(point: str) -> None:
        raise exc(f"injected at {point}")

    return act


def without_dropped(before: list[dict[str, str]], dropped: int) -> list[dict[str, str]]:
    """``before`` less the ``dropped`` oldest non-system messages: what a turn that
    ``drop_oldest`` had to shrink builds on (the tiny model's random replies fill its small
    context within a few turns of up to 32 tokens)."""
    keep = 1 if before and before[0]["role"] == "system" else 0
    return before[:keep] + before[keep + dropped :]


def assert_rule(
    history: list[dict[str, str]], before: list[dict[str, str]], text: str, dropped: int = 0
) -> bool:
    """The history after an interrupted turn is unchanged, or has the turn appended exactly as
    committed (``last.reply``), less the ``dropped`` messages its overflow policy dropped.
    Returns True if it was appended."""
    if history == before:
        return False
    kept = without_dropped(before, dropped)
    assert history[: len(kept)] == kept, "earlier history was changed"
    assert history[len(kept) :][0] == {"role": "user", "content": text}
    assert len(history) == len(kept) + 2 and history[-1]["role"] == "assistant"
    return True


def check_session_after(
    s: Session | AsyncSession, reply: str, before: list[dict[str, str]]
) -> None:
    """After a fault, a clean turn on the same session: its reply is exactly what was streamed
    (a stale frame of the interrupted request would break its sequence or hash check); the
    history lost only what the turn reports as dropped."""
    last = s.last
    assert last is not None and last.reply == reply
    kept = without_dropped(before, last.dropped)
    assert s.history[: len(kept)] == kept and len(s.history) == len(kept) + 2
    assert s.history[-1] == {"role": "assistant", "content": reply}


# --- the blocking client ---------------------------------------------------------------------


def sweep_sync(url: str, action: Callable[[str], None], exc: type[BaseException]) -> Counter[str]:
    """A fault at the k-th call of each point, for every k a turn reaches; returns the faults."""
    hit: Counter[str] = Counter()
    with Client(url, timeout=TIMEOUT) as client:
        s = client.session(system="sys")
        for point in sorted(POINTS):
            for k in range(1, 200):
                if len(s.history) > 6:  # stay far from the tiny context (no drop_oldest here)
                    s.history = s.history[:1]
                before, last = list(s.history), s.last
                inj = Injector(k, action, only=point)
                client._t.fault_hook = inj
                try:
                    pieces = list(s.send(f"turn {k}", max_tokens=MAX_TOKENS))
                except exc:
                    pieces = None
                finally:
                    client._t.fault_hook = None
                if inj.fired is None:  # the turn has fewer such points: it ran to the end
                    assert pieces is not None and s.last is not None
                    break
                hit[point] += 1
                assert pieces is None, f"the exception at {point} was swallowed"
                kept = assert_rule(s.history, before, f"turn {k}")
                # Raised anywhere before the END was taken, nothing is kept; after the commit
                # the turn is complete and kept.
                assert kept == (point == "commit"), (point, s.history[len(before) :])
                if not kept:
                    assert s.last is last
                before = list(s.history)
                reply = s.ask("and now?", max_tokens=MAX_TOKENS)
                check_session_after(s, reply, before)
                other = client.session()
                assert other.ask("hello", max_tokens=2) == other.last.reply  # type: ignore[union-attr]
                assert not client._t._demux._entries, "a request was left open"
            else:
                raise AssertionError(f"no end to the {point} points of a turn")
    return hit


@pytest.mark.parametrize("exc", [KeyboardInterrupt, RuntimeError])
def test_sync_fault_at_every_point(
    tiny_service: Harness, exc: type[BaseException], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    hit = sweep_sync(tiny_service.frontend, raiser(exc), exc)
    assert set(hit) >= POINTS, hit
    # No message was ever split (a split one is logged as malformed, by client or broker).
    assert "frames, expected" not in caplog.text and "malformed" not in caplog.text


def test_sync_second_fault_while_settling(tiny_service: Harness) -> None:
    """Interrupted once mid-stream, then again at every point of the next request (which first
    settles the interrupted one): a third request still works."""
    with Client(tiny_service.frontend, timeout=TIMEOUT) as client:
        s = client.session()
        for k in range(1, 200):
            stream = s.send("long", max_tokens=32)
            if next(stream, None) is None:
                continue  # the reply ended before a piece: nothing to interrupt this time
            client._t.fault_hook = Injector(1, raiser(KeyboardInterrupt))  # in the next recv
            with pytest.raises(KeyboardInterrupt):
                next(stream)
            if len(s.history) > 6:
                s.history = []
            inj = Injector(k, raiser(KeyboardInterrupt))
            client._t.fault_hook = inj
            try:
                s.reset(keep_history=True)
            except KeyboardInterrupt:
                pass
            finally:
                client._t.fault_hook = None
            before = list(s.history)
            check_session_after(s, s.ask("still there?", max_tokens=MAX_TOKENS), before)
            if inj.fired is None:
                break
        else:
            raise AssertionError("the sweep did not reach the end of a reset")
        assert k > 3  # the reset had several points to interrupt


def test_sync_interrupts_do_not_disturb_other_threads(tiny_service: Harness) -> None:
    """A thread chatting on its own session while the main thread is interrupted at every point
    of its turns (including while waiting for the other thread's reads)."""
    errors: list[BaseException] = []
    stop = threading.Event()
    with Client(tiny_service.frontend, timeout=TIMEOUT) as client:

        def chat() -> None:
            try:
                s = client.session()
                while not stop.is_set():
                    s.ask("busy thread", max_tokens=MAX_TOKENS)
                    if len(s.history) > 8:
                        s.history = []
            except BaseException as exc:  # reported below
                errors.append(exc)

        other = threading.Thread(target=chat)
        other.start()
        try:
            hit = sweep_sync_shared(client)
        finally:
            stop.set()
            other.join(timeout=30)
    assert not errors, errors
    assert {"poll", "frame", "pop"} <= set(hit)


def sweep_sync_shared(client: Client) -> Counter[str]:
    """The k-th point of a turn, for k = 1, 2, ... until three turns in a row had fewer points:
    with another thread reading, a turn's points vary (how often it waits), so one short turn
    must not end the sweep."""
    hit: Counter[str] = Counter()
    s = client.session()
    short = 0
    for k in range(1, 400):
        if len(s.history) > 6:
            s.history = []
        inj = Injector(k, raiser(KeyboardInterrupt))
        client._t.fault_hook = inj
        try:
            list(s.send(f"turn {k}", max_tokens=MAX_TOKENS))
        except KeyboardInterrupt:
            pass
        finally:
            client._t.fault_hook = None
        before = list(s.history)
        check_session_after(s, s.ask("next", max_tokens=MAX_TOKENS), before)
        if inj.fired is None:
            short += 1
            if short == 3:
                return hit
            continue
        short = 0
        hit[inj.fired] += 1
    raise AssertionError("the sweep did not reach the end of a turn")


def test_sync_stream_collected_inside_a_receive(tiny_service: Harness) -> None:
    """A running stream finalized inside another receive (as the cyclic garbage collector may
    do) cannot wait there for its END: it cancels, frees its session, and the session's next
    request commits the partial turn."""
    with Client(tiny_service.frontend, timeout=TIMEOUT) as client:
        a, b = client.session(), client.session()
        held = [a.send("dropped inside a receive", max_tokens=32)]
        first = next(held[0])

        def drop(point: str) -> None:
            held.clear()  # the last reference: the stream's finalizer runs here

        client._t.fault_hook = Injector(1, drop, only="poll")
        try:
            b.ask("meanwhile", max_tokens=MAX_TOKENS)
        finally:
            client._t.fault_hook = None
        assert not held and a.history == []
        reply = a.ask("next", max_tokens=MAX_TOKENS)
        assert a.history[0] == {"role": "user", "content": "dropped inside a receive"}
        assert a.history[1]["content"].startswith(first)
        check_session_after(a, reply, a.history[:2])


# --- the asyncio client ----------------------------------------------------------------------


async def sweep_async(url: str, mode: str) -> Counter[str]:
    """As :func:`sweep_sync`; ``mode`` "raise" raises CancelledError from the hook, "cancel"
    cancels the task at the hook, so a real cancellation lands at its next ``await``."""

    def cancel_task(point: str) -> None:
        task = asyncio.current_task()  # the hook runs inside the turn's task
        assert task is not None
        task.cancel()

    action = raiser(asyncio.CancelledError) if mode == "raise" else cancel_task
    hit: Counter[str] = Counter()
    async with AsyncClient(url, timeout=TIMEOUT) as client:
        s = client.session(system="sys")
        for point in sorted(POINTS):
            for k in range(1, 200):
                if len(s.history) > 6:
                    s.history = s.history[:1]
                before, last = list(s.history), s.last
                inj = Injector(k, action, only=point)
                client._t.fault_hook = inj
                task = asyncio.ensure_future(s.ask(f"turn {k}", max_tokens=MAX_TOKENS))
                try:
                    await task
                    done = True
                except asyncio.CancelledError:
                    done = False
                finally:
                    client._t.fault_hook = None
                if inj.fired is None:
                    assert done and s.last is not None
                    break
                hit[point] += 1
                kept = assert_rule(s.history, before, f"turn {k}")
                if mode == "raise":
                    assert not done and kept == (point == "commit"), point
                if not kept:
                    assert s.last is last
                before = list(s.history)
                reply = await s.ask("and now?", max_tokens=MAX_TOKENS)
                check_session_after(s, reply, before)
                other = client.session()
                assert await other.ask("hello", max_tokens=2) == other.last.reply  # type: ignore[union-attr]
                assert not client._t._demux._entries, "a request was left open"
            else:
                raise AssertionError(f"no end to the {point} points of a turn")
    return hit


@pytest.mark.parametrize("mode", ["raise", "cancel"])
def test_async_fault_at_every_point(
    tiny_service: Harness, mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    hit = asyncio.run(asyncio.wait_for(sweep_async(tiny_service.frontend, mode), 200))
    assert set(hit) >= POINTS, hit
    assert "frames, expected" not in caplog.text and "malformed" not in caplog.text


# --- both clients ------------------------------------------------------------------------------


def test_break_close_and_drop_keep_the_partial_turn(
    tiny_service: Harness, connect: Connect
) -> None:
    with connect(tiny_service.frontend, timeout=TIMEOUT) as client:
        s = client.session()
        for how in ("break", "close", "raise_in_loop"):
            before, seen, dropped = list(s.history), [], s.dropped
            try:
                for piece in s.send(how, max_tokens=32) if how != "close" else ():
                    seen.append(piece)
                    if how == "break":
                        break
                    if how == "raise_in_loop":
                        raise ValueError("the caller's own error")
            except ValueError:
                pass  # the stream was dropped with the loop: cancelled, kept
            if how == "close":
                stream = s.send(how, max_tokens=32)
                seen.append(next(stream))
                with pytest.raises(SessionBusy):  # held by the stream until it is closed
                    s.ask("too early")
                stream.close()  # cancels, waits for the END, keeps the partial reply
                stream.close()  # idempotent
            elif connect.flavour == "async":
                # A dropped asyncio stream cannot wait: it freed the session at once, and the
                # session's next request waits for the END and commits the partial turn.
                assert s.history == before
                s.reset(keep_history=True)
            # Kept, cancelled (or finished, had the worker ended before the CANCEL came).
            # Less what drop_oldest dropped, if the turn outgrew the tiny context (reported).
            dropped = s.dropped - dropped
            assert s.last is not None and assert_rule(s.history, before, how, dropped)
            assert s.last.dropped == dropped
            assert s.last.reply.startswith("".join(seen)) and seen
        before = list(s.history)
        check_session_after(s, s.ask("and after?", max_tokens=MAX_TOKENS), before)


def test_ask_and_the_dropped_stream_warning(
    tiny_service: Harness, connect: Connect, caplog: pytest.LogCaptureFixture
) -> None:
    client = connect(tiny_service.frontend, timeout=TIMEOUT)
    s = client.session(system="sys")
    reply = s.ask("hi", max_tokens=MAX_TOKENS)
    assert s.last is not None and reply == s.last.reply
    assert s.history[1:] == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": reply},
    ]
    before = list(s.history)
    with pytest.warns(ResourceWarning, match="without being iterated: nothing was sent"):
        s.send("never read")  # dropped at once
    assert "nothing was sent" in caplog.text and "never read" in caplog.text
    assert s.history == before
    s.ask("the session is free", max_tokens=2)  # not SessionBusy: nothing was claimed
    client.close()
    client.close()  # idempotent
    assert inspect.iscoroutinefunction(AsyncClient.close)  # awaitable, like AsyncSession.close
    assert inspect.iscoroutinefunction(AsyncSession.close)


# --- the I/O-free pieces ----------------------------------------------------------------------


def reply_parts(kind: Kind, rid: bytes, body: bytes = EMPTY_BODY) -> list[bytes]:
    return [HEADERS[kind], b"s", rid, body]


def test_demux_keeps_a_message_across_an_interrupted_read() -> None:
    d = Demux()
    d.open((b"s", b"1"))
    token = reply_parts(Kind.TOKEN, b"1", Token(0, "hi", (1,)).encode())
    for part in token[:2]:  # a reader interrupted after two parts...
        d.feed(part, True)
    assert d.pop((b"s", b"1")) is None
    d.feed(token[2], True)  # ...the next reader carries on with the rest
    d.feed(token[3], False)
    end = reply_parts(Kind.RESET_OK, b"1")
    for i, part in enumerate(end):
        d.feed(part, i < 3)
    assert not d.settled((b"s", b"1"))  # the terminal reply is still queued
    got = d.pop((b"s", b"1"))
    assert got is not None and got.kind is Kind.TOKEN
    got = d.pop((b"s", b"1"))
    assert got is not None and got.kind is Kind.RESET_OK
    # Taken (even if the taker is then interrupted): nothing more will come, and a late reply
    # for the same request is dropped rather than delivered.
    assert d.settled((b"s", b"1"))
    for i, part in enumerate(token):
        d.feed(part, i < 3)
    assert d.pop((b"s", b"1")) is None


def test_outbox_finishes_a_half_sent_message_first() -> None:
    box, sent = Outbox(), []
    box.put([b"a1", b"a2", b"a3"])
    box.put([b"b1", b"b2"])
    calls = 0

    def interrupt_once() -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise KeyboardInterrupt

    def send(part: bytes, more: bool) -> bool:
        sent.append((part, more))
        return True

    with pytest.raises(KeyboardInterrupt):
        box.flush(send, interrupt_once)
    assert box.flush(send, lambda: None) == 0 and len(box) == 0
    assert sent == [
        (b"a1", True), (b"a2", True), (b"a3", False), (b"b1", True), (b"b2", False),
    ]  # fmt: skip
    full = Outbox()
    full.put([b"x", b"y"])
    assert full.flush(lambda part, more: False, lambda: None) == 1 and len(full) == 0


# --- what a person reads ---------------------------------------------------------------------


def test_turn_result_str_and_repr() -> None:
    stats = TurnStats(640, 612, 28, 24, CachePath.TEXT_PREFIX, None, 38.0, 1000.0, "w1")
    r = TurnResult(TurnEnd(24, FinishReason.STOP, reply_sha256("x"), stats), "x", 0, 41.25, 1100.0)
    assert str(r) == (
        "stop · 24 tokens · cached 612/640 prompt tokens · TTFT 41 ms (worker 38 ms)"
        " · 23 tok/s · worker w1 · text_prefix"
    )
    text = repr(r)
    assert text.startswith("TurnResult(reply='x', finish_reason='stop', ")
    for figure in ("cached_tokens=612", "prompt_tokens=640", "ttft_ms=38.0", "client_ttft_ms=41.2"):
        assert figure in text
    assert "TurnEnd(" not in text and "TurnStats(" not in text

    cold = TurnStats(10, 0, 10, 1, CachePath.COLD, ColdReason.RESET, 5.0, 0.0, "w0")
    long = "y" * 500
    r = TurnResult(TurnEnd(1, FinishReason.CANCELLED, reply_sha256(long), cold), long, 2, None)
    assert str(r) == (
        "cancelled · 1 tokens · cached 0/10 prompt tokens · TTFT 5 ms (worker) · worker w0"
        " · cold (reset) · dropped 2 old messages"
    )
    assert len(repr(r)) < 400 and "cold_reason='reset'" in repr(r)


README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_snippet(tiny_service: Harness, capsys: pytest.CaptureFixture[str]) -> None:
    """Run the README's "From Python" snippet against a test service: it prints the streamed
    reply, then one readable status line (not a dataclass repr), then ask()'s reply."""
    text = README.read_text(encoding="utf-8")
    m = re.search(r"From Python:\s*```python\n(.*?)```", text, re.S)
    assert m is not None, "the README has a From Python snippet"
    code = m.group(1).replace("tcp://127.0.0.1:5555", tiny_service.frontend)
    code = code.replace("max_tokens=64", "max_tokens=8")  # both turns fit the tiny context
    assert code.count(tiny_service.frontend) == 1 and code.count("max_tokens=8") == 2
    namespace: dict[str, object] = {}
    exec(compile(code, "README.md", "exec"), namespace)
    out = capsys.readouterr().out
    chat = namespace["chat"]
    assert isinstance(chat, Session)
    first, second = chat.history[2]["content"], chat.history[4]["content"]
    assert out.startswith(first + "\n") and out.endswith("\n" + second + "\n")
    status = out[len(first) + 1 : -len(second) - 2]
    assert "TurnResult(" not in status and "\n" not in status
    assert re.fullmatch(
        r"(stop|length) · \d+ tokens · cached 0/\d+ prompt tokens · TTFT \d+ ms"
        r" \(worker \d+ ms\)( · \d+ tok/s)? · worker w\d · cold \(new\)",
        status,
    ), status
