"""Both clients, one suite: every behaviour runs against the blocking and the asyncio driver.

The ``connect`` fixture makes a :class:`~kvroute.Client`, or an :class:`AsyncDriver`, which gives
the asyncio client the same blocking API by running it on an event loop in a thread (so several
test threads calling it are several tasks of one loop). Here, the protocol against the tiny
model, which emits random bytes; the same fixture runs test_client_scripted.py (replies a real
service never sends), test_client_model.py (the real model: history exactness, cancel) and the
driver-level checks of test_client_faults.py. The lifecycle machine itself is tested without
sockets in test_client_core.py.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from types import TracebackType
from typing import Any, Protocol, TypeVar

import msgpack
import pytest
from service_harness import Harness, start_harness

import kvroute.client.conversation as conversation
from kvroute import (
    AsyncClient,
    Client,
    ContextOverflow,
    KvrouteError,
    NotOwner,
    ProtocolError,
    ServiceUnavailable,
    SessionBusy,
    Timeout,
)
from kvroute.client import AsyncReplyStream, AsyncSession
from kvroute.engine.engine import Engine
from kvroute.proto import (
    CachePath,
    ColdReason,
    ErrorCode,
    FinishReason,
    TurnRequest,
)

pytestmark = pytest.mark.timeout(120)
TIMEOUT = 5.0  # client timeout in these tests: a broken service fails fast, never hangs
T = TypeVar("T")

# --- the asyncio client behind a blocking API ------------------------------------------------


class LoopThread:
    """An event loop running in a daemon thread; :meth:`run` awaits a coroutine there."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Callable[[], T]) -> T:
        """Run a plain function in the loop's thread (where the client's objects live)."""

        async def call() -> T:
            return fn()

        return self.run(call())

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


class AsyncStream:
    """An :class:`AsyncReplyStream` as a blocking iterator. Dropping it drops the real stream at
    once, in the loop's thread, as ``break`` out of ``async for`` would."""

    def __init__(self, loop: LoopThread, stream: AsyncReplyStream) -> None:
        self._loop = loop
        self._box = [stream]

    def __iter__(self) -> AsyncStream:
        return self

    def __next__(self) -> str:
        try:
            return self._loop.run(self._box[0].__anext__())
        except StopAsyncIteration:
            raise StopIteration from None

    def close(self) -> None:
        self._loop.run(self._box[0].aclose())

    def __del__(self) -> None:
        if not self._loop.loop.is_running():  # the test is over
            return
        if threading.current_thread() is self._loop.thread:
            # The cyclic GC can run this finalizer in the loop's own thread (the stream sits in
            # a raised exception's traceback cycle): waiting there for the loop would block it.
            self._box.clear()
        else:
            self._loop.call(self._box.clear)


class AsyncDriverSession:
    """An :class:`AsyncSession` with the blocking session's methods."""

    def __init__(self, loop: LoopThread, session: AsyncSession) -> None:
        self._loop = loop
        self._s = session

    id = property(lambda self: self._s.id)
    last = property(lambda self: self._s.last)
    dropped = property(lambda self: self._s.dropped)

    @property
    def history(self) -> list[dict[str, str]]:
        return self._s.history

    @history.setter
    def history(self, messages: list[dict[str, str]]) -> None:
        self._s.history = messages

    def send(self, text: str, *args: Any, **kwargs: Any) -> AsyncStream:
        return AsyncStream(self._loop, self._s.send(text, *args, **kwargs))

    def ask(self, text: str, *args: Any, **kwargs: Any) -> str:
        return self._loop.run(self._s.ask(text, *args, **kwargs))

    def reset(self, *, keep_history: bool = False) -> None:
        self._loop.run(self._s.reset(keep_history=keep_history))

    def close(self) -> None:
        self._loop.run(self._s.close())

    def cancel(self) -> bool:
        return self._loop.call(self._s.cancel)


class AsyncDriver:
    """An :class:`AsyncClient` with the blocking client's API (``connect`` for "async")."""

    def __init__(self, loop: LoopThread, url: str, *args: Any, **kwargs: Any) -> None:
        self._loop = loop
        self._c = loop.call(lambda: AsyncClient(url, *args, **kwargs))
        self.owner_token = self._c.owner_token

    def __enter__(self) -> AsyncDriver:
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._loop.run(self._c.close())

    def ping(self) -> float:
        return self._loop.run(self._c.ping())

    def session(self, *args: Any, **kwargs: Any) -> AsyncDriverSession:
        return AsyncDriverSession(
            self._loop, self._loop.call(lambda: self._c.session(*args, **kwargs))
        )


class Connect(Protocol):
    flavour: str

    def __call__(self, url: str, timeout: float = ..., **kwargs: Any) -> Any: ...


