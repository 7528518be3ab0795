"""Closed-loop simulated chat users against a kvroute service.

``concurrency`` users share the sessions to play: each takes the next session's
:class:`~kvroute.bench.workload.Script`, sends its turns one after another (the next turn only
after the previous reply ended, plus ``think_time``), closes the session, and takes the next
one until none is left. Warm-up sessions run first, as a separate phase, so their cold start
(page faults, first allocations, empty caches) never overlaps the measured window.

With ``compare_cold``, after each successful warm turn the user sends the same history and
message to a fresh session (``max_tokens`` 1: only the time to first token matters) and closes
it, so the probe's KV cache does not push measured sessions out of a worker's budget. The probe
runs on the service under the same load, which is what a user without cache reuse would see.

Why asyncio (:class:`~kvroute.AsyncClient`) rather than a thread per user: the bench client,
the broker (a thread of this very process under ``--serve``) and the workers share the
machine's cores. One event loop on one socket costs the least CPU per token and never makes the
broker thread wait for the GIL behind C user threads; and a piece's timestamp is taken as soon
as the loop has read it, not after a GIL switch interval (5 ms by default, comparable to the gap
between two tokens of a small model).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from kvroute.client import DEFAULT_TIMEOUT, AsyncClient, AsyncSession, KvrouteError

from .metrics import TurnRecord, classify_error
from .workload import Script

logger = logging.getLogger(__name__)

OnRecord = Callable[[TurnRecord], None]
"""Called with every record as it is finished (progress display)."""

PROBE_MAX_TOKENS = 1  # a cold probe only needs its first token


@dataclass
class RunConfig:
    """How the simulated users behave (the CLI takes its defaults from here).

    Attributes
    ----------
    url
        The broker's frontend address.
    concurrency
        Simulated users, each running one session at a time.
    max_tokens
        Reply length limit of every warm turn (greedy sampling).
    think_time
        Seconds a user waits between a reply and its next message.
    compare_cold
        Probe every warm turn's history in a fresh session (see the module docstring).
    timeout
        Client timeout per reply frame, seconds.
    server_key, key
        CURVE: the broker's public key (file or z85) and this load generator's secret
        certificate; both or neither.
    """

    url: str
    concurrency: int = 4
    max_tokens: int = 64
    think_time: float = 0.0
    compare_cold: bool = False
    timeout: float = DEFAULT_TIMEOUT
    server_key: str | None = None
    key: str | None = None


@dataclass
class RunResult:
    """All records of a run (warm-up included, flagged) and its wall-clock extent."""

    records: list[TurnRecord]
    started_at: float  # time.time() at the start
    wall_s: float  # warm-up included


class Runner:
    """Drives the users of one run over one :class:`~kvroute.AsyncClient`.

    Parameters
    ----------
    config
        User behaviour and the service address.
    on_record
        Called with each finished record, from the event loop's thread.
    """

    def __init__(self, config: RunConfig, on_record: OnRecord | None = None) -> None:
        if config.concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.config = config
        self.records: list[TurnRecord] = []
        self._on_record = on_record
        self._t0 = time.perf_counter()

    async def run(self, scripts: Sequence[Script], warmup: Sequence[Script] = ()) -> RunResult:
        """Play the warm-up scripts, then the measured ones; return every record.

        Measured sessions are numbered ``0 .. len(scripts) - 1``, warm-up sessions after them.
        Failed requests are recorded, not raised: a load test reports errors, it does not stop
        at the first one.
        """
        started = time.time()
        self._t0 = time.perf_counter()
        cfg = self.config
        async with AsyncClient(
            cfg.url, timeout=cfg.timeout, server_key=cfg.server_key, key=cfg.key
        ) as client:
            n = len(scripts)
            if warmup:
                logger.info("warm-up: %d sessions", len(warmup))
                await self._phase(client, [(n + i, s) for i, s in enumerate(warmup)], True)
            logger.info("measuring: %d sessions", n)
            await self._phase(client, list(enumerate(scripts)), False)
        return RunResult(self.records, started, self._now())

    def _now(self) -> float:
        return time.perf_counter() - self._t0

    async def _phase(
        self, client: AsyncClient, sessions: list[tuple[int, Script]], warmup: bool
    ) -> None:
        todo = iter(sessions)  # shared by the users: one event loop, so next() needs no lock
        users = min(self.config.concurrency, len(sessions))
        await asyncio.gather(*(self._user(client, todo, warmup) for _ in range(users)))

    async def _user(
        self, client: AsyncClient, todo: Iterator[tuple[int, Script]], warmup: bool
    ) -> None:
        for index, script in todo:
            await self._session(client, index, script, warmup)

    async def _session(self, client: AsyncClient, index: int, script: Script, warmup: bool) -> None:
        cfg = self.config
        session = client.session(system=script.system)
        try:
            for turn, text in enumerate(script.turns, start=1):
                if turn > 1 and cfg.think_time > 0:
                    await asyncio.sleep(cfg.think_time)
                history = list(session.history)  # what this turn is sent with, for the probe
                rec = await self._request(session, text, cfg.max_tokens, index, turn, warmup)
                if rec.ok and cfg.compare_cold and not warmup:
                    await self._probe(client, history, text, index, turn)
        finally:
            await self._close(session)

    async def _probe(
        self, client: AsyncClient, history: list[dict[str, str]], text: str, index: int, turn: int
    ) -> None:
        probe = client.session(history=history)
        try:
            await self._request(probe, text, PROBE_MAX_TOKENS, index, turn, False, probe=True)
        finally:
            await self._close(probe)

    async def _request(
        self,
        session: AsyncSession,
        text: str,
        max_tokens: int,
        index: int,
        turn: int,
        warmup: bool,
        *,
        probe: bool = False,
    ) -> TurnRecord:
        rec = TurnRecord(session=index, turn=turn, probe=probe, warmup=warmup)
        rec.start = self._now()
        try:
            async for _piece in session.send(text, max_tokens=max_tokens):
                rec.pieces.append(self._now())
        except KvrouteError as exc:
            rec.end = self._now()
            rec.error, rec.error_detail = classify_error(exc), str(exc)
            logger.debug("session %d turn %d: %s", index, turn, exc)
        else:
            rec.end = self._now()
            last = session.last
            assert last is not None, "a turn that ended without error sets session.last"
            rec.worker = last.worker
            rec.prompt_tokens, rec.cached_tokens = last.prompt_tokens, last.cached_tokens
            rec.prefill_tokens, rec.generated_tokens = last.prefill_tokens, last.generated_tokens
            rec.path = str(last.path)
            rec.cold_reason = None if last.cold_reason is None else str(last.cold_reason)
            rec.finish_reason = str(last.finish_reason)
            rec.worker_ttft_ms = last.ttft_ms
        self.records.append(rec)
        if self._on_record is not None:
            self._on_record(rec)
        return rec

    @staticmethod
    async def _close(session: AsyncSession) -> None:
        """Free the session's cache on the service; a failure here only costs memory there."""
        try:
            await session.close()
        except KvrouteError as exc:
            logger.warning("could not close session %s: %s", session.id, exc)


def run(
    config: RunConfig,
    scripts: Sequence[Script],
    warmup: Sequence[Script] = (),
    on_record: OnRecord | None = None,
) -> RunResult:
    """Run a load test to completion in a new event loop (see :meth:`Runner.run`)."""
    return asyncio.run(Runner(config, on_record).run(scripts, warmup))
