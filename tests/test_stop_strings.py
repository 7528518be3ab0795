"""Stop strings in the worker: the matcher alone, then whole turns on the tiny model.

A turn with stop strings streams the reply up to the first match and no further, never streams
the match (nor a piece of it, even when it spans two tokens), ends with ``finish_reason`` stop,
commits no more than it streamed, and the next turn, which echoes the reply as streamed, takes
the text-prefix path.
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvroute.engine.engine import Engine
from kvroute.engine.sampling import SamplingParams
from kvroute.proto.messages import CachePath, FinishReason, reply_sha256
from kvroute.worker.events import EndEvent, TokenEvent
from kvroute.worker.scheduler import Scheduler
from kvroute.worker.stop import StopMatcher

# --- the matcher -------------------------------------------------------------------------------


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
    assert m.matched == "<|x|>" and m.held == ""


def test_held_text_is_released_when_it_turns_out_not_to_match() -> None:
    out, m = run_matcher(["STOP"], ["ab S", "TO", "X", "ST"])
    assert out == ["ab ", "", "STOX", "", "ST"]  # "S", "STO" and "ST" could start STOP
    assert m.matched is None


def test_earliest_of_several_stops_wins() -> None:
    out, m = run_matcher(["world", "lo"], ["hello world"])
    assert "".join(out) == "hel" and m.matched == "lo"


def test_no_stops_passes_through() -> None:
    out, m = run_matcher([], ["a", "b"])
    assert out == ["a", "b", ""] and m.matched is None


@given(
    text=st.text(alphabet="abST", max_size=40),
    stops=st.lists(st.text(alphabet="abST", min_size=1, max_size=4), min_size=1, max_size=4),
    cuts=st.lists(st.integers(0, 40), max_size=8),
)
def test_stop_matches_what_a_search_of_the_text_so_far_finds(
    text: str, stops: list[str], cuts: list[int]
) -> None:
    """Generation stops at the first piece after which some stop string occurs in the text so
    far (later text is never generated), and the reply ends at the earliest such occurrence."""
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    pieces = [text[a:b] for a, b in itertools.pairwise(bounds)]
    out, m = run_matcher(stops, pieces)
    expected, matched = text, False
    for end in bounds[1:]:
        hits = [i for i in (text[:end].find(s) for s in stops) if i != -1]
        if hits:
            expected, matched = text[: min(hits)], True
            break
    assert "".join(out) == expected
    assert (m.matched is not None) == matched


# --- whole turns on the tiny model ---------------------------------------------------------

PROMPT = [{"role": "user", "content": "What?"}]
MAX_TOKENS = 24


def turn(
    sched: Scheduler, sid: bytes, messages: list[dict[str, str]], stop: tuple[str, ...] = ()
) -> tuple[list[TokenEvent], EndEvent]:
    """Run one greedy turn to its end: its TOKEN events and END."""
    params = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True, stop=stop)
    assert sched.submit(b"r-" + sid, sid, messages, params) == []
    tokens: list[TokenEvent] = []
    end = None
    while sched.busy:
        for e in sched.step():
            if isinstance(e, TokenEvent):
                tokens.append(e)
            else:
                assert isinstance(e, EndEvent), e
                end = e
    assert end is not None
    return tokens, end


def split_stop(tokens: list[TokenEvent]) -> tuple[str, str]:
    """A stop string made of the last character of one token and the first of the next (so
    it spans two tokens), and the text before its first occurrence in the reply."""
    text = "".join(t.text for t in tokens)
    for a, b in itertools.pairwise(tokens[1:]):
        if a.text and b.text:
            stop = a.text[-1] + b.text[0]
            cut = text.find(stop)
            if cut > 0:
                return stop, text[:cut]
    raise AssertionError(f"no two neighbouring non-empty tokens in {text!r}")


def test_stop_split_across_two_tokens_cuts_commits_and_next_turn_is_text_prefix(
    tiny_engine: Engine,
) -> None:
    sched = Scheduler(tiny_engine)
    free, free_end = turn(sched, b"free", PROMPT)
    assert free_end.finish_reason is FinishReason.LENGTH
    stop, expected = split_stop(free)

    tokens, end = turn(sched, b"stopped", PROMPT, stop=(stop,))
    streamed = "".join(t.text for t in tokens)
    # Equal to the text before the match: the match's first character, in a token of its own,
    # was held back and never streamed.
    assert streamed == expected
    assert end.finish_reason is FinishReason.STOP
    assert end.reply_sha256 == reply_sha256(streamed)
    assert end.stats.generated_tokens < MAX_TOKENS
    # what was committed is the prompt plus at most the streamed text, and the cache agrees
    session = sched.store.get(b"stopped")
    assert session is not None and session.in_flight is None
    session.check()
    prompt = tiny_engine.render(PROMPT)
    assert session.text.startswith(prompt)
    assert streamed.startswith(session.text[len(prompt) :])
    assert stop not in session.text[len(prompt) :]
    committed = len(session.tokens)

    history = [
        *PROMPT,
        {"role": "assistant", "content": streamed},
        {"role": "user", "content": "ok"},
    ]
    _, after = turn(sched, b"stopped", history)
    assert after.stats.path is CachePath.TEXT_PREFIX
    assert after.stats.cached_tokens == committed


def test_earliest_stop_wins_and_an_absent_one_changes_nothing(tiny_engine: Engine) -> None:
    sched = Scheduler(tiny_engine)
    free, _ = turn(sched, b"free", PROMPT)
    text = "".join(t.text for t in free)
    stop, expected = split_stop(free)
    later = text[len(expected) + 2 :][:2] or "zz"
    tokens, end = turn(sched, b"two", PROMPT, stop=("\x00never\x00", later, stop))
    assert (
        "".join(t.text for t in tokens)
        == text[: min(text.find(s) for s in (later, stop) if s in text)]
    )
    assert end.finish_reason is FinishReason.STOP

    # the first character of a stop string is held back while it could start one, and
    # released (in order, nothing lost) once the next character rules it out
    held = expected[-1] + "\x00"
    tokens, end = turn(sched, b"held", PROMPT, stop=(held,))
    assert "".join(t.text for t in tokens) == text
    assert end.finish_reason is FinishReason.LENGTH
    assert end.reply_sha256 == reply_sha256(text)


def test_stop_at_the_very_start_streams_nothing_and_commits_only_the_prompt(
    tiny_engine: Engine,
) -> None:
    sched = Scheduler(tiny_engine)
    free, _ = turn(sched, b"free", PROMPT)
    first = next(t.text for t in free if t.text)
    tokens, end = turn(sched, b"start", PROMPT, stop=(first[0],))
    assert "".join(t.text for t in tokens) == ""
    assert end.finish_reason is FinishReason.STOP and end.reply_sha256 == reply_sha256("")
    session = sched.store.get(b"start")
    assert session is not None and session.text == tiny_engine.render(PROMPT)
    history = [*PROMPT, {"role": "assistant", "content": ""}, {"role": "user", "content": "ok"}]
    _, after = turn(sched, b"start", history)
    assert after.stats.path is CachePath.TEXT_PREFIX


def test_the_library_checks_stop_strings_at_the_call() -> None:
    from kvroute import Client

    with Client("tcp://127.0.0.1:9", timeout=1) as client:  # nothing is sent
        s = client.session()
        for bad in (["a"] * 5, [""], ["x" * 257], [1]):
            with pytest.raises(ValueError):
                s.send("hi", stop=bad)  # type: ignore[arg-type]
        assert s.history == []
        s.send("hi", stop="one")  # a single string is one stop string (never sent here)
