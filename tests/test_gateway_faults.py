"""The gateway over a real broker and fake workers: exact SSE bytes, stop strings passed to the
worker, every error status, health and models, disconnect -> CANCEL, a worker lost mid-stream,
parallel regenerations, and several gateways sharing sessions through one owner token.

The fake worker (tests/fake_peers.py) streams ``"t0 ", "t1 ", ...`` (one TOKEN per
``token_delay``) and reports fixed stats, so replies and bodies are known to the byte. Every
wait is bounded; fixtures stop the gateway, the workers and the broker.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from broker_service import add_worker
from fake_peers import INTERVAL, TIMEOUT, FakeWorker, wait_until
from procs import free_port

from kvroute.broker import Broker, BrokerConfig
from kvroute.gateway import GatewayConfig, GatewayThread
from kvroute.proto import Kind, TurnRequest


@dataclass
class Fleet:
    """A broker thread and its fake workers."""

    broker: Broker
    frontend: str
    backend: str
    thread: threading.Thread
    workers: list[FakeWorker] = field(default_factory=list)

    def add(self, name: str, token_delay: float = 0.0) -> FakeWorker:
        return add_worker(self.broker, self.backend, self.workers, name, token_delay)


@contextmanager
def fleet(**broker_kw: Any) -> Iterator[Fleet]:
    cfg = BrokerConfig("tcp://127.0.0.1:0", "tcp://127.0.0.1:0", INTERVAL, **broker_kw)
    b = Broker(cfg)
    t = threading.Thread(target=b.run, name="broker", daemon=True)
    t.start()
    frontend, backend = b.wait_bound(TIMEOUT)
    f = Fleet(b, frontend, backend, t)
    try:
        yield f
    finally:
        for w in f.workers:
            w.stop.set()
        for w in f.workers:
            w.join()
        b.close()
        t.join(TIMEOUT)
        assert not t.is_alive(), "broker did not stop"


@contextmanager
def gateway(connect: str, **cfg: Any) -> Iterator[httpx.Client]:
    cfg.setdefault("timeout", 5.0)
    with (
        GatewayThread(GatewayConfig(connect=connect, port=0, **cfg)) as gw,
        httpx.Client(base_url=gw.url, timeout=10.0) as http,
    ):
        yield http


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}


def sse_data(text: str) -> list[str]:
    assert text.endswith("\n\n"), text[-100:]
    frames = text.split("\n\n")[:-1]
    assert all(f.startswith("data: ") for f in frames), frames
    return [f.removeprefix("data: ") for f in frames]


def streamed_text(events: list[str]) -> str:
    chunks = [json.loads(e) for e in events if e != "[DONE]"]
    return "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])


def test_sse_framing_byte_for_byte() -> None:
    with fleet() as f:
        f.add("f0")
        with gateway(f.frontend) as http:
            req = chat(max_tokens=3, stream=True, stream_options={"include_usage": True})
            r = http.post("/v1/chat/completions", json=req, headers={"X-Session-ID": "abc"})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    body = r.text
    cid = re.search(r'"id":"(chatcmpl-[0-9a-f]{32})"', body)
    created = re.search(r'"created":(\d+)', body)
    assert cid and created
    head = (
        f'data: {{"id":"{cid[1]}","object":"chat.completion.chunk","created":{created[1]},'
        '"model":"m","system_fingerprint":null,"choices":'
    )
    token = '[{"index":0,"delta":{"content":"%s"},"logprobs":null,"finish_reason":null}]'
    expected = (
        head
        + '[{"index":0,"delta":{"role":"assistant","content":"t0 "},"logprobs":null,'
        + '"finish_reason":null}],"usage":null}\n\n'
        + head
        + token % "t1 "
        + ',"usage":null}\n\n'
        + head
        + token % "t2 "
        + ',"usage":null}\n\n'
        + head
        + '[{"index":0,"delta":{},"logprobs":null,"finish_reason":"length"}],"usage":null}\n\n'
        + head
        + '[],"usage":{"prompt_tokens":10,"completion_tokens":3,"total_tokens":13,'
        + '"prompt_tokens_details":{"cached_tokens":0}},"kvroute":{"session":"s.abc",'
        + '"affinity":"x-session-id","worker":"f0","path":"cold","cold_reason":"new",'
        + '"cached_tokens":0,"prefill_tokens":10,"ttft_ms":1.0,"decode_ms":2.0}}\n\n'
        + "data: [DONE]\n\n"
    )
    assert body == expected


def test_stop_strings_go_to_the_worker() -> None:
    """The worker applies stop strings (tests/test_stop_strings.py); the gateway passes them
    on and cuts nothing itself: this fake worker ignores them."""
    with fleet() as f:
        w = f.add("f0")
        with gateway(f.frontend) as http:
            r = http.post("/v1/chat/completions", json=chat(max_tokens=3, stop=["t1", "zz"]))
            assert r.json()["choices"][0]["message"]["content"] == "t0 t1 t2 "
            assert r.json()["choices"][0]["finish_reason"] == "length"
            r = http.post("/v1/chat/completions", json=chat(max_tokens=2, stop="t0", stream=True))
            assert streamed_text(sse_data(r.text)) == "t0 t1 "
            r = http.post("/v1/chat/completions", json=chat(max_tokens=2))
            assert r.status_code == 200
    stops = [TurnRequest.decode(d.body).stop for d in w.deliveries if d.kind is Kind.TURN]
    assert stops == [("t1", "zz"), ("t0",), ()]
    assert not w.cancels


def test_client_disconnect_cancels_the_turn() -> None:
    with fleet() as f:
        w = f.add("f0", token_delay=0.05)
        with gateway(f.frontend) as http:
            # streamed: leave after the first event
            req = chat(max_tokens=200, stream=True)
            with http.stream("POST", "/v1/chat/completions", json=req) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        break
            t0 = time.monotonic()
            wait_until(lambda: len(w.cancels) == 1)
            assert time.monotonic() - t0 < 1.0  # within a couple of token steps
            # not streamed: the client gives up waiting for the whole reply
            with pytest.raises(httpx.ReadTimeout):
                http.post("/v1/chat/completions", json=chat(max_tokens=200), timeout=0.3)
            wait_until(lambda: len(w.cancels) == 2)


def test_worker_lost_mid_stream_is_an_sse_error_event() -> None:
    with fleet() as f:
        w = f.add("f0", token_delay=0.05)
        with gateway(f.frontend) as http:
            lines = []
            with http.stream(
                "POST", "/v1/chat/completions", json=chat(max_tokens=500, stream=True)
            ) as r:
                assert r.status_code == 200
                for line in r.iter_lines():
                    lines.append(line)
                    if len(lines) == 3:
                        w.crash.set()  # the worker vanishes mid-stream
            data = [ln.removeprefix("data: ") for ln in lines if ln.startswith("data: ")]
            assert data[-1] != "[DONE]"
            err = json.loads(data[-1])["error"]
            assert err["code"] == "worker_lost" and err["type"] == "service_unavailable"


def test_no_worker_is_503() -> None:
    with fleet() as f, gateway(f.frontend) as http:
        h = http.get("/health")
        assert h.status_code == 503
        assert h.json() == {"status": "unavailable", "broker": True, "workers": 0, "models": []}
        assert http.get("/v1/models").json() == {"object": "list", "data": []}
        for stream in (False, True):
            r = http.post("/v1/chat/completions", json=chat(stream=stream))
            assert r.status_code == 503
            assert r.json()["error"]["code"] == "no_worker"
        f.add("f0")
        f.add("f1")
        h = http.get("/health")
        assert h.status_code == 200
        assert h.json() == {"status": "ok", "broker": True, "workers": 2, "models": ["fake"]}
        assert [m["id"] for m in http.get("/v1/models").json()["data"]] == ["fake"]
        f.workers[0].crash.set()  # lost within the broker's liveness
        wait_until(lambda: http.get("/health").json()["workers"] == 1, timeout=5 * INTERVAL * 3)
    with fleet() as f, gateway(f.frontend, models=("alias",)) as http:
        assert [m["id"] for m in http.get("/v1/models").json()["data"]] == ["alias"]


def test_broker_gone_is_504_within_the_timeout() -> None:
    nowhere = f"tcp://127.0.0.1:{free_port()}"
    with gateway(nowhere, timeout=1.0, health_timeout=0.5) as http:
        t0 = time.monotonic()
        r = http.post("/v1/chat/completions", json=chat(stream=True))
        assert r.status_code == 504 and r.json()["error"]["code"] == "broker_timeout"
        assert time.monotonic() - t0 < 3.0
        h = http.get("/health")
        assert h.status_code == 503 and h.json()["broker"] is False
        r = http.get("/v1/models")
        assert r.status_code == 503 and r.json()["error"]["code"] == "broker_unavailable"


def _slow_stream_then(http: httpx.Client, then: Any) -> Any:
    """Hold one streamed request open (first event read) while ``then()`` runs."""
    with http.stream("POST", "/v1/chat/completions", json=chat(max_tokens=100, stream=True)) as r:
        assert r.status_code == 200
        lines = r.iter_lines()  # kept: a dropped iterator closes the response (a disconnect)
        next(lines)
        return then()


QUICK = chat(max_tokens=2)


def test_gateway_limit_is_429() -> None:
    with fleet() as f:
        f.add("f0", token_delay=0.05)
        with gateway(f.frontend, max_in_flight=1) as http:
            r = _slow_stream_then(http, lambda: http.post("/v1/chat/completions", json=QUICK))
            assert r.status_code == 429
            assert r.json()["error"]["code"] == "rate_limit_exceeded"


def test_broker_client_limit_is_429() -> None:
    with fleet(max_requests_per_client=1) as f:
        f.add("f0", token_delay=0.05)
        with gateway(f.frontend) as http:
            r = _slow_stream_then(http, lambda: http.post("/v1/chat/completions", json=QUICK))
            assert r.status_code == 429
            assert r.json()["error"]["type"] == "rate_limit_error"


def test_parallel_regenerations_run_on_separate_sessions() -> None:
    with fleet() as f:
        f.add("f0", token_delay=0.02)
        with gateway(f.frontend) as http:
            first = http.post("/v1/chat/completions", json=chat(max_tokens=2)).json()
            reply = first["choices"][0]["message"]
            msgs = [{"role": "user", "content": "hi"}, reply, {"role": "user", "content": "more"}]
            req = {"model": "m", "messages": msgs, "max_tokens": 20}
            with ThreadPoolExecutor(2) as pool:
                rs = list(pool.map(lambda _: http.post("/v1/chat/completions", json=req), range(2)))
    assert [r.status_code for r in rs] == [200, 200]
    infos = [r.json()["kvroute"] for r in rs]
    assert sorted(i["affinity"] for i in infos) == ["fallback", "transcript"]
    by = {i["affinity"]: i["session"] for i in infos}
    assert by["transcript"] == first["kvroute"]["session"] != by["fallback"]


def test_bad_requests_are_400_with_the_field() -> None:
    with fleet() as f, gateway(f.frontend) as http:
        r = http.post("/v1/chat/completions", content=b"{not json")
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
        r = http.post("/v1/chat/completions", json=chat(n=2))
        assert r.status_code == 400 and r.json()["error"]["param"] == "n"
        r = http.post("/v1/chat/completions", json=chat(), headers={"X-Session-ID": ""})
        assert r.status_code == 400 and r.json()["error"]["param"] == "X-Session-ID"
        r = http.post("/v1/chat/completions", content=b"[" * 100_000)
        assert r.status_code == 400
        r = http.get("/v1/chat/completions")
        assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"
        r = http.get("/v1/nothing")
        assert r.status_code == 404 and "error" in r.json()
    with fleet() as f, gateway(f.frontend, max_body_bytes=1000) as http:
        r = http.post("/v1/chat/completions", json=chat(stop="x" * 2000))
        assert r.status_code == 400 and r.json()["error"]["code"] == "too_large"


TOKEN = b"gateway-group-token-01"


def test_gateways_sharing_a_token_share_conversations() -> None:
    """Keyless requests of one conversation alternate between two gateways: every turn after
    the first finds the session through the broker's transcript index. A gateway with another
    owner token finds nothing (the index answers per identity)."""
    with fleet() as f:
        f.add("f0")
        with (
            gateway(f.frontend, owner_token=TOKEN) as a,
            gateway(f.frontend, owner_token=TOKEN) as b,
            gateway(f.frontend) as stranger,
        ):
            msgs = [{"role": "user", "content": "hi"}]
            sessions = []
            for turn in range(4):
                http = (a, b)[turn % 2]
                body = http.post(
                    "/v1/chat/completions", json={**chat(max_tokens=2), "messages": msgs}
                )
                info = body.json()["kvroute"]
                assert info["affinity"] == ("new" if turn == 0 else "transcript"), (turn, info)
                sessions.append(info["session"])
                msgs += [
                    body.json()["choices"][0]["message"],
                    {"role": "user", "content": f"q{turn}"},
                ]
            assert len(set(sessions)) == 1
            # each turn came through the other gateway than the one before: all looked up
            assert f.broker.stats.lookups == 3 and f.broker.stats.lookups_found == 3
            again = stranger.post(
                "/v1/chat/completions", json={**chat(max_tokens=2), "messages": msgs}
            )
            assert again.json()["kvroute"]["affinity"] == "new"


def test_a_conversation_through_one_gateway_needs_no_lookup() -> None:
    """The gateway remembers what it indexed itself: a conversation whose requests keep coming
    to it never waits for a LOOKUP."""
    with fleet() as f:
        f.add("f0")
        with gateway(f.frontend) as http:
            msgs = [{"role": "user", "content": "hi"}]
            for turn in range(4):
                body = http.post(
                    "/v1/chat/completions", json={**chat(max_tokens=2), "messages": msgs}
                ).json()
                assert body["kvroute"]["affinity"] == ("new" if turn == 0 else "transcript")
                msgs += [body["choices"][0]["message"], {"role": "user", "content": f"q{turn}"}]
        assert f.broker.stats.lookups == 0


def test_parallel_regenerations_through_two_gateways() -> None:
    """The second of two requests continuing one transcript at once, through another gateway
    (which cannot know the first is running), gets BUSY from the broker and runs on a fresh
    session."""
    with fleet() as f:
        f.add("f0", token_delay=0.05)
        with (
            gateway(f.frontend, owner_token=TOKEN) as a,
            gateway(f.frontend, owner_token=TOKEN) as b,
        ):
            first = a.post("/v1/chat/completions", json=chat(max_tokens=2)).json()
            reply = first["choices"][0]["message"]
            msgs = [{"role": "user", "content": "hi"}, reply, {"role": "user", "content": "more"}]
            req = {"model": "m", "messages": msgs, "max_tokens": 20}
            with ThreadPoolExecutor(2) as pool:
                rs = list(pool.map(lambda h: h.post("/v1/chat/completions", json=req), (a, b)))
    assert [r.status_code for r in rs] == [200, 200]
    infos = [r.json()["kvroute"] for r in rs]
    assert sorted(i["affinity"] for i in infos) == ["fallback", "transcript"]
    by = {i["affinity"]: i["session"] for i in infos}
    assert by["transcript"] == first["kvroute"]["session"] != by["fallback"]
