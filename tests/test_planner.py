"""The prefill planner: which path a prompt takes and how much cache it reuses (no model)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from kvroute.engine.gguf_file import GGUFFile
from kvroute.engine.prompt import Prompt, PromptCodec
from kvroute.engine.tokenizer import Tokenizer
from kvroute.proto.messages import CachePath
from kvroute.worker.planner import common_prefix_len, extends, plan_prefill


class SpyCodec(PromptCodec):
    """The tiny vocabulary's codec, recording from which offset each prompt is encoded."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        super().__init__(tokenizer)
        self.calls: list[tuple[str, int]] = []

    def encode(self, prompt: Prompt, start: int = 0) -> list[int]:
        self.calls.append((prompt.text, start))
        return super().encode(prompt, start)


@pytest.fixture
def codec(tiny_model_path: Path) -> SpyCodec:
    return SpyCodec(Tokenizer.from_gguf(GGUFFile(tiny_model_path)))


def ids(codec: PromptCodec, text: str) -> list[int]:
    """Ids of ``text`` with special tokens parsed everywhere (a prompt with no content)."""
    return codec.encode(codec.mark(text))


def byte_ids(codec: PromptCodec, text: str) -> Sequence[int]:
    """``text`` one byte token at a time: other ids than `ids` for the same text."""
    return [i for ch in text for i in codec.tokenizer.encode(ch)]


def test_common_prefix_len() -> None:
    assert common_prefix_len([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix_len([], [1]) == 0
    assert common_prefix_len([1, 2], [1, 2, 3]) == 2


def test_new_session_is_cold(codec: SpyCodec) -> None:
    plan = plan_prefill("", [], codec.mark("hello"), codec)
    assert plan.path == CachePath.COLD
    assert plan.keep == 0
    assert plan.new_ids == ids(codec, "hello")


def test_text_prefix_tokenizes_only_the_remainder(codec: SpyCodec) -> None:
    # "in" is one merged token; the session holds it as two byte tokens (as a model may have
    # generated it): text matching must not care.
    cached = byte_ids(codec, "in")
    assert len(cached) == 2 and cached != ids(codec, "in")
    codec.calls.clear()
    plan = plan_prefill("in", cached, codec.mark("in the<|im_end|>"), codec)
    assert plan.path == CachePath.TEXT_PREFIX
    assert codec.calls == [("in the<|im_end|>", 2)]
    assert plan.keep == 2
    assert plan.prompt_ids == [*cached, *ids(codec, " the"), 2]


def test_text_prefix_needs_the_same_control_tokens(codec: SpyCodec) -> None:
    held = "a<|im_end|>b"
    as_marker, as_text = ids(codec, held), codec.tokenizer.encode(held, special=False)
    marked, plain = codec.mark(held + "c"), codec.mark(held + "c", [(0, len(held))])
    assert extends(marked, held, as_marker, codec) and extends(plain, held, as_text, codec)
    # Same text, but the control token is content now (or was content before): no reuse of
    # ids that read it the other way.
    assert not extends(plain, held, as_marker, codec)
    assert not extends(marked, held, as_text, codec)
    plan = plan_prefill(held, as_marker, plain, codec)
    assert plan.path == CachePath.TOKEN_PREFIX
    assert plan.keep == 1 and plan.prompt_ids == codec.encode(plain)
    # A cut inside a marker of the new prompt is no text prefix either.
    assert not extends(codec.mark("a<|im_end|>"), "a<|im", byte_ids(codec, "a<|im"), codec)


def test_token_prefix_keeps_longest_common_prefix(codec: SpyCodec) -> None:
    plan = plan_prefill("abXd", ids(codec, "abXd"), codec.mark("abYd"), codec)
    assert plan.path == CachePath.TOKEN_PREFIX
    assert plan.keep == 2
    assert plan.new_ids == ids(codec, "Yd")


def test_nothing_in_common_is_cold(codec: SpyCodec) -> None:
    plan = plan_prefill("xyz", ids(codec, "xyz"), codec.mark("abc"), codec)
    assert plan.path == CachePath.COLD
    assert plan.keep == 0


def test_full_hit_rolls_back_one_token(codec: SpyCodec) -> None:
    # Identical resend: everything is cached, yet fresh logits are needed to sample from.
    plan = plan_prefill("abc", ids(codec, "abc"), codec.mark("abc"), codec)
    assert plan.keep == 2
    assert plan.new_ids == ids(codec, "c")
    # A prompt that is a strict prefix of what is cached (regenerate) is a full hit too.
    plan = plan_prefill("abcdef", ids(codec, "abcdef"), codec.mark("abc"), codec)
    assert plan.path == CachePath.TOKEN_PREFIX
    assert plan.keep == 2
    assert plan.prompt_ids == ids(codec, "abc")
