"""Which kvroute session an OpenAI request continues, when the client names none.

OpenAI clients send the whole history every time and no session id. The rule: a request whose
messages minus the last (user) message equal a transcript that a session holds, as the client
received it, continues that session, on the worker that has its KV cache. After every finished
turn the gateway INDEXes the transcript (the request's messages plus the reply as sent) under
its session in the broker's transcript index; before a turn it LOOKs UP the digest of the
request's history there (:mod:`kvroute.proto.transcripts`). The index lives in the broker, so a
conversation whose requests alternate between several gateways fronting one broker stays on its
session, as long as the gateways share one owner identity (the same owner token, or the same
CURVE key): the broker answers a LOOKUP only with sessions of the caller's identity. Older
transcripts of a session stay indexed too: a regenerate (the same messages again) or an edit of
an earlier turn names one of them, lands on the same session, and the worker rewinds by token
prefix.

Explicit keys win when present, strongest first: the ``X-Session-ID`` header, then the body's
``session_id``, ``prompt_cache_key``, ``user``. A key maps to a fixed session id, so any
gateway maps it the same way; keyed sessions are never indexed (a keyless request must not move
a keyed conversation). Conversations whose transcripts are identical (the same first question,
the same greedy reply) share the session that was indexed last: the cache holds exactly their
common text.

A session runs one turn at a time. When the session a request maps to already has a turn in
flight (parallel regenerations), the request runs on a fresh session instead: a cold prefill
rather than a BUSY error. This gateway knows its own turns in flight (:class:`SessionBook`); a
turn another gateway runs shows up as BUSY from the broker, and the turn runner falls back the
same way. The first turn of a conversation always starts a fresh session: histories without a
reply (a system prompt alone) are never looked up, so unrelated conversations that share a
system prompt never share a session.

The broker's index is the one that counts; this gateway also remembers the transcripts it
indexed itself (:meth:`Affinity.recall`), for sessions it still has open, so a conversation
whose requests keep coming to the same gateway skips the LOOKUP round trip. That shortcut can
only name a session that holds the transcript (a session id is never reused by another client;
keyed ids are never indexed), so it agrees with the broker wherever it answers.

Everything here is I/O-free; :mod:`~kvroute.gateway.turns` does the LOOKUP and INDEX.
"""

from __future__ import annotations

import hashlib
import uuid
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum

import msgspec

from kvroute.proto import Role
from kvroute.proto.limits import MAX_SESSION_ID_BYTES, MIN_DIGEST_BYTES

from .request import ChatRequest


class Via(StrEnum):
    """How a request's session was chosen (reported as ``kvroute.affinity``)."""

    HEADER = "x-session-id"
    SESSION_ID = "session_id"
    PROMPT_CACHE_KEY = "prompt_cache_key"
    USER = "user"
    TRANSCRIPT = "transcript"  # the history matched an indexed transcript
    NEW = "new"  # nothing matched: a fresh session
    FALLBACK = "fallback"  # the chosen session was busy (or not ours): a fresh session


_KEY_VIA = {
    "session_id": Via.SESSION_ID,
    "prompt_cache_key": Via.PROMPT_CACHE_KEY,
    "user": Via.USER,
}
KEYLESS = frozenset({Via.TRANSCRIPT, Via.NEW, Via.FALLBACK})
"""Routes chosen without a key: only their sessions are indexed."""
# One namespace per kind of key, so a user name never collides with a session id.
_PREFIX = {Via.HEADER: "s", Via.SESSION_ID: "s", Via.PROMPT_CACHE_KEY: "p", Via.USER: "u"}
_ENCODE = msgspec.msgpack.Encoder()

LOCAL_TRANSCRIPTS: int = 65536
"""Transcripts this gateway indexed that it also remembers (least recently used out)."""


@dataclass(frozen=True, slots=True)
class Route:
    """The session a request runs on, and why."""

    session_id: str
    via: Via


def transcript_digest(messages: Iterable[Mapping[str, str]]) -> bytes:
    """A digest of a message list: roles and exact texts, in order (128 bits).

    The encoding is msgpack of ``[[role, content], ...]`` (lengths are explicit, so no two
    lists encode alike); every gateway computes it the same way, which is all the broker's
    index needs.
    """
    pairs = [(m["role"], m["content"]) for m in messages]
    return hashlib.sha256(_ENCODE.encode(pairs)).digest()[:MIN_DIGEST_BYTES]


def keyed_session_id(via: Via, key: str) -> str:
    """The session id an explicit key maps to: readable when it fits, else a hash of it."""
    prefix = _PREFIX[via]
    sid = f"{prefix}.{key}"
    if key.isprintable() and len(sid.encode("utf-8", "surrogatepass")) <= MAX_SESSION_ID_BYTES:
        return sid
    digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:40]
    return f"{prefix}#{digest}"


