"""The asyncio client: a thin driver of :mod:`~kvroute.client.core`'s machines, with the same
API as :mod:`kvroute.client.sync` but ``async for`` and ``await``.

Use a client from one event loop; any number of tasks may drive its sessions, a session one
request at a time (another raises ``SessionBusy`` at once). A stream left with ``break`` frees
its session at once: the dropped stream sends CANCEL, and the session's next request first awaits
that turn's end (keeping its partial reply); ``await stream.aclose()`` (or
``contextlib.aclosing``) awaits it on the spot. ``asyncio.CancelledError`` is an interruption
like any other exception (see :mod:`~kvroute.client.core`). :meth:`AsyncSession.cancel` is a
plain method; from another thread use ``loop.call_soon_threadsafe(session.cancel)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import TracebackType

from kvroute.proto import Fleet

from .actions import Done, Machine, Phase, Receive, Yield
from .aio_transport import AsyncTransport
from .api import (
    DEFAULT_MAX_TOKENS,
    DEFAULT_ON_OVERFLOW,
    ClientBase,
    SessionBase,
    StreamBase,
    advance,
    perform_quietly,
)
from .conversation import OnOverflow
from .core import PingMachine
from .errors import KvrouteError
from .queries import IndexMachine, LookupMachine
from .status import StatusMachine


async def drive(t: AsyncTransport, m: Machine) -> Yield | Done:
    """Run ``m`` until it yields a piece or is done, awaiting replies."""
    try:
        while isinstance(act := advance(t, m), Receive):
            m.on_reply(await t.recv(act.key, act.waiting_for))
        return act
    except BaseException as exc:
        perform_quietly(t, m.fail(exc))
        raise


class AsyncReplyStream(StreamBase):
    """The reply to one :meth:`AsyncSession.send`: ``async for piece in stream``.

    Nothing is sent until iteration starts. ``break`` (the stream dropped) cancels the turn and
    frees the session at once; its end is awaited, and the partial reply kept, by the session's
    next request, or on the spot by :meth:`aclose`. An exception raised while iterating
    (``asyncio.CancelledError`` included) leaves the history unchanged. A stream dropped without
    being iterated logs a warning (and a ``ResourceWarning``).
    """

    _t: AsyncTransport

    def __aiter__(self) -> AsyncReplyStream:
        return self

    async def __anext__(self) -> str:
        if self._m.phase is not Phase.DONE:
            act = await drive(self._t, self._m)
            if isinstance(act, Yield):
                return act.text
        raise StopAsyncIteration

    async def aclose(self) -> None:
        """Stop reading: cancel the turn if it is running, await its end and keep the partial
        reply (as the worker committed it). A no-op once the stream is done."""
        if self._m.close():
            try:
                await drive(self._t, self._m)
            except KvrouteError as exc:
                self._close_failed(exc)


class AsyncSession(SessionBase[AsyncTransport, AsyncReplyStream]):
    """One chat session over an :class:`AsyncClient`; attributes and rules in
    :class:`~kvroute.client.api.SessionBase`."""

    _stream = AsyncReplyStream

    async def ask(
        self,
        text: str,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        on_overflow: OnOverflow = DEFAULT_ON_OVERFLOW,
        stop: str | Sequence[str] | None = None,
    ) -> str:
        """Send a user message and return the whole reply; see :meth:`send`."""
        args = (max_tokens, temperature, top_p, top_k, seed, on_overflow, stop)
        return "".join([piece async for piece in self.send(text, *args)])

    async def reset(self, *, keep_history: bool = False) -> None:
        """Forget the worker's cache and (unless ``keep_history``) the history but the system
        prompt; the next turn is cold (reason ``reset``)."""
        await drive(self._t, self._core.reset(keep_history=keep_history))

    async def close(self) -> None:
        """Free the session on the service; the history is kept (a later send starts cold)."""
        await drive(self._t, self._core.close())


class AsyncClient(ClientBase[AsyncTransport, AsyncSession]):
    """A connection to a kvroute broker for asyncio; an async context manager. Arguments and
    errors as :class:`~kvroute.client.api.ClientBase`; concurrency in the module docstring."""

    _transport = AsyncTransport
    _session = AsyncSession

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the socket and context (idempotent); this client's sessions stop working."""
        self._t.close()

    async def ping(self) -> float:
        """Round-trip time to the broker in seconds; raises Timeout without a PONG."""
        m = PingMachine(self._t.ids.next())
        await drive(self._t, m)
        return m.rtt

    async def status(self) -> Fleet:
        """The fleet view, answered by the broker (see :meth:`kvroute.Client.status`); raises
        Timeout without an answer."""
        m = StatusMachine(self._t.ids.next())
        await drive(self._t, m)
        assert m.fleet is not None, "a STATUS that returns has its answer"
        return m.fleet

    async def lookup(self, digest: bytes) -> str | None:
        """The session of this client's identity that the broker's transcript index records
        for ``digest`` (16..32 bytes), or None; see :mod:`kvroute.proto.transcripts`.

        Raises ValueError for a bad digest; Timeout without an answer.
        """
        m = LookupMachine(self._t.ids.next(), digest, self._owner)
        await drive(self._t, m)
        return m.session_id

    async def index(self, session_id: str, digest: bytes) -> None:
        """Record in the broker's transcript index that session ``session_id`` holds the
        transcript ``digest`` (as this client received it).

        Raises ValueError for a bad session id or digest; NotOwner if another client identity
        owns the session; Timeout without an answer.
        """
        m = IndexMachine(self._t.ids.next(), session_id, digest, self._owner)
        await drive(self._t, m)
