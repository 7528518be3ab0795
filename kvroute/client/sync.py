"""The blocking client: :class:`Client` owns one ZeroMQ context and DEALER; each
:class:`Session` streams its turns over it.

Thread-safety: a :class:`Client` may be shared by threads, each driving its own sessions (the
socket is shared under a lock, see :mod:`~kvroute.client.transport`; replies are routed to the
request awaiting them). A :class:`Session` is driven by one thread at a time: a second request
on it while one runs raises :class:`~kvroute.client.errors.SessionBusy` at once. The exception is
:meth:`Session.cancel`, which takes no blocking lock and may be called from any thread, from a
signal handler, or from inside the loop over :meth:`Session.send`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from types import TracebackType

from kvroute.proto import EMPTY_BODY, Kind, TurnEnd, request_frames
from kvroute.proto.identity import KeyPair, KeyPath

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
from .transport import Transport, client_identity

logger = logging.getLogger(__name__)


class Client:
    """A connection to a kvroute broker; a context manager.

    Parameters
    ----------
    url
        The broker's frontend address, e.g. ``"tcp://127.0.0.1:5555"``.
    timeout
        Seconds to wait for each reply frame (first token, next token, acknowledgement) before
        raising :class:`~kvroute.client.errors.Timeout`: a dead broker never hangs a caller.
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

    Options after ``timeout`` are keyword-only, so new ones (e.g. CURVE keys) can be added
    without breaking callers. Thread-safe: see the module docstring.
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
        self._t = Transport(url, timeout, linger, token, curve)

    def __enter__(self) -> Client:
        return self

    def __exit__(
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
    ) -> Session:
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
        return Session(self._t, Conversation(session_id, system, history))

    def ping(self) -> float:
        """Round-trip time to the broker in seconds (checks the broker, not the workers).

        Raises
        ------
        Timeout
            No PONG within ``timeout``.
        """
        t, rid = self._t, self._t.ids.next()
        key = (b"", rid)
        t0 = time.perf_counter()
        t.open(key)
        try:
            t.send(request_frames(Kind.PING, b"", rid))
            check_ack(t.recv(key, "PONG"), Kind.PONG, "")
        finally:
            t.discard(key)
        return time.perf_counter() - t0


class _Active:
    """The TURN a session is running, as :meth:`Session.cancel` sees it."""

    __slots__ = ("cancel_requested", "frames", "sent")

    def __init__(self, frames: list[bytes]) -> None:
        self.frames = frames  # the CANCEL to send
        self.sent = False
        self.cancel_requested = False


