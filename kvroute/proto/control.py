"""Bodies of errors, session loss and the worker <-> broker control messages."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any, ClassVar

from . import limits as L
from .errors import ErrorCode, ProtocolViolation
from .fields import Body, BodyReader


class LostReason(StrEnum):
    """Why a worker was declared lost (SESSION_LOST ``reason``)."""

    HEARTBEAT_TIMEOUT = "heartbeat_timeout"  # silent for liveness x heartbeat interval
    EXITED = "exited"  # its process exited (sentinel fd watched by the broker)
    UNREACHABLE = "unreachable"  # ZeroMQ no longer knows its connection (EHOSTUNREACH)
    RESTARTED = "restarted"  # the same worker id registered again (new epoch)
    DISCONNECTED = "disconnected"  # it sent DISCONNECT
    SHUTDOWN = "shutdown"  # sent by a worker ending its own turns as it stops


@dataclass(frozen=True, slots=True)
class ErrorReply(Body):
    """ERROR body: ``code`` from :class:`ErrorCode`, ``message`` free text (<= 1024 chars)."""

    WHAT: ClassVar[str] = "ERROR"
    code: ErrorCode
    message: str

    @classmethod
    def of(cls, exc: ProtocolViolation) -> ErrorReply:
        """The ERROR that answers a violation (message clipped to the limit)."""
        return cls(exc.code, exc.message[: L.MAX_ERROR_MESSAGE_CHARS])

    def to_map(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message}

    @classmethod
    def read(cls, r: BodyReader) -> ErrorReply:
        return cls(
            code=r.get_enum("code", ErrorCode),
            message=r.get_str("message", L.MAX_ERROR_MESSAGE_CHARS),
        )


@dataclass(frozen=True, slots=True)
class SessionLost(Body):
    """SESSION_LOST body: the worker owning the session is gone with the turn in flight.

    The session's KV state is gone too; ``retryable`` is true when resending the request (with
    the same history) will be served elsewhere, cold with reason ``worker_lost``.
    """

    WHAT: ClassVar[str] = "SESSION_LOST"
    worker: str
    reason: LostReason
    retryable: bool = True

    def to_map(self) -> dict[str, Any]:
        return {"worker": self.worker, "reason": self.reason, "retryable": self.retryable}

    @classmethod
    def read(cls, r: BodyReader) -> SessionLost:
        return cls(
            worker=r.get_str("worker", L.MAX_NAME_CHARS),
            reason=r.get_enum("reason", LostReason),
            retryable=r.get_bool("retryable"),
        )


@dataclass(frozen=True, slots=True)
class Ready(Body):
    """READY body: a worker registers (first message on a new socket, and after DISCONNECT).

    ``worker`` is a stable id (the one ``serve`` prints and END reports); ``epoch`` must change
    every time the worker (re)registers, e.g. ``time.time_ns()``: a READY with the same id and a
    different epoch tells the broker the old incarnation and its sessions are gone.
    ``capacity`` is the number of turns it runs concurrently; ``n_ctx`` its context length.
    """

    WHAT: ClassVar[str] = "READY"
    worker: str
    pid: int
    epoch: int
    capacity: int
    model: str
    n_ctx: int

    def to_map(self) -> dict[str, Any]:
        return {
            "worker": self.worker,
            "pid": self.pid,
            "epoch": self.epoch,
            "capacity": self.capacity,
            "model": self.model,
            "n_ctx": self.n_ctx,
        }

    @classmethod
    def read(cls, r: BodyReader) -> Ready:
        return cls(
            worker=r.get_str("worker", L.MAX_NAME_CHARS, min_chars=1),
            pid=r.get_int("pid", 0, L.MAX_COUNT),
            epoch=r.get_int("epoch", 0, L.MAX_COUNT),
            capacity=r.get_int("capacity", 1, L.MAX_CAPACITY),
            model=r.get_str("model", L.MAX_NAME_CHARS),
            n_ctx=r.get_int("n_ctx", 1, L.MAX_N_CTX),
        )


@dataclass(frozen=True, slots=True)
class Heartbeat(Body):
    """HEARTBEAT body from a worker: ``load`` turns in flight, ``sessions`` held, ``kv_bytes``
    of KV cache in use. The broker's HEARTBEAT to a worker has an empty body instead."""

    WHAT: ClassVar[str] = "HEARTBEAT"
    load: int = 0
    sessions: int = 0
    kv_bytes: int = 0

    def to_map(self) -> dict[str, Any]:
        return {"load": self.load, "sessions": self.sessions, "kv_bytes": self.kv_bytes}

    @classmethod
    def read(cls, r: BodyReader) -> Heartbeat:
        return cls(
            load=r.get_int("load", 0, L.MAX_COUNT),
            sessions=r.get_int("sessions", 0, L.MAX_COUNT),
            kv_bytes=r.get_int("kv_bytes", 0, L.MAX_COUNT),
        )


@dataclass(frozen=True, slots=True)
class Disconnect(Body):
    """DISCONNECT body (either direction): ``reason`` is free text for logs.

    From a worker: it is leaving; its turns in flight end with SESSION_LOST. From the broker:
    "I do not know you" -- the worker must drop all sessions and turns, recreate its socket and
    send READY with a new epoch.
    """

    WHAT: ClassVar[str] = "DISCONNECT"
    reason: str = ""

    def to_map(self) -> dict[str, Any]:
        return {"reason": self.reason}

    @classmethod
    def read(cls, r: BodyReader) -> Disconnect:
        return cls(reason=r.get_str("reason", L.MAX_NAME_CHARS))


def error_body(code: ErrorCode, message: str) -> bytes:
    """Encoded ERROR body (message clipped to its limit, so this never raises for length)."""
    return ErrorReply(code, message[: L.MAX_ERROR_MESSAGE_CHARS]).encode()
