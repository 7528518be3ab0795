"""Many sessions of one client streaming at once from a broker that answers every request at
once, while their consumers do other work between pieces: every turn must complete with all its
tokens. This is the load under which a transport that misses a wake-up stalls: ``ZMQ_FD`` is
edge-triggered, and any send, receive or ``EVENTS`` read may take the edge of messages that
arrive meanwhile, so a reader that then sleeps on the FD hears of them only at its Timeout."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Callable

import pytest
from test_client_scripted import FakeBroker, Script, ScriptedReply, end_body, fake, tokens

from kvroute import AsyncClient, Client
from kvroute.client import AsyncSession
from kvroute.proto import Kind

pytestmark = pytest.mark.timeout(120)
__all__ = ["fake"]  # the fixture, imported for this module's tests

SESSIONS = 8
TOKENS = 256
ROUNDS = 4
REPEATS = 4  # clients, one after the other
REPLY_TIMEOUT = 3.0  # seconds of silence before Timeout: a missed wake-up costs this much
PIECES = [f"p{i} " for i in range(TOKENS)]
TEXT = "".join(PIECES)


def answer_everything(kind: Kind, turns: int) -> list[ScriptedReply]:
    """Each TURN gets its whole reply at once; nothing else is expected."""
    if kind is Kind.TURN:
        return [*tokens(*PIECES), (Kind.END, end_body(TEXT, TOKENS))]
    return []


async def converse_async(s: AsyncSession, rng: random.Random, gaps: list[float]) -> None:
    """ROUNDS streamed turns, doing something else after every piece, as a server relaying
    each piece to its own client would: awaiting, now and then long enough for others to read,
    and now and then working without yielding (replies arrive meanwhile, and the next task to
    run may send a TURN before the loop looks at the socket). Appends each turn's longest wait
    for a piece to ``gaps``."""
    await asyncio.sleep(rng.random() * 0.01)  # staggered TURNs: sent while others read
    for r in range(ROUNDS):
        n, gap = 0, 0.0
        t = time.monotonic()
        async for _piece in s.send(f"round {r}", max_tokens=TOKENS):
            gap = max(gap, time.monotonic() - t)
            n += 1
            await asyncio.sleep(0)
            x = rng.random()
            if x < 0.02:
                await asyncio.sleep(0.002)
            elif x < 0.07:
                time.sleep(0.001)  # blocks the loop, like encoding and writing a piece
            t = time.monotonic()
        assert n == TOKENS and s.last is not None and s.last.reply == TEXT
        gaps.append(gap)


def test_async_concurrent_streams_all_complete(fake: Callable[[Script], FakeBroker]) -> None:
    broker = fake(answer_everything)

    async def run(seed: int) -> list[float]:
        gaps: list[float] = []
        async with AsyncClient(broker.url, REPLY_TIMEOUT) as client:
            rngs = [random.Random(seed * SESSIONS + i) for i in range(SESSIONS)]
            # A Timeout in any task fails the test (gather raises it).
            await asyncio.gather(*(converse_async(client.session(), g, gaps) for g in rngs))
            assert not client._t._demux._entries, "a request was left open"
        return gaps

    for seed in range(REPEATS):  # fresh clients: a missed wake-up is a matter of timing
        gaps = asyncio.run(run(seed))
        assert len(gaps) == SESSIONS * ROUNDS
        # Replies were all queued at once: a wait of the order of the timeout means a reader
        # slept through them (and woke by luck of timer rounding rather than raising Timeout).
        assert max(gaps) < REPLY_TIMEOUT / 2, f"run {seed}: a piece took {max(gaps):.2f} s"
    assert broker.turns == REPEATS * SESSIONS * ROUNDS


def test_sync_concurrent_streams_all_complete(fake: Callable[[Script], FakeBroker]) -> None:
    """The same load on the blocking client, one thread per session."""
    broker = fake(answer_everything)
    counts: list[int] = []
    errors: list[BaseException] = []

    def converse(client: Client, seed: int) -> None:
        rng = random.Random(seed)
        s = client.session()
        try:
            for r in range(ROUNDS):
                n = 0
                for _piece in s.send(f"round {r}", max_tokens=TOKENS):
                    n += 1
                    if rng.random() < 0.02:
                        threading.Event().wait(0.002)
                assert s.last is not None and s.last.reply == TEXT
                counts.append(n)
        except BaseException as exc:  # reported below
            errors.append(exc)

    with Client(broker.url, REPLY_TIMEOUT) as client:
        threads = [
            threading.Thread(target=converse, args=(client, i), daemon=True)
            for i in range(SESSIONS)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(ROUNDS * REPLY_TIMEOUT * 4)
        assert not any(t.is_alive() for t in threads)
    assert not errors, errors
    assert counts == [TOKENS] * (SESSIONS * ROUNDS)
