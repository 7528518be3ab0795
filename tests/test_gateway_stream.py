"""The gateway's I/O-free parts: stop strings, SSE framing and bodies, session affinity."""

from __future__ import annotations

import itertools
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvroute.client import TurnResult
from kvroute.gateway.affinity import (
    Affinity,
    LocalIndex,
    Route,
    SessionBook,
    Via,
    keyed_session_id,
    transcript_digest,
)
from kvroute.gateway.errors import ApiError
from kvroute.gateway.render import DONE, ChunkEncoder, completion, sse_error
from kvroute.gateway.request import parse_chat_request
from kvroute.gateway.stop import StopMatcher
from kvroute.gateway.turns import Finished
from kvroute.proto import CachePath, FinishReason, TurnEnd, TurnStats, reply_sha256
from kvroute.proto.limits import MAX_SESSION_ID_BYTES

# --- stop strings ------------------------------------------------------------------------------


def run_matcher(stops: list[str], pieces: list[str]) -> tuple[list[str], StopMatcher]:
    m = StopMatcher(stops)
    out = []
    for p in pieces:
        out.append(m.feed(p))
        if m.matched is not None:
            break
    else:
        out.append(m.flush())
    return out, m


def test_stop_within_one_piece() -> None:
    out, m = run_matcher(["STOP"], ["Hello ", "world STOP and more"])
    assert "".join(out) == "Hello world " and m.matched == "STOP"


def test_stop_split_across_pieces_is_held_back_then_cut() -> None:
    out, m = run_matcher(["<|x|>"], ["abc<", "|x", "|>tail"])
    assert out == ["abc", "", ""]  # "<" and "<|x" could start the stop string: held
    assert m.text == "abc" and m.matched == "<|x|>"


def test_held_text_is_released_when_it_turns_out_not_to_match() -> None:
    out, m = run_matcher(["STOP"], ["ab S", "TO", "X", "ST"])
    assert out == ["ab ", "", "STOX", "", "ST"]  # "S", "STO" and "ST" could start STOP
    assert m.matched is None and m.text == "ab STOXST"


def test_earliest_of_several_stops_wins() -> None:
    out, m = run_matcher(["world", "lo"], ["hello world"])
    assert "".join(out) == "hel" and m.matched == "lo"


def test_no_stops_passes_through() -> None:
    out, m = run_matcher([], ["a", "b"])
    assert out == ["a", "b", ""] and m.text == "ab"


@given(
    text=st.text(alphabet="abST", max_size=40),
    stop=st.text(alphabet="abST", min_size=1, max_size=4),
    cuts=st.lists(st.integers(0, 40), max_size=8),
)
def test_stop_matches_what_a_whole_string_search_finds(
    text: str, stop: str, cuts: list[int]
) -> None:
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    pieces = [text[a:b] for a, b in itertools.pairwise(bounds)]
    out, m = run_matcher([stop], pieces)
    i = text.find(stop)
    expected = text if i == -1 else text[:i]
    assert "".join(out) == expected == m.text
    assert (m.matched is not None) == (i != -1)


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


def request(msgs: list[dict[str, str]], **extra: object) -> object:
    return parse_chat_request({"model": "m", "messages": msgs, **extra})


def test_digest_depends_on_roles_and_exact_text() -> None:
    a = transcript_digest(conv("hi", "hello"))
    assert a == transcript_digest(conv("hi", "hello"))
    assert a != transcript_digest(conv("hi", "hello "))
    assert a != transcript_digest(
        [{"role": "user", "content": "hi"}, {"role": "user", "content": "hello"}]
    )
    # no separator ambiguity: ["a", "bc"] and ["ab", "c"] differ
    assert transcript_digest(conv("a", "bc")) != transcript_digest(conv("ab", "c"))


def test_keyed_session_ids() -> None:
    assert keyed_session_id(Via.HEADER, "chat-42") == "s.chat-42"
    assert keyed_session_id(Via.SESSION_ID, "chat-42") == "s.chat-42"  # one namespace
    assert keyed_session_id(Via.USER, "chat-42") == "u.chat-42"
    long = keyed_session_id(Via.PROMPT_CACHE_KEY, "k" * 500)
    assert long.startswith("p#") and len(long.encode()) <= MAX_SESSION_ID_BYTES
    assert keyed_session_id(Via.USER, "a\nb").startswith("u#")  # unprintable: hashed


