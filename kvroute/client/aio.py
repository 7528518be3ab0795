"""The asyncio client: :class:`AsyncClient` and :class:`AsyncSession`, the same API as
:mod:`kvroute.client.sync` with ``async for`` and ``await``.

Receiving follows the rule for ``zmq.asyncio`` (DESIGN §3): a pending ``recv`` is never
cancelled, because a cancelled receive can lose a message. One task at a time awaits ``poll``
(cancelling a poll loses nothing) and then receives with ``NOBLOCK`` for everyone, filing each
message under its request; the other tasks wait on an event. Every wait is bounded by
``timeout``.

Concurrency: use a client from one event loop; any number of tasks may drive its sessions. A
session runs one request at a time: a second one waits for the first to end (up to ``timeout``)
and then raises :class:`~kvroute.client.errors.SessionBusy`. Waiting, rather than failing at once
as the blocking client does, matters here because a stream left with ``break`` is closed by the
event loop a moment later (``contextlib.aclosing`` closes it at once). :meth:`AsyncSession.cancel`
is a plain method; from another thread use ``loop.call_soon_threadsafe(session.cancel)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from types import TracebackType

import zmq
import zmq.asyncio

from kvroute.proto import EMPTY_BODY, Kind, Reply, TurnEnd, request_frames

from .core import (
    DEFAULT_LINGER,
    DEFAULT_MAX_TOKENS,
    DEFAULT_TIMEOUT,
    Attempt,
    Conversation,
    Demux,
    Key,
    OnOverflow,
    RequestIds,
    TurnStream,
    check_ack,
)
from .errors import ContextOverflow, KvrouteError, SessionBusy, Timeout
from .result import TurnResult
from .transport import configure_dealer

logger = logging.getLogger(__name__)

_DRAIN_BATCH = 1024


class _AsyncTransport:
    """A ``zmq.asyncio`` DEALER shared by the tasks of one loop; replies routed per request."""

    def __init__(self, url: str, timeout: float, linger: float) -> None:
        self.url, self.timeout = url, timeout
        self.ids = RequestIds()
        self.closed = False
        self._demux = Demux()
        self._reading = False  # a task is polling the socket for everyone
        self._arrived: asyncio.Event | None = None  # set after each read; made in the loop
        self._ctx = zmq.asyncio.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        configure_dealer(self._sock, url, linger)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._sock.close()
        self._ctx.term()
        self._notify()

    def open(self, key: Key) -> None:
        self._demux.open(key)

    def discard(self, key: Key) -> None:
        self._demux.close(key)

    def send(self, frames: list[bytes]) -> None:
        """Send without blocking (a plain call: usable from callbacks and sync code)."""
        if self.closed:
            raise KvrouteError("client is closed")
        try:
            self._sock.send_multipart(frames, flags=zmq.NOBLOCK).result()
        except zmq.Again:
            # The send queue towards a broker that never took it is full: it is gone, and the
            # waiting caller gets Timeout.
            logger.warning("send queue to %s is full; dropped a message", self.url)

    def send_quietly(self, frames: list[bytes]) -> None:
        with contextlib.suppress(KvrouteError):
            self.send(frames)

    async def recv(self, key: Key, waiting_for: str) -> Reply:
        """The next reply for ``key``; raises Timeout after ``timeout`` seconds of silence."""
        deadline = time.monotonic() + self.timeout
        while True:
            reply = self._demux.pop(key)
            if reply is not None:
                return reply
            if self.closed:
                raise KvrouteError("client is closed")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise Timeout(self.timeout, waiting_for, self.url)
            if self._reading:
                if self._arrived is None:
                    self._arrived = asyncio.Event()
                # Cancelling this wait is harmless: it is an Event, not a socket receive.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._arrived.wait(), remaining)
                continue
            self._reading = True
            try:
                if await self._sock.poll(remaining * 1000, zmq.POLLIN):
                    for _ in range(_DRAIN_BATCH):
                        try:  # NOBLOCK: the future is already done; nothing is left pending
                            frames = self._sock.recv_multipart(flags=zmq.NOBLOCK).result()
                        except zmq.Again:
                            break
                        self._demux.dispatch(frames)
            finally:
                self._reading = False
                self._notify()

    def _notify(self) -> None:
        if self._arrived is not None:
            self._arrived.set()
            self._arrived = None


class AsyncClient:
    """A connection to a kvroute broker for asyncio; an async context manager.

    Parameters
    ----------
    url
        The broker's frontend address, e.g. ``"tcp://127.0.0.1:5555"``.
    timeout
        Seconds to wait for each reply frame before raising
        :class:`~kvroute.client.errors.Timeout`.
    linger
        Seconds unsent frames may delay :meth:`close`.

    Options after ``timeout`` are keyword-only (new ones, e.g. CURVE keys, will not break
    callers). See the module docstring for concurrency.
    """

    def __init__(
        self, url: str, timeout: float = DEFAULT_TIMEOUT, *, linger: float = DEFAULT_LINGER
    ) -> None:
        if not timeout > 0:
            raise ValueError("timeout must be positive")
        self.url: str = url
        self.timeout: float = timeout
        self._t = _AsyncTransport(url, timeout, linger)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the socket and context (idempotent); this client's sessions stop working."""
        self._t.close()

    def session(
        self,
        session_id: str | None = None,
        system: str | None = None,
        history: Iterable[Mapping[str, str]] | None = None,
    ) -> AsyncSession:
        """A chat session over this client; arguments as :meth:`kvroute.Client.session`."""
        return AsyncSession(self._t, Conversation(session_id, system, history))

    async def ping(self) -> float:
        """Round-trip time to the broker in seconds; raises Timeout without a PONG."""
        t, rid = self._t, self._t.ids.next()
        key = (b"", rid)
        t0 = time.perf_counter()
        t.open(key)
        try:
            t.send(request_frames(Kind.PING, b"", rid))
            check_ack(await t.recv(key, "PONG"), Kind.PONG, "")
        finally:
            t.discard(key)
        return time.perf_counter() - t0


