"""Bodies of errors, session loss and the worker <-> broker control messages."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, ClassVar, NamedTuple

from msgspec import Meta

from . import limits as L
from .errors import ErrorCode, ProtocolViolation
from .fields import Body, Count, Name, NCtx, WorkerId
from .status import WorkerGauges


class LostReason(StrEnum):
    """Why a worker was declared lost (SESSION_LOST ``reason``)."""

    HEARTBEAT_TIMEOUT = "heartbeat_timeout"  # silent for liveness x heartbeat interval
    EXITED = "exited"  # its process exited (sentinel fd watched by the broker)
    UNREACHABLE = "unreachable"  # ZeroMQ no longer knows its connection (EHOSTUNREACH)
    RESTARTED = "restarted"  # the same worker id registered again (new epoch)
    DISCONNECTED = "disconnected"  # it sent DISCONNECT
    SHUTDOWN = "shutdown"  # reserved: still valid on the wire, sent by nothing today


class ErrorReply(Body, frozen=True):
    """ERROR body: ``code`` from :class:`ErrorCode`, ``message`` free text."""

    WHAT: ClassVar[str] = "ERROR"
    code: ErrorCode
    message: Annotated[str, Meta(max_length=L.MAX_ERROR_MESSAGE_CHARS)]

    @classmethod
    def of(cls, exc: ProtocolViolation) -> ErrorReply:
        """The ERROR that answers a violation (message clipped to the limit)."""
        return cls(exc.code, exc.message[: L.MAX_ERROR_MESSAGE_CHARS])


class SessionLost(Body, frozen=True):
    """SESSION_LOST body: the worker owning the session is gone with the turn in flight.

    The session's KV state is gone too; ``retryable`` is true when resending the request (with
    the same history) will be served elsewhere, cold with reason ``worker_lost``.
    """

    WHAT: ClassVar[str] = "SESSION_LOST"
    worker: Name
    reason: LostReason
    retryable: bool = True


SessionId = Annotated[bytes, Meta(min_length=1, max_length=L.MAX_SESSION_ID_BYTES)]
Owner = Annotated[bytes, Meta(min_length=1, max_length=L.MAX_OWNER_BYTES)]


class Resident(NamedTuple):
    """A session a worker holds, as READY announces it (one msgpack array per session).

    ``owner`` is the principal the broker gave with the session's TURNs (see :mod:`.frames`);
    ``idle_ms`` the time since its last turn started, by the worker's monotonic clock (the
    broker uses it for idle-pin expiry); ``last_turn_ns`` the wall-clock time (ns since the
    epoch) that turn started. When two workers announce one session, the later ``last_turn_ns``
    wins: wall clocks are comparable across hosts and survive the READY waiting in a queue,
    which a relative age does not.
    """

    session_id: SessionId
    owner: Owner
    kv_bytes: Count
    idle_ms: Annotated[float, Meta(ge=0.0, le=L.MAX_IDLE_MS)]
    last_turn_ns: Count


class Ready(Body, frozen=True, omit_defaults=True):
    """READY body: a worker registers (first message on every new socket).

    ``worker`` is a stable id (the one ``serve`` prints and END reports); ``epoch`` must change
    every time the worker (re)registers, e.g. ``time.time_ns()``. The same connection and epoch
    again is a retransmission and changes nothing. A READY with the id of a worker registered
    from another connection that is still connected and heard from is refused (control ERROR
    ``not_owner``): the live worker keeps its sessions. Once the old connection is gone, the
    new READY replaces it (its turns in flight end with SESSION_LOST ``restarted``).
    ``capacity`` is the number of turns it runs concurrently; ``n_ctx`` its context length.

    ``sessions`` lists the sessions the worker still holds (:class:`Resident`), no session id
    twice (checked). The field is left out when empty, so a READY without sessions is the same
    as before the field existed. The broker pins each to this worker under its announced owner,
    unless it knows the session under another owner, has routed a request for it since it
    (re)started, or another worker announced a later turn of it: then it sends this worker a
    CLOSE for the session (empty client frame), and the worker drops it.
    """

    WHAT: ClassVar[str] = "READY"
    worker: WorkerId
    pid: Count
    epoch: Count
    capacity: Annotated[int, Meta(ge=1, le=L.MAX_CAPACITY)]
    model: Name
    n_ctx: NCtx
    sessions: Annotated[tuple[Resident, ...], Meta(max_length=L.MAX_RESIDENT_SESSIONS)] = ()

    def check(self) -> None:
        """No session id twice in ``sessions`` (``bad_body``)."""
        if len({s.session_id for s in self.sessions}) != len(self.sessions):
            raise ProtocolViolation(ErrorCode.BAD_BODY, "READY.sessions: a session id repeats")


class Heartbeat(Body, frozen=True):
    """HEARTBEAT body from a worker: ``load`` turns in flight, ``sessions`` held, ``kv_bytes``
    of KV cache in use. The broker's HEARTBEAT to a worker has an empty body instead.

    ``gauges`` (optional, left out when nil, so a worker without them sends the HEARTBEAT of
    before): what the fleet view shows of this worker (:class:`~.status.WorkerGauges`). A
    broker of an older release answers a HEARTBEAT with gauges with a control ERROR naming
    the field; the worker then stops sending them.
    """

    WHAT: ClassVar[str] = "HEARTBEAT"
    OPTIONAL: ClassVar[frozenset[str]] = frozenset({"gauges"})
    load: Count = 0
    sessions: Count = 0
    kv_bytes: Count = 0
    gauges: WorkerGauges | None = None

    def check(self) -> None:
        """The gauges' cold reasons add up to their cold turns, and cached + prefill tokens to
        prompt tokens (``out_of_range``)."""
        if self.gauges is not None:
            self.gauges.counters.check("HEARTBEAT.gauges.counters")


class Disconnect(Body, frozen=True):
    """DISCONNECT body (either direction): ``reason`` is free text for logs.

    From a worker: it is leaving; its turns in flight end with SESSION_LOST. From the broker:
    "I do not know you" -- the worker must end its turns in flight (nobody can receive their
    replies any more), recreate its socket and send READY with a new epoch, announcing the
    sessions it still holds; the broker answers with a CLOSE for each it will not re-pin.
    """

    WHAT: ClassVar[str] = "DISCONNECT"
    reason: Name = ""


def error_body(code: ErrorCode, message: str) -> bytes:
    """Encoded ERROR body (message clipped to its limit, so this never raises for length)."""
    return ErrorReply(code, message[: L.MAX_ERROR_MESSAGE_CHARS]).encode()
