"""The client's I/O-free core, shared by the sync and asyncio adapters.

- :class:`Conversation`: a session's history, the TURN built from it, the overflow policy and the
  commit of a finished turn (DESIGN §1 rule 7: the reply is appended exactly as streamed).
- :class:`TurnStream`: checks one TURN's replies (sequence numbers, reply hash) and turns
  terminal replies into typed exceptions.
- :class:`Demux`: per-request queues, so replies for other sessions read off the shared socket
  reach their own session instead of being dropped.

Nothing here touches a socket or a clock; the adapters in :mod:`~kvroute.client.sync` and
:mod:`~kvroute.client.aio` poll, receive and call these.
"""

from __future__ import annotations

import itertools
import logging
import uuid
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from kvroute.proto import (
    TERMINAL_KINDS,
    ChatMessage,
    ErrorCode,
    ErrorReply,
    Kind,
    Overflow,
    ProtocolViolation,
    Reply,
    Role,
    Token,
    TurnEnd,
    TurnRequest,
    decode_empty,
    parse_reply,
    reply_sha256,
)
from kvroute.proto import SessionLost as LostBody
from kvroute.proto.limits import MAX_SESSION_ID_BYTES

from .errors import (
    ContextOverflow,
    KvrouteError,
    ProtocolError,
    SessionBusy,
    SessionLost,
    error_for_code,
)
from .result import TurnResult

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT: float = 30.0
"""Seconds a client waits for each reply frame (the CLI takes its default from here)."""
DEFAULT_MAX_TOKENS: int = 256
"""Default ``max_tokens`` of a turn."""
DEFAULT_LINGER: float = 0.1
"""Seconds unsent frames may delay :meth:`close` (ZeroMQ's default, forever, would hang it)."""

OnOverflow = Literal["raise", "drop_oldest"]
Key = tuple[bytes, bytes]
"""(session id, request id): how replies are routed to the request that awaits them."""


def new_session_id() -> str:
    """A fresh random session id (uuid4 hex: 32 ASCII characters)."""
    return uuid.uuid4().hex


class RequestIds:
    """Request ids unique within one client (a counter; ``next`` on it is atomic in CPython)."""

    def __init__(self) -> None:
        self._n = itertools.count(1)

    def next(self) -> bytes:
        return b"%x" % next(self._n)


def _checked_message(m: Mapping[str, str]) -> dict[str, str]:
    try:
        role, content = Role(m["role"]), m["content"]
    except (KeyError, ValueError, TypeError) as exc:
        raise ValueError(f"history entries are {{'role', 'content'}} maps: {m!r:.80}") from exc
    if not isinstance(content, str):
        raise ValueError(f"history content must be str, got {type(content).__name__}")
    return {"role": str(role), "content": content}


def _as_request(
    messages: Iterable[Mapping[str, str]], params: TurnRequest
) -> tuple[TurnRequest, bytes]:
    chat = tuple(ChatMessage(Role(m["role"]), m["content"]) for m in messages)
    req = TurnRequest(
        chat, params.max_tokens, params.temperature, params.top_p, params.top_k, params.seed
    )
    try:
        return req, req.encode()
    except ProtocolViolation as exc:  # our own argument checks, before anything is sent
        raise ValueError(exc.message) from exc


def _oldest_turn(messages: list[dict[str, str]]) -> list[int]:
    """Indices of the oldest non-system turn: a user message and the replies that follow it."""
    idx = [i for i, m in enumerate(messages) if m["role"] != Role.SYSTEM]
    if not idx:
        return []
    turn = [idx[0]]
    for i in idx[1:]:
        if messages[i]["role"] == Role.USER:
            break
        turn.append(i)
    return turn


