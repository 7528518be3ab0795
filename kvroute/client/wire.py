"""What the blocking and asyncio transports share: the client's identity, its DEALER's options,
moving parts in and out one at a time, and :class:`WireBase`, a transport's non-blocking half.

A transport owns one DEALER for all the sessions of a client and routes replies per request
(:class:`~kvroute.client.demux.Demux`). Only waiting differs between the two
(:mod:`~kvroute.client.transport`, :mod:`~kvroute.client.aio_transport`): one waiter at a time
reads the socket for everyone, the others sleep until it has.

Exception safety: an exception may land at any point (``KeyboardInterrupt`` from a signal
handler, ``asyncio.CancelledError`` at an ``await``). The reader's role is a token cleared in
``finally``, received and sent parts are recorded as they go (nothing lives in a local list),
and a terminal reply is remembered when it is filed, so a reader interrupted anywhere loses no
message, splits none, and leaves the next caller a working socket. :attr:`WireBase.fault_hook`
lets tests raise at each of these points.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import zmq

from kvroute.proto import Reply
from kvroute.proto.identity import (
    CurveClient,
    KeyPair,
    KeyPath,
    check_owner_token,
    new_owner_token,
)
from kvroute.proto.limits import MAX_MSG_SIZE

from .demux import Demux, Key, Outbox, RequestIds
from .errors import KvrouteError, Timeout

logger = logging.getLogger(__name__)

DRAIN_PARTS = 4096  # parts read per wake-up before the waiting callers get to look
WAIT_SLICE = 0.1  # a waiter re-checks this often, should a reader's wake-up have been lost

FaultHook = Callable[[str], None]
"""Called with the name of an interruption point; raising from it simulates an interrupt there.

Points: ``poll`` (before waiting for the socket), ``wait`` (before waiting for another reader),
``frame`` (after each received part), ``pop`` (after taking a reply off its queue, before
returning it), ``send`` (after each sent part); and, from the drivers, ``claim`` (a call has
started), ``yield`` (a piece is about to be returned) and ``commit`` (a call ended: a turn was
committed, not yet reported)."""


def client_identity(
    server_key: KeyPath | bytes | None, key: KeyPath | KeyPair | None, owner_token: bytes | None
) -> tuple[bytes, CurveClient | None]:
    """The owner token (a fresh one if None) and CURVE settings of a client's arguments.

    Raises
    ------
    ValueError
        A bad owner token; :class:`~kvroute.proto.identity.KeyFileError` (a ValueError) for
        unusable keys, or only one of ``server_key`` and ``key``.
    """
    curve = CurveClient.load(server_key, key)
    token = new_owner_token() if owner_token is None else check_owner_token(owner_token)
    return token, curve


def configure_dealer(
    sock: zmq.Socket[Any],
    url: str,
    linger: float,
    owner_token: bytes,
    curve: CurveClient | None = None,
) -> None:
    """Set the options of a client DEALER and connect it.

    ``linger`` bounds how long close waits for unsent frames (ZeroMQ's default is forever);
    ``MAXMSGSIZE`` keeps a broken or hostile peer from making us buffer huge frames. The owner
    token becomes the routing id: without CURVE the broker binds the sessions this client
    creates to it, and ZeroMQ presents it again on every reconnect. With ``curve`` the socket
    is a CURVE client and the broker knows it by its public key instead.
    """
    sock.setsockopt(zmq.LINGER, int(linger * 1000))
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_MSG_SIZE)
    sock.setsockopt(zmq.ROUTING_ID, owner_token)
    try:
        if curve is not None:
            curve.apply(sock)
        sock.connect(url)
    except zmq.ZMQError as exc:
        # Close now: a socket left open makes its context's term() block when it is collected.
        sock.close(linger=0)
        raise ValueError(f"cannot connect to {url!r}: {exc}") from exc


def read_parts(
    sock: zmq.Socket[bytes], feed: Callable[[bytes, bool], None], fault: Callable[[str], None]
) -> None:
    """Receive what is ready, one part at a time, handing each to ``feed`` (a Demux's)."""
    for _ in range(DRAIN_PARTS):
        try:
            frame = sock.recv(zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return
        feed(frame.bytes, frame.more)
        fault("frame")


def part_sender(sock: zmq.Socket[bytes]) -> Callable[[bytes, bool], bool]:
    """The :class:`~kvroute.client.demux.Outbox` sender for ``sock`` (never blocks)."""

    def send_part(part: bytes, more: bool) -> bool:
        try:
            sock.send(part, zmq.NOBLOCK | (zmq.SNDMORE if more else 0))
        except zmq.Again:
            return False
        return True

    return send_part


class WireBase:
    """A transport's non-blocking half: reply queues per request, the outbox, the fault hook.

    Parameters
    ----------
    url
        The broker's frontend address.
    timeout
        Seconds ``recv`` waits for one reply before raising ``Timeout``.

    Subclasses own the socket, set ``_send_part`` and ``_lock`` (what guards the reply queues:
    a condition for threads; nothing for the tasks of one event loop) and add ``send`` and
    ``recv``.
    """

    _send_part: Callable[[bytes, bool], bool]

    def __init__(self, url: str, timeout: float, lock: AbstractContextManager[object]) -> None:
        self.url = url
        self.timeout = timeout
        self.ids = RequestIds()
        self.fault_hook: FaultHook | None = None
        self._lock = lock
        self._demux = Demux()
        self._outbox = Outbox()  # appended from any thread, lock-free
        self._reader: object | None = None  # token of the caller reading for everyone
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    def fault(self, point: str) -> None:
        """Run :attr:`fault_hook` (a test hook; see :data:`FaultHook`) at an interruption point."""
        hook = self.fault_hook
        if hook is not None:
            hook(point)

    def open(self, key: Key) -> None:
        """Collect replies for a request (call before sending it)."""
        with self._lock:
            self._demux.open(key)

    def discard(self, key: Key) -> None:
        """Stop collecting replies for a request; late ones are dropped."""
        with self._lock:
            self._demux.close(key)

    def settled(self, key: Key) -> bool:
        """True when nothing more will come for ``key`` (see :meth:`Demux.settled`)."""
        with self._lock:
            return self._demux.settled(key)

    def send(self, frames: list[bytes]) -> None:
        raise NotImplementedError

    def send_quietly(self, frames: list[bytes]) -> None:
        """Best-effort :meth:`send` (e.g. a CANCEL on the way out of an error)."""
        with contextlib.suppress(KvrouteError):
            self.send(frames)

    def _take(self, key: Key, deadline: float, waiting_for: str) -> Reply | float:
        """The next reply for ``key`` if one is queued, else the seconds left to wait for it
        (the caller holds ``_lock``). Raises Timeout when none are left."""
        reply = self._demux.pop(key)
        if reply is not None:
            self.fault("pop")
            return reply
        if self._closed:
            raise KvrouteError("client is closed")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise Timeout(self.timeout, waiting_for, self.url)
        return remaining

    def _flush(self) -> None:
        """Send what is queued (the caller owns the socket)."""
        if not self._closed and self._outbox.flush(self._send_part, lambda: self.fault("send")):
            # SNDHWM messages queued towards a broker that never took them: it is gone. The
            # waiting caller gets Timeout; dropping keeps memory bounded.
            logger.warning("send queue to %s is full; dropped a message", self.url)
