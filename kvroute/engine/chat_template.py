"""Render chat messages into a prompt with the model's own Jinja chat template.

The template comes from the GGUF's ``tokenizer.chat_template`` (the Hugging Face template the
model was trained with) and runs in jinja2's immutable sandbox, set up like ``transformers``
does it (``trim_blocks``, ``lstrip_blocks``, ``raise_exception``, ``bos_token``/``eos_token``),
so that every template written for Hugging Face renders identically here. A model without a
template gets plain ChatML.

Messages come from clients, so they are validated here, at the edge, before any template sees
them. Their content is data: `ChatTemplate.render_spans` also says where each content landed in
the prompt, so that a control token's text inside a message is never read as one (``prompt.py``).
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NoReturn

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import ModelLoadError, TemplateError
from .gguf_file import GGUFFile
from .tokenizer import Tokenizer

logger = logging.getLogger(__name__)

ROLES = frozenset({"system", "user", "assistant"})

# Plain ChatML, for models whose file carries no template.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True)
class RenderedChat:
    """A rendered prompt and where the message contents are in it.

    ``content`` holds ``(start, end)`` character ranges of ``text``, one per rendered content
    (with the whitespace around it), or is None when the template alters contents beyond
    trimming them so that they cannot be located.
    """

    text: str
    content: tuple[tuple[int, int], ...] | None


def _one_line(text: str, limit: int = 200) -> str:
    """Collapse whitespace so an error message stays on one line, and cap its length."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def _raise_exception(message: str) -> NoReturn:
    # Templates call this to reject a conversation (e.g. roles not alternating).
    raise jinja2.TemplateError(message)


def _tojson(
    value: Any, indent: int | None = None, ensure_ascii: bool = False, sort_keys: bool = False
) -> str:
    # jinja2's own tojson HTML-escapes '<', '>' and '&'; transformers replaces it with this.
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def _tag(messages: Sequence[Mapping[str, str]]) -> str:
    """A random run of Unicode noncharacters that no content contains, to bracket contents."""
    while True:
        tag = "\ufdd0" + "".join(chr(0xFDD1 + b % 31) for b in secrets.token_bytes(8))
        if not any(tag in m["content"] for m in messages):
            return tag


def _bracket(messages: list[dict[str, str]], tag: str) -> list[dict[str, str]]:
    """Each content wrapped in numbered begin/end tags inside its surrounding whitespace.

    The whitespace stays outside so that a template's ``trim`` still removes it.
    """
    out = []
    for i, m in enumerate(messages):
        core = m["content"].strip()
        if core:
            lead, _, trail = m["content"].partition(core)
            m = {**m, "content": f"{lead}{tag}{i}b{tag}{core}{tag}{i}e{tag}{trail}"}
        out.append(m)
    return out


def _unbracket(
    text: str, tag: str, messages: list[dict[str, str]]
) -> tuple[str, list[tuple[int, int]]] | None:
    """Remove the tags of `_bracket`: the plain text and the content ranges in it.

    None if the tags do not pair up (the template cut or reordered a content).
    """
    # Contents never contain the tag, so splitting on it leaves text and labels alternating.
    pieces = text.split(tag)
    if len(pieces) % 2 == 0:
        return None
    parts: list[str] = [pieces[0]]
    opened: dict[int, int] = {}
    found: list[tuple[int, int, int]] = []
    n = len(pieces[0])
    for label, after in zip(pieces[1::2], pieces[2::2], strict=True):
        number, kind = label[:-1], label[-1:]
        if not (number.isascii() and number.isdigit() and int(number) < len(messages)):
            return None
        i = int(number)
        if kind == "b" and i not in opened:
            opened[i] = n
        elif kind == "e" and i in opened:
            found.append((opened.pop(i), n, i))
        else:
            return None
        parts.append(after)
        n += len(after)
    if opened:
        return None
    plain = "".join(parts)
    spans = []
    for start, end, i in found:
        # Widen over the whitespace around the content where the template kept it.
        content = messages[i]["content"]
        lead = content[: len(content) - len(content.lstrip())]
        trail = content[len(content.rstrip()) :]
        if plain[start - len(lead) : start] == lead:
            start -= len(lead)
        if plain[end : end + len(trail)] == trail:
            end += len(trail)
        spans.append((start, end))
    return plain, spans