@dataclass
class Attempt:
    """One ``send``: the user's text, sampling settings and the history it is sent with.

    ``history`` is a working copy: ``drop_oldest`` trims it, and it replaces the session's history
    only when the turn ends (a turn that raises changes nothing).
    """

    text: str
    params: TurnRequest
    on_overflow: OnOverflow
    history: list[dict[str, str]]
    dropped: int = 0
    body: bytes = field(init=False, default=b"")

    def __post_init__(self) -> None:
        if self.on_overflow not in ("raise", "drop_oldest"):
            raise ValueError(f"on_overflow is 'raise' or 'drop_oldest', not {self.on_overflow!r}")
        self.rebuild()

    def refresh(self, history: Iterable[Mapping[str, str]]) -> None:
        """Take the session's history as it is now (when the turn really starts)."""
        self.history = [_checked_message(m) for m in history]
        self.rebuild()

    def rebuild(self) -> None:
        """Encode the TURN body for the current history (raises ValueError for bad arguments)."""
        user = {"role": str(Role.USER), "content": self.text}
        self.params, self.body = _as_request([*self.history, user], self.params)

    def shrink(self, overflow: ContextOverflow) -> bool:
        """Apply the overflow policy; True if the TURN should be sent again.

        ``drop_oldest`` drops whole turns, oldest first, until the dropped text is estimated to
        free ``overflow.excess`` tokens (at the prompt's own chars-per-token ratio), so one retry
        usually suffices; the worker's next answer decides. False when the policy is ``raise`` or
        nothing is left to drop.
        """
        if self.on_overflow != "drop_oldest":
            return False
        chars = sum(len(m["content"]) for m in self.history) + len(self.text)
        chars_per_token = max(chars / max(overflow.prompt_tokens, 1), 0.5)
        freed = 0.0
        dropped_now = 0
        while freed < overflow.excess:
            turn = _oldest_turn(self.history)
            if not turn:
                break
            # +1: template markup adds tokens per message; guessing low only costs a retry.
            freed += sum(len(self.history[i]["content"]) for i in turn) / chars_per_token + 1
            for i in reversed(turn):
                del self.history[i]
            dropped_now += len(turn)
        if not dropped_now:
            return False
        self.dropped += dropped_now
        logger.info("overflow by %d tokens: dropped %d messages", overflow.excess, dropped_now)
        self.rebuild()
        return True


class Conversation:
    """A session's client-side state: id, history, last result, messages dropped.

    Parameters
    ----------
    session_id
        The session id (1..64 bytes of UTF-8); None for a fresh uuid4 hex.
    system
        A system prompt, stored as the first history message.
    history
        Earlier ``{"role", "content"}`` messages to resume from (e.g. a saved chat).
    """

    def __init__(
        self,
        session_id: str | None = None,
        system: str | None = None,
        history: Iterable[Mapping[str, str]] | None = None,
    ) -> None:
        self.id: str = session_id if session_id is not None else new_session_id()
        self.key: bytes = self.id.encode()
        if not 1 <= len(self.key) <= MAX_SESSION_ID_BYTES:
            raise ValueError(f"session id must be 1..{MAX_SESSION_ID_BYTES} bytes of UTF-8")
        msgs = [_checked_message(m) for m in history or ()]
        if system is not None:
            if msgs and msgs[0]["role"] == Role.SYSTEM:
                raise ValueError("give the system prompt either as system= or in history, not both")
            msgs.insert(0, {"role": str(Role.SYSTEM), "content": system})
        self.history: list[dict[str, str]] = msgs
        self.last: TurnResult | None = None
        self.dropped: int = 0

    def attempt(
        self,
        text: str,
        *,
        max_tokens: int,
        temperature: float,
        top_p: float,
        top_k: int,
        seed: int | None,
        on_overflow: OnOverflow,
    ) -> Attempt:
        """Validate a send's arguments and build its first TURN (raises ValueError)."""
        if not isinstance(text, str):
            raise ValueError(f"text must be str, got {type(text).__name__}")
        params = TurnRequest((), max_tokens, temperature, top_p, top_k, seed)
        history = [_checked_message(m) for m in self.history]  # the user may have edited it
        return Attempt(text, params, on_overflow, history)

    def commit(
        self, attempt: Attempt, end: TurnEnd, reply: str, ttft_ms: float | None, elapsed_ms: float
    ) -> TurnResult:
        """Record a finished turn: the history gains the user text and the reply as streamed."""
        self.history = [
            *attempt.history,
            {"role": str(Role.USER), "content": attempt.text},
            {"role": str(Role.ASSISTANT), "content": reply},
        ]
        self.dropped += attempt.dropped
        self.last = TurnResult(end, reply, attempt.dropped, ttft_ms, elapsed_ms)
        return self.last

    def forget(self) -> None:
        """After RESET: keep only the leading system prompt."""
        keep = 1 if self.history and self.history[0]["role"] == Role.SYSTEM else 0
        self.history = self.history[:keep]


def terminal_error(reply: Reply, session_id: str) -> KvrouteError:
    """The exception for a terminal reply that is not the one awaited (raises nothing).

    Bodies that fail to decode become a client-side :class:`ProtocolError`.
    """
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
        return ProtocolError(exc.code, exc.message, remote=False)
    unexpected = f"unexpected {reply.kind.name} reply"
    return ProtocolError(ErrorCode.UNKNOWN_KIND, unexpected, remote=False)