def test_conversation_follows_its_session() -> None:
    aff = Affinity(LocalIndex(100), max_sessions=10)
    first = aff.resolve(request(conv("hi", system="sys")))
    assert first.via is Via.NEW
    aff.begin(first)
    aff.end(first, conv("hi", "hello", system="sys"))
    second = aff.resolve(request(conv("hi", "hello", "more?", system="sys")))
    assert second == Route(first.session_id, Via.TRANSCRIPT)
    aff.begin(second)
    aff.end(second, conv("hi", "hello", "more?", "sure", system="sys"))
    # regenerate turn 2 and edit turn 2: both continue the transcript of turn 1
    again = aff.resolve(request(conv("hi", "hello", "more?", system="sys")))
    edited = aff.resolve(request(conv("hi", "hello", "other", system="sys")))
    assert again.session_id == edited.session_id == first.session_id
    # a reply the client changed is not what the session holds: a fresh session
    assert aff.resolve(request(conv("hi", "HELLO", "more?", system="sys"))).via is Via.NEW


def test_first_turns_never_share_a_session() -> None:
    aff = Affinity(LocalIndex(100), max_sessions=10)
    a = aff.resolve(request(conv("hi", system="sys")))
    aff.begin(a)
    aff.end(a, conv("hi", "hello", system="sys"))
    b = aff.resolve(request(conv("hi", system="sys")))
    assert b.via is Via.NEW and b.session_id != a.session_id


def test_busy_session_falls_back_to_a_fresh_one() -> None:
    aff = Affinity(LocalIndex(100), max_sessions=10)
    r = aff.resolve(request(conv("hi")), header_key="k")
    assert r == Route("s.k", Via.HEADER)
    aff.begin(r)
    other = aff.resolve(request(conv("hi")), header_key="k")
    assert other.via is Via.FALLBACK and other.session_id != "s.k"
    aff.end(r, None)
    assert aff.resolve(request(conv("hi")), header_key="k") == r


def test_keyed_sessions_do_not_enter_the_index() -> None:
    aff = Affinity(LocalIndex(100), max_sessions=10)
    keyed = aff.resolve(request(conv("hi")), header_key="k")
    aff.begin(keyed)
    aff.end(keyed, conv("hi", "hello"))
    assert aff.resolve(request(conv("hi", "hello", "more"))).via is Via.NEW


def test_explicit_keys_win() -> None:
    aff = Affinity(LocalIndex(100), max_sessions=10)
    req = request(conv("hi"), user="bob", prompt_cache_key="pk")
    assert aff.resolve(req) == Route("p.pk", Via.PROMPT_CACHE_KEY)
    assert aff.resolve(req, header_key="h") == Route("s.h", Via.HEADER)


def test_index_is_bounded_and_forgets_sessions() -> None:
    idx = LocalIndex(3)
    for i in range(5):
        idx.record(f"d{i}", "s1" if i < 4 else "s2")
    assert len(idx) == 3 and idx.lookup("d0") is None and idx.lookup("d1") is None
    assert idx.lookup("d3") == "s1"
    idx.forget("s1")
    assert idx.lookup("d2") is None and idx.lookup("d3") is None and idx.lookup("d4") == "s2"
    idx.record("d4", "s3")  # the same transcript now held by another session
    idx.forget("s2")
    assert idx.lookup("d4") == "s3"


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


def test_evicted_sessions_are_forgotten_by_the_index() -> None:
    aff = Affinity(LocalIndex(100), max_sessions=1)
    a = aff.resolve(request(conv("one")))
    aff.begin(a)
    assert aff.end(a, conv("one", "1")) == []
    b = aff.resolve(request(conv("two")))
    aff.begin(b)
    assert aff.end(b, conv("two", "2")) == [a.session_id]
    assert aff.resolve(request(conv("one", "1", "again"))).via is Via.NEW
    assert aff.resolve(request(conv("two", "2", "again"))).session_id == b.session_id
