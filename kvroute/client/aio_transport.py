"""The asyncio client's socket: one ``zmq.asyncio`` DEALER shared by the tasks of one loop.

Both rules below are in docs/design.md, *ZeroMQ rules we rely on*.

Receiving follows the rule for ``zmq.asyncio``: a pending ``recv`` is never cancelled, because
a cancelled receive can lose a message. One task at a time awaits ``poll`` (cancelling a poll
loses nothing) and then receives with ``NOBLOCK`` for everyone, one part at a time, filing each
message under its request; the other tasks wait on an event. Every wait is bounded by
``timeout``. ``asyncio.CancelledError`` lands only at an ``await``. The rest, exception safety
included, is shared with the blocking transport (:mod:`~kvroute.client.wire`).

Wake-ups follow the rule for an edge-triggered descriptor: ``ZMQ_FD`` signals a change, not a
state, and any call on the socket (a send, a receive, reading ``EVENTS``) may take the signal
for messages that arrived meanwhile, after which the FD stays quiet however many more arrive.
So the reader checks ``EVENTS`` before it sleeps in ``poll`` (and reads at once if messages are
queued), and a send made while it sleeps checks ``EVENTS`` again and wakes it if they are.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from typing import cast

import zmq
import zmq.asyncio

from kvroute.proto import Reply
from kvroute.proto.identity import CurveClient

from .demux import Key
from .errors import KvrouteError
from .wire import WAIT_SLICE, WireBase, configure_dealer, part_sender, read_parts


class AsyncTransport(WireBase):
    """A ``zmq.asyncio`` DEALER shared by the tasks of one loop; replies routed per request.

    Same parameters as :class:`~kvroute.client.transport.Transport`.
    """

    def __init__(
        self,
        url: str,
        timeout: float,
        linger: float,
        owner_token: bytes,
        curve: CurveClient | None = None,
    ) -> None:
        super().__init__(url, timeout, contextlib.nullcontext())
        self._arrived: asyncio.Event | None = None  # set after each read; made in the loop
        self._polling: asyncio.Future[int] | None = None  # the reader's poll, while it sleeps
        self._ctx = zmq.asyncio.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        try:
            configure_dealer(self._sock, url, linger, owner_token, curve)
        except ValueError:
            self._ctx.term()
            raise
        # Non-blocking sends and receives go through a plain-socket view of the same socket:
        # they complete at once, so nothing is left pending in the asyncio wrapper.
        self._raw: zmq.Socket[bytes] = zmq.Socket.shadow(self._sock)
        self._send_part = part_sender(self._raw)

    def close(self) -> None:
        """Close the socket and the context (idempotent); waiting tasks wake up."""
        if self._closed:
            return
        self._closed = True
        self._wake_reader(0)  # it finds the client closed (rather than cancelled by close)
        self._sock.close()
        self._ctx.term()
        self._notify()

    def send(self, frames: list[bytes]) -> None:
        """Send without blocking (a plain call: usable from callbacks, finalizers, sync code)."""
        if self._closed:
            raise KvrouteError("client is closed")
        self._outbox.put(frames)
        self._flush()
        if self._polling is not None and self._readable():
            self._wake_reader(zmq.POLLIN)  # the send may have taken the FD's signal

    async def recv(self, key: Key, waiting_for: str) -> Reply:
        """The next reply for ``key``; raises Timeout after ``timeout`` seconds of silence."""
        deadline = time.monotonic() + self.timeout
        me = object()
        while True:
            try:
                got = self._take(key, deadline, waiting_for)
                if isinstance(got, Reply):
                    return got
                if self._reader is not None:
                    if self._arrived is None:
                        self._arrived = asyncio.Event()
                    self.fault("wait")
                    # Cancelling this wait is harmless: it is an Event, not a socket receive.
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._arrived.wait(), min(got, WAIT_SLICE))
                    continue
                self._reader = me
                self._flush()  # a send interrupted half-way is finished before anything else
                self.fault("poll")
                if self._readable():
                    # Queued already (their signal may be spent): no poll. Let the tasks whose
                    # replies the last read filed take them first.
                    await asyncio.sleep(0)
                elif not await self._poll(got):
                    continue
                if not self._closed:
                    read_parts(self._raw, self._demux.feed, self.fault)
            finally:
                if self._reader is me:
                    self._reader = None
                    self._notify()

    def _readable(self) -> bool:
        if self._closed:
            return False
        events = self._raw.get(zmq.EVENTS)
        assert isinstance(events, int), "an integer option"
        return bool(events & zmq.POLLIN)

    async def _poll(self, seconds: float) -> int:
        # poll() hands back a Future (ensure_future returns it as it is): _wake_reader may
        # resolve it early. Cancelling it, as a cancelled task does, loses nothing.
        # (pyzmq annotates zmq.asyncio.Socket.poll with the Poller's signature and result.)
        ms = math.ceil(seconds * 1000)
        future = cast("asyncio.Future[int]", self._sock.poll(ms, zmq.POLLIN))  # type: ignore[call-arg]
        poll = asyncio.ensure_future(future)
        self._polling = poll
        try:
            return await poll
        finally:
            self._polling = None

    def _wake_reader(self, events: int) -> None:
        poll = self._polling
        if poll is not None and not poll.done():
            poll.set_result(events)

    def _notify(self) -> None:
        if self._arrived is not None:
            self._arrived.set()
            self._arrived = None
