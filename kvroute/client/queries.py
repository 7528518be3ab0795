"""Requests the broker answers itself about transcripts: LOOKUP and INDEX (sans-I/O machines).

They follow the machine protocol of :mod:`~kvroute.client.core` (``start``, ``next_action``,
``on_reply``, ``fail``), so the blocking and asyncio drivers run them like a PING. Neither
occupies a session: an INDEX names a session but may be sent while another call runs on it.

- :class:`LookupMachine`: which of this client's sessions holds a transcript digest
  (``session_id`` afterwards: the id, or None).
- :class:`IndexMachine`: record that a session holds a transcript digest.

Digests are opaque to the broker (16..32 bytes); see :mod:`kvroute.proto.transcripts`.
"""

from __future__ import annotations

from collections import deque

from kvroute.proto import (
    ErrorCode,
    Found,
    Index,
    Kind,
    Lookup,
    ProtocolViolation,
    Reply,
    request_frames,
)

from .actions import Action, Cleanup, Discard, Done, Phase, Raise, Receive, Send
from .demux import Key
from .errors import KvrouteError, ProtocolError
from .replies import ack_error, error_reply


def _body(cls: type[Lookup] | type[Index], digest: bytes) -> bytes:
    try:
        return cls(digest).encode()
    except ProtocolViolation as exc:  # our own argument check, before anything is sent
        raise ValueError(exc.message) from exc


class _BrokerQuery:
    """One request answered by the broker with one reply of kind ``ok``."""

    def __init__(self, frames: list[bytes], key: Key, ok: Kind) -> None:
        self.phase = Phase.NEW
        self._frames, self._key, self._ok = frames, key, ok
        self._queue: deque[Action] = deque()

    def start(self) -> None:
        self.phase = Phase.RUNNING
        self._queue.append(Send(self._frames, self._key))

    def next_action(self) -> Action:
        return self._queue.popleft() if self._queue else Receive(self._key, f"{self._ok.name}")

    def on_reply(self, reply: Reply | None) -> None:
        assert reply is not None, "only a request being waited out ends without a reply"
        err = self._check(reply)
        if err is not None:
            self._queue.append(Raise(err))
            return
        self.phase = Phase.DONE
        self._queue.append(Done())

    def _check(self, reply: Reply) -> KvrouteError | None:
        return ack_error(reply, self._ok, self._key[0].decode(errors="replace"))

    def fail(self, exc: BaseException) -> Cleanup:
        self.phase = Phase.DONE
        return [Discard(self._key)]


class LookupMachine(_BrokerQuery):
    """LOOKUP ``digest``; afterwards :attr:`session_id` is the session found, or None.

    Raises ValueError at construction for a digest the protocol refuses (16..32 bytes)."""

    def __init__(self, request_id: bytes, digest: bytes, owner: bytes = b"") -> None:
        body = _body(Lookup, digest)
        frames = request_frames(Kind.LOOKUP, b"", request_id, body, owner)
        super().__init__(frames, (b"", request_id), Kind.FOUND)
        self.session_id: str | None = None

    def _check(self, reply: Reply) -> KvrouteError | None:
        if reply.kind is not Kind.FOUND:
            return error_reply(reply, "")
        try:
            found = Found.decode(reply.body).session
            self.session_id = None if found is None else found.decode()
        except ProtocolViolation as exc:
            return ProtocolError(exc.code, exc.message, remote=False)
        except UnicodeDecodeError:
            return ProtocolError(ErrorCode.BAD_BODY, "FOUND: session id is not UTF-8", remote=False)
        return None


class IndexMachine(_BrokerQuery):
    """INDEX ``digest`` under session ``session_id``.

    Raises ValueError at construction for a bad session id or digest."""

    def __init__(
        self, request_id: bytes, session_id: str, digest: bytes, owner: bytes = b""
    ) -> None:
        body = _body(Index, digest)
        try:
            frames = request_frames(Kind.INDEX, session_id.encode(), request_id, body, owner)
        except ProtocolViolation as exc:
            raise ValueError(exc.message) from exc
        super().__init__(frames, (session_id.encode(), request_id), Kind.INDEX_OK)
