"""The gateway's request checks and error mapping, without sockets."""

from __future__ import annotations

from typing import Any

import pytest

from kvroute.client import (
    ContextOverflow,
    KvrouteError,
    LimitReached,
    NotOwner,
    ProtocolError,
    ServiceUnavailable,
    SessionBusy,
    SessionLost,
    Timeout,
)
from kvroute.gateway.config import GatewayConfig, parse_http_address
from kvroute.gateway.errors import ApiError, from_client_error
from kvroute.gateway.request import check_header_key, parse_chat_request
from kvroute.proto import ErrorCode
from kvroute.proto.limits import MAX_MESSAGES

USER = {"role": "user", "content": "hi"}


def body(**fields: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [USER], **fields}


def refused(b: object) -> ApiError:
    with pytest.raises(ApiError) as info:
        parse_chat_request(b)
    assert info.value.status == 400
    return info.value


def test_minimal_request_takes_defaults() -> None:
    req = parse_chat_request(body())
    assert req.messages == (USER,)
    assert (req.max_tokens, req.temperature, req.top_p, req.seed) == (None, None, 1.0, None)
    assert (req.stop, req.stream, req.include_usage, req.session_key) == ((), False, False, None)
    assert req.history == [] and req.user_text == "hi"


def test_honoured_fields() -> None:
    msgs = [
        {"role": "developer", "content": "be terse"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": "ok", "refusal": None},
        {"role": "user", "content": "again"},
    ]
    req = parse_chat_request(
        {
            "model": "m",
            "messages": msgs,
            "max_completion_tokens": 7,
            "temperature": 0,
            "top_p": 0.5,
            "seed": 3,
            "stop": "END",
            "stream": True,
            "stream_options": {"include_usage": True},
            "user": "alice",
            "n": 1,
            "logprobs": False,
            "tools": [],
            "response_format": {"type": "text"},
        }
    )
    assert req.messages == (
        {"role": "system", "content": "be terse"},
        {"role": "user", "content": "ab"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "again"},
    )
    assert (req.max_tokens, req.temperature, req.top_p, req.seed) == (7, 0.0, 0.5, 3)
    assert (req.stop, req.stream, req.include_usage) == (("END",), True, True)
    assert req.session_key == ("user", "alice")


def test_strongest_body_key_wins() -> None:
    req = parse_chat_request(body(user="u", prompt_cache_key="p", session_id="s"))
    assert req.session_key == ("session_id", "s")
    req = parse_chat_request(body(user="u", prompt_cache_key="p", session_id=None))
    assert req.session_key == ("prompt_cache_key", "p")


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"n": 2}, "n"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"tool_choice": "auto"}, "tool_choice"),
        ({"logprobs": True}, "logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"frobnicate": 1}, "frobnicate"),
        ({"temperature": 2.5}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"seed": -1}, "seed"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"max_tokens": 5, "max_completion_tokens": 6}, "max_tokens"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stop": [""]}, "stop[0]"),
        ({"stop": 3}, "stop"),
        ({"stream": "yes"}, "stream"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"stream": True, "stream_options": {"continuous": True}}, "stream_options.continuous"),
        ({"model": ""}, "model"),
        ({"user": 5}, "user"),
        ({"n": True}, "n"),  # a boolean is not the number 1
    ],
)
def test_unsupported_or_bad_fields_name_the_field(fields: dict[str, Any], param: str) -> None:
    assert refused(body(**fields)).param == param


