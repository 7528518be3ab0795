"""STATUS, answered by the broker with the fleet view (a sans-I/O machine, run like a PING).

The answer is the protocol's :class:`~kvroute.proto.status.Fleet`: every registered worker
with its last heartbeat's gauges, the broker's own counters, and counters added up over every
worker process. It occupies no session.
"""

from __future__ import annotations

from collections import deque

from kvroute.proto import Fleet, Kind, ProtocolViolation, Reply, request_frames

from .actions import Action, Cleanup, Discard, Done, Phase, Raise, Receive, Send
from .demux import Key
from .errors import ProtocolError
from .replies import error_reply


class StatusMachine:
    """A STATUS to the broker; afterwards :attr:`fleet` is its answer."""

    def __init__(self, request_id: bytes) -> None:
        self.phase = Phase.NEW
        self.fleet: Fleet | None = None
        self._key: Key = (b"", request_id)
        self._queue: deque[Action] = deque()

    def start(self) -> None:
        self.phase = Phase.RUNNING
        self._queue.append(Send(request_frames(Kind.STATUS, b"", self._key[1]), self._key))

    def next_action(self) -> Action:
        return self._queue.popleft() if self._queue else Receive(self._key, "FLEET")

    def on_reply(self, reply: Reply | None) -> None:
        assert reply is not None, "only a request being waited out ends without a reply"
        if reply.kind is not Kind.FLEET:
            self._queue.append(Raise(error_reply(reply, "")))
            return
        try:
            self.fleet = Fleet.decode(reply.body)
        except ProtocolViolation as exc:
            self._queue.append(Raise(ProtocolError(exc.code, exc.message, remote=False)))
            return
        self.phase = Phase.DONE
        self._queue.append(Done())

    def fail(self, exc: BaseException) -> Cleanup:
        self.phase = Phase.DONE
        return [Discard(self._key)]
