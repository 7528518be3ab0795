"""Both clients on the real model: the history as streamed keeps the text-prefix path, cancel
keeps the partial reply, a lost worker and a second owner are typed errors."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
from collections.abc import AsyncIterator, Iterator

import pytest
from service_harness import REAL_MODEL_HEARTBEAT, Harness, start_harness
from test_client import Connect, connect_fixture  # noqa: F401  (the fixture)

from kvroute import AsyncClient, Client, NotOwner, SessionLost
from kvroute.engine.engine import Engine
from kvroute.proto import CachePath, ColdReason, FinishReason

pytestmark = [pytest.mark.model, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def real_service(engine: Engine) -> Iterator[Harness]:
    """One worker serving the real model (the engine loads once per test session)."""
    h = start_harness(engine, 1, heartbeat=REAL_MODEL_HEARTBEAT)
    yield h
    h.close()


def test_history_as_streamed_keeps_the_text_prefix_path(
    real_service: Harness, connect: Connect
) -> None:
    with connect(real_service.frontend, timeout=30) as client:
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


def test_both_clients_give_the_same_replies(real_service: Harness) -> None:
    prompts = ["What is the capital of France?", "And of Spain?"]
    with Client(real_service.frontend, timeout=30) as client:
        s = client.session(system="You are brief.")
        sync_replies = [s.ask(p, max_tokens=10) for p in prompts]
        assert s.last is not None and s.last.path == CachePath.TEXT_PREFIX

    async def main() -> list[str]:
        async with AsyncClient(real_service.frontend, timeout=30) as client:
            a = client.session(system="You are brief.")
            replies = [await a.ask(p, max_tokens=10) for p in prompts]
            assert a.last is not None and a.last.path == CachePath.TEXT_PREFIX
            return replies

    assert asyncio.run(asyncio.wait_for(main(), 30)) == sync_replies and all(sync_replies)


@pytest.mark.parametrize("how", ["in_loop", "other_thread", "break"])
def test_cancel_keeps_the_partial_reply(real_service: Harness, connect: Connect, how: str) -> None:
    with connect(real_service.frontend, timeout=30) as client:
        s = client.session()
        pieces: list[str] = []
        # Started after the third piece, not on a timer: a loaded machine may take longer than
        # any fixed delay to prefill.
        canceller = threading.Thread(target=s.cancel)
        for piece in s.send("Write a long story about a dragon.", max_tokens=200):
            pieces.append(piece)
            if len(pieces) == 3 and how == "in_loop":
                assert s.cancel()
            if len(pieces) == 3 and how == "other_thread":
                canceller.start()
            if len(pieces) == 3 and how == "break":
                break
        if how == "other_thread":
            canceller.join(timeout=5)
        if how == "break" and connect.flavour == "async":
            # A dropped asyncio stream cannot wait: the next request commits the partial turn.
            list(s.send("Go on.", max_tokens=4))
            assert s.history[-4]["content"] == "Write a long story about a dragon."
            assert s.history[-3]["content"].startswith("".join(pieces))
            assert s.last is not None and s.last.path == CachePath.TEXT_PREFIX
            return
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


def test_service_not_owner_for_a_second_client_on_the_session(
    real_service: Harness, connect: Connect
) -> None:
    with connect(real_service.frontend, timeout=30) as one, connect(real_service.frontend) as two:
        a = one.session()
        b = two.session(session_id=a.id)  # the same session from another client
        stream = a.send("Count to twenty.", max_tokens=40)
        next(stream)
        with pytest.raises(NotOwner):  # not SessionBusy: a stranger learns nothing
            list(b.send("Me too."))
        assert b.history == []
        stream.close()  # cancels and waits for END
        assert a.last is not None and a.last.finish_reason == FinishReason.CANCELLED


def test_session_lost_mid_stream_then_resend_is_cold(engine: Engine, connect: Connect) -> None:
    h = start_harness(engine, 2, heartbeat=REAL_MODEL_HEARTBEAT)
    try:
        with connect(h.frontend, timeout=30) as client:
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


def test_task_cancellation_keeps_nothing_and_frees_the_session(real_service: Harness) -> None:
    """asyncio only: a task cancelled mid-turn is an interruption (the blocking client's
    counterpart, KeyboardInterrupt, is swept in test_client_faults.py)."""

    async def consume(stream: AsyncIterator[str]) -> None:
        async for _ in stream:
            pass

    async def main() -> None:
        async with AsyncClient(real_service.frontend, timeout=30) as client:
            s = client.session()
            await s.ask("Hi.", max_tokens=2)
            before, last = list(s.history), s.last
            task = asyncio.ensure_future(
                consume(s.send("Write a long story about a brave knight.", max_tokens=200))
            )
            await asyncio.sleep(0.3)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            assert s.history == before and s.last is last  # interrupted: nothing kept
            await s.ask("Done.", max_tokens=2)  # not BUSY: the turn was settled first
            assert s.history[: len(before)] == before and len(s.history) == len(before) + 2

    asyncio.run(asyncio.wait_for(main(), 60))
