"""The asyncio client's socket: one ``zmq.asyncio`` DEALER shared by the tasks of one loop.

Receiving follows the rule for ``zmq.asyncio`` (DESIGN §3): a pending ``recv`` is never
cancelled, because a cancelled receive can lose a message. One task at a time awaits ``poll``
(cancelling a poll loses nothing) and then receives with ``NOBLOCK`` for everyone, filing each
message under its request; the other tasks wait on an event. Every wait is bounded by
``timeout``. Socket options come from :func:`~kvroute.client.transport.configure_dealer`, as for
the blocking client.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import zmq
import zmq.asyncio

from kvroute.proto import Reply
from kvroute.proto.identity import CurveClient

from .core import Demux, Key, RequestIds
from .errors import KvrouteError, Timeout
from .transport import configure_dealer

logger = logging.getLogger(__name__)

_DRAIN_BATCH = 1024


class AsyncTransport:
    """A ``zmq.asyncio`` DEALER shared by the tasks of one loop; replies routed per request."""

    def __init__(
        self,
        url: str,
        timeout: float,
        linger: float,
        owner_token: bytes,
        curve: CurveClient | None = None,
    ) -> None:
        self.url, self.timeout = url, timeout
        self.ids = RequestIds()
        self.closed = False
        self._demux = Demux()
        self._reading = False  # a task is polling the socket for everyone
        self._arrived: asyncio.Event | None = None  # set after each read; made in the loop
        self._ctx = zmq.asyncio.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        try:
            configure_dealer(self._sock, url, linger, owner_token, curve)
        except ValueError:
            self._ctx.term()
            raise

    def close(self) -> None:
        """Close the socket and the context (idempotent); waiting tasks wake up."""
        if self.closed:
            return
        self.closed = True
        self._sock.close()
        self._ctx.term()
        self._notify()

    def open(self, key: Key) -> None:
        """Collect replies for a request (call before sending it)."""
        self._demux.open(key)

    def discard(self, key: Key) -> None:
        """Stop collecting replies for a request; late ones are dropped."""
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
        """Best-effort :meth:`send` (e.g. a CANCEL on the way out of an error)."""
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