def check_ack(reply: Reply, ok: Kind, session_id: str) -> None:
    """Accept the reply ``ok`` (empty body) to a RESET / CLOSE / PING, else raise its error."""
    if reply.kind is ok:
        try:
            decode_empty(reply.body, ok.name)
        except ProtocolViolation as exc:
            raise ProtocolError(exc.code, exc.message, remote=False) from exc
        return
    raise terminal_error(reply, session_id)


class TurnStream:
    """The replies of one TURN, checked as they arrive.

    Parameters
    ----------
    session_id
        For error messages.
    """

    def __init__(self, session_id: str) -> None:
        self.session_id = session_id
        self.parts: list[str] = []
        self.seq = 0  # TOKEN frames received
        self.done = False  # a terminal reply arrived: nothing more will come for this request

    @property
    def text(self) -> str:
        """The reply streamed so far."""
        return "".join(self.parts)

    def feed(self, reply: Reply) -> str | TurnEnd:
        """Take one reply: a TOKEN's text (may be empty), or END once the stream checks out.

        Raises
        ------
        ContextOverflow, SessionBusy, SessionLost, ServiceUnavailable, ProtocolError
            For the other terminal replies; ProtocolError (client side) for a sequence gap, a
            reply hash mismatch or an undecodable body.
        """
        self.done = reply.kind in TERMINAL_KINDS
        try:
            if reply.kind is Kind.TOKEN:
                tok = Token.decode(reply.body)
                if tok.seq != self.seq:
                    raise self._broken(f"TOKEN seq {tok.seq}, expected {self.seq} (frames lost)")
                self.seq += 1
                self.parts.append(tok.text)
                return tok.text
            if reply.kind is Kind.END:
                end = TurnEnd.decode(reply.body)
                if end.seq != self.seq:
                    raise self._broken(f"END says {end.seq} TOKEN frames, {self.seq} arrived")
                if reply_sha256(self.text) != end.reply_sha256:
                    raise self._broken(
                        "reply hash mismatch: the streamed text is not what the worker committed"
                    )
                return end
        except ProtocolViolation as exc:
            raise ProtocolError(exc.code, exc.message, remote=False) from exc
        raise terminal_error(reply, self.session_id)

    def _broken(self, message: str) -> ProtocolError:
        return ProtocolError(
            ErrorCode.OUT_OF_RANGE, f"session {self.session_id!r}: {message}", remote=False
        )


class Demux:
    """Per-request reply queues. Not locked: each adapter guards it its own way."""

    def __init__(self) -> None:
        self._queues: dict[Key, deque[Reply]] = {}

    def open(self, key: Key) -> None:
        """Start collecting replies for a request (before its first frame is sent)."""
        self._queues[key] = deque()

    def close(self, key: Key) -> None:
        """Stop collecting: later replies for it are dropped (e.g. after a timeout)."""
        self._queues.pop(key, None)

    def pop(self, key: Key) -> Reply | None:
        """The oldest queued reply of a request, or None."""
        q = self._queues.get(key)
        return q.popleft() if q else None

    def dispatch(self, frames: list[bytes]) -> None:
        """Queue a received message for its request; log and drop what cannot be routed."""
        try:
            reply = parse_reply(frames)
        except ProtocolViolation as exc:
            logger.warning("dropped a malformed message from the broker: %s", exc)
            return
        q = self._queues.get((reply.session_id, reply.request_id))
        if q is None:
            # Late replies of an abandoned request (timeout) land here; nobody awaits them.
            logger.debug(
                "dropped %s for session %r request %r: nobody waits for it",
                reply.kind.name,
                reply.session_id,
                reply.request_id,
            )
            return
        q.append(reply)


class SessionView:
    """What sync and asyncio sessions share: attributes read from their `Conversation`."""

    _conv: Conversation

    @property
    def id(self) -> str:
        """The session id."""
        return self._conv.id

    @property
    def history(self) -> list[dict[str, str]]:
        """The messages sent with every turn (editable between turns)."""
        return self._conv.history

    @history.setter
    def history(self, messages: list[dict[str, str]]) -> None:
        self._conv.history = messages

    @property
    def last(self) -> TurnResult | None:
        """Result of the last finished turn (None before the first)."""
        return self._conv.last

    @property
    def dropped(self) -> int:
        """Messages dropped so far by ``on_overflow="drop_oldest"``."""
        return self._conv.dropped
