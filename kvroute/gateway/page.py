"""``GET /``: a chat page that shows the cache at work, served from files in the package.

The page (``static/index.html``, ``chat.css``, ``chat.js``) needs no build step and loads
nothing from elsewhere, so it works offline. It streams replies from
``POST /v1/chat/completions`` (fetch and SSE parsing in the page), and under every reply shows
what the turn cost: time to first token, cached / prompt tokens, prefilled tokens, decode speed,
worker, cache path and cold reason, and a bar per turn of the chat's TTFT. Stop aborts the
request, which makes the gateway cancel the turn on its worker. The badge reads ``/v1/models``
and ``/health``.
"""

from __future__ import annotations

from importlib.resources import files

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

PACKAGE = "kvroute.gateway"
STATIC = "static"
"""The page's folder inside :data:`PACKAGE`."""


async def _index(request: Request) -> Response:
    html = files(PACKAGE).joinpath(STATIC, "index.html").read_bytes()
    # no-cache: a browser revalidates, so an upgraded gateway serves its own page at once.
    return Response(html, media_type="text/html", headers={"cache-control": "no-cache"})


def page_routes() -> list[Route | Mount]:
    """``GET /`` (the page) and ``/static/...`` (its stylesheet and script)."""
    return [
        Route("/", _index, methods=["GET"]),
        Mount("/static", StaticFiles(packages=[(PACKAGE, STATIC)]), name="static"),
    ]