class AsyncSession:
    """One chat session over an :class:`AsyncClient`; see :class:`kvroute.client.sync.Session`
    for the attributes (``id``, ``history``, ``last``, ``dropped``) and the semantics."""

    def __init__(self, transport: _AsyncTransport, conversation: Conversation) -> None:
        self._t = transport
        self._conv = conversation
        self._busy = False
        self._freed: asyncio.Event | None = None
        self._cancel: list[bytes] | None = None  # CANCEL of the TURN in flight

    @property
    def id(self) -> str:
        """The session id."""
        return self._conv.id

    @property
    def history(self) -> list[dict[str, str]]:
        """The messages sent with every turn (editable between turns)."""
        return self._conv.history

    @history.setter
    def history(self, messages: list[dict[str, str]]) -> None:
        self._conv.history = messages

    @property
    def last(self) -> TurnResult | None:
        """Result of the last finished turn."""
        return self._conv.last

    @property
    def dropped(self) -> int:
        """Messages dropped so far by ``on_overflow="drop_oldest"``."""
        return self._conv.dropped

    def send(
        self,
        text: str,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        on_overflow: OnOverflow = "raise",
    ) -> AsyncIterator[str]:
        """Send a user message; ``async for`` over the reply's text pieces.

        Same arguments, history rules and errors as :meth:`kvroute.client.sync.Session.send`;
        bad arguments raise ValueError at the call.
        """
        attempt = self._conv.attempt(
            text,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed,
            on_overflow=on_overflow,
        )
        return self._stream(attempt)

    def cancel(self) -> bool:
        """Stop the turn in flight (it ends with ``finish_reason`` cancelled); False if none."""
        frames = self._cancel
        if frames is None:
            return False
        self._t.send_quietly(frames)
        return True

    async def reset(self, *, keep_history: bool = False) -> None:
        """Forget the worker's cache and (unless ``keep_history``) the history but the system
        prompt; the next turn is cold (reason ``reset``)."""
        await self._request(Kind.RESET, Kind.RESET_OK)
        if not keep_history:
            self._conv.forget()

    async def close(self) -> None:
        """Free the session on the service; the history is kept (a later send starts cold)."""
        await self._request(Kind.CLOSE, Kind.CLOSE_OK)

    # --- internals --------------------------------------------------------------------------

    async def _claim(self) -> None:
        deadline = time.monotonic() + self._t.timeout
        while self._busy:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise SessionBusy(self.id)
            if self._freed is None:
                self._freed = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._freed.wait(), remaining)
        self._busy = True

    def _release(self) -> None:
        self._busy, self._cancel = False, None
        if self._freed is not None:
            self._freed.set()
            self._freed = None

    async def _request(self, kind: Kind, ok: Kind) -> None:
        await self._claim()
        t, sid = self._t, self._conv.key
        key = (sid, t.ids.next())
        try:
            t.open(key)
            t.send(request_frames(kind, sid, key[1]))
            check_ack(await t.recv(key, f"{ok.name} reply"), ok, self.id)
        finally:
            t.discard(key)
            self._release()

    async def _stream(self, attempt: Attempt) -> AsyncIterator[str]:
        await self._claim()
        try:
            attempt.refresh(self._conv.history)  # the turn we may have waited for changed it
            while True:
                try:
                    # aclosing: leaving this generator must close (cancel, drain) the turn now,
                    # not whenever the loop finalizes the inner generator.
                    async with contextlib.aclosing(self._turn(attempt)) as turn:
                        async for piece in turn:
                            yield piece
                    return
                except ContextOverflow as exc:
                    if not attempt.shrink(exc):
                        raise
        finally:
            self._release()

    async def _turn(self, attempt: Attempt) -> AsyncIterator[str]:
        t, sid = self._t, self._conv.key
        rid = t.ids.next()
        key = (sid, rid)
        stream = TurnStream(self.id)
        cancel = request_frames(Kind.CANCEL, sid, rid, EMPTY_BODY)
        t0 = time.perf_counter()
        ttft: float | None = None
        t.open(key)
        try:
            t.send(request_frames(Kind.TURN, sid, rid, attempt.body))
            self._cancel = cancel
            while True:
                out = stream.feed(await t.recv(key, "TURN reply"))
                if isinstance(out, TurnEnd):
                    elapsed = (time.perf_counter() - t0) * 1e3
                    self._conv.commit(attempt, out, stream.text, ttft, elapsed)
                    return
                if out:
                    if ttft is None:
                        ttft = (time.perf_counter() - t0) * 1e3
                    yield out
        except Timeout:
            t.send_quietly(cancel)
            raise
        except BaseException as exc:  # GeneratorExit (break), CancelledError, client checks
            if not stream.done:
                healthy = not isinstance(exc, KvrouteError)
                await self._drain(key, stream, attempt, cancel, t0, healthy=healthy)
            raise
        finally:
            self._cancel = None
            t.discard(key)

    async def _drain(
        self,
        key: Key,
        stream: TurnStream,
        attempt: Attempt,
        cancel: list[bytes],
        t0: float,
        *,
        healthy: bool,
    ) -> None:
        """Cancel an abandoned turn and await its end (see the sync ``Session._drain``)."""
        try:
            self._t.send(cancel)
            while not stream.done:
                reply = await self._t.recv(key, "END after CANCEL")
                if not healthy:
                    stream.done = reply.kind is not Kind.TOKEN
                    continue
                out = stream.feed(reply)
                if isinstance(out, TurnEnd):
                    elapsed = (time.perf_counter() - t0) * 1e3
                    self._conv.commit(attempt, out, stream.text, None, elapsed)
        except KvrouteError as exc:
            logger.warning("session %s: abandoned turn did not end cleanly: %s", self.id, exc)