@pytest.fixture(params=["sync", "async"], name="connect")
def connect_fixture(request: pytest.FixtureRequest) -> Iterator[Connect]:
    """``connect``: makes a client of the parametrized flavour, ``with connect(url) as c``
    (other modules import it as ``connect_fixture``)."""
    if request.param == "sync":

        def sync(url: str, timeout: float = TIMEOUT, **kwargs: Any) -> Client:
            return Client(url, timeout, **kwargs)

        sync.flavour = "sync"  # type: ignore[attr-defined]
        yield sync  # type: ignore[misc]
        return
    loop = LoopThread()

    def aio(url: str, timeout: float = TIMEOUT, **kwargs: Any) -> AsyncDriver:
        return AsyncDriver(loop, url, timeout, **kwargs)

    aio.flavour = "async"  # type: ignore[attr-defined]
    try:
        yield aio  # type: ignore[misc]
    finally:
        gc.collect()  # streams of this test go now, while their loop runs
        loop.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- tiny model: the protocol -----------------------------------------------------------------


def test_pieces_join_to_the_reply_and_history(tiny_service: Harness, connect: Connect) -> None:
    with connect(tiny_service.frontend) as client:
        assert client.ping() < TIMEOUT
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
        assert last.client_ttft_ms is None or 0 < last.client_ttft_ms <= last.elapsed_ms
        assert chat.ask("again", max_tokens=4) == chat.history[-1]["content"]


def test_sessions_interleave_on_one_client(tiny_service: Harness, connect: Connect) -> None:
    with connect(tiny_service.frontend) as client:
        a, b = client.session(), client.session()
        ga, gb = a.send("first", max_tokens=20), b.send("second", max_tokens=20)
        got_a, got_b = [next(ga)], [next(gb)]  # both turns in flight on one socket
        client.ping()  # a reply for nobody's stream in between
        got_a += list(ga)
        got_b += list(gb)
        assert a.last is not None and b.last is not None
        assert "".join(got_a) == a.last.reply and "".join(got_b) == b.last.reply
        assert a.history[0]["content"] == "first" and b.history[0]["content"] == "second"