class Session(SessionView):
    """One chat session: its history, and the turns streamed over its :class:`Client`.

    Get one from :meth:`Client.session`. Attributes: ``id`` (str), ``history`` (list of
    ``{"role", "content"}``; sent with every turn, editable between turns), ``last``
    (:class:`~kvroute.client.result.TurnResult` of the last finished turn, or None), ``dropped``
    (messages dropped so far by ``on_overflow="drop_oldest"``).
    """

    def __init__(self, transport: Transport, conversation: Conversation) -> None:
        self._t = transport
        self._conv = conversation
        self._claim = threading.Lock()  # held while a request of this session is running
        self._active: _Active | None = None

    def send(
        self,
        text: str,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        on_overflow: OnOverflow = "raise",
    ) -> Iterator[str]:
        """Send a user message; iterate over the reply's text pieces as they stream.

        Nothing is sent until iteration starts. When the turn ends, the user message and the
        reply exactly as streamed are appended to ``history`` and ``last`` is set, also for a
        cancelled turn (the worker kept the partial reply). Leaving the loop early (``break``,
        an exception) cancels the turn and waits for its end, so the session is free again.

        Parameters
        ----------
        text
            The user message.
        max_tokens, temperature, top_p, top_k, seed
            Sampling: ``temperature`` 0 is greedy; ``top_k`` 0 and ``top_p`` 1 disable them.
        on_overflow
            ``"raise"``: :class:`ContextOverflow`. ``"drop_oldest"``: drop the oldest
            non-system turns until the turn fits, then retry; ``last.dropped`` and ``dropped``
            say how many messages went.

        Raises
        ------
        ValueError
            At the call, for arguments the protocol rejects.
        ContextOverflow, SessionBusy, SessionLost, ServiceUnavailable, ProtocolError, Timeout
            While iterating; the history is unchanged.
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
        """Stop the turn in flight; it ends with ``finish_reason`` cancelled.

        Lock-free: call it from another thread, from a signal handler, or from the loop over
        :meth:`send`. Returns False if no turn is running.
        """
        active = self._active
        if active is None:
            return False
        active.cancel_requested = True
        if active.sent:
            self._t.send_quietly(active.frames)
        return True

    def reset(self, *, keep_history: bool = False) -> None:
        """Forget the worker's cache of this session and (unless ``keep_history``) the history
        except the system prompt. The next turn is cold (reason ``reset``)."""
        self._request(Kind.RESET, Kind.RESET_OK)
        if not keep_history:
            self._conv.forget()

    def close(self) -> None:
        """Free the session on the service (cache and pin). The history is kept: a later
        ``send`` starts again, cold."""
        self._request(Kind.CLOSE, Kind.CLOSE_OK)

    # --- internals --------------------------------------------------------------------------

    def _request(self, kind: Kind, ok: Kind) -> None:
        t, sid = self._t, self._conv.key
        if not self._claim.acquire(blocking=False):
            raise SessionBusy(self.id)
        key = (sid, t.ids.next())
        try:
            t.open(key)
            t.send(request_frames(kind, sid, key[1]))
            check_ack(t.recv(key, f"{ok.name} reply"), ok, self.id)
        finally:
            t.discard(key)
            self._claim.release()

    def _stream(self, attempt: Attempt) -> Iterator[str]:
        if not self._claim.acquire(blocking=False):
            raise SessionBusy(self.id)
        try:
            attempt.refresh(self._conv.history)  # as it is now, not when send() was called
            while True:
                try:
                    yield from self._turn(attempt)
                    return
                except ContextOverflow as exc:
                    if not attempt.shrink(exc):
                        raise
        finally:
            self._active = None
            self._claim.release()

    def _turn(self, attempt: Attempt) -> Iterator[str]:
        t, sid = self._t, self._conv.key
        rid = t.ids.next()
        key = (sid, rid)
        stream = TurnStream(self.id)
        active = _Active(request_frames(Kind.CANCEL, sid, rid, EMPTY_BODY))
        self._active = active
        t0 = time.perf_counter()
        ttft: float | None = None
        t.open(key)
        try:
            t.send(request_frames(Kind.TURN, sid, rid, attempt.body))
            active.sent = True
            if active.cancel_requested:  # cancel() ran before the TURN was out
                t.send(active.frames)
            while True:
                out = stream.feed(t.recv(key, "TURN reply"))
                if isinstance(out, TurnEnd):
                    elapsed = (time.perf_counter() - t0) * 1e3
                    self._conv.commit(attempt, out, stream.text, ttft, elapsed)
                    return
                if out:
                    if ttft is None:
                        ttft = (time.perf_counter() - t0) * 1e3
                    yield out
        except Timeout:
            t.send_quietly(active.frames)  # best effort: the broker is probably gone
            raise
        except BaseException as exc:  # GeneratorExit (break), KeyboardInterrupt, client checks
            if not stream.done:
                healthy = not isinstance(exc, KvrouteError)
                self._drain(key, stream, attempt, active, t0, healthy=healthy)
            raise
        finally:
            t.discard(key)

    def _drain(
        self,
        key: Key,
        stream: TurnStream,
        attempt: Attempt,
        active: _Active,
        t0: float,
        *,
        healthy: bool,
    ) -> None:
        """Cancel a turn the caller walked away from and wait for its end, so the session is
        free for the next request. A healthy stream's partial reply is committed (the worker
        kept it); a broken one (client-side check failed) is only drained."""
        try:
            self._t.send(active.frames)
            while not stream.done:
                reply = self._t.recv(key, "END after CANCEL")
                if not healthy:
                    stream.done = reply.kind is not Kind.TOKEN
                    continue
                out = stream.feed(reply)
                if isinstance(out, TurnEnd):
                    elapsed = (time.perf_counter() - t0) * 1e3
                    self._conv.commit(attempt, out, stream.text, None, elapsed)
        except KvrouteError as exc:
            logger.warning("session %s: abandoned turn did not end cleanly: %s", self.id, exc)
