"""Render chat messages into a prompt with the model's own Jinja chat template.

The template comes from the GGUF's ``tokenizer.chat_template`` (the Hugging Face template the
model was trained with) and runs in jinja2's immutable sandbox, set up like ``transformers``
does it (``trim_blocks``, ``lstrip_blocks``, ``raise_exception``, ``bos_token``/``eos_token``),
so that every template written for Hugging Face renders identically here. A model without a
template gets plain ChatML.

Messages come from clients, so they are validated here, at the edge, before any template sees
them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
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
        clean = validate_messages(messages)
        try:
            return self._template.render(
                messages=clean,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
            )
        except Exception as exc:
            # The template is third-party code from the model file: whatever it raises
            # (raise_exception, sandbox violations, type errors) is a rendering failure.
            raise TemplateError(f"chat template failed: {_one_line(str(exc))}") from exc
