"""A session's history on the client: what a turn is sent with, how it shrinks, how it grows.

- :class:`Conversation`: the session id, the history, the last result and the messages dropped
  so far; :meth:`Conversation.commit` is the only writer of the three after a turn.
- :class:`Attempt`: one ``send()``: the user's text, the sampling settings and the TURN body
  built from a working copy of the history, which the overflow policy may trim.

I/O-free; :mod:`~kvroute.client.core` drives these through a turn.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from kvroute.proto import ChatMessage, ProtocolViolation, Role, TurnEnd, TurnRequest
from kvroute.proto.limits import MAX_SESSION_ID_BYTES

from .errors import ContextOverflow
from .result import TurnResult

logger = logging.getLogger(__name__)

OnOverflow = Literal["raise", "drop_oldest"]


def new_session_id() -> str:
    """A fresh random session id (uuid4 hex: 32 ASCII characters)."""
    return uuid.uuid4().hex


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
        chat,
        params.max_tokens,
        params.temperature,
        params.top_p,
        params.top_k,
        params.seed,
        params.stop,
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
        self._rebuild()

    def refresh(self, history: Iterable[Mapping[str, str]]) -> None:
        """Take the session's history as it is now (when the turn really starts)."""
        self.history = [_checked_message(m) for m in history]
        self._rebuild()

    def shrink(self, overflow: ContextOverflow, session_id: str = "") -> bool:
        """Apply the overflow policy; True if the TURN should be sent again.

        ``drop_oldest`` drops whole turns, oldest first, until the dropped text is estimated to
        free ``overflow.excess`` tokens (at the prompt's own chars-per-token ratio), so one retry
        usually suffices; the worker's next answer decides. False when the policy is ``raise`` or
        nothing is left to drop. What it drops is logged as a WARNING with the numbers (the
        default policy must never lose history silently), besides ``TurnResult.dropped``.
        """
        if self.on_overflow != "drop_oldest":
            return False
        chars = sum(len(m["content"]) for m in self.history) + len(self.text)
        chars_per_token = max(chars / max(overflow.prompt_tokens, 1), 0.5)
        freed = 0.0
        turns = messages = 0
        while freed < overflow.excess:
            turn = _oldest_turn(self.history)
            if not turn:
                break
            # +1: template markup adds tokens per message; guessing low only costs a retry.
            freed += sum(len(self.history[i]["content"]) for i in turn) / chars_per_token + 1
            for i in reversed(turn):
                del self.history[i]
            turns += 1
            messages += len(turn)
        if not messages:
            return False
        self.dropped += messages
        self._rebuild()
        logger.warning(
            "session %s: %d prompt tokens + max_tokens %d exceed n_ctx %d by %d:"
            " dropped the oldest %d turn(s) (%d messages; %d so far in this send), sending it"
            " again (on_overflow='drop_oldest'; 'raise' keeps the history and raises instead)",
            session_id or "?",
            overflow.prompt_tokens,
            overflow.max_tokens,
            overflow.n_ctx,
            overflow.excess,
            turns,
            messages,
            self.dropped,
        )
        return True

    def _rebuild(self) -> None:
        """Encode the TURN body for the current history (raises ValueError for bad arguments)."""
        user = {"role": str(Role.USER), "content": self.text}
        self.params, self.body = _as_request([*self.history, user], self.params)


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
        stop: str | Sequence[str] | None = None,
    ) -> Attempt:
        """Validate a send's arguments and build its first TURN (raises ValueError)."""
        if not isinstance(text, str):
            raise ValueError(f"text must be str, got {type(text).__name__}")
        stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
        if not all(isinstance(s, str) for s in stops):
            raise ValueError("stop must be a string or a sequence of strings")
        params = TurnRequest((), max_tokens, temperature, top_p, top_k, seed, stops)
        history = [_checked_message(m) for m in self.history]  # the user may have edited it
        return Attempt(text, params, on_overflow, history)

    def commit(
        self, attempt: Attempt, end: TurnEnd, reply: str, ttft_ms: float | None, elapsed_ms: float
    ) -> TurnResult:
        """Record a finished turn: the history gains the user text and the reply as streamed."""
        history = [
            *attempt.history,
            {"role": str(Role.USER), "content": attempt.text},
            {"role": str(Role.ASSISTANT), "content": reply},
        ]
        result = TurnResult(end, reply, attempt.dropped, ttft_ms, elapsed_ms)
        # Plain assignments only from here (no call an interrupt could land after): the three
        # attributes change together.
        self.history, self.last, self.dropped = history, result, self.dropped + attempt.dropped
        return result

    def forget(self) -> None:
        """After RESET: keep only the leading system prompt."""
        keep = 1 if self.history and self.history[0]["role"] == Role.SYSTEM else 0
        self.history = self.history[:keep]
