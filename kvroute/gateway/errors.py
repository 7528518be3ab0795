"""HTTP errors in the OpenAI shape, and the mapping from the client library's typed errors.

Every error the gateway answers is an :class:`ApiError`: an HTTP status and the body
``{"error": {"message", "type", "param", "code", ...}}`` that OpenAI clients parse. The mapping
(:func:`from_client_error`) is the one place where a kvroute failure becomes a status:

=========================  ======  =============================================
client library             status  code
=========================  ======  =============================================
ContextOverflow            400     ``context_length_exceeded`` (+ n_prompt_tokens, n_ctx)
ValueError (bad argument)  400     ``invalid_value``
LimitReached               429     ``rate_limit_exceeded``
ServiceUnavailable         503     ``no_worker`` / ``overloaded`` / ``shutting_down``
SessionLost                503     ``worker_lost``
Timeout                    504     ``broker_timeout``
NotOwner, SessionBusy      409     ``not_owner`` / ``session_busy`` (the gateway falls back
                                   to a fresh session first, so these are rare)
ProtocolError              502     the protocol's error code
=========================  ======  =============================================
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kvroute.client import (
    ContextOverflow,
    KvrouteError,
    LimitReached,
    NotOwner,
    ProtocolError,
    ServiceUnavailable,
    SessionBusy,
    SessionLost,
    Timeout,
)

INVALID_REQUEST = "invalid_request_error"


@dataclass(eq=False)
class ApiError(Exception):
    """An error answer: HTTP ``status`` and the OpenAI error object.

    Attributes
    ----------
    status
        HTTP status code.
    message
        Human-readable explanation.
    type
        OpenAI error type (``invalid_request_error``, ``rate_limit_error``, ...).
    param
        The request field at fault (dotted path, e.g. ``messages[2].content``), or None.
    code
        A machine-readable code, or None.
    extra
        More fields of the error object (e.g. ``n_ctx`` for a context overflow).
    """

    status: int
    message: str
    type: str = INVALID_REQUEST
    param: str | None = None
    code: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__init__(self.message)

    def body(self) -> dict[str, Any]:
        """The JSON body: ``{"error": {...}}``."""
        err = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        err.update(self.extra)
        return {"error": err}


def invalid(message: str, param: str | None = None, code: str = "invalid_value") -> ApiError:
    """A 400 for a request the gateway refuses (bad JSON, a bad or unsupported field)."""
    return ApiError(400, message, INVALID_REQUEST, param, code)


def rate_limited(message: str) -> ApiError:
    """A 429 ``rate_limit_exceeded`` (the worker's limits, or this gateway's)."""
    return ApiError(429, message, "rate_limit_error", None, "rate_limit_exceeded")


def unavailable(message: str, code: str) -> ApiError:
    """A 503 ``service_unavailable`` with ``code`` (no worker, no broker, ...)."""
    return ApiError(503, message, "service_unavailable", None, code)


def overflow_error(exc: ContextOverflow) -> ApiError:
    """400 ``context_length_exceeded``, worded as OpenAI words it (clients match the prefix)."""
    message = (
        f"This model's maximum context length is {exc.n_ctx} tokens. However, you requested "
        f"{exc.needed} tokens ({exc.prompt_tokens} in the messages, {exc.max_tokens} in the "
        "completion). Please reduce the length of the messages or completion."
    )
    extra = {"n_prompt_tokens": exc.prompt_tokens, "n_ctx": exc.n_ctx}
    return ApiError(400, message, INVALID_REQUEST, "messages", "context_length_exceeded", extra)


def from_client_error(exc: Exception) -> ApiError:
    """The HTTP answer for an exception the client library raised for a turn."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, ContextOverflow):
        return overflow_error(exc)
    if isinstance(exc, LimitReached):
        return rate_limited(exc.message)
    if isinstance(exc, ServiceUnavailable):
        return unavailable(exc.message, str(exc.code))
    if isinstance(exc, SessionLost):
        return unavailable(str(exc), "worker_lost")
    if isinstance(exc, Timeout):
        return ApiError(504, str(exc), "timeout", None, "broker_timeout")
    if isinstance(exc, NotOwner):
        return ApiError(409, exc.message, INVALID_REQUEST, None, "not_owner")
    if isinstance(exc, SessionBusy):
        return ApiError(409, str(exc), INVALID_REQUEST, None, "session_busy")
    if isinstance(exc, ProtocolError):
        return ApiError(502, str(exc), "upstream_error", None, str(exc.code))
    if isinstance(exc, KvrouteError):  # e.g. the client was closed under a request
        return unavailable(str(exc), "unavailable")
    if isinstance(exc, ValueError):  # the library's own argument checks (protocol limits)
        return invalid(str(exc), "messages")
    raise TypeError(f"not a client error: {exc!r}") from exc
