"""The blocking client's socket: one DEALER that many threads share, and the options every
client socket gets (the asyncio adapter uses :func:`configure_dealer` too).

Sharing scheme: every use of the socket happens under ``_io``. A thread waiting for a reply
*reads for everyone* when nobody else is (poll, receive with ``NOBLOCK``, file each message
under its request in the :class:`~kvroute.client.core.Demux`); the other waiters sleep on a
condition until their queue fills. Frames to send go through a lock-free outbox and a wake-up
socket pair, so a thread (or a signal handler) never waits behind another thread's poll.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections import deque

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

from .core import Demux, Key, RequestIds
from .errors import KvrouteError, Timeout

logger = logging.getLogger(__name__)

_DRAIN_BATCH = 1024  # messages read per wake-up before the waiting threads get to look


def configure_dealer(
    sock: zmq.Socket[bytes],
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


class Transport:
    """A DEALER connected to the broker, shared by threads; replies routed per request.

    Parameters
    ----------
    url
        The broker's frontend address.
    timeout
        Seconds :meth:`recv` waits for one reply before raising ``Timeout``.
    linger
        Seconds unsent frames may delay :meth:`close`.
    owner_token, curve
        See :func:`configure_dealer`.
    """

    def __init__(
        self,
        url: str,
        timeout: float,
        linger: float,
        owner_token: bytes,
        curve: CurveClient | None = None,
    ) -> None:
        self.url = url
        self.timeout = timeout
        self.ids = RequestIds()
        self._demux = Demux()
        self._cond = threading.Condition()  # guards _demux and _reading
        self._reading = False  # a thread is polling the socket for everyone
        self._io = threading.Lock()  # guards the socket: one thread uses it at a time
        self._outbox: deque[list[bytes]] = deque()  # appended from any thread, lock-free
        self._closed = False
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        try:
            configure_dealer(self._sock, url, linger, owner_token, curve)
        except ValueError:
            self._ctx.term()
            raise
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._poller = zmq.Poller()
        self._poller.register(self._sock, zmq.POLLIN)
        self._poller.register(self._wake_r, zmq.POLLIN)

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Close the socket and the context (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._wake()  # a thread in poll lets go of the socket
        with self._io:
            self._sock.close()
            self._ctx.term()
            self._wake_r.close()
            self._wake_w.close()
        with self._cond:
            self._cond.notify_all()

    def open(self, key: Key) -> None:
        """Collect replies for a request (call before sending it)."""
        with self._cond:
            self._demux.open(key)

    def discard(self, key: Key) -> None:
        """Stop collecting replies for a request; late ones are dropped."""
        with self._cond:
            self._demux.close(key)

    def send(self, frames: list[bytes]) -> None:
        """Send frames now if the socket is free, else have the thread holding it send them.

        Takes no blocking lock, so it is safe from any thread and from signal handlers.
        """
        if self._closed:
            raise KvrouteError("client is closed")
        self._outbox.append(frames)
        if self._io.acquire(blocking=False):
            try:
                self._flush()
            finally:
                self._io.release()
        else:
            # The holder is most likely in poll: wake it and it flushes; if it is past its last
            # flush, the next receive of any thread flushes first thing.
            self._wake()

    def send_quietly(self, frames: list[bytes]) -> None:
        """Best-effort :meth:`send` (e.g. a CANCEL on the way out of an error)."""
        with contextlib.suppress(KvrouteError):
            self.send(frames)

    def recv(self, key: Key, waiting_for: str) -> Reply:
        """The next reply for ``key``, reading the socket for everyone if nobody else is.

        Raises
        ------
        Timeout
            Nothing for ``key`` within ``timeout`` seconds.
        """
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

    # --- internals ------------------------------------------------------------------------

    def _wake(self) -> None:
        # Full buffer (already awake) or closed: either way there is nothing to do.
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")

    def _flush(self) -> None:
        """Send queued frames (the caller holds ``_io``)."""
        while self._outbox and not self._closed:
            frames = self._outbox.popleft()
            try:
                self._sock.send_multipart(frames, zmq.NOBLOCK)
            except zmq.Again:
                # SNDHWM messages queued towards a broker that never took them: it is gone. The
                # waiting caller gets Timeout; dropping keeps memory bounded.
                logger.warning("send queue to %s is full; dropped a message", self.url)

    def _pump(self, seconds: float, got: list[list[bytes]]) -> None:
        with self._io:
            if self._closed:
                return
            self._flush()
            events = dict(self._poller.poll(seconds * 1000))
            if self._wake_r in events:
                with contextlib.suppress(BlockingIOError):
                    while self._wake_r.recv(4096):
                        pass
                self._flush()  # what woke us: frames another thread posted
            if self._sock in events:
                for _ in range(_DRAIN_BATCH):
                    try:
                        got.append(self._sock.recv_multipart(zmq.NOBLOCK))
                    except zmq.Again:
                        break
