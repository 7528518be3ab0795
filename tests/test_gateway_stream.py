"""The gateway's I/O-free parts: SSE framing and bodies, session affinity.

(Stop strings are the worker's: tests/test_stop_strings.py.)"""

from __future__ import annotations

import json

import pytest

from kvroute.client import TurnResult
from kvroute.gateway.affinity import (
    Affinity,
    Route,
    SessionBook,
    Via,
    keyed_session_id,
    transcript_digest,
)
from kvroute.gateway.errors import ApiError
from kvroute.gateway.render import DONE, ChunkEncoder, completion, sse_error
from kvroute.gateway.request import ChatRequest, parse_chat_request
from kvroute.gateway.turns import Finished
from kvroute.proto import CachePath, FinishReason, TurnEnd, TurnStats, reply_sha256
from kvroute.proto.limits import MAX_SESSION_ID_BYTES

# --- rendering -------------------------------------------------------------------------------


def finished(reply: str = "Hi!", finish: str = "stop") -> Finished:
    stats = TurnStats(120, 100, 20, 3, CachePath.TEXT_PREFIX, None, 4.5, 9.0, "w1")
    end = TurnEnd(2, FinishReason.STOP, reply_sha256(reply), stats)
    return Finished(Route("g.abc", Via.TRANSCRIPT), TurnResult(end, reply), reply, finish)


def events(data: bytes) -> list[str]:
    assert data.endswith(b"\n\n")
    frames = data.decode().split("\n\n")[:-1]
    assert all(f.startswith("data: ") and "\n" not in f for f in frames)
    return [f.removeprefix("data: ") for f in frames]


def test_completion_body() -> None:
    body = json.loads(completion("chatcmpl-1", "smol", finished(), created=7))
    assert body["object"] == "chat.completion" and body["created"] == 7
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "Hi!", "refusal": None}
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"] == {
        "prompt_tokens": 120,
        "completion_tokens": 3,
        "total_tokens": 123,
        "prompt_tokens_details": {"cached_tokens": 100},
    }
    assert body["kvroute"] == {
        "session": "g.abc",
        "affinity": "transcript",
        "worker": "w1",
        "path": "text_prefix",
        "cold_reason": None,
        "cached_tokens": 100,
        "prefill_tokens": 20,
        "ttft_ms": 4.5,
        "decode_ms": 9.0,
    }


@pytest.mark.parametrize("include_usage", [False, True])
def test_chunks(include_usage: bool) -> None:
    enc = ChunkEncoder("chatcmpl-1", "smol", include_usage, created=7)
    first, piece = json.loads(events(enc.first("H"))[0]), enc.content('i "\n\u00e9')
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": "H"}
    chunk = json.loads(events(piece)[0])
    assert chunk["choices"][0]["delta"] == {"content": 'i "\n\u00e9'}
    # the pre-encoded content chunk is the same object the generic encoder would build
    assert chunk == json.loads(events(enc._event({"content": 'i "\n\u00e9'}, None))[0])
    # so is the pre-encoded first chunk (the role included)
    delta = {"role": "assistant", "content": 'H "\u00e9'}
    assert enc.first('H "\u00e9') == enc._event(delta, None)
    assert ("usage" in chunk) == include_usage and chunk.get("usage") is None
    tail = events(enc.end(finished()))
    assert tail[-1] == "[DONE]"
    finish = json.loads(tail[0])
    assert finish["choices"][0]["finish_reason"] == "stop" and finish["choices"][0]["delta"] == {}
    last = json.loads(tail[-2])
    assert last["kvroute"]["session"] == "g.abc"
    if include_usage:
        assert len(tail) == 3 and last["choices"] == []
        assert last["usage"]["prompt_tokens_details"] == {"cached_tokens": 100}
    else:
        assert len(tail) == 2 and "usage" not in last
    for e in (first, chunk, finish, last):
        assert (e["id"], e["object"], e["created"], e["model"]) == (
            "chatcmpl-1",
            "chat.completion.chunk",
            7,
            "smol",
        )


