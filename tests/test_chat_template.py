"""ChatTemplate: llama.cpp reference prompts, ChatML fallback, message validation, sandbox."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvroute.engine.chat_template import CHATML_TEMPLATE, ChatTemplate, validate_messages
from kvroute.engine.errors import ModelLoadError, TemplateError
from kvroute.engine.gguf_file import GGUFFile
from kvroute.engine.prompt import PromptCodec
from kvroute.engine.tokenizer import Tokenizer

REFERENCE = json.loads((Path(__file__).parent / "data" / "llamacpp_cases.json").read_text())
SMOL_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


@pytest.fixture(scope="module")
def real(model_path: Path) -> tuple[Tokenizer, ChatTemplate]:
    gguf = GGUFFile(model_path)
    tokenizer = Tokenizer.from_gguf(gguf)
    return tokenizer, ChatTemplate.from_gguf(gguf, tokenizer)


@pytest.fixture
def tiny_gguf(tiny_model_path: Path) -> GGUFFile:
    """A fresh GGUFFile per test, so a test may edit its ``meta``."""
    gguf = GGUFFile(tiny_model_path)
    gguf.meta = dict(gguf.meta)
    return gguf


def tiny_template(gguf: GGUFFile) -> ChatTemplate:
    return ChatTemplate.from_gguf(gguf, Tokenizer.from_gguf(gguf))


@pytest.mark.model
@pytest.mark.parametrize("case", REFERENCE["cases"], ids=lambda c: c["question"][:30])
def test_reference_prompts(real: tuple[Tokenizer, ChatTemplate], case: dict) -> None:
    tokenizer, template = real
    messages = [
        {"role": "system", "content": REFERENCE["system"]},
        {"role": "user", "content": case["question"]},
    ]
    prompt = template.render(messages)
    assert prompt == case["prompt"]
    assert tokenizer.encode(prompt) == case["prompt_ids"]
    # Contents as text, only the template's markers as control tokens: for ordinary contents
    # exactly llama.cpp's ids for the whole string.
    chat = template.render_spans(messages)
    assert chat.text == prompt and chat.content is not None
    assert [chat.text[a:b] for a, b in chat.content] == [REFERENCE["system"], case["question"]]
    codec = PromptCodec(tokenizer)
    assert codec.encode(codec.mark(chat.text, chat.content)) == case["prompt_ids"]


@pytest.mark.model
def test_default_system_prompt(real: tuple[Tokenizer, ChatTemplate]) -> None:
    _, template = real
    assert not template.is_chatml_fallback
    assert template.render([{"role": "user", "content": "hi"}]) == (
        f"<|im_start|>system\n{SMOL_SYSTEM}<|im_end|>\n"
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
    # Its own system prompt replaces the default one.
    own = template.render([{"role": "system", "content": "Be terse."}])
    assert own.startswith("<|im_start|>system\nBe terse.<|im_end|>\n") and SMOL_SYSTEM not in own


def test_multi_turn_without_generation_prompt(tiny_gguf: GGUFFile) -> None:
    template = tiny_template(tiny_gguf)
    messages = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
    ]
    turns = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    system = f"<|im_start|>system\n{SMOL_SYSTEM}<|im_end|>\n"
    assert template.render(messages, add_generation_prompt=False) == system + turns
    assert template.render(messages) == system + turns + "<|im_start|>assistant\n"


def test_render_spans_locates_every_content(tiny_gguf: GGUFFile) -> None:
    template = tiny_template(tiny_gguf)
    contents = ["a<|im_end|>", " two words\n", "", "é😀"]
    roles = ["user", "assistant"] * 2
    messages = [{"role": r, "content": c} for r, c in zip(roles, contents, strict=True)]
    chat = template.render_spans(messages)
    assert chat.text == template.render(messages)
    assert chat.content is not None
    # The empty content has nothing to locate; the others come out in order, whitespace kept.
    assert [chat.text[a:b] for a, b in chat.content] == [c for c in contents if c]
    # No trace of the tags used to find them.
    assert not any(0xFDD0 <= ord(ch) <= 0xFDEF for ch in chat.text)


def test_chatml_fallback_without_template(tiny_gguf: GGUFFile) -> None:
    del tiny_gguf.meta["tokenizer.chat_template"]
    template = tiny_template(tiny_gguf)
    assert template.is_chatml_fallback and template.source == CHATML_TEMPLATE
    assert template.render([{"role": "user", "content": "hi"}]) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_bos_and_eos_variables(tiny_gguf: GGUFFile) -> None:
    tiny_gguf.meta["tokenizer.chat_template"] = "{{ bos_token }}|{{ eos_token }}"
    assert tiny_template(tiny_gguf).render([{"role": "user", "content": ""}]) == (
        "<|im_start|>|<|im_end|>"
    )


def test_extra_message_keys_are_dropped() -> None:
    assert validate_messages([{"role": "user", "content": "x", "name": "bob"}]) == [
        {"role": "user", "content": "x"}
    ]


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ("hello", "must be a list"),
        ({"role": "user", "content": "x"}, "must be a list"),
        (None, "must be a list"),
        ([], "must not be empty"),
        (["hello"], r"messages\[0\] must be an object"),
        ([{"content": "x"}], r"messages\[0\]\.role must be one of assistant, system, user"),
        ([{"role": "tool", "content": "x"}], r"got 'tool'"),
        ([{"role": "user", "content": "x"}, {"role": "user"}], r"messages\[1\]\.content"),
        ([{"role": "user", "content": ["x"]}], "must be a string, got list"),
        ([{"role": "user\n" * 100, "content": "x"}], r"\.\.\.$"),
    ],
)
def test_bad_messages(messages: object, match: str) -> None:
    template = ChatTemplate()
    with pytest.raises(TemplateError, match=match) as info:
        template.render(messages)  # type: ignore[arg-type]
    assert "\n" not in str(info.value)


def test_raise_exception_helper() -> None:
    template = ChatTemplate(
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}"
        "{% endif %}ok"
    )
    assert template.render([{"role": "user", "content": "x"}]) == "ok"
    with pytest.raises(TemplateError, match="first must be user"):
        template.render([{"role": "system", "content": "x"}])


def test_sandbox_refuses_mutation() -> None:
    template = ChatTemplate("{{ messages.append({'role': 'user', 'content': 'x'}) }}")
    with pytest.raises(TemplateError, match="chat template failed"):
        template.render([{"role": "user", "content": "x"}])


def test_tojson_keeps_text_readable() -> None:
    template = ChatTemplate("{{ messages[0]['content'] | tojson }}")
    assert template.render([{"role": "user", "content": "<é>"}]) == '"<é>"'


def test_broken_template(tiny_gguf: GGUFFile) -> None:
    with pytest.raises(TemplateError, match="does not compile"):
        ChatTemplate("{% for m in messages %}")
    tiny_gguf.meta["tokenizer.chat_template"] = "{% if %}"
    with pytest.raises(ModelLoadError, match=r"tiny\.gguf: chat template does not compile"):
        tiny_template(tiny_gguf)
