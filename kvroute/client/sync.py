"""The blocking client: :class:`Client` owns one ZeroMQ context and DEALER; :class:`Session`
streams turns over it.

Thread-safety: a :class:`Client` may be shared by threads, each driving its own sessions. Every
use of the socket happens under one lock; whichever thread waits for a reply *reads for everyone*
(it polls, receives with ``NOBLOCK`` and files each message under its request), while the others
wait on a condition for their queue to fill. A socket pair wakes the reading thread when another
thread has something to send, so nobody waits for a poll to time out. A :class:`Session` is driven
by one thread at a time (a second concurrent ``send`` raises :class:`SessionBusy`), except
:meth:`Session.cancel`, which takes no lock and may be called from any thread or a signal handler.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from types import TracebackType

import zmq

from kvroute.proto import EMPTY_BODY, Kind, Reply, TurnEnd, request_frames
from kvroute.proto.limits import MAX_MSG_SIZE

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

logger = logging.getLogger(__name__)

_DRAIN_BATCH = 1024  # messages read per wake-up before letting waiting threads look


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

    Options after ``timeout`` are keyword-only, so new ones (e.g. CURVE keys) can be added
    without breaking callers. See the module docstring for thread-safety.
    """

    def __init__(
        self, url: str, timeout: float = DEFAULT_TIMEOUT, *, linger: float = DEFAULT_LINGER
    ) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        self.url: str = url
        self.timeout: float = timeout
        self._ids = RequestIds()
        self._demux = Demux()
        self._cond = threading.Condition()  # guards _demux and _reading
        self._reading = False  # a thread is polling the socket for everyone
        self._io = threading.Lock()  # guards the socket: one thread uses it at a time
        self._outbox: deque[list[bytes]] = deque()  # frames any thread may post without a lock
        self._closed = False
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, int(linger * 1000))
        self._sock.setsockopt(zmq.MAXMSGSIZE, MAX_MSG_SIZE)
        self._sock.connect(url)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._poller = zmq.Poller()
        self._poller.register(self._sock, zmq.POLLIN)
        self._poller.register(self._wake_r, zmq.POLLIN)

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the socket and context (idempotent). Sessions of this client stop working."""
        if self._closed:
            return
        self._closed = True
        self._wake()
        with self._io:
            self._sock.close()
            self._ctx.term()
            self._wake_r.close()
            self._wake_w.close()

    def session(
        self,
        session_id: str | None = None,
        system: str | None = None,
        history: Iterable[Mapping[str, str]] | None = None,
    ) -> Session:
        """A chat session over this client (no message is sent until the first turn).

        Parameters
        ----------
        session_id
            Resume a session by id; None for a new random one.
        system
            A system prompt (becomes the first history message).
        history
            Earlier ``{"role", "content"}`` messages to start from.
        """
        return Session(self, Conversation(session_id, system, history))

    def ping(self) -> float:
        """Round-trip time to the broker in seconds (checks the broker, not the workers).

        Raises
        ------
        Timeout
            No PONG within ``timeout``.
        """
        rid = self._ids.next()
        key = (b"", rid)
        t0 = time.perf_counter()
        self._open(key)
        try:
            self._send(request_frames(Kind.PING, b"", rid))
            check_ack(self._recv(key, "PONG"), Kind.PONG, "")
        finally:
            self._close(key)
        return time.perf_counter() - t0

    # --- plumbing used by Session ---------------------------------------------------------

    def _open(self, key: Key) -> None:
        with self._cond:
            self._demux.open(key)

    def _close(self, key: Key) -> None:
        with self._cond:
            self._demux.close(key)

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except OSError:  # buffer full (already awake) or closed: either way nothing to do
            pass

    def _send(self, frames: list[bytes]) -> None:
        """Queue frames and send them now if the socket is free; else the thread holding it is
        woken and sends them. Lock-free until the try-acquire, so safe from signal handlers."""
        if self._closed:
            raise KvrouteError("client is closed")
        self._outbox.append(frames)
        self._wake()
        if self._io.acquire(blocking=False):
            try:
                self._flush()
            finally:
                self._io.release()

    def _post_quietly(self, frames: list[bytes]) -> None:
        try:
            self._send(frames)
        except KvrouteError:  # closed meanwhile: nothing left to tell
            pass

    def _flush(self) -> None:
        """Send queued frames (caller holds ``_io``)."""
        while self._outbox and not self._closed:
            frames = self._outbox.popleft()
            try:
                self._sock.send_multipart(frames, zmq.NOBLOCK)
            except zmq.Again:
                # 1000 messages queued towards a broker that never took them: it is gone. The
                # waiting caller gets Timeout; dropping here keeps memory bounded.
                logger.warning("send queue to %s full; dropped a message", self.url)

    def _recv(self, key: Key, waiting_for: str) -> Reply:
        """The next reply for ``key``, reading the socket for everyone if nobody else is."""
        deadline = time.monotonic() + self.timeout
        while True:
            with self._cond:
                reply = self._demux.pop(key)
                if reply is not None:
                    return reply
                if self._closed:
                    raise KvrouteError("client is closed")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise Timeout(self.timeout, waiting_for, self.url)
                if self._reading:
                    self._cond.wait(remaining)
                    continue
                self._reading = True
            got: list[list[bytes]] = []
            try:
                self._pump(remaining, got)
            finally:
                with self._cond:
                    for frames in got:
                        self._demux.dispatch(frames)
                    self._reading = False
                    self._cond.notify_all()

    def _pump(self, seconds: float, got: list[list[bytes]]) -> None:
        with self._io:
            if self._closed:
                return
            self._flush()
            events = dict(self._poller.poll(seconds * 1000))
            if self._wake_r in events:
                try:
                    while self._wake_r.recv(4096):
                        pass
                except BlockingIOError:
                    pass
                self._flush()  # what woke us: frames another thread posted
            if self._sock in events:
                for _ in range(_DRAIN_BATCH):
                    try:
                        got.append(self._sock.recv_multipart(zmq.NOBLOCK))
                    except zmq.Again:
                        break


class _Active:
    """The TURN a session is running, as :meth:`Session.cancel` sees it."""

    __slots__ = ("cancel_requested", "frames", "sent")

    def __init__(self, frames: list[bytes]) -> None:
        self.frames = frames  # the CANCEL to send
        self.sent = False
        self.cancel_requested = False


class Session:
    """One chat session: its history, and the turns streamed over its :class:`Client`.

    Get one from :meth:`Client.session`. Attributes: ``id`` (str), ``history`` (list of
    ``{"role", "content"}``; sent with every turn, editable between turns), ``last``
    (:class:`~kvroute.client.result.TurnResult` of the last finished turn, or None), ``dropped``
    (messages dropped so far by ``on_overflow="drop_oldest"``).
    """

    def __init__(self, client: Client, conversation: Conversation) -> None:
        self._client = client
        self._conv = conversation
        self._claim = threading.Lock()  # held while a request of this session is running
        self._active: _Active | None = None

    @property
    def id(self) -> str:
        return self._conv.id

    @property
    def history(self) -> list[dict[str, str]]:
        return self._conv.history

    @history.setter
    def history(self, messages: list[dict[str, str]]) -> None:
        self._conv.history = messages

    @property
    def last(self) -> TurnResult | None:
        return self._conv.last

    @property
    def dropped(self) -> int:
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
            self._client._send(active.frames)
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
        c, sid = self._client, self._conv.key
        if not self._claim.acquire(blocking=False):
            raise SessionBusy(self.id)
        key = (sid, c._ids.next())
        try:
            c._open(key)
            c._send(request_frames(kind, sid, key[1]))
            check_ack(c._recv(key, f"{ok.name} reply"), ok, self.id)
        finally:
            c._close(key)
            self._claim.release()

    def _stream(self, attempt: Attempt) -> Iterator[str]:
        if not self._claim.acquire(blocking=False):
            raise SessionBusy(self.id)
        try:
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
        c, sid = self._client, self._conv.key
        rid = c._ids.next()
        key = (sid, rid)
        stream = TurnStream(self.id)
        active = _Active(request_frames(Kind.CANCEL, sid, rid, EMPTY_BODY))
        self._active = active
        t0 = time.perf_counter()
        ttft: float | None = None
        c._open(key)
        try:
            c._send(request_frames(Kind.TURN, sid, rid, attempt.body))
            active.sent = True
            if active.cancel_requested:  # cancel() ran before the TURN was out
                c._send(active.frames)
            while True:
                out = stream.feed(c._recv(key, "TURN reply"))
                if isinstance(out, TurnEnd):
                    elapsed = (time.perf_counter() - t0) * 1e3
                    self._conv.commit(attempt, out, stream.text, ttft, elapsed)
                    return
                if out:
                    if ttft is None:
                        ttft = (time.perf_counter() - t0) * 1e3
                    yield out
        except Timeout:
            c._post_quietly(active.frames)  # best effort: the broker is probably gone
            raise
        except BaseException as exc:  # GeneratorExit (break), KeyboardInterrupt, client checks
            if not stream.done:
                healthy = not isinstance(exc, KvrouteError)
                self._drain(key, stream, attempt, active, t0, healthy=healthy)
            raise
        finally:
            c._close(key)

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
        c = self._client
        try:
            c._send(active.frames)
            while not stream.done:
                reply = c._recv(key, "END after CANCEL")
                if not healthy:
                    stream.done = reply.kind is not Kind.TOKEN
                    continue
                out = stream.feed(reply)
                if isinstance(out, TurnEnd):
                    elapsed = (time.perf_counter() - t0) * 1e3
                    self._conv.commit(attempt, out, stream.text, None, elapsed)
        except KvrouteError as exc:
            logger.warning("session %s: abandoned turn did not end cleanly: %s", self.id, exc)
