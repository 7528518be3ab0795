"""The same closed-loop chat users as :mod:`.runner`, against any OpenAI-compatible server.

``kvroute bench --openai URL`` plays the workload over ``POST {URL}/v1/chat/completions``
(streamed, ``stream_options.include_usage``), whatever serves it: kvroute's gateway, llama.cpp's
server, vLLM. Each conversation keeps its own message list and sends it whole every turn, as an
OpenAI client does; no session key is sent. Records are the runner's
:class:`~kvroute.bench.metrics.TurnRecord`, so the report is the same:

- cache hit comes from ``usage.prompt_tokens_details.cached_tokens`` where the server reports
  it; a turn without it has ``cache_reported`` False and the report reads "not reported";
- worker, cache path, cold reason and worker-side TTFT come from the ``kvroute`` object where
  present; without it the turn has no worker, so stickiness is checked only on kvroute;
- ``--compare-cold`` probes send an ``X-Session-ID`` of their own, which kvroute's gateway
  honours with a fresh session; other servers ignore it (their prefix caches may still hit).

The model is the first one ``GET {URL}/v1/models`` lists (``"default"`` if it lists none).
Sampling is greedy, as in the runner.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Sequence
from typing import Any

import httpx

from .metrics import TurnRecord
from .runner import PROBE_MAX_TOKENS, OnRecord, RunConfig, RunResult
from .workload import Script

logger = logging.getLogger(__name__)

FALLBACK_MODEL = "default"


class RequestFailed(Exception):
    """A turn that did not end with a reply; ``kind`` is an ERROR_KINDS bucket."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def base_url(url: str) -> str:
    """The server's root: ``http://host:port`` (a trailing ``/v1`` or slash is dropped)."""
    url = url.rstrip("/")
    return url.removesuffix("/v1")


def _failure(status: int, body: bytes) -> RequestFailed:
    """Classify an HTTP error answer into the report's error kinds."""
    try:
        err = json.loads(body).get("error") or {}
    except (ValueError, AttributeError):
        err = {}
    code = err.get("code") if isinstance(err, dict) else None
    message = (err.get("message") if isinstance(err, dict) else None) or body[:200].decode(
        "utf-8", "replace"
    )
    return RequestFailed(_kind(status, code), f"HTTP {status}: {message}")


def _kind(status: int | None, code: object) -> str:
    if code == "context_length_exceeded":
        return "overflow"
    if code == "worker_lost":
        return "lost"
    if code == "session_busy":
        return "busy"
    if status == 504 or code == "broker_timeout":
        return "timeout"
    return "other"


