"""The blocking client against a served tiny model and the real model.

The tiny model emits random bytes, which is enough for the protocol; history exactness (turns 2+
take the text-prefix path) is checked on the real model. Replies a real service never sends
(sequence gaps, bad hashes, every ERROR code) are scripted in test_client_async.py, for both
clients at once.
"""

from __future__ import annotations

import itertools
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import msgpack
import pytest
from service_harness import Harness, start_harness

import kvroute.client.core as client_core
from kvroute import (
    AsyncClient,
    Client,
    ContextOverflow,
    KvrouteError,
    NotOwner,
    ProtocolError,
    ServiceUnavailable,
    SessionBusy,
    SessionLost,
    Timeout,
)
from kvroute.engine.engine import Engine
from kvroute.proto import (
    CachePath,
    ColdReason,
    ErrorCode,
    FinishReason,
    TurnRequest,
)

TIMEOUT = 5.0  # client timeout in these tests: a broken service fails fast, never hangs

# --- helpers -----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def real_service(engine: Engine) -> Iterator[Harness]:
    """One worker serving the real model (the engine loads once per test session)."""
    h = start_harness(engine, 1)
    yield h
    h.close()


# --- tiny model: the protocol -----------------------------------------------------------------


def test_pieces_join_to_the_reply_and_history(tiny_service: Harness) -> None:
    with Client(tiny_service.frontend, timeout=TIMEOUT) as client:
        chat = client.session(system="Be brief.")
        pieces = list(chat.send("hello", max_tokens=12))
        assert all(pieces), "no empty pieces are yielded"
        last = chat.last
        assert last is not None and last.reply == "".join(pieces)
        assert chat.history == [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "hello"},
            {"role": "assistant", "content": last.reply},
        ]
        assert last.worker in ("w0", "w1")
        assert last.path == CachePath.COLD and last.cold_reason == ColdReason.NEW
        assert last.finish_reason in (FinishReason.STOP, FinishReason.LENGTH)
        assert last.generated_tokens <= 12
        assert last.prompt_tokens == last.cached_tokens + last.prefill_tokens
        assert client.ping() < TIMEOUT


def test_sessions_interleave_on_one_client(tiny_service: Harness) -> None:
    with Client(tiny_service.frontend, timeout=TIMEOUT) as client:
        a, b = client.session(), client.session()
        ga, gb = a.send("first", max_tokens=20), b.send("second", max_tokens=20)
        got_a, got_b = [next(ga)], [next(gb)]  # both turns in flight on one socket
        client.ping()  # a reply for nobody's stream in between
        got_a += list(ga)
        got_b += list(gb)
        assert a.last is not None and b.last is not None
        assert "".join(got_a) == a.last.reply and "".join(got_b) == b.last.reply
        assert a.history[0]["content"] == "first" and b.history[0]["content"] == "second"


