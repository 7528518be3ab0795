"""Run the gateway app under uvicorn: in the foreground (the CLI) or in a thread (tests, benches).

The listening socket is bound here rather than by uvicorn, so port 0 works: the bound address is
known before the first request and handed to ``on_ready``.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from collections.abc import Callable
from dataclasses import replace

import uvicorn

from .app import create_app
from .config import GatewayConfig
from .protocol import GatewayHttpProtocol

logger = logging.getLogger(__name__)

OnReady = Callable[[GatewayConfig], None]
"""Called once the gateway accepts requests, with the config holding the bound port."""


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: any free one).

    Raises
    ------
    OSError
        The address cannot be bound (in use, not local, ...).
    """
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(2048)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def _prepare(config: GatewayConfig) -> tuple[socket.socket, GatewayConfig, uvicorn.Server]:
    """Bind the socket and build the server; the config returned holds the bound port."""
    sock = bind(config.host, config.port)
    bound = replace(config, port=sock.getsockname()[1])
    cfg = uvicorn.Config(
        create_app(bound),
        lifespan="on",
        http=GatewayHttpProtocol,  # a response's head leaves with its first body bytes
        access_log=False,
        log_config=None,  # keep the process's logging setup (the CLI's -v)
        timeout_graceful_shutdown=5,
    )
    return sock, bound, uvicorn.Server(cfg)


async def _started(server: uvicorn.Server, task: asyncio.Future[None]) -> None:
    """Return once uvicorn accepts requests; raise why if it stopped first."""
    while not server.started:
        if task.done():
            task.result()
            raise RuntimeError("the gateway stopped while starting")
        await asyncio.sleep(0.005)


async def serve(config: GatewayConfig, on_ready: OnReady | None = None) -> None:
    """Serve until SIGINT/SIGTERM (when run in the main thread) or until cancelled.

    Raises
    ------
    OSError
        The HTTP address cannot be bound.
    """
    sock, bound, server = _prepare(config)
    task = asyncio.ensure_future(server.serve(sockets=[sock]))
    try:
        await _started(server, task)
        logger.info("gateway listening on %s, broker %s", bound.url, bound.connect)
        if on_ready is not None:
            on_ready(bound)
        await task
    finally:
        sock.close()


class GatewayThread:
    """A gateway served from a thread of this process with its own event loop.

    Parameters
    ----------
    config
        What to serve (``port`` 0 picks a free port; :attr:`url` tells which).
    """

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.url = ""
        self._server: uvicorn.Server | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="kvroute-gateway", daemon=True)

    def start(self, timeout: float = 10.0) -> str:
        """Start serving; returns the base URL once requests are accepted."""
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError(f"gateway did not start within {timeout} s")
        if self._error is not None:
            raise RuntimeError(f"gateway failed to start: {self._error}") from self._error
        return self.url

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:
            self._error = exc
        finally:
            self._ready.set()

    async def _main(self) -> None:
        sock, bound, self._server = _prepare(self.config)
        task = asyncio.ensure_future(self._server.serve(sockets=[sock]))
        try:
            await _started(self._server, task)
            self.url = bound.url
            self._ready.set()
            await task
        finally:
            sock.close()

    def close(self, timeout: float = 10.0) -> None:
        """Stop serving (requests in flight get up to uvicorn's grace period)."""
        if self._server is not None:
            self._server.should_exit = True
        self._thread.join(timeout)

    def __enter__(self) -> GatewayThread:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