class OpenAIRunner:
    """Drives the users of one run over one :class:`httpx.AsyncClient`.

    Parameters
    ----------
    config
        User behaviour; ``url`` is the server's base URL.
    on_record
        Called with each finished record.
    """

    def __init__(self, config: RunConfig, on_record: OnRecord | None = None) -> None:
        if config.concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.config = config
        self.base = base_url(config.url)
        self.records: list[TurnRecord] = []
        self.model = FALLBACK_MODEL
        self._on_record = on_record
        self._t0 = time.perf_counter()

    def _now(self) -> float:
        return time.perf_counter() - self._t0

    async def run(self, scripts: Sequence[Script], warmup: Sequence[Script] = ()) -> RunResult:
        """Play the warm-up scripts, then the measured ones (as :meth:`.Runner.run`)."""
        started = time.time()
        self._t0 = time.perf_counter()
        limits = httpx.Limits(max_connections=self.config.concurrency * 2 + 2)
        timeout = httpx.Timeout(self.config.timeout, connect=self.config.timeout)
        async with httpx.AsyncClient(base_url=self.base, timeout=timeout, limits=limits) as http:
            self.model = await self._model(http)
            n = len(scripts)
            if warmup:
                await self._phase(http, [(n + i, s) for i, s in enumerate(warmup)], True)
            await self._phase(http, list(enumerate(scripts)), False)
        return RunResult(self.records, started, self._now())

    async def _model(self, http: httpx.AsyncClient) -> str:
        try:
            r = await http.get("/v1/models")
            data = r.json().get("data") or []
            return str(data[0]["id"]) if r.status_code == 200 and data else FALLBACK_MODEL
        except (httpx.HTTPError, ValueError, KeyError, TypeError, AttributeError) as exc:
            logger.info("GET /v1/models failed (%s); using model %r", exc, FALLBACK_MODEL)
            return FALLBACK_MODEL

    async def _phase(
        self, http: httpx.AsyncClient, sessions: list[tuple[int, Script]], warmup: bool
    ) -> None:
        todo = iter(sessions)
        users = min(self.config.concurrency, len(sessions))

        async def user() -> None:
            for index, script in todo:
                await self._session(http, index, script, warmup)

        await asyncio.gather(*(user() for _ in range(users)))

    async def _session(
        self, http: httpx.AsyncClient, index: int, script: Script, warmup: bool
    ) -> None:
        cfg = self.config
        msgs: list[dict[str, str]] = []
        if script.system is not None:
            msgs.append({"role": "system", "content": script.system})
        for turn, text in enumerate(script.turns, start=1):
            if turn > 1 and cfg.think_time > 0:
                await asyncio.sleep(cfg.think_time)
            sent = [*msgs, {"role": "user", "content": text}]
            rec, reply = await self._request(http, sent, cfg.max_tokens, index, turn, warmup)
            if not rec.ok:
                continue  # as a client would: the turn is retried by the next message
            msgs = [*sent, {"role": "assistant", "content": reply}]
            if cfg.compare_cold and not warmup:
                probe = {"X-Session-ID": f"bench-probe-{uuid.uuid4().hex}"}
                await self._request(
                    http, sent, PROBE_MAX_TOKENS, index, turn, False, probe=True, headers=probe
                )

    async def _request(
        self,
        http: httpx.AsyncClient,
        messages: list[dict[str, str]],
        max_tokens: int,
        index: int,
        turn: int,
        warmup: bool,
        *,
        probe: bool = False,
        headers: dict[str, str] | None = None,
    ) -> tuple[TurnRecord, str]:
        rec = TurnRecord(session=index, turn=turn, probe=probe, warmup=warmup)
        body = {
            "model": self.model,
            "messages": messages,
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        parts: list[str] = []
        rec.start = self._now()
        try:
            final = await self._stream(http, body, headers, rec, parts)
        except RequestFailed as exc:
            rec.end = self._now()
            rec.error, rec.error_detail = exc.kind, str(exc)
        except httpx.TimeoutException as exc:
            rec.end = self._now()
            rec.error, rec.error_detail = "timeout", f"{type(exc).__name__}: {exc}"
        except httpx.HTTPError as exc:
            rec.end = self._now()
            rec.error, rec.error_detail = "other", f"{type(exc).__name__}: {exc}"
        else:
            rec.end = self._now()
            _fill(rec, final)
        self.records.append(rec)
        if self._on_record is not None:
            self._on_record(rec)
        return rec, "".join(parts)

    async def _stream(
        self,
        http: httpx.AsyncClient,
        body: dict[str, Any],
        headers: dict[str, str] | None,
        rec: TurnRecord,
        parts: list[str],
    ) -> dict[str, Any]:
        """Send one request and read its SSE stream; returns the chunk that carried usage."""
        final: dict[str, Any] = {}
        async with http.stream("POST", "/v1/chat/completions", json=body, headers=headers) as r:
            if r.status_code != 200:
                raise _failure(r.status_code, await r.aread())
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    return final
                chunk = json.loads(data)
                if "error" in chunk:
                    err = chunk["error"] if isinstance(chunk["error"], dict) else {}
                    raise RequestFailed(_kind(None, err.get("code")), str(err.get("message")))
                for choice in chunk.get("choices") or ():
                    content = (choice.get("delta") or {}).get("content")
                    if content:
                        rec.pieces.append(self._now())
                        parts.append(content)
                    if choice.get("finish_reason"):
                        final["finish_reason"] = choice["finish_reason"]
                if chunk.get("usage"):
                    final["usage"] = chunk["usage"]
                if chunk.get("kvroute"):
                    final["kvroute"] = chunk["kvroute"]
        raise RequestFailed("other", "the stream ended without [DONE]")


def _fill(rec: TurnRecord, final: dict[str, Any]) -> None:
    """Copy what the server reported into the record."""
    usage = final.get("usage") or {}
    rec.prompt_tokens = int(usage.get("prompt_tokens") or 0)
    rec.generated_tokens = int(usage.get("completion_tokens") or 0)
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
    rec.cache_reported = cached is not None
    rec.cached_tokens = int(cached or 0)
    rec.prefill_tokens = rec.prompt_tokens - rec.cached_tokens
    rec.finish_reason = final.get("finish_reason")
    kv = final.get("kvroute")
    if kv:
        rec.worker = kv.get("worker")
        rec.path = kv.get("path")
        rec.cold_reason = kv.get("cold_reason")
        rec.worker_ttft_ms = kv.get("ttft_ms")


def run_openai(
    config: RunConfig,
    scripts: Sequence[Script],
    warmup: Sequence[Script] = (),
    on_record: OnRecord | None = None,
) -> RunResult:
    """Run a load test against an OpenAI-compatible server in a new event loop."""
    return asyncio.run(OpenAIRunner(config, on_record).run(scripts, warmup))
