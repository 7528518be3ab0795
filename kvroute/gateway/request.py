"""An OpenAI chat completion request, checked: what kvroute honours, and a 400 for the rest.

:func:`parse_chat_request` takes the decoded JSON body and returns a :class:`ChatRequest` or
raises :class:`~kvroute.gateway.errors.ApiError` (400) naming the field at fault. Nothing is
ignored silently: a field is either honoured, accepted at the value that means "off" (``n: 1``,
``logprobs: false``, ``tools: []``, any field set to ``null``), or refused.

Honoured: ``model`` (any name; the answer says which model served it), ``messages`` (roles
``system``, ``developer`` (= system), ``user``, ``assistant``; content a string or a list of
``{"type": "text", "text": ...}`` parts, concatenated without separator), ``max_tokens`` /
``max_completion_tokens``, ``temperature`` (0..2), ``top_p`` (0 < p <= 1), ``seed``, ``stop``
(a string or up to 4), ``stream``, ``stream_options.include_usage``, and the session keys
``session_id``, ``prompt_cache_key`` and ``user`` (see :mod:`~kvroute.gateway.affinity`). The
last message must come from the user: the worker answers it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kvroute.proto import Role
from kvroute.proto.limits import MAX_MAX_TOKENS, MAX_MESSAGES, MAX_SEED, MAX_STOP, MAX_STOP_CHARS

from .errors import ApiError, invalid

MAX_KEY_CHARS: int = 1024
"""Characters of a session key (``session_id``, ``prompt_cache_key``, ``user``, header)."""
MAX_OPENAI_TEMPERATURE: float = 2.0

SESSION_KEY_FIELDS: tuple[str, ...] = ("session_id", "prompt_cache_key", "user")
"""Body fields that name a session, strongest first (the X-Session-ID header beats them all)."""

_ROLES: dict[str, str] = {
    "system": str(Role.SYSTEM),
    "developer": str(Role.SYSTEM),  # OpenAI's newer name for system instructions
    "user": str(Role.USER),
    "assistant": str(Role.ASSISTANT),
}

# Fields accepted only at the value that means "off" (or null). The reason is the 400 message.
_OFF_VALUES: dict[str, tuple[tuple[Any, ...], str]] = {
    "n": ((1,), "only n=1 is supported (one choice per request)"),
    "frequency_penalty": ((0,), "frequency_penalty is not supported"),
    "presence_penalty": ((0,), "presence_penalty is not supported"),
    "logprobs": ((False,), "logprobs are not supported"),
    "top_logprobs": ((0,), "logprobs are not supported"),
    "tools": (([],), "tools are not supported"),
    "functions": (([],), "functions are not supported"),
    "tool_choice": (("none",), "tools are not supported"),
    "function_call": (("none",), "functions are not supported"),
    "parallel_tool_calls": ((), "tools are not supported"),
    "response_format": (({"type": "text"},), "only response_format {'type': 'text'} is supported"),
    "logit_bias": (({},), "logit_bias is not supported"),
    "modalities": ((["text"],), "only text output is supported"),
    "audio": ((), "audio output is not supported"),
    "store": ((False,), "storing completions is not supported"),
    "metadata": (({},), "metadata is not supported (nothing is stored)"),
    "service_tier": (("auto", "default"), "service tiers are not supported"),
    "prediction": ((), "predicted outputs are not supported"),
    "reasoning_effort": ((), "reasoning_effort is not supported"),
    "web_search_options": ((), "web search is not supported"),
}
_HONOURED = frozenset(
    {
        "model",
        "messages",
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "seed",
        "stop",
        "stream",
        "stream_options",
        *SESSION_KEY_FIELDS,
    }
)


@dataclass(frozen=True, slots=True)
class ChatRequest:
    """A checked chat completion request.

    Attributes
    ----------
    model
        The model the client named (any name is accepted).
    messages
        ``{"role", "content"}`` maps with kvroute roles and string content; the last is the
        user's.
    max_tokens
        Reply limit, or None for the gateway's default.
    temperature, top_p, seed
        Sampling (temperature None: the gateway's default).
    stop
        Stop strings (0..4, each non-empty).
    stream, include_usage
        SSE streaming, and a final usage chunk in it.
    session_key
        ``(field, value)`` of the strongest session key in the body, or None.
    """

    model: str
    messages: tuple[dict[str, str], ...]
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False
    session_key: tuple[str, str] | None = None

    @property
    def history(self) -> list[dict[str, str]]:
        """Every message but the last (what the session must hold before this turn)."""
        return list(self.messages[:-1])

    @property
    def user_text(self) -> str:
        """The last (user) message's text: what this turn sends."""
        return self.messages[-1]["content"]


def _type_name(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "object"
    return "array" if isinstance(value, list) else ""


def _same(value: object, off: object) -> bool:
    """JSON equality that keeps booleans apart from numbers (``True == 1`` in Python)."""
    if isinstance(value, bool) or isinstance(off, bool):
        return value is off
    if isinstance(value, int | float) and isinstance(off, int | float):
        return float(value) == float(off)
    return type(value) is type(off) and value == off


def _number(body: Mapping[str, Any], key: str, lo: float, hi: float, lo_open: bool) -> float:
    value = body[key]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise invalid(f"{key} must be a number", key, "invalid_type")
    value = float(value)
    if not math.isfinite(value) or value > hi or value < lo or (lo_open and value == lo):
        bounds = f"{'(' if lo_open else '['}{lo:g}, {hi:g}]"
        raise invalid(f"{key} must be within {bounds}, got {value:g}", key)
    return value


def _integer(body: Mapping[str, Any], key: str, lo: int, hi: int) -> int:
    value = body[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(f"{key} must be an integer", key, "invalid_type")
    if not lo <= value <= hi:
        raise invalid(f"{key} must be within [{lo}, {hi}], got {value}", key)
    return value


def _text(value: object, param: str, max_chars: int) -> str:
    if not isinstance(value, str) or not value:
        raise invalid(f"{param} must be a non-empty string", param, "invalid_type")
    if len(value) > max_chars:
        raise invalid(f"{param} is longer than {max_chars} characters", param)
    return value


def _content(value: object, param: str) -> str:
    """A message's text: a string, or text parts concatenated."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise invalid(f"{param} must be a string or an array of text parts", param, "invalid_type")
    texts = []
    for j, part in enumerate(value):
        where = f"{param}[{j}]"
        if not isinstance(part, dict):
            raise invalid(f"{where} must be an object", where, "invalid_type")
        kind = part.get("type")
        if kind != "text":
            raise invalid(
                f"{where}.type {kind!r} is not supported: only text parts are",
                f"{where}.type",
                "unsupported_content",
            )
        for k in part:
            if k not in ("type", "text"):
                raise invalid(f"{where}.{k} is not supported", f"{where}.{k}", "unsupported_field")
        text = part.get("text")
        if not isinstance(text, str):
            raise invalid(f"{where}.text must be a string", f"{where}.text", "invalid_type")
        texts.append(text)
    return "".join(texts)


def _message(m: object, i: int) -> dict[str, str]:
    where = f"messages[{i}]"
    if not isinstance(m, dict):
        raise invalid(f"{where} must be an object", where, "invalid_type")
    role = m.get("role")
    if role not in _ROLES:
        raise invalid(
            f"{where}.role {role!r} is not supported: use system, developer, user or assistant",
            f"{where}.role",
            "unsupported_role",
        )
    for k, v in m.items():
        if k in ("role", "content") or v is None:
            continue
        what = "tool calls are" if k in ("tool_calls", "function_call") else f"{k} is"
        raise invalid(f"{where}.{k}: {what} not supported", f"{where}.{k}", "unsupported_field")
    if "content" not in m:
        raise invalid(f"{where}.content is missing", f"{where}.content", "missing_field")
    return {"role": _ROLES[role], "content": _content(m["content"], f"{where}.content")}


def _messages(value: object) -> tuple[dict[str, str], ...]:
    if not isinstance(value, list) or not value:
        raise invalid("messages must be a non-empty array", "messages", "invalid_type")
    if len(value) > MAX_MESSAGES:
        raise invalid(f"at most {MAX_MESSAGES} messages per request", "messages")
    msgs = tuple(_message(m, i) for i, m in enumerate(value))
    if msgs[-1]["role"] != Role.USER:
        raise invalid(
            "the last message must have role 'user' (the model answers it)",
            f"messages[{len(msgs) - 1}].role",
        )
    return msgs


def _stop(value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise invalid("stop must be a string or an array of strings", "stop", "invalid_type")
    if len(value) > MAX_STOP:
        raise invalid(f"at most {MAX_STOP} stop strings", "stop")
    return tuple(_text(s, f"stop[{i}]", MAX_STOP_CHARS) for i, s in enumerate(value))


def _max_tokens(body: Mapping[str, Any]) -> int | None:
    values = {
        k: _integer(body, k, 1, MAX_MAX_TOKENS)
        for k in ("max_completion_tokens", "max_tokens")
        if body.get(k) is not None
    }
    if len(set(values.values())) > 1:
        raise invalid("max_tokens and max_completion_tokens disagree; give one", "max_tokens")
    return next(iter(values.values()), None)


def _stream_options(body: Mapping[str, Any], stream: bool) -> bool:
    opts = body.get("stream_options")
    if opts is None:
        return False
    if not stream:
        raise invalid("stream_options is only allowed with stream: true", "stream_options")
    if not isinstance(opts, dict):
        raise invalid("stream_options must be an object", "stream_options", "invalid_type")
    for k in opts:
        if k != "include_usage":
            param = f"stream_options.{k}"
            raise invalid(f"{param} is not supported", param, "unsupported_field")
    include = opts.get("include_usage", False)
    if not isinstance(include, bool):
        param = "stream_options.include_usage"
        raise invalid(f"{param} must be a boolean", param, "invalid_type")
    return include


def _check_other_fields(body: Mapping[str, Any]) -> None:
    for key, value in body.items():
        if key in _HONOURED or value is None:
            continue
        if key not in _OFF_VALUES:
            raise invalid(f"Unrecognized request argument supplied: {key}", key, "unknown_field")
        offs, reason = _OFF_VALUES[key]
        if not any(_same(value, off) for off in offs):
            raise invalid(reason, key, "unsupported_field")


def parse_chat_request(body: object) -> ChatRequest:
    """Check a decoded ``POST /v1/chat/completions`` body.

    Raises
    ------
    ApiError
        400 naming the field (``param``) for anything malformed or unsupported.
    """
    if not isinstance(body, dict):
        raise invalid(f"the request body must be a JSON object, not {_type_name(body)}".strip())
    _check_other_fields(body)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise invalid("model must be a non-empty string", "model", "invalid_type")
    messages = _messages(body.get("messages"))
    stream = body.get("stream")
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise invalid("stream must be a boolean", "stream", "invalid_type")
    present = {k for k, v in body.items() if v is not None}
    key = next(
        ((k, _text(body[k], k, MAX_KEY_CHARS)) for k in SESSION_KEY_FIELDS if k in present),
        None,
    )
    return ChatRequest(
        model=model,
        messages=messages,
        max_tokens=_max_tokens(body),
        temperature=(
            _number(body, "temperature", 0.0, MAX_OPENAI_TEMPERATURE, False)
            if "temperature" in present
            else None
        ),
        top_p=_number(body, "top_p", 0.0, 1.0, True) if "top_p" in present else 1.0,
        seed=_integer(body, "seed", 0, MAX_SEED) if "seed" in present else None,
        stop=_stop(body["stop"]) if "stop" in present else (),
        stream=stream,
        include_usage=_stream_options(body, stream),
        session_key=key,
    )


def check_header_key(value: str | None) -> str | None:
    """The ``X-Session-ID`` header's value, checked (None when absent)."""
    if value is None:
        return None
    try:
        return _text(value, "X-Session-ID", MAX_KEY_CHARS)
    except ApiError as exc:
        exc.param = "X-Session-ID"
        raise