def test_threads_share_one_client(tiny_service: Harness) -> None:
    errors: list[BaseException] = []
    results: dict[int, list[str]] = {}

    with Client(tiny_service.frontend, timeout=TIMEOUT) as client:

        def chat(i: int) -> None:
            try:
                s = client.session()
                replies = ["".join(s.send(f"thread {i} turn {t}", max_tokens=16)) for t in range(3)]
                assert [m["content"] for m in s.history[1::2]] == replies
                results[i] = replies
            except BaseException as exc:  # reported below, with the thread's traceback
                errors.append(exc)

        threads = [threading.Thread(target=chat, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
    assert not errors, errors
    assert len(results) == 6


def test_second_turn_stays_on_its_worker_and_reuses_cache(tiny_service: Harness) -> None:
    with Client(tiny_service.frontend, timeout=TIMEOUT) as client:
        s = client.session()
        list(s.send("one", max_tokens=8))
        first = s.last
        list(s.send("two", max_tokens=8))
        assert s.last is not None and first is not None
        assert s.last.worker == first.worker
        assert s.last.cached_tokens > 0


def test_reset_forgets_cache_and_history(tiny_service: Harness) -> None:
    with Client(tiny_service.frontend, timeout=TIMEOUT) as client:
        s = client.session(system="sys")
        list(s.send("one", max_tokens=4))
        s.reset(keep_history=True)
        assert len(s.history) == 3
        list(s.send("two", max_tokens=4))
        assert s.last is not None and s.last.cold_reason == ColdReason.RESET
        s.reset()
        assert s.history == [{"role": "system", "content": "sys"}]
        s.close()  # frees the session on the service; the object stays usable
        list(s.send("three", max_tokens=4))
        assert len(s.history) == 3


def test_seeded_history_is_sent(tiny_service: Harness) -> None:
    past = [{"role": "user", "content": "earlier"}, {"role": "assistant", "content": "reply"}]
    with Client(tiny_service.frontend, timeout=TIMEOUT) as client:
        fresh, resumed = client.session(), client.session(history=past)
        list(fresh.send("now", max_tokens=2))
        list(resumed.send("now", max_tokens=2))
        assert fresh.last is not None and resumed.last is not None
        assert resumed.last.prompt_tokens > fresh.last.prompt_tokens
        assert resumed.history[:2] == past


def test_overflow_raises_with_numbers_and_changes_nothing(tiny_service: Harness) -> None:
    n_ctx = 256  # tiny model (tests/tiny_gguf.py)
    with Client(tiny_service.frontend, timeout=TIMEOUT) as client:
        s = client.session()
        list(s.send("hi", max_tokens=4))
        before = list(s.history)
        with pytest.raises(ContextOverflow) as err:
            list(s.send("hi again", max_tokens=250))
        e = err.value
        assert (e.max_tokens, e.n_ctx) == (250, n_ctx)
        assert e.prompt_tokens > 0 and e.excess == e.prompt_tokens + 250 - n_ctx > 0
        assert str(e.prompt_tokens) in str(e) and "256" in str(e)
        assert s.history == before


def test_drop_oldest_drops_whole_turns_until_it_fits(tiny_service: Harness) -> None:
    turns = []
    for i in range(6):
        turns += [
            {"role": "user", "content": f"question {i} " + "x" * 60},
            {"role": "assistant", "content": f"answer {i} " + "y" * 60},
        ]
    with Client(tiny_service.frontend, timeout=TIMEOUT) as client:
        s = client.session(system="sys", history=turns)
        with pytest.raises(ContextOverflow):
            list(s.send("now", max_tokens=64))
        assert s.dropped == 0 and len(s.history) == 13
        list(s.send("now", max_tokens=64, on_overflow="drop_oldest"))
        last = s.last
        assert last is not None and last.dropped > 0 and last.dropped % 2 == 0
        assert s.dropped == last.dropped
        assert s.history[0] == {"role": "system", "content": "sys"}
        assert s.history[1]["content"].startswith(f"question {last.dropped // 2} ")
        assert len(s.history) == 13 - last.dropped + 2
        assert last.prompt_tokens + 64 <= 256


def test_drop_oldest_gives_up_when_nothing_is_left_to_drop(tiny_service: Harness) -> None:
    with Client(tiny_service.frontend, timeout=TIMEOUT) as client:
        s = client.session(system="sys")
        with pytest.raises(ContextOverflow):
            list(s.send("hi", max_tokens=255, on_overflow="drop_oldest"))
        assert s.history == [{"role": "system", "content": "sys"}]


def test_session_busy_locally(tiny_service: Harness) -> None:
    with Client(tiny_service.frontend, timeout=TIMEOUT) as client:
        s = client.session()
        first = s.send("one", max_tokens=8)
        next(first)
        with pytest.raises(SessionBusy) as err:
            next(s.send("two"))
        assert err.value.session_id == s.id and s.id in str(err.value)
        with pytest.raises(SessionBusy):
            s.reset()
        list(first)
        list(s.send("two", max_tokens=2))  # free again once the first turn ended


def test_another_client_is_not_the_owner(tiny_service: Harness) -> None:
    url = tiny_service.frontend
    with Client(url, timeout=TIMEOUT) as one, Client(url, timeout=TIMEOUT) as two:
        mine = one.session()
        list(mine.send("hello", max_tokens=3))
        theirs = two.session(session_id=mine.id, history=mine.history)
        for act in (lambda: list(theirs.send("mine now")), theirs.reset, theirs.close):
            with pytest.raises(NotOwner):
                act()
        assert len(theirs.history) == 2  # unchanged, like the session on the service
        list(mine.send("still mine", max_tokens=3))
        assert mine.last is not None and mine.last.path == CachePath.TEXT_PREFIX
    assert one.owner_token != two.owner_token
    # The owner token resumes the sessions from another client (one connection at a time).
    with Client(url, timeout=TIMEOUT, owner_token=one.owner_token) as resumed:
        again = resumed.session(session_id=mine.id, history=mine.history)
        list(again.send("back again", max_tokens=3))
        assert again.last is not None and again.last.path == CachePath.TEXT_PREFIX


def test_no_worker_is_service_unavailable(tiny_engine: Engine) -> None:
    h = start_harness(tiny_engine, 0)
    try:
        with Client(h.frontend, timeout=TIMEOUT) as client:
            s = client.session()
            with pytest.raises(ServiceUnavailable) as err:
                list(s.send("anyone?"))
            assert err.value.code == ErrorCode.NO_WORKER
            assert s.history == []
    finally:
        h.close()


def test_dead_broker_times_out() -> None:
    url = f"tcp://127.0.0.1:{free_port()}"
    with Client(url, timeout=0.3) as client:
        s = client.session()
        t0 = time.monotonic()
        with pytest.raises(Timeout) as err:
            list(s.send("hello"))
        assert 0.25 < time.monotonic() - t0 < 2
        assert isinstance(err.value, TimeoutError) and err.value.seconds == 0.3
        assert url in str(err.value)
        with pytest.raises(Timeout):
            s.reset()
        with pytest.raises(Timeout):
            client.ping()
        assert s.history == []


def test_server_error_for_a_bad_request(
    tiny_service: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The client validates what it sends, so forge a body the worker must reject.
    def forged(messages: object, params: TurnRequest) -> tuple[TurnRequest, bytes]:
        return params, msgpack.packb({"x": 1})

    monkeypatch.setattr(client_core, "_as_request", forged)
    with Client(tiny_service.frontend, timeout=TIMEOUT) as client:
        s = client.session()
        with pytest.raises(ProtocolError) as err:
            list(s.send("hello"))
        assert err.value.remote and err.value.code == ErrorCode.BAD_BODY
        assert "messages" in err.value.message


def test_bad_arguments_raise_value_error_before_sending(tiny_service: Harness) -> None:
    with Client(tiny_service.frontend, timeout=TIMEOUT) as client:
        s = client.session()
        for kwargs in ({"temperature": -1.0}, {"top_p": 0.0}, {"max_tokens": 0}):
            with pytest.raises(ValueError):
                s.send("x", **kwargs)  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            s.send("x", on_overflow="truncate")  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            client.session(session_id="")
        with pytest.raises(ValueError):
            client.session(history=[{"role": "robot", "content": "beep"}])
    with pytest.raises(KvrouteError):
        list(s.send("after close"))
    client.close()  # idempotent


# --- real model ---------------------------------------------------------------------------------


@pytest.mark.model
def test_history_as_streamed_keeps_the_text_prefix_path(real_service: Harness) -> None:
    with Client(real_service.frontend, timeout=30) as client:
        s = client.session(system="You are a helpful assistant.")
        prompts = ["What is the capital of France?", "And of Italy?", "Thanks!"]
        seen = []
        for text in prompts:
            reply = "".join(s.send(text, max_tokens=12))
            assert s.last is not None and reply == s.last.reply
            seen.append(s.last)
        assert seen[0].path == CachePath.COLD
        for prev, cur in itertools.pairwise(seen):
            assert cur.path == CachePath.TEXT_PREFIX, cur
            assert cur.cached_tokens >= prev.prompt_tokens  # the whole previous prompt reused
            assert cur.worker == prev.worker


@pytest.mark.model
@pytest.mark.parametrize("how", ["in_loop", "other_thread", "break"])
def test_cancel_keeps_the_partial_reply(real_service: Harness, how: str) -> None:
    with Client(real_service.frontend, timeout=30) as client:
        s = client.session()
        pieces: list[str] = []
        timer = threading.Timer(0.4, s.cancel) if how == "other_thread" else None
        if timer:
            timer.start()
        for piece in s.send("Write a long story about a dragon.", max_tokens=200):
            pieces.append(piece)
            if len(pieces) == 3 and how == "in_loop":
                assert s.cancel()
            if len(pieces) == 3 and how == "break":
                break
        last = s.last
        assert last is not None and last.finish_reason == FinishReason.CANCELLED
        assert 3 <= last.generated_tokens < 200
        if how == "break":  # the worker may have streamed more than we read before CANCEL
            assert last.reply.startswith("".join(pieces))
        else:
            assert last.reply == "".join(pieces)
        assert s.history[-1] == {"role": "assistant", "content": last.reply}
        assert not s.cancel()  # nothing in flight
        list(s.send("Go on.", max_tokens=4))  # the session is free at once (no BUSY)
        assert s.last is not None and s.last.path == CachePath.TEXT_PREFIX


@pytest.mark.model
def test_service_not_owner_for_a_second_client_on_the_session(real_service: Harness) -> None:
    with Client(real_service.frontend, timeout=30) as one, Client(real_service.frontend) as two:
        a = one.session()
        b = two.session(session_id=a.id)  # the same session from another client
        stream = a.send("Count to twenty.", max_tokens=40)
        next(stream)
        with pytest.raises(NotOwner):  # not SessionBusy: a stranger learns nothing
            list(b.send("Me too."))
        assert b.history == []
        stream.close()  # cancels and waits for END


@pytest.mark.model
def test_session_lost_mid_stream_then_resend_is_cold(engine: Engine) -> None:
    h = start_harness(engine, 2)
    try:
        with Client(h.frontend, timeout=30) as client:
            s = client.session()
            list(s.send("Hi.", max_tokens=2))
            assert s.last is not None
            owner = s.last.worker
            history = list(s.history)
            with pytest.raises(SessionLost) as err:
                for i, _ in enumerate(s.send("Tell me a long story.", max_tokens=200)):
                    if i == 1:
                        h.stop_worker(owner)
            assert err.value.worker == owner
            assert s.history == history  # the partial reply was not kept
            list(s.send("Tell me a long story.", max_tokens=4))
            assert s.last.worker != owner
            assert s.last.path == CachePath.COLD
            assert s.last.cold_reason == ColdReason.WORKER_LOST
    finally:
        h.close()


def test_import_kvroute_stays_light() -> None:
    code = (
        "import sys, kvroute; assert 'zmq' not in sys.modules; "
        "from kvroute import Client, AsyncClient, ContextOverflow, Timeout; "
        "assert 'numpy' not in sys.modules, 'the client must not pull in numpy'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)


@pytest.mark.parametrize("cls", [Client, AsyncClient])
def test_bad_url_is_a_value_error_and_leaks_no_socket(cls: type) -> None:
    """A malformed URL used to leave an open socket whose context blocked at collection."""
    import gc

    with pytest.raises(ValueError, match="cannot connect"):
        cls("not-an-address")
    gc.collect()  # would hang (pytest-timeout) if a socket were left open in its context