def test_callers_share_one_client(tiny_service: Harness, connect: Connect) -> None:
    """Threads on the blocking client; on the asyncio one, tasks of one loop (each thread's
    call is a task there)."""
    errors: list[BaseException] = []
    results: dict[int, list[str]] = {}

    with connect(tiny_service.frontend) as client:

        def chat(i: int) -> None:
            try:
                s = client.session()
                replies = ["".join(s.send(f"caller {i} turn {t}", max_tokens=16)) for t in range(3)]
                assert [m["content"] for m in s.history[1::2]] == replies
                results[i] = replies
            except BaseException as exc:  # reported below, with the thread's traceback
                errors.append(exc)

        threads = [threading.Thread(target=chat, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    assert not errors, errors
    assert len(results) == 6


def test_second_turn_stays_on_its_worker_and_reuses_cache(
    tiny_service: Harness, connect: Connect
) -> None:
    with connect(tiny_service.frontend) as client:
        s = client.session()
        list(s.send("one", max_tokens=8))
        first = s.last
        list(s.send("two", max_tokens=8))
        assert s.last is not None and first is not None
        assert s.last.worker == first.worker
        assert s.last.cached_tokens > 0


def test_reset_forgets_cache_and_history(tiny_service: Harness, connect: Connect) -> None:
    with connect(tiny_service.frontend) as client:
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


def test_seeded_history_is_sent(tiny_service: Harness, connect: Connect) -> None:
    past = [{"role": "user", "content": "earlier"}, {"role": "assistant", "content": "reply"}]
    with connect(tiny_service.frontend) as client:
        fresh, resumed = client.session(), client.session(history=past)
        list(fresh.send("now", max_tokens=2))
        list(resumed.send("now", max_tokens=2))
        assert fresh.last is not None and resumed.last is not None
        assert resumed.last.prompt_tokens > fresh.last.prompt_tokens
        assert resumed.history[:2] == past


def test_overflow_raises_with_numbers_and_changes_nothing(
    tiny_service: Harness, connect: Connect
) -> None:
    n_ctx = 256  # tiny model (tests/tiny_gguf.py)
    with connect(tiny_service.frontend) as client:
        s = client.session()
        list(s.send("hi", max_tokens=4))
        before = list(s.history)
        with pytest.raises(ContextOverflow) as err:
            list(s.send("hi again", max_tokens=250, on_overflow="raise"))
        e = err.value
        assert (e.max_tokens, e.n_ctx) == (250, n_ctx)
        assert e.prompt_tokens > 0 and e.excess == e.prompt_tokens + 250 - n_ctx > 0
        assert str(e.prompt_tokens) in str(e) and "256" in str(e)
        assert s.history == before


def test_drop_oldest_drops_whole_turns_until_it_fits(
    tiny_service: Harness, connect: Connect, caplog: pytest.LogCaptureFixture
) -> None:
    turns = []
    for i in range(6):
        turns += [
            {"role": "user", "content": f"question {i} " + "x" * 60},
            {"role": "assistant", "content": f"answer {i} " + "y" * 60},
        ]
    with connect(tiny_service.frontend) as client:
        s = client.session(system="sys", history=turns)
        with pytest.raises(ContextOverflow):
            list(s.send("now", max_tokens=64, on_overflow="raise"))
        assert s.dropped == 0 and len(s.history) == 13
        with caplog.at_level(logging.WARNING, logger="kvroute.client"):
            list(s.send("now", max_tokens=64))  # DEFAULT_ON_OVERFLOW is drop_oldest
        last = s.last
        assert last is not None and last.dropped > 0 and last.dropped % 2 == 0
        # Never silent: each drop is a WARNING with what went and the numbers that forced it.
        warned = [r for r in caplog.records if "exceed n_ctx 256" in r.getMessage()]
        assert warned and all(r.levelno == logging.WARNING for r in warned)
        assert f"({last.dropped} messages;" in warned[-1].getMessage()
        assert "max_tokens 64" in warned[-1].getMessage()
        assert s.dropped == last.dropped
        assert s.history[0] == {"role": "system", "content": "sys"}
        assert s.history[1]["content"].startswith(f"question {last.dropped // 2} ")
        assert len(s.history) == 13 - last.dropped + 2
        assert last.prompt_tokens + 64 <= 256


def test_drop_oldest_gives_up_when_nothing_is_left_to_drop(
    tiny_service: Harness, connect: Connect
) -> None:
    with connect(tiny_service.frontend) as client:
        s = client.session(system="sys")
        with pytest.raises(ContextOverflow):
            list(s.send("hi", max_tokens=255, on_overflow="drop_oldest"))
        assert s.history == [{"role": "system", "content": "sys"}]


def test_session_busy_at_once(tiny_service: Harness, connect: Connect) -> None:
    with connect(tiny_service.frontend) as client:
        s = client.session()
        first = s.send("one", max_tokens=8)
        next(first)
        t0 = time.monotonic()
        with pytest.raises(SessionBusy) as err:
            next(s.send("two"))
        assert err.value.session_id == s.id and s.id in str(err.value)
        with pytest.raises(SessionBusy):
            s.reset()
        with pytest.raises(SessionBusy):
            s.ask("two")
        assert time.monotonic() - t0 < TIMEOUT / 2  # not after waiting out the timeout
        list(first)
        list(s.send("two", max_tokens=2))  # free again once the first turn ended


def test_another_client_is_not_the_owner(tiny_service: Harness, connect: Connect) -> None:
    url = tiny_service.frontend
    with connect(url) as one, connect(url) as two:
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
    with connect(url, owner_token=one.owner_token) as resumed:
        again = resumed.session(session_id=mine.id, history=mine.history)
        list(again.send("back again", max_tokens=3))
        assert again.last is not None and again.last.path == CachePath.TEXT_PREFIX


def test_no_worker_is_service_unavailable(tiny_engine: Engine, connect: Connect) -> None:
    h = start_harness(tiny_engine, 0)
    try:
        with connect(h.frontend) as client:
            s = client.session()
            with pytest.raises(ServiceUnavailable) as err:
                list(s.send("anyone?"))
            assert err.value.code == ErrorCode.NO_WORKER
            assert s.history == []
    finally:
        h.close()


def test_dead_broker_times_out(connect: Connect) -> None:
    url = f"tcp://127.0.0.1:{free_port()}"
    with connect(url, timeout=0.3) as client:
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
    tiny_service: Harness, connect: Connect, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The client validates what it sends, so forge a body the worker must reject.
    def forged(messages: object, params: TurnRequest) -> tuple[TurnRequest, bytes]:
        return params, msgpack.packb({"x": 1})

    monkeypatch.setattr(conversation, "_as_request", forged)
    with connect(tiny_service.frontend) as client:
        s = client.session()
        with pytest.raises(ProtocolError) as err:
            list(s.send("hello"))
        assert err.value.remote and err.value.code == ErrorCode.BAD_BODY
        assert "messages" in err.value.message


def test_bad_arguments_raise_value_error_before_sending(
    tiny_service: Harness, connect: Connect
) -> None:
    with connect(tiny_service.frontend) as client:
        s = client.session()
        for kwargs in ({"temperature": -1.0}, {"temperature": float("nan")}, {"top_p": 0.0}):
            with pytest.raises(ValueError):
                s.send("x", **kwargs)
        with pytest.raises(ValueError):
            s.send("x", max_tokens=0)
        with pytest.raises(ValueError):
            s.send("x", on_overflow="truncate")
        with pytest.raises(ValueError):
            client.session(session_id="")
        with pytest.raises(ValueError):
            client.session(history=[{"role": "robot", "content": "beep"}])
    with pytest.raises(KvrouteError):
        list(s.send("after close"))
    client.close()  # idempotent


def test_bad_url_is_a_value_error_and_leaks_no_socket(connect: Connect) -> None:
    """A malformed URL used to leave an open socket whose context blocked at collection."""
    with pytest.raises(ValueError, match=r"bad address .not-an-address.: no port"):
        connect("not-an-address")
    gc.collect()  # would hang (pytest-timeout) if a socket were left open in its context


def test_import_kvroute_stays_light() -> None:
    code = (
        "import sys, kvroute; assert 'zmq' not in sys.modules; "
        "from kvroute import Client, AsyncClient, ContextOverflow, Timeout; "
        "assert 'numpy' not in sys.modules, 'the client must not pull in numpy'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)
