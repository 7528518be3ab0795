"""Typed exceptions of the client library: every failure a caller can act on, with its numbers.

Errors cross the wire as messages (OVERFLOW, BUSY, ERROR, SESSION_LOST); the client turns each into
one of these. All derive from :class:`KvrouteError`, so ``except KvrouteError`` catches everything
the library raises on purpose. The history of a session is never changed by a turn that raised.
"""

from __future__ import annotations

from kvroute.proto import RETRYABLE_CODES, ErrorCode


class KvrouteError(Exception):
    """Base of every error the kvroute client raises."""


class ContextOverflow(KvrouteError):
    """The prompt plus ``max_tokens`` does not fit the worker's context; nothing was changed.

    Parameters
    ----------
    prompt_tokens
        Tokens of the rendered prompt (history + the new message).
    max_tokens
        Tokens requested for the reply.
    n_ctx
        Context length of the worker.
    """

    def __init__(self, prompt_tokens: int, max_tokens: int, n_ctx: int) -> None:
        self.prompt_tokens: int = prompt_tokens
        self.max_tokens: int = max_tokens
        self.n_ctx: int = n_ctx
        super().__init__(
            f"context overflow: prompt {prompt_tokens} + max_tokens {max_tokens} = {self.needed}"
            f" tokens > n_ctx {n_ctx} (over by {self.excess}); shorten the history, lower"
            " max_tokens, or send with on_overflow='drop_oldest'"
        )

    @property
    def needed(self) -> int:
        """Context positions the turn would need."""
        return self.prompt_tokens + self.max_tokens

    @property
    def excess(self) -> int:
        """Positions missing (``needed - n_ctx``)."""
        return self.needed - self.n_ctx


class SessionBusy(KvrouteError):
    """The session already has a request in flight (one turn at a time per session).

    Parameters
    ----------
    session_id
        The session that is busy.
    """

    def __init__(self, session_id: str) -> None:
        self.session_id: str = session_id
        super().__init__(
            f"session {session_id!r} is busy: it already has a request in flight; wait for it"
            " to end (or cancel it) before sending another"
        )


class SessionLost(KvrouteError):
    """The worker holding the session died with the turn in flight.

    The partial reply was not added to the history; send the same message again and it is served
    by another worker (cold, reason ``worker_lost``).

    Parameters
    ----------
    worker
        Id of the lost worker.
    reason
        Why the broker declared it lost (``heartbeat_timeout``, ``exited``, ...).
    retryable
        Whether resending is expected to succeed.
    """

    def __init__(self, worker: str, reason: str, retryable: bool = True) -> None:
        self.worker: str = worker
        self.reason: str = reason
        self.retryable: bool = retryable
        hint = "; send the message again" if retryable else ""
        super().__init__(f"worker {worker!r} lost mid-turn ({reason}){hint}")


class ProtocolError(KvrouteError):
    """A request was refused as malformed, or a reply broke the protocol.

    Parameters
    ----------
    code
        The error code: from the service's ERROR reply, or the one the client's own check
        reports (e.g. ``out_of_range`` for a sequence gap or a reply hash mismatch).
    message
        What was wrong.
    remote
        True when the service sent ERROR; False when the client detected the problem.
    """

    def __init__(self, code: ErrorCode, message: str, *, remote: bool = True) -> None:
        self.code: ErrorCode = code
        self.message: str = message
        self.remote: bool = remote
        side = "service" if remote else "client check"
        super().__init__(f"protocol error ({side}) {code}: {message}")


class Timeout(KvrouteError, TimeoutError):
    """No answer within the client's timeout (the broker may be down or unreachable).

    Parameters
    ----------
    seconds
        The timeout that expired.
    waiting_for
        What was awaited, e.g. ``"TURN reply"``.
    url
        The broker address.
    """

    def __init__(self, seconds: float, waiting_for: str, url: str) -> None:
        self.seconds: float = seconds
        self.waiting_for: str = waiting_for
        self.url: str = url
        super().__init__(f"no {waiting_for} from {url} within {seconds:g} s (is the broker up?)")


class ServiceUnavailable(KvrouteError):
    """The service cannot serve the request now (no live worker, overloaded, shutting down).

    Retrying later may succeed.

    Parameters
    ----------
    code
        ``no_worker``, ``overloaded`` or ``shutting_down``.
    message
        The service's explanation.
    """

    def __init__(self, code: ErrorCode, message: str) -> None:
        self.code: ErrorCode = code
        self.message: str = message
        super().__init__(f"service unavailable ({code}): {message}")


class NotOwner(KvrouteError):
    """The session belongs to another client identity; the request changed nothing.

    A session belongs to whoever created it: the CURVE key of that client, or without CURVE its
    owner token (``Client.owner_token``, random per client unless given). Use a session id of
    your own, or resume with the same key / owner token.

    Parameters
    ----------
    message
        The service's explanation.
    """

    def __init__(self, message: str) -> None:
        self.code: ErrorCode = ErrorCode.NOT_OWNER
        self.message: str = message
        super().__init__(f"not the session's owner: {message}")


class LimitReached(KvrouteError):
    """A per-client limit of the service was reached (sessions open, or requests in flight);
    the request was not run. Close sessions, or wait for turns to end, then retry.

    Parameters
    ----------
    message
        The service's explanation, with the count and the limit.
    """

    def __init__(self, message: str) -> None:
        self.code: ErrorCode = ErrorCode.LIMIT
        self.message: str = message
        super().__init__(f"client limit reached: {message}")


def error_for_code(code: ErrorCode, message: str) -> KvrouteError:
    """The exception for an ERROR reply from the service."""
    if code in RETRYABLE_CODES:
        return ServiceUnavailable(code, message)
    if code is ErrorCode.NOT_OWNER:
        return NotOwner(message)
    if code is ErrorCode.LIMIT:
        return LimitReached(message)
    return ProtocolError(code, message)
