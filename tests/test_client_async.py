"""The asyncio client: same behaviour as the blocking one, and the same replies on the real model.

Each test runs its own event loop with ``asyncio.run`` (no plugin needed) under a hard
``asyncio.wait_for`` bound, on top of pytest-timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Awaitable, Callable, Iterator

import pytest
import zmq
from service_harness import Harness, start_harness
from test_client import free_port

from kvroute import (
    AsyncClient,
    Client,
    ContextOverflow,
    KvrouteError,
    LimitReached,
    NotOwner,
    ProtocolError,
    ServiceUnavailable,
    SessionBusy,
    SessionLost,
    Timeout,
)
from kvroute.engine.engine import Engine
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
TIMEOUT = 5.0  # client timeout: a broken service fails fast, never hangs


def run(coro: Awaitable[None], seconds: float = 30) -> None:
    asyncio.run(asyncio.wait_for(coro, seconds))  # type: ignore[arg-type]


async def collect(stream: object) -> list[str]:
    return [piece async for piece in stream]  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def real_service(engine: Engine) -> Iterator[Harness]:
    h = start_harness(engine, 1)
    yield h
    h.close()


# --- tiny model ---------------------------------------------------------------------------------


def test_stream_history_reset_ping(tiny_service: Harness) -> None:
    async def main() -> None:
        async with AsyncClient(tiny_service.frontend, timeout=TIMEOUT) as client:
            assert await client.ping() < TIMEOUT
            s = client.session(system="sys")
            pieces = await collect(s.send("hello", max_tokens=12))
            assert s.last is not None and s.last.reply == "".join(pieces)
            assert [m["role"] for m in s.history] == ["system", "user", "assistant"]
            await collect(s.send("again", max_tokens=4))
            assert s.last is not None and s.last.cached_tokens > 0
            await s.reset()
            assert len(s.history) == 1
            await collect(s.send("fresh", max_tokens=4))
            assert s.last.cold_reason == ColdReason.RESET
            await s.close()

    run(main())


def test_many_sessions_as_tasks(tiny_service: Harness) -> None:
    async def chat(client: AsyncClient, i: int) -> list[str]:
        s = client.session()
        replies = [
            "".join(await collect(s.send(f"task {i} turn {t}", max_tokens=16))) for t in range(3)
        ]
        assert [m["content"] for m in s.history[1::2]] == replies
        return replies

    async def main() -> None:
        async with AsyncClient(tiny_service.frontend, timeout=TIMEOUT) as client:
            results = await asyncio.gather(*(chat(client, i) for i in range(8)))
            assert len(results) == 8

    run(main())


def test_errors_with_their_numbers(tiny_service: Harness) -> None:
    async def main() -> None:
        async with AsyncClient(tiny_service.frontend, timeout=TIMEOUT) as client:
            s = client.session()
            with pytest.raises(ContextOverflow) as err:
                await collect(s.send("hi", max_tokens=250))
            assert (err.value.max_tokens, err.value.n_ctx) == (250, 256)
            assert s.history == []
            with pytest.raises(ValueError):
                s.send("x", temperature=float("nan"))
            hist = [{"role": "user", "content": "q" * 150}, {"role": "assistant", "content": "a"}]
            t = client.session(history=hist)
            await collect(t.send("now", max_tokens=100, on_overflow="drop_oldest"))
            assert t.dropped == 2 and t.last is not None and t.last.dropped == 2

    run(main())


def test_no_worker_and_dead_broker(tiny_engine: Engine) -> None:
    h = start_harness(tiny_engine, 0)

    async def main() -> None:
        async with AsyncClient(h.frontend, timeout=TIMEOUT) as client:
            with pytest.raises(ServiceUnavailable) as err:
                await collect(client.session().send("x"))
            assert err.value.code == ErrorCode.NO_WORKER
        async with AsyncClient(f"tcp://127.0.0.1:{free_port()}", timeout=0.3) as client:
            s = client.session()
            with pytest.raises(Timeout):
                await collect(s.send("x"))
            with pytest.raises(Timeout):
                await s.reset()
            with pytest.raises(Timeout):
                await client.ping()

    try:
        run(main())
    finally:
        h.close()


def test_concurrent_send_waits_then_busy(tiny_service: Harness) -> None:
    async def main() -> None:
        async with AsyncClient(tiny_service.frontend, timeout=0.5) as client:
            s = client.session()
            first = s.send("one", max_tokens=8)
            await first.__anext__()  # type: ignore[attr-defined]
            # A second request waits for the first to end; the first never resumes here.
            with pytest.raises(SessionBusy):
                await s.reset()
            await collect(first)
            await s.reset()  # free again

    run(main())


# --- fake broker: replies a real service never sends, for both clients ------------------------

Reply = tuple[Kind, bytes] | tuple[Kind, bytes, bytes, bytes]  # kind, body[, sid, rid]
Script = Callable[[Kind, int], list[Reply]]  # (request kind, TURNs seen so far) -> replies


class FakeBroker:
    """A ROUTER thread answering each client request with scripted replies."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.turns = 0
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
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


