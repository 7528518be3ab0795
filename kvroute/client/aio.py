"""The asyncio client: :class:`AsyncClient` and :class:`AsyncSession`, the same API as
:mod:`kvroute.client.sync` with ``async for`` and ``await``.

The socket is :class:`~kvroute.client.aio_transport.AsyncTransport`'s, which receives for every
task without ever cancelling a pending ``recv``. Every wait is bounded by ``timeout``.

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

from kvroute.proto import EMPTY_BODY, Kind, TurnEnd, request_frames
from kvroute.proto.identity import KeyPair, KeyPath

from .aio_transport import AsyncTransport
from .core import (
    DEFAULT_LINGER,
    DEFAULT_MAX_TOKENS,
    DEFAULT_TIMEOUT,
    Attempt,
    Conversation,
    Key,
    OnOverflow,
    SessionView,
    TurnStream,
    check_ack,
)
from .errors import ContextOverflow, KvrouteError, SessionBusy, Timeout
from .transport import client_identity

logger = logging.getLogger(__name__)


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
    server_key
        The broker's public CURVE key: its certificate file (``server.key``) or z85 text. With
        ``key``, for a broker run with ``--curve-secret``. A broker that does not allow ``key``
        answers nothing at all: every request ends in :class:`~kvroute.client.errors.Timeout`.
    key
        This client's CURVE key pair: its secret certificate (``client.key_secret``) or
        ``(public, secret)`` z85 bytes. Under CURVE, sessions belong to this key: any client
        holding it may drive them, from any process.
    owner_token
        Without CURVE, the secret that owns the sessions this client creates (it is the
        connection's routing id); None makes a random one, readable as ``owner_token``. Pass a
        saved token to drive the same sessions from another process later, but to one connected
        client at a time: ZeroMQ ignores a second connection presenting the same routing id.
        Another client's request on a session gets :class:`~kvroute.client.errors.NotOwner`.

    Raises
    ------
    ValueError
        A bad timeout or owner token; ``KeyFileError`` (a ValueError) for an unusable key file,
        or only one of ``server_key`` and ``key``.

    Options after ``timeout`` are keyword-only (new ones, e.g. CURVE keys, will not break
    callers). See the module docstring for concurrency.
    """

    def __init__(
        self,
        url: str,
        timeout: float = DEFAULT_TIMEOUT,
        *,
        linger: float = DEFAULT_LINGER,
        server_key: KeyPath | bytes | None = None,
        key: KeyPath | KeyPair | None = None,
        owner_token: bytes | None = None,
    ) -> None:
        if not timeout > 0:
            raise ValueError("timeout must be positive")
        self.url: str = url
        self.timeout: float = timeout
        token, curve = client_identity(server_key, key, owner_token)
        self.owner_token: bytes = token
        self._t = AsyncTransport(url, timeout, linger, token, curve)

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


class AsyncSession(SessionView):
    """One chat session over an :class:`AsyncClient`; see :class:`kvroute.client.sync.Session`
    for the attributes (``id``, ``history``, ``last``, ``dropped``) and the semantics."""

    def __init__(self, transport: AsyncTransport, conversation: Conversation) -> None:
        self._t = transport
        self._conv = conversation
        self._busy = False
        self._freed: asyncio.Event | None = None
        self._cancel: list[bytes] | None = None  # CANCEL of the TURN in flight

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
