"""``kvroute gateway``: the OpenAI-compatible HTTP API in front of a running broker.

The gateway is a kvroute client (:mod:`kvroute.gateway`); several may front one broker, and
share sessions when they share an owner token (``--owner-token-file``; under CURVE, the same
client key). It prints ``http http://HOST:PORT`` and then ``ready ...`` once it accepts
requests, and stops on SIGINT/SIGTERM after the requests in flight (up to a few seconds).
``kvroute serve`` runs the same gateway as a child process (:class:`GatewayProcess`).
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import re
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import click

from kvroute.gateway import GatewayConfig, serve
from kvroute.gateway.config import DEFAULT_HTTP, parse_http_address
from kvroute.proto.identity import check_owner_token, new_owner_token

from .app import curve_client_options, echo_err, stop_on_signals, user_errors
from .options import connect_option, timeout_option

_G = GatewayConfig()


class HttpAddress(click.ParamType[tuple[str, int]]):
    """``HOST:PORT`` for the HTTP listener (port 0: any free port)."""

    name = "HOST:PORT"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> tuple[str, int]:
        if isinstance(value, tuple):
            return value
        try:
            return parse_http_address(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


HTTP_ADDRESS = HttpAddress()


def read_owner_token(path: Path) -> bytes:
    """The owner token kept in ``path`` (one line); a fresh one is written there, readable by
    this user only, when the file does not exist yet (the first gateway of a group makes it).

    Raises
    ------
    ValueError
        The file cannot be read or written, or holds no valid token (one line).
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    except OSError as exc:
        raise ValueError(f"cannot create owner token file {path}: {exc.strerror}") from exc
    else:
        with os.fdopen(fd, "wb") as f:
            f.write(new_owner_token() + b"\n")
    try:
        token = path.read_bytes().strip()
    except OSError as exc:
        raise ValueError(f"cannot read owner token file {path}: {exc.strerror}") from exc
    try:
        return check_owner_token(token)
    except ValueError as exc:
        raise ValueError(f"owner token file {path}: {exc}") from None


def announce(bound: GatewayConfig) -> None:
    """The lines scripts wait for: the HTTP URL (before ``ready``)."""
    click.echo(f"http {bound.url}", color=False)


@click.command()
@connect_option(_G.connect)
@click.option(
    "--http",
    "http",
    type=HTTP_ADDRESS,
    default=DEFAULT_HTTP,
    show_default=True,
    help="Listen here for HTTP (port 0: any free port).",
)
@click.option(
    "--model-name",
    "model_names",
    multiple=True,
    help="A model name GET /v1/models lists and responses carry (repeatable; default: the "
    "models the live workers serve).",
)
@click.option(
    "--owner-token-file",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="KVROUTE_OWNER_TOKEN_FILE",
    help="Share sessions with the other gateways given this file (without CURVE): its token "
    "owns the sessions; created with a fresh token if missing. [env: KVROUTE_OWNER_TOKEN_FILE]",
)
@click.option(
    "--max-in-flight",
    type=click.IntRange(min=1),
    default=_G.max_in_flight,
    show_default=True,
    help="Chat requests running at once; one more gets 429.",
)
@timeout_option("each reply frame from the broker (then 504)")
@curve_client_options
def gateway(
    url: str,
    http: tuple[str, int],
    model_names: tuple[str, ...],
    owner_token_file: Path | None,
    max_in_flight: int,
    timeout: float,
    server_key: str | None,
    key: str | None,
) -> None:
    """Serve the OpenAI-compatible HTTP API (/v1/chat/completions, /v1/models, /health)."""
    from kvroute.worker.process import set_title

    with user_errors(OSError, ValueError):
        cfg = GatewayConfig(
            connect=url,
            host=http[0],
            port=http[1],
            timeout=timeout,
            models=model_names,
            max_in_flight=max_in_flight,
            server_key=server_key,
            key=key,
            owner_token=None if owner_token_file is None else read_owner_token(owner_token_file),
        )

        def ready(bound: GatewayConfig) -> None:
            set_title(f"kvroute gateway {bound.url}")
            announce(bound)
            click.echo(f"ready gateway {bound.url} broker {bound.connect}", color=False)

        # uvicorn handles SIGINT/SIGTERM while it serves and raises the signal again after its
        # shutdown: our handlers take it then, so the command ends cleanly.
        with stop_on_signals():
            asyncio.run(serve(cfg, ready))
    echo_err("stopped")


