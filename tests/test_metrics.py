"""``GET /metrics``: parsed with prometheus_client's own parser, its counters move by exactly what
a known sequence of turns must add, native-library turns included, and its gauges follow the
fleet (a worker that leaves reads ``kvroute_worker_up 0``; a dead broker ``kvroute_broker_up 0``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from service_harness import Harness, start_harness
from tiny_gguf import TinySpec, write_tiny_gguf

from kvroute import Client
from kvroute.engine.engine import Engine
from kvroute.gateway import GatewayConfig, GatewayThread

pytestmark = pytest.mark.timeout(120)
N_CTX = 1024
TIMEOUT = 5.0

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture(scope="module")
def engine_1k(tmp_path_factory: pytest.TempPathFactory) -> Engine:
    path = write_tiny_gguf(tmp_path_factory.mktemp("tiny1k") / "tiny.gguf", TinySpec(n_ctx=N_CTX))
    return Engine.load(path, n_ctx=N_CTX)


@pytest.fixture
def service(engine_1k: Engine) -> Iterator[Harness]:
    h = start_harness(engine_1k, 2)
    try:
        yield h
    finally:
        h.close()


@pytest.fixture
def gateway(service: Harness) -> Iterator[str]:
    with GatewayThread(GatewayConfig(connect=service.frontend, port=0, timeout=10)) as gw:
        yield gw.url


def scrape(url: str) -> Samples:
    """Every sample of ``GET /metrics``, parsed by prometheus_client."""
    r = httpx.get(f"{url}/metrics", timeout=TIMEOUT)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain; version=")
    out: Samples = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def total(samples: Samples, name: str) -> float:
    return sum(v for (n, _), v in samples.items() if n == name)


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def http_turn(url: str, messages: list[dict[str, str]], max_tokens: int) -> dict[str, Any]:
    """One streamed chat completion; returns its reply, usage and kvroute object."""
    body = {
        "model": "m",
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    reply, last = "", {}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=30) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            for c in chunk["choices"]:
                reply += c["delta"].get("content") or ""
            if chunk.get("usage"):
                last = chunk
    return {"reply": reply, "usage": last["usage"], "kvroute": last["kvroute"]}


def wait_for(url: str, cond: Any) -> Samples:
    """Scrape until ``cond(samples)`` holds (workers report with their heartbeats)."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        samples = scrape(url)
        if cond(samples):
            return samples
        assert time.monotonic() < deadline, "metrics did not reach the expected values"
        time.sleep(0.05)


