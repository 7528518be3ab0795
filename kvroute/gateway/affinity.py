"""Which kvroute session an OpenAI request continues, when the client names none.

OpenAI clients send the whole history every time and no session id. The rule: a request whose
messages minus the last (user) message equal a transcript that a session holds, as the client
received it, continues that session, on the worker that has its KV cache. Every finished turn
records its transcript (the request's messages plus the reply as streamed) under a digest, so
the next turn of the conversation finds it. Older transcripts of a session stay recorded too:
a regenerate (the same messages again) or an edit of an earlier turn names one of them, lands
on the same session, and the worker rewinds by token prefix.

Explicit keys win when present, strongest first: the ``X-Session-ID`` header, then the body's
``session_id``, ``prompt_cache_key``, ``user``. A key maps to a fixed session id, so any
gateway maps it the same way; keyed sessions never enter the transcript index. Conversations
whose transcripts are identical (the same first question, the same greedy reply) share the
session that recorded it last: the cache holds exactly their common text.

A session runs one turn at a time. When the session a request maps to already has a turn in
flight (parallel regenerations), the request runs on a fresh session instead: a cold prefill
rather than a BUSY error. The first turn of a conversation always starts a fresh session:
histories without a reply (a system prompt alone) are never recorded, so unrelated
conversations that share a system prompt never share a session.

Where the transcript index lives is behind :class:`TranscriptIndex`. :class:`LocalIndex` keeps
it in this gateway's memory (bounded, least recently used first out), which serves one
gateway; several gateways fronting one broker need an index they share.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from kvroute.proto import Role
from kvroute.proto.limits import MAX_SESSION_ID_BYTES

from .request import ChatRequest


class Via(StrEnum):
    """How a request's session was chosen (reported as ``kvroute.affinity``)."""

    HEADER = "x-session-id"
    SESSION_ID = "session_id"
    PROMPT_CACHE_KEY = "prompt_cache_key"
    USER = "user"
    TRANSCRIPT = "transcript"  # the history matched a recorded transcript
    NEW = "new"  # nothing matched: a fresh session
    FALLBACK = "fallback"  # the chosen session was busy (or not ours): a fresh session


_KEY_VIA = {
    "session_id": Via.SESSION_ID,
    "prompt_cache_key": Via.PROMPT_CACHE_KEY,
    "user": Via.USER,
}
_KEYLESS = frozenset({Via.TRANSCRIPT, Via.NEW, Via.FALLBACK})
# One namespace per kind of key, so a user name never collides with a session id.
_PREFIX = {Via.HEADER: "s", Via.SESSION_ID: "s", Via.PROMPT_CACHE_KEY: "p", Via.USER: "u"}


@dataclass(frozen=True, slots=True)
class Route:
    """The session a request runs on, and why."""

    session_id: str
    via: Via


def transcript_digest(messages: Iterable[Mapping[str, str]]) -> str:
    """A digest of a message list: roles and exact texts, in order (128 bits, hex)."""
    canon = json.dumps(
        [[m["role"], m["content"]] for m in messages], ensure_ascii=False, separators=(",", ":")
    )
    return hashlib.sha256(canon.encode("utf-8", "surrogatepass")).hexdigest()[:32]


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


class TranscriptIndex(Protocol):
    """Transcript digest -> the session that holds that transcript."""

    def lookup(self, digest: str) -> str | None:
        """The session recorded for ``digest``, or None."""
        ...

    def record(self, digest: str, session_id: str) -> None:
        """Remember that ``session_id`` holds the transcript ``digest``."""
        ...

    def forget(self, session_id: str) -> None:
        """Drop every transcript of a session (it was closed)."""
        ...


class LocalIndex:
    """A :class:`TranscriptIndex` in this process's memory, bounded, least recently used out.

    Parameters
    ----------
    max_entries
        Digests kept; recording one more drops the least recently used.
    """

    def __init__(self, max_entries: int) -> None:
        assert max_entries >= 1, "the index holds at least one entry"
        self.max_entries = max_entries
        self._sessions: OrderedDict[str, str] = OrderedDict()
        self._digests: dict[str, set[str]] = {}  # session -> its digests, to forget it whole

    def __len__(self) -> int:
        return len(self._sessions)

    def lookup(self, digest: str) -> str | None:
        sid = self._sessions.get(digest)
        if sid is not None:
            self._sessions.move_to_end(digest)
        return sid

    def record(self, digest: str, session_id: str) -> None:
        old = self._sessions.get(digest)
        if old is not None and old != session_id:
            self._drop(old, digest)
        self._sessions[digest] = session_id
        self._sessions.move_to_end(digest)
        self._digests.setdefault(session_id, set()).add(digest)
        while len(self._sessions) > self.max_entries:
            d, sid = self._sessions.popitem(last=False)
            self._drop(sid, d)

    def _drop(self, session_id: str, digest: str) -> None:
        mine = self._digests[session_id]
        mine.discard(digest)
        if not mine:
            del self._digests[session_id]

    def forget(self, session_id: str) -> None:
        for d in self._digests.pop(session_id, ()):
            del self._sessions[d]


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
    """Picks each request's session (see the module docstring) and learns from finished turns.

    Parameters
    ----------
    index
        Where transcripts are recorded.
    max_sessions
        Sessions kept open (see :class:`SessionBook`).
    """

    def __init__(self, index: TranscriptIndex, max_sessions: int) -> None:
        self.index = index
        self.book = SessionBook(max_sessions)

    def resolve(self, req: ChatRequest, header_key: str | None = None) -> Route:
        """The session ``req`` should run on."""
        if header_key is not None:
            route = Route(keyed_session_id(Via.HEADER, header_key), Via.HEADER)
        elif req.session_key is not None:
            via = _KEY_VIA[req.session_key[0]]
            route = Route(keyed_session_id(via, req.session_key[1]), via)
        else:
            sid = self._continued(req)
            route = Route(sid, Via.TRANSCRIPT) if sid else Route(fresh_session_id(), Via.NEW)
        return self.fallback() if self.book.busy(route.session_id) else route

    def _continued(self, req: ChatRequest) -> str | None:
        history = req.history
        if not any(m["role"] == Role.ASSISTANT for m in history):
            return None  # a first turn: never shared (see the module docstring)
        return self.index.lookup(transcript_digest(history))

    def fallback(self) -> Route:
        """A fresh session for a request whose session is busy or not this gateway's."""
        return Route(fresh_session_id(), Via.FALLBACK)

    def begin(self, route: Route) -> None:
        """A turn starts on ``route``'s session."""
        self.book.begin(route.session_id)

    def end(self, route: Route, transcript: Iterable[Mapping[str, str]] | None) -> list[str]:
        """The turn ended; ``transcript`` (messages + reply) if it finished, else None.

        Only sessions chosen without a key learn transcripts: a keyed session belongs to its
        key, and a keyless request must not move it elsewhere. Returns sessions to close on
        the broker (pushed out by the bound), already forgotten.
        """
        if transcript is not None and route.via in _KEYLESS:
            self.index.record(transcript_digest(transcript), route.session_id)
        evicted = self.book.end(route.session_id)
        for sid in evicted:
            self.index.forget(sid)
        return evicted