def test_sse_error_event() -> None:
    (data,) = events(sse_error(ApiError(503, "gone", "service_unavailable", None, "worker_lost")))
    assert json.loads(data) == {
        "error": {
            "message": "gone",
            "type": "service_unavailable",
            "param": None,
            "code": "worker_lost",
        }
    }
    assert DONE == b"data: [DONE]\n\n"


# --- affinity ----------------------------------------------------------------------------------


def conv(*texts: str, system: str | None = None) -> list[dict[str, str]]:
    msgs = [] if system is None else [{"role": "system", "content": system}]
    for i, t in enumerate(texts):
        msgs.append({"role": "user" if i % 2 == 0 else "assistant", "content": t})
    return msgs


def request(msgs: list[dict[str, str]], **extra: object) -> ChatRequest:
    return parse_chat_request({"model": "m", "messages": msgs, **extra})


class Routed:
    """An Affinity with a dict standing in for the broker's transcript index (the index itself
    is tested in tests/test_broker_transcripts.py): what TurnRunner does, without sockets."""

    def __init__(self, max_sessions: int = 10) -> None:
        self.aff = Affinity(max_sessions)
        self.index: dict[bytes, str] = {}

    def resolve(self, req: ChatRequest, header_key: str | None = None) -> Route:
        keyed = self.aff.keyed(req, header_key)
        if keyed is not None:
            return keyed
        digest = self.aff.history_digest(req)
        return self.aff.found(None if digest is None else self.index.get(digest))

    def turn(self, route: Route, transcript: list[dict[str, str]]) -> list[str]:
        self.aff.begin(route)
        digest = self.aff.to_index(route, transcript)
        if digest is not None:
            self.index[digest] = route.session_id
        return self.aff.end(route)


def test_digest_depends_on_roles_and_exact_text() -> None:
    a = transcript_digest(conv("hi", "hello"))
    assert a == transcript_digest(conv("hi", "hello")) and len(a) == 16
    assert a != transcript_digest(conv("hi", "hello "))
    assert a != transcript_digest(
        [{"role": "user", "content": "hi"}, {"role": "user", "content": "hello"}]
    )
    # no separator ambiguity: ["a", "bc"] and ["ab", "c"] differ
    assert transcript_digest(conv("a", "bc")) != transcript_digest(conv("ab", "c"))
    # the gateway's normalised request messages and the reply it appends digest alike
    req = request(
        [
            {
                "role": "developer",
                "content": [{"type": "text", "text": "s"}, {"type": "text", "text": "ys"}],
            },
            {"role": "user", "content": "x"},
        ]
    )
    assert transcript_digest(req.history) == transcript_digest(
        [{"role": "system", "content": "sys"}]
    )


def test_keyed_session_ids() -> None:
    assert keyed_session_id(Via.HEADER, "chat-42") == "s.chat-42"
    assert keyed_session_id(Via.SESSION_ID, "chat-42") == "s.chat-42"  # one namespace
    assert keyed_session_id(Via.USER, "chat-42") == "u.chat-42"
    long = keyed_session_id(Via.PROMPT_CACHE_KEY, "k" * 500)
    assert long.startswith("p#") and len(long.encode()) <= MAX_SESSION_ID_BYTES
    assert keyed_session_id(Via.USER, "a\nb").startswith("u#")  # unprintable: hashed


def test_conversation_follows_its_session() -> None:
    r = Routed()
    first = r.resolve(request(conv("hi", system="sys")))
    assert first.via is Via.NEW
    r.turn(first, conv("hi", "hello", system="sys"))
    second = r.resolve(request(conv("hi", "hello", "more?", system="sys")))
    assert second == Route(first.session_id, Via.TRANSCRIPT)
    r.turn(second, conv("hi", "hello", "more?", "sure", system="sys"))
    # regenerate turn 2 and edit turn 2: both continue the transcript of turn 1
    again = r.resolve(request(conv("hi", "hello", "more?", system="sys")))
    edited = r.resolve(request(conv("hi", "hello", "other", system="sys")))
    assert again.session_id == edited.session_id == first.session_id
    # a reply the client changed is not what the session holds: a fresh session
    assert r.resolve(request(conv("hi", "HELLO", "more?", system="sys"))).via is Via.NEW


