"""The blocking client's socket: one DEALER that many threads share.

Every use of the socket happens under ``_io``. A thread waiting for a reply *reads for everyone*
when nobody else is (poll, receive with ``NOBLOCK`` one part at a time, file each message under
its request); the other waiters sleep on a condition until their queue fills. Frames to send go
through the lock-free outbox and a wake-up socket pair, so a thread (or a signal handler) never
waits behind another thread's poll. What both transports share, exception safety included, is in
:mod:`~kvroute.client.wire`.
"""

from __future__ import annotations

import contextlib
import math
import socket
import threading
import time

import zmq

from kvroute.proto import Reply
from kvroute.proto.identity import CurveClient

from .demux import Key
from .errors import KvrouteError
from .wire import WAIT_SLICE, WireBase, configure_dealer, part_sender, read_parts


class Transport(WireBase):
    """A DEALER connected to the broker, shared by threads; replies routed per request.

    Parameters
    ----------
    url, timeout
        See :class:`~kvroute.client.wire.WireBase`.
    linger
        Seconds unsent frames may delay :meth:`close`.
    owner_token, curve
        See :func:`~kvroute.client.wire.configure_dealer`.
    """

    def __init__(
        self,
        url: str,
        timeout: float,
        linger: float,
        owner_token: bytes,
        curve: CurveClient | None = None,
    ) -> None:
        self._cond = threading.Condition()  # guards the reply queues
        super().__init__(url, timeout, self._cond)
        self._io = threading.Lock()  # guards the socket: one thread uses it at a time
        self._in_recv = threading.local()  # per thread: inside recv (see receiving())
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        try:
            configure_dealer(self._sock, url, linger, owner_token, curve)
        except ValueError:
            self._ctx.term()
            raise
        self._send_part = part_sender(self._sock)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._poller = zmq.Poller()
        self._poller.register(self._sock, zmq.POLLIN)
        self._poller.register(self._wake_r, zmq.POLLIN)

    def receiving(self) -> bool:
        """True inside :meth:`recv` on this thread: a finalizer that runs there (the garbage
        collector can run anywhere) must not wait for replies, or it would wait on itself."""
        return bool(getattr(self._in_recv, "depth", 0))

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

    def send(self, frames: list[bytes]) -> None:
        """Send frames now if the socket is free, else have the thread holding it send them.

        Takes no blocking lock, so it is safe from any thread and from signal handlers.
        """
        if self._closed:
            raise KvrouteError("client is closed")
        self._outbox.put(frames)
        if self._io.acquire(blocking=False):
            try:
                self._flush()
            finally:
                self._io.release()
        else:
            # The holder is most likely in poll: wake it and it flushes; if it is past its last
            # flush, the next receive of any thread flushes first thing.
            self._wake()

    def recv(self, key: Key, waiting_for: str) -> Reply:
        """The next reply for ``key``, reading the socket for everyone if nobody else is.

        Raises
        ------
        Timeout
            Nothing for ``key`` within ``timeout`` seconds.
        """
        depth = getattr(self._in_recv, "depth", 0)
        self._in_recv.depth = depth + 1
        try:
            return self._recv(key, waiting_for)
        finally:
            self._in_recv.depth = depth

    def _recv(self, key: Key, waiting_for: str) -> Reply:
        deadline = time.monotonic() + self.timeout
        me = object()
        while True:
            try:
                with self._cond:
                    got = self._take(key, deadline, waiting_for)
                    if isinstance(got, Reply):
                        return got
                    if self._reader is not None:
                        self.fault("wait")
                        self._cond.wait(min(got, WAIT_SLICE))
                        continue
                    self._reader = me
                self._pump(got)
            finally:
                if self._reader is me:
                    self._reader = None  # first, before anything that could raise
                    with self._cond:
                        self._cond.notify_all()

    def _wake(self) -> None:
        # Full buffer (already awake) or closed: either way there is nothing to do.
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")

    def _pump(self, seconds: float) -> None:
        with self._io:
            if self._closed:
                return
            self._flush()
            self.fault("poll")
            events = dict(self._poller.poll(math.ceil(seconds * 1000)))
            if self._wake_r in events:
                with contextlib.suppress(BlockingIOError):
                    while self._wake_r.recv(4096):
                        pass
                self._flush()  # what woke us: frames another thread posted
            if self._sock in events:
                read_parts(self._sock, self._feed, self.fault)

    def _feed(self, part: bytes, more: bool) -> None:
        with self._cond:
            self._demux.feed(part, more)
