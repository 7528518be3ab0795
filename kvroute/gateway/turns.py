"""One chat completion as one kvroute turn: pick the session, send, cut at stop strings, retry.

:meth:`TurnRunner.run` is an async generator of the reply's text pieces followed by one
:class:`Finished`. It uses only the client library's public API: a session object per request
(``client.session(id, history=...)``, whose history is the request's messages but the last) and
``send`` of the last user message. A task cancelled inside it (a client that disconnected)
makes the library send CANCEL for the turn; closing the library's stream early (a stop string)
also waits for the turn's END.

What it retries, and only while nothing was released to the caller yet:

- BUSY or NOT_OWNER on the session it picked: once more on a fresh session (a parallel
  regeneration, or a key whose session another client identity holds);
- SESSION_LOST: once more on the same session, which the broker places on another worker (cold,
  reason ``worker_lost``).

Stop strings are applied here, on the streamed text (:class:`~kvroute.gateway.stop.StopMatcher`):
the reply is cut before the match and the turn is cancelled. The worker still commits what it
generated up to the cancel, so the next turn of that conversation differs from the session's
text and takes the token-prefix path instead of the text-prefix one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from kvroute.client import (
    AsyncClient,
    KvrouteError,
    NotOwner,
    ProtocolError,
    ServiceUnavailable,
    SessionBusy,
    SessionLost,
    TurnResult,
)
from kvroute.proto import ErrorCode, FinishReason, Role

from .affinity import Affinity, Route
from .config import GatewayConfig
from .request import ChatRequest
from .stop import StopMatcher

logger = logging.getLogger(__name__)

LOST_RETRIES = 1
"""Resends of a turn whose worker was lost before it released any text."""


@dataclass(frozen=True, slots=True)
class Finished:
    """The end of a turn: what the client got and what the worker reported.

    Attributes
    ----------
    route
        The session that served it and how it was chosen.
    result
        The library's turn result (the worker's stats).
    reply
        The reply text as released (cut before a stop string).
    finish_reason
        OpenAI's: ``stop`` (end of turn or a stop string) or ``length``.
    """

    route: Route
    result: TurnResult
    reply: str
    finish_reason: str


Observer = Callable[[TurnResult | KvrouteError], None]
"""Told every turn's result or library error (the fleet view learns live workers from it)."""


class TurnRunner:
    """Runs chat requests as turns over one :class:`~kvroute.AsyncClient`.

    Parameters
    ----------
    client
        The connection to the broker.
    affinity
        Picks sessions and learns transcripts.
    config
        Defaults for unset sampling fields.
    observe
        Optional callback for every turn's outcome.
    """

    def __init__(
        self,
        client: AsyncClient,
        affinity: Affinity,
        config: GatewayConfig,
        observe: Observer | None = None,
    ) -> None:
        self.client = client
        self.affinity = affinity
        self.config = config
        self._observe = observe
        self._closing: set[asyncio.Task[None]] = set()

    async def run(
        self, req: ChatRequest, header_key: str | None = None
    ) -> AsyncIterator[str | Finished]:
        """Text pieces of the reply, then one :class:`Finished`.

        Raises
        ------
        KvrouteError
            The library's typed errors (after the retries above); ValueError for arguments
            the protocol refuses (e.g. too much text).
        """
        route = self.affinity.resolve(req, header_key)
        lost_left = LOST_RETRIES
        while True:
            self.affinity.begin(route)
            transcript: list[dict[str, str]] | None = None
            released = False
            try:
                matcher = StopMatcher(req.stop)
                ended: list[TurnResult] = []
                async for piece in self._pieces(route, req, matcher, ended):
                    released = True
                    yield piece
                result = ended[0]
                reply = matcher.text
                transcript = [*req.messages, {"role": str(Role.ASSISTANT), "content": reply}]
                self._tell(result)
                yield Finished(route, result, reply, _finish_reason(result, matcher))
                return
            except (SessionBusy, NotOwner) as exc:
                if released:
                    raise
                logger.info("session %s: %s; running on a fresh session", route.session_id, exc)
                retry = self.affinity.fallback()
            except SessionLost as exc:
                self._tell(exc)
                if released or lost_left == 0:
                    raise
                lost_left -= 1
                logger.info("session %s: %s; sending again", route.session_id, exc)
                retry = route
            except KvrouteError as exc:
                self._tell(exc)
                raise
            finally:
                self._close_later(self.affinity.end(route, transcript))
            route = retry

    async def _pieces(
        self, route: Route, req: ChatRequest, matcher: StopMatcher, ended: list[TurnResult]
    ) -> AsyncIterator[str]:
        """The released text of one attempt; its result is appended to ``ended`` at the end."""
        cfg = self.config
        session = self.client.session(route.session_id, history=req.history)
        stream = session.send(
            req.user_text,
            max_tokens=req.max_tokens or cfg.default_max_tokens,
            temperature=cfg.default_temperature if req.temperature is None else req.temperature,
            top_p=req.top_p,
            seed=req.seed,
            on_overflow="raise",  # never drop history behind the client's back
        )
        # aclosing: leaving early (a stop string, a vanished client) closes the library's
        # stream now, which cancels the turn and waits for its END.
        async with contextlib.aclosing(stream):
            async for piece in stream:
                out = matcher.feed(piece)
                if out:
                    yield out
                if matcher.matched is not None:
                    break
        tail = matcher.flush()
        if tail:
            yield tail
        if session.last is None:  # a cancelled turn whose END never came (logged by the library)
            raise ProtocolError(ErrorCode.INTERNAL, "the turn's end was not received", remote=False)
        ended.append(session.last)

    def _tell(self, outcome: TurnResult | KvrouteError) -> None:
        if self._observe is not None:
            self._observe(outcome)

    def _close_later(self, session_ids: list[str]) -> None:
        """Close sessions pushed out of the book, in the background."""
        if session_ids:
            task = asyncio.get_running_loop().create_task(self._close(session_ids))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def _close(self, session_ids: list[str]) -> None:
        for sid in session_ids:
            try:
                await self.client.session(sid).close()
            except KvrouteError as exc:  # only costs memory on the worker until its pin expires
                logger.info("could not close session %s: %s", sid, exc)


def _finish_reason(result: TurnResult, matcher: StopMatcher) -> str:
    if matcher.matched is None and result.finish_reason is FinishReason.LENGTH:
        return "length"
    return "stop"


def is_unavailable(exc: BaseException) -> bool:
    """Whether an error says no worker can take turns now."""
    return isinstance(exc, ServiceUnavailable) and exc.code is ErrorCode.NO_WORKER
