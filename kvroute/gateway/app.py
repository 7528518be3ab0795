"""The ASGI application: OpenAI's chat completions, models and a health check over kvroute.

Endpoints: ``POST /v1/chat/completions`` (streamed as SSE or not), ``GET /v1/models`` (the
models the live workers serve, from the broker's STATUS), ``GET /health`` (200 with the live
worker count, 503 when there is none or the broker does not answer), ``GET /metrics``
(Prometheus, :mod:`~kvroute.gateway.metrics`), ``GET /`` (the chat page,
:mod:`~kvroute.gateway.page`). Every error is an OpenAI error object
(:mod:`~kvroute.gateway.errors`).

A chat request is answered by :class:`TurnResponse`, an ASGI response that runs the turn and
watches the connection at the same time: when the client disconnects, before the first token or
during the stream, the turn's task is cancelled, which makes the client library send CANCEL at
once, so the worker stops within one step. A streamed request sends its
status only with its first piece of text: an error that happens before it (context overflow, no
worker, broker timeout) gets its proper HTTP status; one that happens later becomes an SSE error
event, and the stream closes without ``[DONE]``.

Starlette is used for routing only (it costs the same per request as FastAPI here, with fewer
dependencies, and the bodies are checked by :mod:`~kvroute.gateway.request` either way).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from kvroute.client import AsyncClient, KvrouteError

from .affinity import Affinity
from .config import GatewayConfig
from .errors import (
    INVALID_REQUEST,
    ApiError,
    from_client_error,
    invalid,
    rate_limited,
    unavailable,
)
from .fleet import fleet_status
from .metrics import GatewayMetrics, metrics_route
from .page import page_routes
from .render import ChunkEncoder, completion, completion_id, sse_error
from .request import ChatRequest, check_header_key, parse_chat_request
from .turns import Finished, TurnRunner

logger = logging.getLogger(__name__)

SSE_HEADERS: list[tuple[bytes, bytes]] = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),  # proxies must pass events on at once
]
JSON_HEADERS: list[tuple[bytes, bytes]] = [(b"content-type", b"application/json")]


def json_response(status: int, body: dict[str, Any]) -> Response:
    """A JSON answer."""
    return Response(json.dumps(body), status, media_type="application/json")


def error_response(err: ApiError) -> Response:
    """An OpenAI error answer."""
    return json_response(err.status, err.body())


async def _send_json(send: Send, status: int, body: bytes) -> None:
    headers = [*JSON_HEADERS, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _send_error(send: Send, err: ApiError) -> None:
    await _send_json(send, err.status, json.dumps(err.body()).encode())


async def _disconnected(receive: Receive) -> None:
    """Return when the client goes away (the request body was read before)."""
    while (await receive())["type"] != "http.disconnect":
        pass


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


async def read_json(request: Request, max_bytes: int) -> object:
    """The request body as JSON, at most ``max_bytes``; ApiError 400 otherwise."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise invalid(f"request body over {max_bytes} bytes", None, "too_large")
    buf = bytearray()
    async for chunk in request.stream():
        buf += chunk
        if len(buf) > max_bytes:
            raise invalid(f"request body over {max_bytes} bytes", None, "too_large")
    try:
        return json.loads(buf, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and bad UTF-8 are ValueErrors
        raise invalid(f"the request body is not valid JSON: {exc}", None, "invalid_json") from None


class Gateway:
    """One gateway's state: its broker connection, session affinity and turn runner.

    Parameters
    ----------
    config
        Addresses, defaults and limits.
    """

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.affinity = Affinity(config.max_sessions)
        self.started = int(time.time())
        self.in_flight = 0
        self.metrics = GatewayMetrics()  # GET /metrics; times every chat request
        self._client: AsyncClient | None = None
        self._runner: TurnRunner | None = None

    @property
    def client(self) -> AsyncClient:
        """The broker connection (made when the app starts, in its event loop)."""
        assert self._client is not None, "the gateway's lifespan has not started"
        return self._client

    @property
    def runner(self) -> TurnRunner:
        """The turn runner over :attr:`client`."""
        assert self._runner is not None, "the gateway's lifespan has not started"
        return self._runner

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        """Open the broker connection in the server's loop; close it at shutdown."""
        cfg = self.config
        client = AsyncClient(
            cfg.connect,
            cfg.timeout,
            server_key=cfg.server_key,
            key=cfg.key,
            owner_token=cfg.owner_token,
        )
        self._client = client
        self._runner = TurnRunner(client, self.affinity, cfg)
        try:
            yield
        finally:
            await client.close()

    async def chat(self, request: Request) -> Response:
        """``POST /v1/chat/completions``."""
        if self.in_flight >= self.config.max_in_flight:
            limit = self.config.max_in_flight
            return error_response(
                rate_limited(
                    f"too many requests in flight on this gateway (limit {limit}); retry later"
                )
            )
        try:
            body = await read_json(request, self.config.max_body_bytes)
            req = parse_chat_request(body)
            header = check_header_key(request.headers.get("x-session-id"))
        except ApiError as err:
            return error_response(err)
        self.in_flight += 1  # TurnResponse gives it back when the answer is done
        return TurnResponse(self, req, header)

    async def models(self, request: Request) -> Response:
        """``GET /v1/models``: the model(s) the fleet serves (the configured names instead, if
        any); 503 when the broker does not answer."""
        names = self.config.models
        if not names:
            st = await fleet_status(self.client, self.config.health_timeout)
            if not st.broker:
                return error_response(unavailable(st.error, "broker_unavailable"))
            names = st.models
        data = [
            {"id": m, "object": "model", "created": self.started, "owned_by": "kvroute"}
            for m in names
        ]
        return json_response(200, {"object": "list", "data": data})

    async def health(self, request: Request) -> Response:
        """``GET /health``: 200 with the live worker count; 503 when there is none or the
        broker does not answer."""
        st = await fleet_status(self.client, self.config.health_timeout)
        body: dict[str, Any] = {
            "status": "ok" if st.healthy else "unavailable",
            "broker": st.broker,
            "workers": st.workers,
            "models": list(st.models),
        }
        if st.error:
            body["error"] = st.error
        return json_response(200 if st.healthy else 503, body)


class TurnResponse(Response):
    """The answer to one chat request: runs its turn while watching for a disconnect."""

    def __init__(self, gateway: Gateway, req: ChatRequest, header_key: str | None) -> None:
        self.gateway, self.req, self.header_key = gateway, req, header_key
        self.status_code = 200
        self.background = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # The turn runs in this task (a task of its own would cost a trip through the event
        # loop before the TURN is sent); a watcher cancels it when the client goes away.
        task = asyncio.current_task()
        assert task is not None, "an ASGI app runs in a task"
        state = {"running": True, "cancelled": False}

        def client_gone(watch: asyncio.Future[None]) -> None:
            if state["running"] and not watch.cancelled():
                # The client went away (or the server is stopping): cancelling the turn makes
                # the library send CANCEL for it at once.
                logger.info("client disconnected; cancelling its turn")
                state["cancelled"] = True
                task.cancel()

        gone = asyncio.ensure_future(_disconnected(receive))
        gone.add_done_callback(client_gone)
        try:
            await (self._stream(send) if self.req.stream else self._whole(send))
        except asyncio.CancelledError:
            if not state["cancelled"] or task.uncancel() > 0:
                raise  # not (only) ours: a cancellation of this task itself propagates
        finally:
            state["running"] = False
            gone.cancel()
            self.gateway.in_flight -= 1

    def _events(self) -> AsyncGenerator[str | Finished, None]:
        return self.gateway.metrics.watch(self.gateway.runner.run(self.req, self.header_key))

    @property
    def _model(self) -> str:
        names = self.gateway.config.models
        return names[0] if names else self.req.model

    async def _whole(self, send: Send) -> None:
        fin: Finished | None = None
        try:
            async with contextlib.aclosing(self._events()) as events:
                async for ev in events:
                    if isinstance(ev, Finished):
                        fin = ev
        except (KvrouteError, ValueError) as exc:
            await _send_error(send, from_client_error(exc))
            return
        assert fin is not None, "a turn that raised nothing ends with Finished"
        await _send_json(send, 200, completion(completion_id(), self._model, fin))

    async def _stream(self, send: Send) -> None:
        enc = ChunkEncoder(completion_id(), self._model, self.req.include_usage)
        async with contextlib.aclosing(self._events()) as events:
            try:
                first = await anext(events)
            except (KvrouteError, ValueError) as exc:
                await _send_error(send, from_client_error(exc))
                return
            await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
            if isinstance(first, Finished):  # an empty reply
                await _body(send, enc.first("") + enc.end(first), more=False)
                return
            await _body(send, enc.first(first))
            try:
                async for ev in events:
                    if isinstance(ev, Finished):
                        await _body(send, enc.end(ev), more=False)
                        return
                    await _body(send, enc.content(ev))
            except (KvrouteError, ValueError) as exc:
                logger.info("turn failed mid-stream: %s", exc)
                await _body(send, sse_error(from_client_error(exc)), more=False)


async def _body(send: Send, data: bytes, more: bool = True) -> None:
    await send({"type": "http.response.body", "body": data, "more_body": more})


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException), "registered for HTTPException only"
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    return error_response(ApiError(exc.status_code, str(exc.detail), INVALID_REQUEST, None, code))


def create_app(config: GatewayConfig) -> Starlette:
    """The gateway's ASGI app (run it with uvicorn; the broker connection opens at startup)."""
    gw = Gateway(config)
    routes = [
        Route("/v1/chat/completions", gw.chat, methods=["POST"]),
        Route("/v1/models", gw.models, methods=["GET"]),
        Route("/health", gw.health, methods=["GET"]),
        metrics_route(gw.metrics, lambda: gw.client, config.health_timeout),
        *page_routes(),  # GET /: the chat page
    ]
    app = Starlette(
        routes=routes, lifespan=gw.lifespan, exception_handlers={HTTPException: _http_error}
    )
    app.state.gateway = gw
    return app
