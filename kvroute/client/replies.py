"""What a reply means to the client: a piece of text, a checked END, or a typed exception.

Replies come from the network, so nothing here raises for what they say: each function returns
the exception a reply means and :mod:`~kvroute.client.core` decides what to do with it. Bodies
that do not decode become a client-side :class:`~kvroute.client.errors.ProtocolError`.
"""

from __future__ import annotations

from kvroute.proto import (
    ErrorCode,
    ErrorReply,
    Kind,
    Overflow,
    ProtocolViolation,
    Reply,
    Token,
    TurnEnd,
    decode_empty,
    reply_sha256,
)
from kvroute.proto import SessionLost as LostBody

from .errors import (
    ContextOverflow,
    KvrouteError,
    ProtocolError,
    SessionBusy,
    SessionLost,
    error_for_code,
)


def error_reply(reply: Reply, session_id: str) -> KvrouteError:
    """The exception a terminal reply means when it is not the one awaited."""
    try:
        if reply.kind is Kind.OVERFLOW:
            o = Overflow.decode(reply.body)
            return ContextOverflow(o.prompt_tokens, o.max_tokens, o.n_ctx)
        if reply.kind is Kind.BUSY:
            decode_empty(reply.body, "BUSY")
            return SessionBusy(session_id)
        if reply.kind is Kind.ERROR:
            err = ErrorReply.decode(reply.body)
            return error_for_code(err.code, err.message)
        if reply.kind is Kind.SESSION_LOST:
            lost = LostBody.decode(reply.body)
            return SessionLost(lost.worker, str(lost.reason), lost.retryable)
    except ProtocolViolation as exc:
        return _client_error(exc)
    unexpected = f"unexpected {reply.kind.name} reply"
    return ProtocolError(ErrorCode.UNKNOWN_KIND, unexpected, remote=False)


def ack_error(reply: Reply, ok: Kind, session_id: str) -> KvrouteError | None:
    """None if ``reply`` is ``ok`` (RESET_OK, CLOSE_OK or PONG, with an empty body), else the
    error it means."""
    if reply.kind is not ok:
        return error_reply(reply, session_id)
    try:
        decode_empty(reply.body, ok.name)
    except ProtocolViolation as exc:
        return _client_error(exc)
    return None


def turn_reply(parts: list[str], reply: Reply, session_id: str) -> str | TurnEnd | KvrouteError:
    """One reply of a TURN whose TOKEN texts so far are ``parts``: a TOKEN's text (appended to
    ``parts``; it may be empty), the END once the stream checks out (as many TOKENs as it says,
    and the hash of their text), or the error the reply means."""
    try:
        if reply.kind is Kind.TOKEN:
            tok = Token.decode(reply.body)
            if tok.seq != len(parts):
                return _broken(session_id, f"TOKEN seq {tok.seq}, expected {len(parts)} (lost)")
            parts.append(tok.text)
            return tok.text
        if reply.kind is Kind.END:
            end = TurnEnd.decode(reply.body)
            if end.seq != len(parts):
                return _broken(session_id, f"END says {end.seq} TOKENs, {len(parts)} arrived")
            if reply_sha256("".join(parts)) != end.reply_sha256:
                return _broken(session_id, "reply hash mismatch: not what the worker committed")
            return end
    except ProtocolViolation as exc:
        return _client_error(exc)
    return error_reply(reply, session_id)


def _broken(session_id: str, message: str) -> ProtocolError:
    return ProtocolError(ErrorCode.OUT_OF_RANGE, f"session {session_id!r}: {message}", remote=False)


def _client_error(exc: ProtocolViolation) -> ProtocolError:
    err = ProtocolError(exc.code, exc.message, remote=False)
    err.__cause__ = exc
    return err
