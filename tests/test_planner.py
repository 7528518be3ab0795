"""The prefill planner: which path a prompt takes and how much cache it reuses (no model)."""

from __future__ import annotations

from kvroute.proto.messages import CachePath
from kvroute.worker.planner import common_prefix_len, plan_prefill


def encode(text: str) -> list[int]:
    """A toy tokenizer: one id per character."""
    return [ord(c) for c in text]


def test_common_prefix_len() -> None:
    assert common_prefix_len([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix_len([], [1]) == 0
    assert common_prefix_len([1, 2], [1, 2, 3]) == 2


def test_new_session_is_cold() -> None:
    plan = plan_prefill("", [], "hello", encode)
    assert plan.path == CachePath.COLD
    assert plan.keep == 0
    assert plan.new_ids == encode("hello")


def test_text_prefix_tokenizes_only_the_remainder() -> None:
    calls: list[str] = []

    def spy(text: str) -> list[int]:
        calls.append(text)
        return encode(text)

    cached = [900, 901]  # ids that differ from re-tokenizing "ab": text matching must not care
    plan = plan_prefill("ab", cached, "abcd", spy)
    assert plan.path == CachePath.TEXT_PREFIX
    assert calls == ["cd"]
    assert plan.keep == 2
    assert plan.prompt_ids == [900, 901, ord("c"), ord("d")]


def test_token_prefix_keeps_longest_common_prefix() -> None:
    plan = plan_prefill("abXd", encode("abXd"), "abYd", encode)
    assert plan.path == CachePath.TOKEN_PREFIX
    assert plan.keep == 2
    assert plan.new_ids == encode("Yd")


def test_nothing_in_common_is_cold() -> None:
    plan = plan_prefill("xyz", encode("xyz"), "abc", encode)
    assert plan.path == CachePath.COLD
    assert plan.keep == 0


def test_full_hit_rolls_back_one_token() -> None:
    # Identical resend: everything is cached, yet fresh logits are needed to sample from.
    plan = plan_prefill("abc", encode("abc"), "abc", encode)
    assert plan.keep == 2
    assert plan.new_ids == [ord("c")]
    # A prompt that is a strict prefix of what is cached (regenerate) is a full hit too.
    plan = plan_prefill("abcdef", encode("abcdef"), "abc", encode)
    assert plan.path == CachePath.TOKEN_PREFIX
    assert plan.keep == 2
    assert plan.prompt_ids == encode("abc")
