"""The gateway in front of real workers (the tiny model): cache reuse without a session key
(through one gateway, and through two alternating), stop strings end to end, greedy equality
with the client library, overflow, the openai SDK, health, and ``kvroute gateway``.

The broker and workers run as threads of the test process (tests/service_harness.py), the
gateway in a thread with its own event loop; ``kvroute gateway`` as a subprocess. Real-model
checks are in tests/test_gateway_openai.py.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from procs import Procs, free_port
from service_harness import REAL_MODEL_HEARTBEAT, Harness, start_harness
from tiny_gguf import TinySpec, write_tiny_gguf

from kvroute import Client
from kvroute.engine.engine import Engine
from kvroute.gateway import GatewayConfig, GatewayThread

pytestmark = pytest.mark.timeout(120)
N_CTX = 1024


@pytest.fixture(scope="module")
def engine_1k(tmp_path_factory: pytest.TempPathFactory) -> Engine:
    """The tiny model with room for a few turns (the default tiny one has 256 positions)."""
    path = write_tiny_gguf(tmp_path_factory.mktemp("tiny1k") / "tiny.gguf", TinySpec(n_ctx=N_CTX))
    return Engine.load(path, n_ctx=N_CTX)


@pytest.fixture
def service(engine_1k: Engine) -> Iterator[Harness]:
    h = start_harness(engine_1k, 1, heartbeat=REAL_MODEL_HEARTBEAT)
    try:
        yield h
    finally:
        h.close()


@pytest.fixture
def gateway(service: Harness) -> Iterator[str]:
    with GatewayThread(GatewayConfig(connect=service.frontend, port=0, timeout=10)) as gw:
        yield gw.url


def post(url: str, **body: Any) -> httpx.Response:
    body.setdefault("model", "m")
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30)


USER_TURNS = ["Hello there.", "Tell me more.", "And then?", "Why?", "Go on.", "Thanks!"]


def test_keyless_conversation_follows_its_session(gateway: str) -> None:
    msgs: list[dict[str, str]] = [{"role": "system", "content": "Be brief."}]
    sessions = set()
    for turn, text in enumerate(USER_TURNS[:4], start=1):
        msgs.append({"role": "user", "content": text})
        body = post(gateway, messages=msgs, max_tokens=16, temperature=0).json()
        kv, usage = body["kvroute"], body["usage"]
        sessions.add(kv["session"])
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        assert usage["prompt_tokens_details"]["cached_tokens"] == kv["cached_tokens"]
        if turn == 1:
            assert (kv["affinity"], kv["path"], kv["cold_reason"]) == ("new", "cold", "new")
        else:
            assert (kv["affinity"], kv["path"]) == ("transcript", "text_prefix")
            assert kv["cached_tokens"] > usage["prompt_tokens"] // 2
        msgs.append(body["choices"][0]["message"])
    assert len(sessions) == 1
    # regenerate the last turn: same session, rewound by token prefix
    body = post(gateway, messages=msgs[:-1], max_tokens=16, temperature=0).json()
    assert body["kvroute"]["session"] in sessions
    assert body["kvroute"]["path"] == "token_prefix"
    assert body["kvroute"]["affinity"] == "transcript"


def test_greedy_replies_equal_the_client_library(service: Harness, gateway: str) -> None:
    http_msgs: list[dict[str, str]] = []
    http_replies = []
    for text in USER_TURNS[:3]:
        http_msgs.append({"role": "user", "content": text})
        r = post(gateway, messages=http_msgs, max_tokens=12, temperature=0, stream=True)
        content = "".join(
            c["choices"][0]["delta"].get("content", "") for c in _chunks(r.text) if c["choices"]
        )
        http_replies.append(content)
        http_msgs.append({"role": "assistant", "content": content})
    with Client(service.frontend, timeout=10) as client:
        chat = client.session()
        lib_replies = [chat.ask(t, max_tokens=12, temperature=0) for t in USER_TURNS[:3]]
    assert http_replies == lib_replies


def _chunks(sse: str) -> list[dict[str, Any]]:
    import json

    data = [f.removeprefix("data: ") for f in sse.split("\n\n") if f.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


def test_context_overflow_is_400_and_changes_nothing(gateway: str) -> None:
    for stream in (False, True):
        r = post(
            gateway, messages=[{"role": "user", "content": "hi"}], max_tokens=N_CTX, stream=stream
        )
        assert r.status_code == 400
        err = r.json()["error"]
        assert err["code"] == "context_length_exceeded"
        assert err["message"].startswith(f"This model's maximum context length is {N_CTX} tokens")
        assert err["n_ctx"] == N_CTX and 0 < err["n_prompt_tokens"] < N_CTX
    # an explicit session survives its overflow untouched
    headers = {"X-Session-ID": "keep"}
    msgs = [{"role": "user", "content": "hi"}]
    first = httpx.post(
        f"{gateway}/v1/chat/completions",
        json={"model": "m", "messages": msgs, "max_tokens": 4},
        headers=headers,
    ).json()
    msgs += [first["choices"][0]["message"], {"role": "user", "content": "x " * 600}]
    over = httpx.post(
        f"{gateway}/v1/chat/completions",
        json={"model": "m", "messages": msgs, "max_tokens": 4},
        headers=headers,
    )
    assert over.status_code == 400
    msgs[-1] = {"role": "user", "content": "short"}
    again = httpx.post(
        f"{gateway}/v1/chat/completions",
        json={"model": "m", "messages": msgs, "max_tokens": 4},
        headers=headers,
    ).json()
    assert again["kvroute"]["session"] == "s.keep" and again["kvroute"]["path"] == "text_prefix"


def test_models_and_health(service: Harness, gateway: str, engine_1k: Engine) -> None:
    models = httpx.get(f"{gateway}/v1/models").json()
    assert [m["id"] for m in models["data"]] == [engine_1k.model_name]
    assert models["object"] == "list"
    health = httpx.get(f"{gateway}/health")  # before any turn: the broker knows its workers
    assert health.status_code == 200
    assert health.json()["status"] == "ok" and health.json()["workers"] == 1
    service.add_worker(engine_1k, "w1")
    assert httpx.get(f"{gateway}/health").json()["workers"] == 2
    service.stop_worker("w0")
    service.stop_worker("w1")
    wait = time.monotonic() + 10
    while httpx.get(f"{gateway}/health").status_code != 503:
        assert time.monotonic() < wait, "health still 200 with no worker"
        time.sleep(0.05)
    assert httpx.get(f"{gateway}/health").json()["workers"] == 0


def sse_pieces(r: httpx.Response) -> tuple[list[str], dict[str, Any]]:
    """The text pieces of a streamed answer and its last chunk with choices."""
    chunks = [c for c in _chunks(r.text) if c["choices"]]
    return [c["choices"][0]["delta"].get("content", "") for c in chunks], chunks[-1]


def test_stop_split_across_two_tokens_end_to_end(gateway: str) -> None:
    """The worker cuts the reply before a stop string that spans two tokens, streams none of
    it, finishes with finish_reason stop, and the next turn still takes the text-prefix path."""
    msgs: list[dict[str, str]] = [{"role": "user", "content": "Say something long."}]
    r = post(gateway, messages=msgs, max_tokens=24, temperature=0, stream=True)
    pieces, _ = sse_pieces(r)
    text = "".join(pieces)
    stop, expected = next(
        (p[-1] + q[0], text[: text.find(p[-1] + q[0])])
        for p, q in itertools.pairwise(pieces[1:])
        if p and q and text.find(p[-1] + q[0]) > 0
    )
    r = post(gateway, messages=msgs, max_tokens=24, temperature=0, stream=True, stop=[stop])
    pieces, last = sse_pieces(r)
    assert "".join(pieces) == expected and stop not in "".join(pieces)
    assert last["choices"][0]["finish_reason"] == "stop"
    whole = post(gateway, messages=msgs, max_tokens=24, temperature=0, stop=stop).json()
    assert whole["choices"][0]["message"]["content"] == expected
    assert whole["choices"][0]["finish_reason"] == "stop"
    msgs += [whole["choices"][0]["message"], {"role": "user", "content": "And?"}]
    nxt = post(gateway, messages=msgs, max_tokens=4, temperature=0).json()["kvroute"]
    assert (nxt["session"], nxt["affinity"]) == (whole["kvroute"]["session"], "transcript")
    assert nxt["path"] == "text_prefix"


def test_two_gateways_alternating_keep_the_conversation_warm(service: Harness) -> None:
    """Requests of one keyless conversation alternate between two gateways sharing an owner
    token: every turn after the first lands on the same session, on the text-prefix path."""
    cfg = GatewayConfig(connect=service.frontend, port=0, timeout=10, owner_token=b"g2-shared")
    with GatewayThread(cfg) as one, GatewayThread(cfg) as two:
        msgs: list[dict[str, str]] = [{"role": "system", "content": "Be brief."}]
        sessions = set()
        for turn, text in enumerate(USER_TURNS, start=1):
            url = (one.url, two.url)[turn % 2]
            msgs.append({"role": "user", "content": text})
            body = post(url, messages=msgs, max_tokens=12, temperature=0).json()
            kv = body["kvroute"]
            sessions.add(kv["session"])
            if turn > 1:
                assert (kv["affinity"], kv["path"]) == ("transcript", "text_prefix"), (turn, kv)
            msgs.append(body["choices"][0]["message"])
        assert len(sessions) == 1


def test_openai_sdk_sync_and_async(gateway: str) -> None:
    """The real SDK, streaming, no session key: every turn after the first reuses the cache."""
    sdk = openai.OpenAI(base_url=f"{gateway}/v1", api_key="unused", max_retries=0)
    msgs: list[Any] = []
    for turn, text in enumerate(USER_TURNS[:3], start=1):
        msgs.append({"role": "user", "content": text})
        stream = sdk.chat.completions.create(
            model="m",
            messages=msgs,
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
        reply = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        usage = chunks[-1].usage
        assert usage is not None and usage.prompt_tokens_details is not None
        if turn > 1:
            assert usage.prompt_tokens_details.cached_tokens > 0
        msgs.append({"role": "assistant", "content": reply})

    async def async_chat() -> list[str]:
        client = openai.AsyncOpenAI(base_url=f"{gateway}/v1", api_key="unused", max_retries=0)
        out = []
        amsgs: list[Any] = []
        for text in USER_TURNS[:3]:
            amsgs.append({"role": "user", "content": text})
            r = await client.chat.completions.create(
                model="m", messages=amsgs, max_tokens=10, temperature=0
            )
            content = r.choices[0].message.content or ""
            out.append(content)
            amsgs.append({"role": "assistant", "content": content})
            assert r.usage is not None
        await client.close()
        return out

    replies = asyncio.run(asyncio.wait_for(async_chat(), 60))
    assert replies == [m["content"] for m in msgs if m["role"] == "assistant"]
    with pytest.raises(openai.BadRequestError) as info:
        sdk.chat.completions.create(model="m", messages=msgs[:1], n=2)
    assert "n=1" in str(info.value)


def test_gateway_command(service: Harness, tmp_path: Path) -> None:
    procs = Procs(tmp_path)
    try:
        token = tmp_path / "group.token"
        args = ["gateway", "--connect", service.frontend, "--http", "127.0.0.1:0"]
        p = procs.start("gateway", [*args, "--owner-token-file", str(token)])
        (ready,) = p.wait_log(r"ready gateway (http://127\.0\.0\.1:\d+)", timeout=60)
        text = p.text()
        (http,) = re.findall(r"^http (http://127\.0\.0\.1:\d+)$", text, re.M)
        assert http == ready[1] and text.index("http http") < text.index("ready gateway")
        r = post(http, messages=[{"role": "user", "content": "hi"}], max_tokens=3)
        assert r.status_code == 200 and r.json()["kvroute"]["worker"] == "w0"
        # the first gateway of a group made the token file, private to this user
        assert token.stat().st_mode & 0o777 == 0o600 and len(token.read_bytes().strip()) == 22
        p.signal(signal.SIGTERM)
        assert p.p.wait(20) == 0
        (tmp_path / "empty.token").write_bytes(b"\n")
        bad = procs.start("bad", [*args, "--owner-token-file", str(tmp_path / "empty.token")])
        assert bad.p.wait(60) == 1 and "error: owner token file" in bad.text()
    finally:
        procs.close()


def test_serve_starts_the_gateway_before_ready(tiny_model_path: Path, tmp_path: Path) -> None:
    procs = Procs(tmp_path)
    try:
        frontend = f"tcp://127.0.0.1:{free_port()}"
        args = ["serve", "--workers", "1", "--model", str(tiny_model_path), "--frontend", frontend]
        p = procs.start("serve", [*args, "--http", "127.0.0.1:0"])
        p.wait_log(r"ready frontend", timeout=120)
        text = p.text()
        (http,) = re.findall(r"^http (http://127\.0\.0\.1:\d+)$", text, re.M)
        assert text.index(f"http {http}") < text.index("ready frontend")
        r = post(http, messages=[{"role": "user", "content": "hi"}], max_tokens=3)
        assert r.status_code == 200 and r.json()["kvroute"]["worker"] == "w0"
        assert httpx.get(f"{http}/v1/models").json()["data"][0]["id"] == tiny_model_path.name
        p.signal(signal.SIGTERM)
        assert p.p.wait(30) == 0
        with pytest.raises(httpx.ConnectError):  # the gateway child went with it
            httpx.get(f"{http}/health", timeout=2)
        off = procs.start("serve-no-http", [*args, "--no-http"])
        off.wait_log(r"ready frontend", timeout=120)
        assert "http http" not in off.text()
    finally:
        procs.close()