class GatewayError(RuntimeError):
    """The gateway child could not start (e.g. its HTTP address is in use)."""


def local_connect(frontend: str) -> str:
    """The address a local client uses for a bound frontend (a wildcard host becomes loopback)."""
    return re.sub(r"^tcp://(\*|0\.0\.0\.0|\[::\])(?=:)", "tcp://127.0.0.1", frontend)


def _child(config: GatewayConfig, conn: Connection) -> None:
    """The gateway process: a title, die with the parent, serve until SIGTERM."""
    from kvroute.worker.process import die_with_parent, set_title

    die_with_parent()

    def ready(bound: GatewayConfig) -> None:
        set_title(f"kvroute gateway {bound.url}")
        conn.send(("ready", bound.url))

    try:
        asyncio.run(serve(config, ready))
    except (OSError, ValueError) as exc:
        conn.send(("error", str(exc)))
    finally:
        conn.close()


class GatewayProcess:
    """A gateway in a spawned child process (``kvroute serve``'s), stopped with SIGTERM.

    Parameters
    ----------
    config
        What the child serves; ``port`` 0 picks a free port (:meth:`start` returns the URL).
    """

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.url = ""
        self.process: BaseProcess | None = None

    def start(self, timeout: float = 60.0) -> str:
        """Start the child; return its URL once it accepts requests.

        Raises
        ------
        GatewayError
            It could not bind, or did not start within ``timeout`` seconds.
        """
        ctx = mp.get_context("spawn")
        ours, theirs = ctx.Pipe(duplex=False)
        self.process = ctx.Process(
            target=_child, args=(self.config, theirs), name="kvroute-gateway", daemon=True
        )
        self.process.start()
        theirs.close()
        if not ours.poll(timeout):
            self.close()
            raise GatewayError(f"the HTTP gateway did not start within {timeout:g} s")
        try:
            what, detail = ours.recv()
        except EOFError:
            what, detail = "error", f"exited with code {self.process.exitcode}"
        if what != "ready":
            self.close()
            raise GatewayError(f"the HTTP gateway could not start: {detail}")
        self.url = str(detail)
        return self.url

    def alive(self) -> bool:
        """Whether the child is running."""
        return self.process is not None and self.process.is_alive()

    def close(self, timeout: float = 10.0) -> None:
        """SIGTERM (requests in flight get a few seconds), then SIGKILL. Idempotent."""
        p = self.process
        if p is None:
            return
        if p.is_alive():
            p.terminate()
            p.join(timeout)
            if p.is_alive():
                p.kill()
                p.join(5.0)
        self.process = None


def start_serve_gateway(
    frontend: str, http: tuple[str, int], model_name: str, curve: bool
) -> GatewayProcess | None:
    """``kvroute serve``'s gateway: started, its ``http URL`` line printed (before ``ready``).

    Under CURVE it is left out with a note: the broker lets in only the client keys it was
    given, and a gateway needs one of them (``kvroute gateway --server-key --key``).

    Raises
    ------
    GatewayError
        It could not start (e.g. the HTTP address is in use).
    """
    if curve:
        echo_err(
            "http gateway not started: under CURVE run it apart with a client key "
            "(kvroute gateway --server-key FILE --key FILE)"
        )
        return None
    # An owner token of its own, presented on every request as a standalone gateway's
    # --owner-token-file is (the library sends it in an owner frame).
    cfg = GatewayConfig(
        connect=local_connect(frontend),
        host=http[0],
        port=http[1],
        models=(model_name,),
        owner_token=new_owner_token(),
    )
    gw = GatewayProcess(cfg)
    click.echo(f"http {gw.start()}", color=False)
    return gw