def test_counters_move_by_what_known_turns_add(service: Harness, gateway: str) -> None:
    before = scrape(gateway)
    assert value(before, "kvroute_broker_up") == 1
    turns_before = total(before, "kvroute_turns_total")
    # Two HTTP turns of one conversation (cold, then text_prefix) ...
    msgs = [{"role": "user", "content": "Hello there."}]
    first = http_turn(gateway, msgs, 8)
    msgs += [{"role": "assistant", "content": first["reply"]}, {"role": "user", "content": "More?"}]
    second = http_turn(gateway, msgs, 8)
    # ... one through the client library, which the broker counts the same way ...
    with Client(service.frontend, timeout=TIMEOUT) as client:
        chat = client.session()
        chat.ask("Native.", max_tokens=6)
        native = chat.last
        assert native is not None
    # ... and one refused for overflow: counted as a request, not as a turn.
    overflow = httpx.post(
        f"{gateway}/v1/chat/completions",
        json={"model": "m", "messages": msgs[:1], "max_tokens": N_CTX},
        timeout=30,
    )
    assert overflow.status_code == 400
    assert [first["kvroute"]["path"], second["kvroute"]["path"]] == ["cold", "text_prefix"]
    after = wait_for(gateway, lambda s: total(s, "kvroute_turns_total") >= turns_before + 3)

    assert delta(before, after, "kvroute_requests_total", status="end") == 3
    assert delta(before, after, "kvroute_requests_total", status="overflow") == 1
    assert delta(before, after, "kvroute_turns_total", path="cold", cold_reason="new") == 2
    assert delta(before, after, "kvroute_turns_total", path="text_prefix", cold_reason="") == 1
    usages = [first["usage"], second["usage"]]
    prompt = sum(u["prompt_tokens"] for u in usages) + native.prompt_tokens
    cached = sum(u["prompt_tokens_details"]["cached_tokens"] for u in usages)
    generated = sum(u["completion_tokens"] for u in usages) + native.generated_tokens
    assert cached > 0 and native.cached_tokens == 0
    assert delta(before, after, "kvroute_prompt_tokens_total") == prompt
    assert delta(before, after, "kvroute_cached_tokens_total") == cached
    assert delta(before, after, "kvroute_prefill_tokens_total") == prompt - cached
    assert delta(before, after, "kvroute_generation_tokens_total") == generated
    # The latency histograms are this gateway's own: its two turns, by path.
    for name in ("kvroute_time_to_first_token_seconds", "kvroute_e2e_request_latency_seconds"):
        for path in ("cold", "text_prefix"):
            assert delta(before, after, f"{name}_count", path=path) == 1, (name, path)
        assert delta(before, after, f"{name}_bucket", path="cold", le="+Inf") == 1
    pieces = after[("kvroute_inter_token_latency_seconds_count", ())]
    assert pieces >= 1  # gaps between streamed pieces (the replies have several)
    # Gauges: both workers up, the two sessions resident somewhere, nothing in flight.
    assert value(after, "kvroute_worker_up", worker="w0") == 1
    assert value(after, "kvroute_worker_up", worker="w1") == 1
    assert total(after, "kvroute_sessions_resident") == 2
    assert total(after, "kvroute_kv_bytes") > 0
    assert value(after, "kvroute_kv_budget_bytes", worker="w0") > 0
    assert value(after, "kvroute_requests_in_flight") == 0
    assert value(after, "kvroute_workers_lost_total") == 0


def test_a_worker_that_leaves_reads_down(service: Harness, gateway: str) -> None:
    samples = scrape(gateway)
    assert value(samples, "kvroute_worker_up", worker="w1") == 1
    service.stop_worker("w1")  # it says DISCONNECT: an orderly leave, not a loss
    after = wait_for(gateway, lambda s: value(s, "kvroute_worker_up", worker="w1") == 0)
    assert ("kvroute_worker_up", (("worker", "w1"),)) in after  # reported 0, not dropped
    assert value(after, "kvroute_worker_up", worker="w0") == 1
    assert value(after, "kvroute_workers_lost_total") == 0
    assert ("kvroute_sessions_resident", (("worker", "w1"),)) not in after


def test_without_a_broker_only_the_gateway_reports(tmp_path: Any) -> None:
    cfg = GatewayConfig(connect="tcp://127.0.0.1:9", port=0, timeout=1, health_timeout=0.3)
    with GatewayThread(cfg) as gw:
        samples = scrape(gw.url)
    assert value(samples, "kvroute_broker_up") == 0
    assert not any(name.startswith("kvroute_requests_total") for name, _ in samples)
    assert ("kvroute_inter_token_latency_seconds_count", ()) in samples


def test_native_library_turns_count_without_any_http(service: Harness, gateway: str) -> None:
    before = scrape(gateway)
    with Client(service.frontend, timeout=TIMEOUT) as client:
        for _ in range(3):
            client.session().ask("Just the library.", max_tokens=3)
    after = wait_for(
        gateway,
        lambda s: delta(before, s, "kvroute_turns_total", path="cold", cold_reason="new") == 3,
    )
    assert delta(before, after, "kvroute_requests_total", status="end") == 3
    # No HTTP request ran: the gateway's own histograms did not move.
    for path in ("cold", "text_prefix"):
        assert delta(before, after, "kvroute_e2e_request_latency_seconds_count", path=path) == 0