def tokens(*texts: str, start: int = 0) -> list[Reply]:
    return [(Kind.TOKEN, Token(start + i, t, (1,)).encode()) for i, t in enumerate(texts)]


Outcome = str | KvrouteError


def converse(flavour: str, url: str, steps: list[str]) -> tuple[list[Outcome], list[object]]:
    """Run ``steps`` on one session of a sync or async client: ``/ping``, ``/reset`` or a user
    message. Returns what each step gave (reply text or exception) and the final history."""
    out: list[Outcome] = []
    if flavour == "sync":
        with Client(url, timeout=TIMEOUT) as client:
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

    async def main() -> list[object]:
        async with AsyncClient(url, timeout=TIMEOUT) as client:
            a = client.session(session_id="shared")
            for step in steps:
                try:
                    if step == "/ping":
                        out.append(str(await client.ping() >= 0))
                    elif step == "/reset":
                        out.append(str(await a.reset()))
                    else:
                        out.append("".join(await collect(a.send(step))))
                except KvrouteError as exc:
                    out.append(exc)
            return list(a.history)

    history = asyncio.run(asyncio.wait_for(main(), 30))
    return out, history


FLAVOURS = pytest.mark.parametrize("flavour", ["sync", "async"])


@FLAVOURS
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
    fake: Callable[[Script], FakeBroker], flavour: str, code: ErrorCode, exc: type[KvrouteError]
) -> None:
    broker = fake(lambda kind, n: [(Kind.ERROR, error_body(code, "scripted"))])
    (err,), history = converse(flavour, broker.url, ["x"])
    assert isinstance(err, exc) and err.code == code  # type: ignore[attr-defined]
    assert "scripted" in str(err) and history == []


@FLAVOURS
def test_busy_and_session_lost(fake: Callable[[Script], FakeBroker], flavour: str) -> None:
    lost = LostBody("w9", LostReason.EXITED, True).encode()

    def script(kind: Kind, turns: int) -> list[Reply]:
        if kind is Kind.RESET or turns == 1:
            return [(Kind.BUSY, EMPTY_BODY)]
        return [*tokens("par", "tial"), (Kind.SESSION_LOST, lost)]

    broker = fake(script)
    (busy, busy_reset, gone), history = converse(flavour, broker.url, ["x", "/reset", "y"])
    assert isinstance(busy, SessionBusy) and isinstance(busy_reset, SessionBusy)
    assert "'shared' is busy" in str(busy)
    assert isinstance(gone, SessionLost)
    assert (gone.worker, gone.reason, gone.retryable) == ("w9", "exited", True)
    assert history == []  # the partial reply was not kept


