"""One chat completion as one kvroute turn: pick the session, send, index the transcript, retry.

:meth:`TurnRunner.run` is an async generator of the reply's text pieces followed by one
:class:`Finished`. It uses only the client library's public API: ``lookup`` of the history's
digest in the broker's transcript index (keyless requests whose transcript this gateway did not
index itself, see :mod:`.affinity`), a session
object per request (``client.session(id, history=...)``, whose history is the request's
messages but the last), ``send`` of the last user message with the request's stop strings
(the worker applies them: the reply ends before the match, which is neither streamed nor
committed, and the next turn still takes the text-prefix path), and, once the turn ended, an
``index`` of the transcript the client received, awaited before :class:`Finished` is handed
out, so the conversation's next request finds its session through any gateway. A task
cancelled inside it (a client that disconnected) makes the library send CANCEL for the turn.

What it retries, and only while nothing was released to the caller yet:

- BUSY or NOT_OWNER on the session it picked: once more on a fresh session (a parallel
  regeneration, through this gateway or another, or a key whose session another client
  identity holds);
- SESSION_LOST: once more on the same session, which the broker places on another worker (cold,
  reason ``worker_lost``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass

from kvroute.client import (
    AsyncClient,
    KvrouteError,
    NotOwner,
    ProtocolError,
    SessionBusy,
    SessionLost,
    Timeout,
    TurnResult,
)
from kvroute.proto import ErrorCode, FinishReason, Role

from .affinity import Affinity, Route
from .config import GatewayConfig
from .request import ChatRequest

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
        The reply text as sent (ending before a stop string).
    finish_reason
        OpenAI's: ``stop`` (end of turn or a stop string) or ``length``.
    """

    route: Route
    result: TurnResult
    reply: str
    finish_reason: str


Observer = Callable[[TurnResult | KvrouteError], None]
"""Told every turn's result or library error (e.g. for metrics)."""


class TurnRunner:
    """Runs chat requests as turns over one :class:`~kvroute.AsyncClient`.

    Parameters
    ----------
    client
        The connection to the broker.
    affinity
        Picks sessions.
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
        self._no_index = False  # the broker does not answer LOOKUP/INDEX (logged once)

    async def run(
        self, req: ChatRequest, header_key: str | None = None
    ) -> AsyncGenerator[str | Finished, None]:
        """Text pieces of the reply, then one :class:`Finished`.

        Raises
        ------
        KvrouteError
            The library's typed errors (after the retries above); ValueError for arguments
            the protocol refuses (e.g. too much text).
        """
        route = await self.route(req, header_key)
        lost_left = LOST_RETRIES
        while True:
            self.affinity.begin(route)
            released = False
            try:
                parts: list[str] = []
                ended: list[TurnResult] = []
                async for piece in self._pieces(route, req, parts, ended):
                    released = True
                    yield piece
                result, reply = ended[0], "".join(parts)
                answer = {"role": str(Role.ASSISTANT), "content": reply}
                await self._index(route, [*req.messages, answer])
                self._tell(result)
                yield Finished(route, result, reply, _finish_reason(result))
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
                self._close_later(self.affinity.end(route))
            route = retry

    async def route(self, req: ChatRequest, header_key: str | None = None) -> Route:
        """The session ``req`` runs on: its key's, else the one the broker's index holds for
        its history, else a fresh one.

        Raises
        ------
        Timeout
            The broker did not answer the LOOKUP.
        """
        keyed = self.affinity.keyed(req, header_key)
        if keyed is not None:
            return keyed
        digest = self.affinity.history_digest(req)
        if digest is None or self._no_index:
            return self.affinity.found(None)
        mine = self.affinity.recall(digest)
        if mine is not None:  # indexed through this gateway: no round trip needed
            return self.affinity.found(mine)
        try:
            return self.affinity.found(await self.client.lookup(digest))
        except Timeout:
            raise
        except KvrouteError as exc:  # a broker without the transcript index: no affinity
            self._index_unavailable(exc)
            return self.affinity.found(None)

    async def _pieces(
        self, route: Route, req: ChatRequest, parts: list[str], ended: list[TurnResult]
    ) -> AsyncIterator[str]:
        """The text of one attempt (also collected in ``parts``); its result is appended to
        ``ended`` at the end."""
        cfg = self.config
        session = self.client.session(route.session_id)
        # Set, not passed to session(): the library checks the history as each send starts, so
        # checking it when the session is made too would only repeat the work.
        session.history = req.history
        stream = session.send(
            req.user_text,
            max_tokens=req.max_tokens or cfg.default_max_tokens,
            temperature=cfg.default_temperature if req.temperature is None else req.temperature,
            top_p=req.top_p,
            seed=req.seed,
            on_overflow="raise",  # never drop history behind the client's back
            stop=req.stop,
        )
        # aclosing: leaving early (a vanished client) closes the library's stream now, which
        # cancels the turn and waits for its END.
        async with contextlib.aclosing(stream):
            async for piece in stream:
                parts.append(piece)
                yield piece
        if session.last is None:  # a cancelled turn whose END never came (logged by the library)
            raise ProtocolError(ErrorCode.INTERNAL, "the turn's end was not received", remote=False)
        ended.append(session.last)

    async def _index(self, route: Route, transcript: Sequence[Mapping[str, str]]) -> None:
        """INDEX the transcript the client received under the route's session (keyless routes
        only). A failure costs only the next turn's warm path: logged, not raised."""
        digest = self.affinity.to_index(route, transcript)
        if digest is None or self._no_index:
            return
        try:
            await self.client.index(route.session_id, digest)
            self.affinity.remember(digest, route.session_id)
        except KvrouteError as exc:
            if isinstance(exc, Timeout | NotOwner):
                logger.warning("session %s: transcript not indexed: %s", route.session_id, exc)
            else:
                self._index_unavailable(exc)

    def _index_unavailable(self, exc: KvrouteError) -> None:
        if isinstance(exc, ProtocolError) and exc.code is ErrorCode.UNKNOWN_KIND:
            self._no_index = True
            logger.warning(
                "the broker has no transcript index (%s): requests without a session key run"
                " on fresh sessions",
                exc,
            )
        else:
            logger.warning("transcript index: %s", exc)

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


def _finish_reason(result: TurnResult) -> str:
    return "length" if result.finish_reason is FinishReason.LENGTH else "stop"