def test_first_turns_are_never_looked_up() -> None:
    r = Routed()
    a = r.resolve(request(conv("hi", system="sys")))
    r.turn(a, conv("hi", "hello", system="sys"))
    assert r.aff.history_digest(request(conv("hi", system="sys"))) is None
    b = r.resolve(request(conv("hi", system="sys")))
    assert b.via is Via.NEW and b.session_id != a.session_id


def test_busy_session_falls_back_to_a_fresh_one() -> None:
    r = Routed()
    route = r.resolve(request(conv("hi")), header_key="k")
    assert route == Route("s.k", Via.HEADER)
    r.aff.begin(route)
    other = r.resolve(request(conv("hi")), header_key="k")
    assert other.via is Via.FALLBACK and other.session_id != "s.k"
    assert r.aff.found("s.k").via is Via.FALLBACK  # the same through the index
    r.aff.end(route)
    assert r.resolve(request(conv("hi")), header_key="k") == route


def test_keyed_sessions_are_not_indexed() -> None:
    r = Routed()
    keyed = r.resolve(request(conv("hi")), header_key="k")
    r.turn(keyed, conv("hi", "hello"))
    assert not r.index and r.aff.to_index(keyed, conv("hi", "hello")) is None
    assert r.resolve(request(conv("hi", "hello", "more"))).via is Via.NEW
    fallback = Affinity.fallback()
    assert Affinity.to_index(fallback, conv("hi", "hello")) == transcript_digest(
        conv("hi", "hello")
    )


def test_explicit_keys_win() -> None:
    r = Routed()
    req = request(conv("hi"), user="bob", prompt_cache_key="pk")
    assert r.resolve(req) == Route("p.pk", Via.PROMPT_CACHE_KEY)
    assert r.resolve(req, header_key="h") == Route("s.h", Via.HEADER)


def test_book_evicts_idle_sessions_only() -> None:
    book = SessionBook(2)
    book.begin("a")
    book.begin("b")
    book.begin("c")
    assert book.end("a") == ["a"]  # over the bound; a is the only idle one
    assert book.end("b") == [] and len(book) == 2
    book.begin("d")
    assert book.end("c") == ["b"]  # the least recently used idle one goes
    assert book.busy("d") and not book.busy("c") and len(book) == 2


def test_evicted_sessions_are_handed_back_to_close() -> None:
    r = Routed(max_sessions=1)
    a = r.resolve(request(conv("one")))
    assert r.turn(a, conv("one", "1")) == []
    b = r.resolve(request(conv("two")))
    assert r.turn(b, conv("two", "2")) == [a.session_id]  # closing it drops its transcripts


def test_recall_names_only_sessions_still_open_here() -> None:
    r = Routed(max_sessions=1)
    a = r.resolve(request(conv("one")))
    r.turn(a, conv("one", "1"))
    d1 = transcript_digest(conv("one", "1"))
    r.aff.remember(d1, a.session_id)
    assert r.aff.recall(d1) == a.session_id
    assert r.aff.recall(transcript_digest(conv("two", "2"))) is None
    b = r.resolve(request(conv("two")))
    assert r.turn(b, conv("two", "2")) == [a.session_id]  # closed: no longer recalled
    assert r.aff.recall(d1) is None
    small = Affinity(10, local_transcripts=2)
    for i, d in enumerate((b"a" * 16, b"b" * 16, b"c" * 16)):
        small.begin(Route(f"s{i}", Via.NEW))
        small.remember(d, f"s{i}")
    assert small.recall(b"a" * 16) is None and small.recall(b"c" * 16) == "s2"