@FLAVOURS
def test_sequence_gap_and_bad_hash(fake: Callable[[Script], FakeBroker], flavour: str) -> None:
    def script(kind: Kind, turns: int) -> list[Reply]:
        if turns == 1:  # TOKEN 0, TOKEN 2 (1 lost), END
            return [*tokens("a"), *tokens("c", start=2), (Kind.END, end_body("ac", 3))]
        if turns == 2:  # END with the hash of another text
            return [*tokens("a", "b"), (Kind.END, end_body("ab", 2, reply_sha256("xx")))]
        return [*tokens("o", "k"), (Kind.END, end_body("ok", 2))]

    broker = fake(script)
    (gap, bad_hash, ok), history = converse(flavour, broker.url, ["x", "x", "x"])
    assert isinstance(gap, ProtocolError) and not gap.remote and "seq 2, expected 1" in str(gap)
    assert isinstance(bad_hash, ProtocolError) and "hash mismatch" in str(bad_hash)
    assert ok == "ok" and len(history) == 2  # usable afterwards; failed turns left no trace


@FLAVOURS
def test_replies_for_other_requests_are_not_misrouted(
    fake: Callable[[Script], FakeBroker], flavour: str
) -> None:
    stray = (Kind.TOKEN, Token(0, "stray", ()).encode(), b"someone-else", b"99")

    def script(kind: Kind, turns: int) -> list[Reply]:
        if kind is Kind.PING:
            return [stray, (Kind.PONG, EMPTY_BODY)]
        return [stray, *tokens("o", "k"), stray, (Kind.END, end_body("ok", 2))]

    broker = fake(script)
    assert converse(flavour, broker.url, ["/ping", "x"])[0] == ["True", "ok"]


# --- real model ---------------------------------------------------------------------------------

PROMPTS = ["What is the capital of France?", "And of Spain?"]


@pytest.mark.model
def test_async_equals_sync(real_service: Harness) -> None:
    with Client(real_service.frontend, timeout=30) as client:
        s = client.session(system="You are brief.")
        sync_replies, sync_paths = [], []
        for p in PROMPTS:
            sync_replies.append("".join(s.send(p, max_tokens=10)))
            assert s.last is not None
            sync_paths.append(s.last.path)

    async def main() -> tuple[list[str], list[CachePath]]:
        async with AsyncClient(real_service.frontend, timeout=30) as client:
            a = client.session(system="You are brief.")
            replies, paths = [], []
            for p in PROMPTS:
                replies.append("".join(await collect(a.send(p, max_tokens=10))))
                assert a.last is not None
                paths.append(a.last.path)
            return replies, paths

    replies, paths = asyncio.run(asyncio.wait_for(main(), 30))
    assert replies == sync_replies and all(replies)
    assert paths == sync_paths == [CachePath.COLD, CachePath.TEXT_PREFIX]


@pytest.mark.model
def test_cancel_break_and_task_cancellation(real_service: Harness) -> None:
    async def main() -> None:
        async with AsyncClient(real_service.frontend, timeout=30) as client:
            s = client.session()
            pieces = []
            async for piece in s.send("Write a long poem about the sea.", max_tokens=200):
                pieces.append(piece)
                if len(pieces) == 3:
                    assert s.cancel()
            assert s.last is not None and s.last.finish_reason == FinishReason.CANCELLED
            assert s.last.reply == "".join(pieces) and s.last.generated_tokens < 200

            async for _ in s.send("Another one.", max_tokens=200):
                break  # the loop closes the stream a moment later; the next send waits for it
            await collect(s.send("Short now.", max_tokens=3))
            assert s.last.path == CachePath.TEXT_PREFIX

            async def consume() -> None:
                await collect(s.send("Write a long story about a brave knight.", max_tokens=200))

            task = asyncio.ensure_future(consume())
            await asyncio.sleep(0.3)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            assert s.last.finish_reason == FinishReason.CANCELLED, s.last  # drained, committed
            await collect(s.send("Done.", max_tokens=2))

    run(main(), 60)
