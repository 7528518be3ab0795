"""``kvroute bench --openai URL``: the same workload and report over HTTP.

Against kvroute's gateway (tiny model) the report has cache hits and stickiness; against a
minimal foreign OpenAI server that reports neither cached tokens nor a kvroute object, the
cache hit reads "not reported" and no stickiness is checked.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn
from click.testing import CliRunner, Result
from service_harness import Harness
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from kvroute.cli import main
from kvroute.gateway import GatewayConfig, GatewayThread
from kvroute.gateway.server import bind

pytestmark = pytest.mark.timeout(120)

CONVERSATIONS = [
    {"system": "Be brief.", "turns": ["Hello.", "Tell me more.", "Why?"]},
    {"turns": ["Hi there.", "And then?", "Thanks."]},
]


@pytest.fixture
def prompts(tmp_path: Path) -> Path:
    f = tmp_path / "chats.jsonl"
    f.write_text("".join(json.dumps(c) + "\n" for c in CONVERSATIONS), encoding="utf-8")
    return f


def bench(*args: str | Path | int) -> Result:
    return CliRunner().invoke(main, ["bench", *map(str, args)])


def test_bench_openai_against_the_gateway(
    tiny_service: Harness, prompts: Path, tmp_path: Path
) -> None:
    out = tmp_path / "gw.json"
    with GatewayThread(GatewayConfig(connect=tiny_service.frontend, port=0, timeout=10)) as gw:
        r = bench(
            "--openai", gw.url, "--sessions", 4, "--turns", 3, "--concurrency", 2,
            "--max-tokens", 6, "--prompts", prompts, "--compare-cold", "--json", out,
        )  # fmt: skip
    assert r.exit_code == 0, r.output
    doc = json.loads(out.read_text())
    assert (doc["turns"], doc["turns_ok"], doc["probes"]) == (12, 12, 12)
    assert sum(doc["errors"].values()) == 0 and doc["violations"] == []
    assert doc["per_turn"][0]["cache_hit"] == 0
    assert all(t["cache_hit"] > 0 for t in doc["per_turn"][1:])
    assert doc["paths"]["text_prefix"] == 8  # turns 2 and 3 of the four conversations
    assert (
        set(doc["workers"]) <= {"w0", "w1"}
        and sum(w["turns"] for w in doc["workers"].values()) == 12
    )
    assert all(t["speedup"] is not None for t in doc["per_turn"])  # probes ran cold
    assert doc["cold_reasons"]["new"] >= 4


def test_bench_openai_errors_are_counted(tiny_service: Harness, tmp_path: Path) -> None:
    out = tmp_path / "o.json"
    with GatewayThread(GatewayConfig(connect=tiny_service.frontend, port=0, timeout=10)) as gw:
        r = bench(
            "--openai", gw.url, "--sessions", 2, "--turns", 1, "--max-tokens", 1000,
            "--json", out,
        )  # fmt: skip
    assert r.exit_code == 3, r.output  # n_ctx 256: every turn overflows
    assert json.loads(out.read_text())["errors"]["overflow"] == 2


def foreign_app() -> Starlette:
    """An OpenAI-compatible server that reports usage without cached tokens or kvroute."""

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": "foreign", "object": "model"}]})

    async def chat(request: Request) -> Response:
        body = await request.json()
        assert body["model"] == "foreign" and body["stream"] is True
        n = sum(len(m["content"]) for m in body["messages"])

        async def events() -> Iterator[bytes]:  # type: ignore[misc]
            for word in ("Hello", " world"):
                chunk = {"choices": [{"index": 0, "delta": {"content": word}}]}
                yield f"data: {json.dumps(chunk)}\n\n".encode()
            done = {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
            usage = {"prompt_tokens": n, "completion_tokens": 2, "total_tokens": n + 2}
            yield f"data: {json.dumps(done)}\n\n".encode()
            yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n".encode()
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return Starlette(
        routes=[Route("/v1/models", models), Route("/v1/chat/completions", chat, methods=["POST"])]
    )


@pytest.fixture
def foreign() -> Iterator[str]:
    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(foreign_app(), log_config=None, lifespan="off"))
    t = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    t.start()
    try:
        while not server.started:
            t.join(0.01)
            assert t.is_alive(), "the foreign server did not start"
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    finally:
        server.should_exit = True
        t.join(10)
        sock.close()


def test_bench_openai_against_a_server_without_cache_reports(
    foreign: str, prompts: Path, tmp_path: Path
) -> None:
    out = tmp_path / "f.json"
    r = bench(
        "--openai", foreign, "--sessions", 2, "--turns", 3, "--prompts", prompts, "--json", out
    )
    assert r.exit_code == 0, r.output
    assert "not reported" in r.output
    doc = json.loads(out.read_text())
    assert doc["turns_ok"] == 6 and doc["cache_hit"] is None and doc["violations"] == []
    assert doc["workers"] == {} and doc["output_tokens"] == 12
    assert all(t["cache_hit"] is None for t in doc["per_turn"])
