"""An OpenAI-compatible HTTP gateway in front of the broker.

The gateway is just another kvroute client: an asyncio ASGI app (Starlette on uvicorn) that
turns ``POST /v1/chat/completions`` into turns sent with :class:`~kvroute.AsyncClient` over
ZeroMQ. It never imports broker, worker or engine code. Any OpenAI client gets the warm-cache
behaviour with no change: requests without a session key are routed to the session that holds
their history (:mod:`.affinity`), through the broker's transcript index, so several gateways
sharing an owner token can front one broker.

Modules: :mod:`.request` (body checks, 400 naming the field), :mod:`.affinity` (which session),
:mod:`.turns` (a request as a turn: lookup, index, retries), :mod:`.render` (response bodies,
SSE framing), :mod:`.errors` (OpenAI error objects, status mapping), :mod:`.fleet` (health and
models, from the broker's STATUS), :mod:`.app` (the ASGI app), :mod:`.server` (uvicorn).

>>> from kvroute.gateway import GatewayConfig, GatewayThread
>>> with GatewayThread(GatewayConfig(connect="tcp://127.0.0.1:5555", port=0)) as gw:
...     print(gw.url)
"""

from .app import Gateway, create_app
from .config import DEFAULT_HTTP_HOST, DEFAULT_HTTP_PORT, GatewayConfig
from .errors import ApiError
from .server import GatewayThread, serve

__all__ = [
    "DEFAULT_HTTP_HOST",
    "DEFAULT_HTTP_PORT",
    "ApiError",
    "Gateway",
    "GatewayConfig",
    "GatewayThread",
    "create_app",
    "serve",
]