def fresh_session_id() -> str:
    """A new session id nobody else uses (uuid4)."""
    return f"g.{uuid.uuid4().hex}"


class SessionBook:
    """The sessions this gateway drives: which have a turn in flight, and a bound on the rest.

    Parameters
    ----------
    max_sessions
        Sessions kept open; beyond it the least recently used idle ones are handed back by
        :meth:`end` for the caller to close on the broker (never one with a turn in flight).
    """

    def __init__(self, max_sessions: int) -> None:
        assert max_sessions >= 1, "the book holds at least one session"
        self.max_sessions = max_sessions
        self._idle: OrderedDict[str, None] = OrderedDict()
        self._busy: set[str] = set()

    def __len__(self) -> int:
        return len(self._idle) + len(self._busy)

    def __contains__(self, session_id: object) -> bool:
        return session_id in self._idle or session_id in self._busy

    def busy(self, session_id: str) -> bool:
        """Whether the session has a turn in flight through this gateway."""
        return session_id in self._busy

    def begin(self, session_id: str) -> None:
        """A turn starts on the session."""
        assert session_id not in self._busy, "one turn at a time per session"
        self._idle.pop(session_id, None)
        self._busy.add(session_id)

    def end(self, session_id: str) -> list[str]:
        """The turn ended; returns the idle sessions pushed out by the bound (to close)."""
        self._busy.discard(session_id)
        self._idle[session_id] = None
        out = []
        while len(self) > self.max_sessions and self._idle:
            sid, _ = self._idle.popitem(last=False)
            out.append(sid)
        return out


class Affinity:
    """Picks each request's session (see the module docstring), given what the index found.

    A request is routed in two steps, with the LOOKUP between them done by the caller:
    :meth:`keyed` (a route, or None when the request has no key), then, keyless,
    :meth:`history_digest` (what to look up; None for a first turn) and :meth:`found`.

    Parameters
    ----------
    max_sessions
        Sessions kept open (see :class:`SessionBook`).
    """

    def __init__(self, max_sessions: int, local_transcripts: int = LOCAL_TRANSCRIPTS) -> None:
        self.book = SessionBook(max_sessions)
        self.local_transcripts = local_transcripts
        self._recent: OrderedDict[bytes, str] = OrderedDict()  # digest -> session, indexed here

    def keyed(self, req: ChatRequest, header_key: str | None = None) -> Route | None:
        """The route an explicit key gives ``req``, or None (no key: look the history up)."""
        if header_key is not None:
            return self._free(Route(keyed_session_id(Via.HEADER, header_key), Via.HEADER))
        if req.session_key is not None:
            via = _KEY_VIA[req.session_key[0]]
            return self._free(Route(keyed_session_id(via, req.session_key[1]), via))
        return None

    @staticmethod
    def history_digest(req: ChatRequest) -> bytes | None:
        """The digest to look up for a keyless request; None for a first turn (no reply in
        its history), which always starts a fresh session."""
        history = req.history
        if not any(m["role"] == Role.ASSISTANT for m in history):
            return None
        return transcript_digest(history)

    def recall(self, digest: bytes) -> str | None:
        """The session this gateway indexed ``digest`` under, if it still has it open (the
        LOOKUP can then be skipped); None otherwise."""
        sid = self._recent.get(digest)
        if sid is None or sid not in self.book:
            return None
        self._recent.move_to_end(digest)
        return sid

    def remember(self, digest: bytes, session_id: str) -> None:
        """This gateway indexed ``digest`` under ``session_id`` (see :meth:`recall`)."""
        self._recent[digest] = session_id
        self._recent.move_to_end(digest)
        while len(self._recent) > self.local_transcripts:
            self._recent.popitem(last=False)

    def found(self, session_id: str | None) -> Route:
        """The route of a keyless request whose history the index mapped to ``session_id``."""
        if session_id is None:
            return Route(fresh_session_id(), Via.NEW)
        return self._free(Route(session_id, Via.TRANSCRIPT))

    def _free(self, route: Route) -> Route:
        return self.fallback() if self.book.busy(route.session_id) else route

    @staticmethod
    def fallback() -> Route:
        """A fresh session for a request whose session is busy or not this gateway's."""
        return Route(fresh_session_id(), Via.FALLBACK)

    def begin(self, route: Route) -> None:
        """A turn starts on ``route``'s session."""
        self.book.begin(route.session_id)

    @staticmethod
    def to_index(route: Route, transcript: Iterable[Mapping[str, str]]) -> bytes | None:
        """The digest to INDEX under ``route``'s session after its turn finished with
        ``transcript`` (messages + reply as sent), or None for a keyed session."""
        return transcript_digest(transcript) if route.via in KEYLESS else None

    def end(self, route: Route) -> list[str]:
        """The turn ended; returns sessions to close on the broker (pushed out by the bound;
        the broker forgets their transcripts with them)."""
        return self.book.end(route.session_id)