@pytest.mark.parametrize(
    ("messages", "param"),
    [
        ([], "messages"),
        ("hi", "messages"),
        ([{"role": "tool", "content": "x", "tool_call_id": "1"}, USER], "messages[0].role"),
        ([{"role": "user", "content": "x", "name": "bob"}], "messages[0].name"),
        (
            [{"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]}, USER],
            "messages[0].tool_calls",
        ),
        ([{"role": "user"}], "messages[0].content"),
        ([{"role": "user", "content": None}], "messages[0].content"),
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
            "messages[0].content[0].type",
        ),
        (
            [{"role": "user", "content": [{"type": "text", "text": 5}]}],
            "messages[0].content[0].text",
        ),
        ([USER, {"role": "assistant", "content": "x"}], "messages[1].role"),
        ([{"role": "system", "content": "only a system prompt"}], "messages[0].role"),
        ([USER] * (MAX_MESSAGES + 1), "messages"),
        (["hi"], "messages[0]"),
    ],
)
def test_bad_messages_name_the_field(messages: object, param: str) -> None:
    err = refused({"model": "m", "messages": messages})
    assert err.param == param
    assert err.body()["error"]["type"] == "invalid_request_error"


def test_body_must_be_an_object() -> None:
    assert "JSON object" in refused([1, 2]).message


def test_nulls_mean_absent() -> None:
    req = parse_chat_request(
        body(temperature=None, stop=None, tools=None, n=None, stream=None, user=None)
    )
    assert req.temperature is None and req.stop == () and not req.stream
    assert req.session_key is None


def test_header_key() -> None:
    assert check_header_key(None) is None
    assert check_header_key("abc") == "abc"
    with pytest.raises(ApiError) as info:
        check_header_key("")
    assert info.value.param == "X-Session-ID"
    with pytest.raises(ApiError):
        check_header_key("x" * 2000)


def test_overflow_error_in_openai_words() -> None:
    err = from_client_error(ContextOverflow(prompt_tokens=1900, max_tokens=256, n_ctx=2048))
    assert err.status == 400
    e = err.body()["error"]
    assert e["code"] == "context_length_exceeded"
    assert e["message"].startswith("This model's maximum context length is 2048 tokens")
    assert "2156 tokens (1900 in the messages, 256 in the completion)" in e["message"]
    assert (e["n_prompt_tokens"], e["n_ctx"], e["param"]) == (1900, 2048, "messages")


@pytest.mark.parametrize(
    ("exc", "status", "code"),
    [
        (LimitReached("3 of 3 requests in flight"), 429, "rate_limit_exceeded"),
        (ServiceUnavailable(ErrorCode.NO_WORKER, "no live worker"), 503, "no_worker"),
        (ServiceUnavailable(ErrorCode.OVERLOADED, "queue full"), 503, "overloaded"),
        (SessionLost("w1", "exited"), 503, "worker_lost"),
        (Timeout(2.0, "TURN reply", "tcp://127.0.0.1:1"), 504, "broker_timeout"),
        (NotOwner("someone else's"), 409, "not_owner"),
        (SessionBusy("s"), 409, "session_busy"),
        (ProtocolError(ErrorCode.BAD_BODY, "bad"), 502, "bad_body"),
        (KvrouteError("client is closed"), 503, "unavailable"),
        (ValueError("TURN.messages: too many chars"), 400, "invalid_value"),
    ],
)
def test_client_errors_map_to_statuses(exc: Exception, status: int, code: str) -> None:
    err = from_client_error(exc)
    assert (err.status, err.code) == (status, code)
    assert set(err.body()["error"]) >= {"message", "type", "param", "code"}


def test_other_exceptions_are_not_mapped() -> None:
    with pytest.raises(TypeError):
        from_client_error(RuntimeError("a bug"))


def test_config_checks() -> None:
    with pytest.raises(ValueError):
        GatewayConfig(port=70000)
    with pytest.raises(ValueError):
        GatewayConfig(models=("",))
    with pytest.raises(ValueError):
        GatewayConfig(server_key="k")
    for token in (b"", b"\x00zmq-generated", b"t" * 256):
        with pytest.raises(ValueError, match="owner token"):
            GatewayConfig(owner_token=token)
    with pytest.raises(ValueError, match="CURVE"):
        GatewayConfig(owner_token=b"token", server_key="k", key="k")
    assert GatewayConfig(owner_token=b"shared").owner_token == b"shared"
    assert GatewayConfig(host="::1", port=9).url == "http://[::1]:9"


@pytest.mark.parametrize(
    ("text", "expected"),
    [("127.0.0.1:8000", ("127.0.0.1", 8000)), ("[::1]:0", ("::1", 0)), ("h:1", ("h", 1))],
)
def test_http_address(text: str, expected: tuple[str, int]) -> None:
    assert parse_http_address(text) == expected


@pytest.mark.parametrize("text", ["8000", ":8000", "host:", "host:99999", "host:x"])
def test_bad_http_address(text: str) -> None:
    with pytest.raises(ValueError, match="HOST:PORT"):
        parse_http_address(text)