def validate_messages(messages: object) -> list[dict[str, str]]:
    """Check chat messages and return them as plain ``{"role", "content"}`` dicts.

    Other keys of a message are dropped, so a template only ever sees what was checked.

    Raises
    ------
    TemplateError
        If ``messages`` is not a non-empty list of mappings, each with a ``role`` among
        system/user/assistant and a string ``content``.
    """
    if isinstance(messages, str | bytes | Mapping) or not isinstance(messages, Sequence):
        raise TemplateError(
            f"messages must be a list of {{role, content}} objects, got {type(messages).__name__}"
        )
    if not messages:
        raise TemplateError("messages must not be empty")
    clean: list[dict[str, str]] = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise TemplateError(
                f"messages[{i}] must be an object with role and content, "
                f"got {type(message).__name__}"
            )
        role = message.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise TemplateError(
                f"messages[{i}].role must be one of {', '.join(sorted(ROLES))}, "
                f"got {_one_line(repr(role), 40)}"
            )
        content = message.get("content")
        if not isinstance(content, str):
            raise TemplateError(
                f"messages[{i}].content must be a string, got {type(content).__name__}"
            )
        clean.append({"role": role, "content": content})
    return clean


class ChatTemplate:
    """A compiled chat template.

    Parameters
    ----------
    source:
        Jinja source of the template; None uses plain ChatML.
    bos_token, eos_token:
        Texts bound to the template's ``bos_token`` and ``eos_token`` variables.

    Raises
    ------
    TemplateError
        If ``source`` is not valid Jinja.
    """

    def __init__(
        self, source: str | None = None, *, bos_token: str = "", eos_token: str = ""
    ) -> None:
        self.is_chatml_fallback: bool = source is None
        self.source: str = CHATML_TEMPLATE if source is None else source
        self.bos_token = bos_token
        self.eos_token = eos_token
        self._warned = False  # about a template that alters contents (logged once)
        try:
            self._template = _environment().from_string(self.source)
        except jinja2.TemplateError as exc:
            raise TemplateError(f"chat template does not compile: {_one_line(str(exc))}") from exc

    @classmethod
    def from_gguf(cls, gguf: GGUFFile, tokenizer: Tokenizer) -> ChatTemplate:
        """The template of a GGUF file (``tokenizer.chat_template``), or ChatML if it has none.

        Raises
        ------
        ModelLoadError
            If the file's template is not a string or does not compile.
        """
        source = gguf.meta.get("tokenizer.chat_template")
        if source is not None and not isinstance(source, str):
            raise ModelLoadError(f"{gguf.path}: tokenizer.chat_template is not a string")
        if source is None:
            logger.info("%s: no tokenizer.chat_template, using ChatML", gguf.path)
            ids = tokenizer.encode("<|im_start|>")
            if len(ids) != 1 or not tokenizer.is_control(ids[0]):
                # ChatML markers would be tokenized as plain text: the model will not follow.
                logger.warning("%s: ChatML fallback but no <|im_start|> control token", gguf.path)
        bos = "" if tokenizer.bos_id is None else tokenizer.token_text(tokenizer.bos_id)
        try:
            return cls(source, bos_token=bos, eos_token=tokenizer.token_text(tokenizer.eos_id))
        except TemplateError as exc:
            raise ModelLoadError(f"{gguf.path}: {exc}") from exc

    def render(
        self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True
    ) -> str:
        """Render a conversation into the prompt text the model expects.

        Parameters
        ----------
        messages:
            The conversation, oldest first: ``{"role": ..., "content": ...}`` mappings.
        add_generation_prompt:
            End with the header that opens the assistant's reply.

        Raises
        ------
        TemplateError
            If the messages are malformed or the template rejects them.
        """
        return self._render(validate_messages(messages), add_generation_prompt)

    def render_spans(
        self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True
    ) -> RenderedChat:
        """Render like `render`, and locate every message content in the result.

        The template runs a second time with each content bracketed by random tags; removing
        them must give exactly the prompt of `render`, else ``content`` is None.

        Raises
        ------
        TemplateError
            If the messages are malformed or the template rejects them.
        """
        clean = validate_messages(messages)
        text = self._render(clean, add_generation_prompt)
        tag = _tag(clean)
        try:
            bracketed = self._render(_bracket(clean, tag), add_generation_prompt)
        except TemplateError:  # a template that inspects contents may reject the tags
            bracketed = None
        found = None if bracketed is None else _unbracket(bracketed, tag, clean)
        if found is None or found[0] != text:
            if not self._warned:
                logger.warning("the chat template alters message contents: cannot locate them")
                self._warned = True
            return RenderedChat(text, None)
        return RenderedChat(text, tuple(found[1]))

    def _render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        try:
            return self._template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
            )
        except Exception as exc:
            # The template is third-party code from the model file: whatever it raises
            # (raise_exception, sandbox violations, type errors) is a rendering failure.
            raise TemplateError(f"chat template failed: {_one_line(str(exc))}") from exc
