"""Whole messages in and out of a client's DEALER, one part at a time, and replies per request.

An exception can land between any two steps of the socket code: a signal handler's
``KeyboardInterrupt`` in the blocking client, or anything raised from a fault-injection hook.
ZeroMQ hands a multipart message over one part per call, so code that reads or writes a message
in one Python loop (``recv_multipart``) and is interrupted half-way splits it: the rest arrives
as a message of its own (``3 frames, expected 4``). These I/O-free classes keep the progress in
the object instead of a local variable, so the next call carries on where the interrupted one
stopped:

- :class:`Demux` assembles received parts into messages and files each reply under its
  request; it remembers which requests have had their terminal reply.
- :class:`Outbox` holds messages to send and how many parts of the first one went out.

Requests are told apart by :data:`Key`, with request ids from :class:`RequestIds`.
"""

from __future__ import annotations

import itertools
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from kvroute.proto import Kind, ProtocolViolation, Reply, parse_reply

logger = logging.getLogger(__name__)

Key = tuple[bytes, bytes]
"""(session id, request id): how replies are routed to the request that awaits them."""


class RequestIds:
    """Request ids unique within one client (a counter; ``next`` on it is atomic in CPython)."""

    def __init__(self) -> None:
        self._n = itertools.count(1)

    def next(self) -> bytes:
        return b"%x" % next(self._n)


def ends_request(reply: Reply) -> bool:
    """True for a reply after which nothing more comes for its request (all but TOKEN)."""
    return reply.kind is not Kind.TOKEN


@dataclass
class _Entry:
    queue: deque[Reply] = field(default_factory=deque)
    ended: bool = False  # its terminal reply was filed (it may still be queued)


class Demux:
    """Received parts -> messages -> per-request reply queues. Not locked: each adapter guards
    it its own way (the blocking client with a condition, asyncio by running in one loop)."""

    def __init__(self) -> None:
        self._entries: dict[Key, _Entry] = {}
        self._parts: list[bytes] = []  # a message being received

    def open(self, key: Key) -> None:
        """Start collecting replies for a request (before its first frame is sent)."""
        self._entries[key] = _Entry()

    def close(self, key: Key) -> None:
        """Stop collecting: later replies for it are dropped (e.g. after a timeout)."""
        self._entries.pop(key, None)

    def pop(self, key: Key) -> Reply | None:
        """The oldest queued reply of a request, or None. Taking its terminal reply closes it."""
        entry = self._entries.get(key)
        if entry is None or not entry.queue:
            return None
        reply = entry.queue.popleft()
        if ends_request(reply):
            self._entries.pop(key, None)
        return reply

    def settled(self, key: Key) -> bool:
        """True when nothing more will come for a request: it is closed, or its terminal reply
        arrived and was taken (even by a reader interrupted before it could use it)."""
        entry = self._entries.get(key)
        if entry is None:
            return True
        return entry.ended and not any(ends_request(r) for r in entry.queue)

    def feed(self, part: bytes, more: bool) -> None:
        """Take one received part; a message is filed when its last part arrives."""
        self._parts.append(part)
        if not more:
            frames, self._parts = self._parts, []
            self.dispatch(frames)

    def dispatch(self, frames: list[bytes]) -> None:
        """File a received message under its request; log and drop what cannot be routed."""
        try:
            reply = parse_reply(frames)
        except ProtocolViolation as exc:
            logger.warning("dropped a malformed message from the broker: %s", exc)
            return
        entry = self._entries.get((reply.session_id, reply.request_id))
        if entry is None:
            # Late replies of an abandoned request land here; nobody awaits them.
            logger.debug(
                "dropped %s for session %r request %r: nobody waits for it",
                reply.kind.name,
                reply.session_id,
                reply.request_id,
            )
            return
        if entry.ended:
            logger.debug("dropped %s after the end of %r", reply.kind.name, reply.request_id)
            return
        entry.ended = ends_request(reply)
        entry.queue.append(reply)


SendPart = Callable[[bytes, bool], bool]
"""Sends one part without blocking (``more``: parts follow); False if the socket is full."""


@dataclass(slots=True)
class _Outgoing:
    frames: list[bytes]
    sent: int = 0  # parts already handed to the socket


class Outbox:
    """Messages waiting to be sent, written one part at a time.

    :meth:`put` is a single ``deque.append``, safe from any thread and from a signal handler;
    only the thread (or task) that owns the socket calls :meth:`flush`.
    """

    def __init__(self) -> None:
        self._queue: deque[_Outgoing] = deque()
        self._flushing = False

    def __len__(self) -> int:
        return len(self._queue)

    def put(self, frames: list[bytes]) -> None:
        """Queue a message."""
        self._queue.append(_Outgoing(frames))

    def flush(self, send_part: SendPart, after_part: Callable[[], None]) -> int:
        """Send what is queued, finishing a half-sent message first.

        Returns how many messages were dropped because the socket was full when their first
        part was due (the peer is not taking anything: keeping them would only grow memory).
        ``after_part`` runs after each part (the adapters' fault-injection point). A flush
        started from inside another (a finalizer sending CANCEL) returns at once: the outer one
        sends what it queued.
        """
        if self._flushing:
            return 0
        try:
            self._flushing = True  # inside the try, so an interrupt cannot leave it set
            return self._flush(send_part, after_part)
        finally:
            self._flushing = False

    def _flush(self, send_part: SendPart, after_part: Callable[[], None]) -> int:
        dropped = 0
        while self._queue:
            out = self._queue[0]
            while out.sent < len(out.frames):
                i = out.sent
                if not send_part(out.frames[i], i < len(out.frames) - 1):
                    if i > 0:
                        # ZeroMQ takes the rest of a message once it took its first part, so
                        # this is not expected; keep the message and finish it next time.
                        return dropped
                    dropped += 1
                    break
                out.sent = i + 1
                after_part()
            self._queue.popleft()
        return dropped
