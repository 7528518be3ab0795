"""What the blocking and asyncio clients share: their public API but for the ``await``s.

:class:`ClientBase`, :class:`SessionBase` and :class:`StreamBase` hold the arguments, attributes
and docstrings of :class:`~kvroute.Client` / :class:`~kvroute.AsyncClient`, their sessions and
reply streams; :func:`advance` is the part of the driver loop that does not wait. Each driver
(:mod:`~kvroute.client.sync`, :mod:`~kvroute.client.aio`) adds how it waits for a reply.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Generic, TypeVar

from kvroute.proto.endpoint import parse_endpoint
from kvroute.proto.identity import CurveClient, KeyPair, KeyPath, new_owner_token

from .actions import Cleanup, Discard, Done, Machine, Phase, Raise, Receive, Send, Yield
from .conversation import Conversation, OnOverflow
from .core import RequestMachine, SessionCore
from .result import TurnResult
from .wire import WireBase, client_identity

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT: float = 30.0
"""Seconds a client waits for each reply frame (the CLI takes its default from here)."""
DEFAULT_MAX_TOKENS: int = 256
"""Default ``max_tokens`` of a turn, for the library and every command."""
DEFAULT_ON_OVERFLOW: OnOverflow = "drop_oldest"
"""Default overflow policy, for the library and every command: a conversation that outgrows the
context drops its oldest turns and goes on. Not silent: ``TurnResult.dropped`` (and its text)
says how many messages went; pass ``"raise"`` to get :class:`ContextOverflow` instead."""
DEFAULT_LINGER: float = 0.1
"""Seconds unsent frames may delay ``close()`` (ZeroMQ's default, forever, would hang it)."""

WireT = TypeVar("WireT", bound=WireBase)
SessionT = TypeVar("SessionT", bound="SessionBase[Any, Any]")
StreamT = TypeVar("StreamT", bound="StreamBase")


def advance(t: WireBase, m: Machine) -> Receive | Yield | Done:
    """Run ``m`` until it must wait for a reply, yields a piece or is done, performing what
    needs no waiting on the way; raises what the machine says to raise."""
    if m.phase is Phase.NEW:
        m.start()
        t.fault("claim")
    while True:
        act = m.next_action()
        if isinstance(act, Send):
            if act.key is not None:
                t.open(act.key)
            t.send(act.frames)
        elif isinstance(act, Discard):
            t.discard(act.key)
        elif isinstance(act, Raise):
            raise act.error
        elif isinstance(act, Receive):
            if not (act.draining and t.settled(act.key)):
                return act
            m.on_reply(None)
        else:
            t.fault("yield" if isinstance(act, Yield) else "commit")
            return act


def perform_quietly(t: WireBase, actions: Cleanup) -> None:
    """Perform a machine's cleanup: it never waits, and a closed client is not an error."""
    for act in actions:
        if isinstance(act, Send):
            t.send_quietly(act.frames)
        else:
            t.discard(act.key)


class ClientBase(Generic[WireT, SessionT]):
    """A connection to a kvroute broker.

    Parameters
    ----------
    url
        The broker's frontend address, e.g. ``"tcp://127.0.0.1:5555"``.
    timeout
        Seconds to wait for each reply frame (first token, next token, acknowledgement) before
        raising :class:`~kvroute.client.errors.Timeout`: a dead broker never hangs a caller.
    linger
        Seconds unsent frames may delay ``close()``.
    server_key
        The broker's public CURVE key: its certificate file (``server.key``) or z85 text. With
        ``key``, for a broker run with ``--curve-secret``. A broker that does not allow ``key``
        answers nothing at all: every request ends in :class:`~kvroute.client.errors.Timeout`.
    key
        This client's CURVE key pair: its secret certificate (``client.key_secret``) or
        ``(public, secret)`` z85 bytes. Under CURVE, sessions belong to this key: any client
        holding it may drive them, from any process.
    owner_token
        Without CURVE, the secret that owns the sessions this client creates; None makes a
        random one, readable as ``owner_token`` (it is then the connection's routing id). A
        token given here is presented on every request instead (the protocol's owner frame), so
        any number of clients given the same token, in any processes, drive the same sessions at
        once: several gateways fronting one broker share sessions this way, and a saved token
        resumes them later. Another client's request on a session gets
        :class:`~kvroute.client.errors.NotOwner`. Under CURVE the key owns sessions instead.

    Raises
    ------
    ValueError
        A bad URL, timeout or owner token; ``KeyFileError`` (a ValueError) for an unusable key
        file, or only one of ``server_key`` and ``key``.

    Options after ``timeout`` are keyword-only, so new ones can be added without breaking
    callers.
    """

    _transport: Callable[[str, float, float, bytes, CurveClient | None], WireT]
    _session: Callable[[WireT, Conversation, bytes], SessionT]

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
        url = parse_endpoint(url)  # the same one-line error as every kvroute command
        self.url: str = url
        self.timeout: float = timeout
        token, curve = client_identity(server_key, key, owner_token)
        self.owner_token: bytes = token
        # A token given without CURVE travels in an owner frame, and the routing id is random:
        # ZeroMQ would refuse a second connection presenting the same routing id.
        self._owner: bytes = token if owner_token is not None and curve is None else b""
        routing = new_owner_token() if self._owner else token
        self._t: WireT = self._transport(url, timeout, linger, routing, curve)

    def session(
        self,
        session_id: str | None = None,
        system: str | None = None,
        history: Iterable[Mapping[str, str]] | None = None,
    ) -> SessionT:
        """A chat session over this client (nothing is sent until its first request).

        Parameters
        ----------
        session_id
            Resume a session by id (1..64 bytes of UTF-8); None for a new random one.
        system
            A system prompt (becomes the first history message).
        history
            Earlier ``{"role", "content"}`` messages to start from, e.g. a saved chat.

        Raises
        ------
        ValueError
            A bad session id or history entry.
        """
        return self._session(self._t, Conversation(session_id, system, history), self._owner)


class SessionBase(Generic[WireT, StreamT]):
    """One chat session: its history, and the turns streamed over its client.

    Get one from the client's ``session()``. Attributes: ``id`` (str), ``history`` (list of
    ``{"role", "content"}``; sent with every turn, editable between turns), ``last``
    (:class:`~kvroute.client.result.TurnResult` of the last finished turn, or None), ``dropped``
    (messages dropped so far by ``on_overflow="drop_oldest"``).

    A session runs one request at a time: another one while it runs raises
    :class:`~kvroute.client.errors.SessionBusy` at once. The history follows the rule in
    :mod:`~kvroute.client.core`.
    """

    _stream: Callable[[Any, RequestMachine], StreamT]

    def __init__(self, transport: WireT, conversation: Conversation, owner: bytes = b"") -> None:
        self._t = transport
        self._core = SessionCore(conversation, transport.ids, owner=owner)

    @property
    def id(self) -> str:
        """The session id."""
        return self._core.conv.id

    @property
    def history(self) -> list[dict[str, str]]:
        """The messages sent with every turn (editable between turns)."""
        return self._core.conv.history

    @history.setter
    def history(self, messages: list[dict[str, str]]) -> None:
        self._core.conv.history = messages

    @property
    def last(self) -> TurnResult | None:
        """Result of the last finished turn (None before the first)."""
        return self._core.conv.last

    @property
    def dropped(self) -> int:
        """Messages dropped so far by ``on_overflow="drop_oldest"``."""
        return self._core.conv.dropped

    def send(
        self,
        text: str,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        on_overflow: OnOverflow = DEFAULT_ON_OVERFLOW,
        stop: str | Sequence[str] | None = None,
    ) -> StreamT:
        """Send a user message; iterate over the returned stream (``for`` / ``async for``) for
        the reply's text pieces.

        Nothing is sent until iteration starts (``ask`` does it all). When the turn ends, the
        user message and the reply exactly as streamed are appended to ``history`` and ``last``
        is set, also for a cancelled turn (the worker kept the partial reply). Leaving the loop
        early cancels the turn and keeps its partial reply (see the stream).

        Parameters
        ----------
        text
            The user message.
        max_tokens, temperature, top_p, top_k, seed
            Sampling: ``temperature`` 0 is greedy; ``top_k`` 0 and ``top_p`` 1 disable them.
        on_overflow
            ``"drop_oldest"`` (default): drop the oldest non-system turns until the turn fits,
            then retry; ``last.dropped`` and ``dropped`` say how many messages went.
            ``"raise"``: :class:`~kvroute.client.errors.ContextOverflow`.
        stop
            Up to 4 stop strings (or one): the worker ends the reply before the first
            occurrence of any of them (``finish_reason`` stop); the match is never streamed.

        Raises
        ------
        ValueError
            At the call, for arguments the protocol rejects.
        ContextOverflow, SessionBusy, SessionLost, ServiceUnavailable, ProtocolError, Timeout
            While iterating; the history is unchanged (so for any exception, e.g.
            KeyboardInterrupt or asyncio.CancelledError: the turn is cancelled and the session
            stays usable).
        """
        attempt = self._core.conv.attempt(
            text,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed,
            on_overflow=on_overflow,
            stop=stop,
        )
        return self._stream(self, self._core.turn(attempt))

    def cancel(self) -> bool:
        """Stop the turn in flight; it ends with ``finish_reason`` cancelled and is kept.

        Lock-free: call it from the loop over ``send``, from another thread (the blocking
        client; asyncio: ``loop.call_soon_threadsafe``) or from a signal handler. Returns False
        if no turn is running.
        """
        cancel = self._core.cancel()
        if cancel is None:
            return False
        perform_quietly(self._t, cancel)
        return True


class StreamBase:
    """The reply to one ``send()``: the driver's stream iterates its :class:`RequestMachine`.

    The session records the machine, not the stream, as the holder of the session: a stream the
    caller drops is collected at once, and its finalizer lets go of the turn (:meth:`_dropped`).
    """

    def __init__(self, session: SessionBase[Any, Any], machine: RequestMachine) -> None:
        self._session_id = session.id
        self._t: WireBase = session._t
        self._m = machine

    def _dropped(self) -> None:
        """A running stream was dropped: cancel its turn without waiting (a finalizer cannot
        await); the session's next request waits for its END and keeps the partial reply."""
        perform_quietly(self._t, self._m.abandon())

    def __del__(self) -> None:
        try:
            phase = self._m.phase
            if phase is Phase.NEW:
                text = self._m.attempt.text[:40] if self._m.attempt is not None else ""
                msg = (
                    f"kvroute: the reply stream of send({text!r}) on session {self._session_id}"
                    " was dropped without being iterated: nothing was sent"
                    " (iterate it, or call ask() for the whole reply)"
                )
                logger.warning("%s", msg)
                warnings.warn(msg, ResourceWarning, stacklevel=1, source=self)
            elif phase is not Phase.DONE:
                self._dropped()
        except Exception:  # a finalizer must not raise; at interpreter exit anything may be gone
            logger.debug("reply stream finalizer failed", exc_info=True)

    def _close_failed(self, exc: Exception) -> None:
        logger.warning("session %s: the closed turn did not end cleanly: %s", self._session_id, exc)
