"""Multipart send and receive for the broker's per-message path, on pyzmq's backend socket.

pyzmq's ``Socket.send`` is a Python wrapper (routing ids, groups, ``Frame`` objects) around the
Cython backend's ``send``, and ``send_multipart`` calls it once per frame after a type check of
every part. The broker only ever sends ``bytes`` frames it received or prebuilt, so it calls the
backend (``zmq.backend.Socket``, public API) directly, which makes a 5-frame send several times
cheaper (``benchmarks/broker.py`` measures the broker's per-frame cost); every message through
the broker is one receive and one send.
Semantics are the same: ZeroMQ delivers and queues multipart messages atomically, and with
``NOBLOCK`` a full queue (``zmq.Again``) or an unknown peer (``EHOSTUNREACH`` under
``ROUTER_MANDATORY``) is reported on the first frame, before anything is queued.
"""

from __future__ import annotations

import zmq
import zmq.backend

_send = zmq.backend.Socket.send
_recv = zmq.backend.Socket.recv
_get = zmq.backend.Socket.get
_SNDMORE = zmq.SNDMORE
_RCVMORE = zmq.RCVMORE


def send_multipart(sock: zmq.Socket[bytes], frames: list[bytes], flags: int = zmq.NOBLOCK) -> None:
    """Send ``frames`` (all ``bytes``) as one message; raises like ``Socket.send_multipart``."""
    more = _SNDMORE | flags
    last = len(frames) - 1
    for i in range(last):
        _send(sock, frames[i], more)
    _send(sock, frames[last], flags)


def recv_multipart(sock: zmq.Socket[bytes], flags: int = zmq.NOBLOCK) -> list[bytes]:
    """Receive one message as a list of ``bytes``; raises ``zmq.Again`` if none is queued."""
    frames = [_recv(sock, flags)]
    while _get(sock, _RCVMORE):
        frames.append(_recv(sock, flags))
    return frames


def recv_multipart_user(
    sock: zmq.Socket[bytes], flags: int = zmq.NOBLOCK
) -> tuple[list[bytes], bytes]:
    """Like :func:`recv_multipart`, plus the ``User-Id`` ZAP gave the sender's connection.

    Every frame of a message carries its connection's metadata, the routing id the ROUTER
    prepends included, so only the first frame is received as a ``Frame`` (dearer than a plain
    copy). Read per message, not cached per routing id: a routing id a client chose can
    come back later on another connection with another key.

    Raises
    ------
    zmq.Again
        No message queued.
    zmq.ZMQError
        ``EINVAL`` if the connection has no ``User-Id`` (no ZAP handler authenticated it).
    """
    first = _recv(sock, flags, False)
    frames = [first.bytes]
    while _get(sock, _RCVMORE):
        frames.append(_recv(sock, flags))
    user_id = first.get("User-Id")
    assert isinstance(user_id, str), "a string property"
    return frames, user_id.encode()
