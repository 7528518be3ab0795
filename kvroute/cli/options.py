"""Option definitions shared by several commands: one definition per concern, defaults shown.

Addresses go through :func:`kvroute.proto.endpoint.parse_endpoint` (the client library and the
configs use the same parser, so a mistake reads the same everywhere). Reply length and
sampling take their defaults from the client library and the protocol, never from numbers
repeated here.
"""

from __future__ import annotations

from typing import Any

import click

from kvroute.client import DEFAULT_MAX_TOKENS, DEFAULT_TIMEOUT
from kvroute.proto import TurnRequest
from kvroute.proto.endpoint import EndpointError, parse_endpoint
from kvroute.proto.limits import MAX_MAX_TOKENS, MAX_SEED, MAX_TEMPERATURE, MAX_TOP_K

from .app import Decorator, option_group

FORMS_HELP = "tcp://HOST:PORT, HOST:PORT or ipc://PATH"


class Endpoint(click.ParamType):
    """A ZeroMQ address, checked and normalised (``HOST:PORT`` becomes ``tcp://HOST:PORT``)."""

    name = "address"

    def __init__(self, bind: bool = False) -> None:
        self.bind = bind

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        try:
            return parse_endpoint(value, bind=self.bind)
        except EndpointError as exc:
            self.fail(str(exc), param, ctx)

    def get_metavar(self, param: click.Parameter, *args: Any, **kwargs: Any) -> str:
        return "ADDRESS"


CONNECT = Endpoint()
"""An address to connect to."""
BIND = Endpoint(bind=True)
"""An address to bind (wildcards allowed: ``*`` host, port 0)."""


def connect_option(default: str | None, what: str = "The broker's frontend address") -> Decorator:
    """``--connect ADDRESS`` (parameter ``url``)."""
    return click.option(
        "--connect",
        "url",
        type=CONNECT,
        default=default,
        show_default=default is not None,
        help=f"{what}: {FORMS_HELP}.",
    )


def timeout_option(what: str = "each reply frame (first token, next token)") -> Decorator:
    """``--timeout SECONDS``: how long a client waits before giving up."""
    return click.option(
        "--timeout",
        type=click.FloatRange(0.0, min_open=True),
        default=DEFAULT_TIMEOUT,
        show_default=True,
        help=f"Seconds to wait for {what} before giving up.",
    )


MAX_TOKENS = click.IntRange(1, MAX_MAX_TOKENS)
TEMPERATURE = click.FloatRange(0.0, MAX_TEMPERATURE)
TOP_P = click.FloatRange(0.0, 1.0, min_open=True)
TOP_K = click.IntRange(0, MAX_TOP_K)
SEED = click.IntRange(0, MAX_SEED)
"""Value types of the reply options (also what chat's ``/set`` checks its values with)."""

max_tokens_option: Decorator = click.option(
    "--max-tokens",
    type=MAX_TOKENS,
    default=DEFAULT_MAX_TOKENS,
    show_default=True,
    help="Longest reply, in tokens (the model's context is the hard cap).",
)

_T = TurnRequest(())  # the protocol's sampling defaults

SAMPLING_OPTIONS = (
    (
        "temperature",
        click.option(
            "--temperature",
            type=TEMPERATURE,
            default=_T.temperature,
            show_default=True,
            help="Sampling temperature; 0 picks the most likely token (greedy).",
        ),
    ),
    (
        "top_p",
        click.option(
            "--top-p",
            type=TOP_P,
            default=_T.top_p,
            show_default=True,
            help="Sample only from the most likely tokens covering this probability (1: all).",
        ),
    ),
    (
        "top_k",
        click.option(
            "--top-k",
            type=TOP_K,
            default=_T.top_k,
            show_default=True,
            help="Sample only from the K most likely tokens (0: no limit).",
        ),
    ),
    (
        "seed",
        click.option(
            "--seed",
            type=SEED,
            default=_T.seed,
            show_default="random",
            help="Sampler seed, for repeatable replies when --temperature > 0.",
        ),
    ),
)
sampling_options = option_group("sampling", SAMPLING_OPTIONS)
"""``--temperature --top-p --top-k --seed``, handed to the command as ``sampling`` (a dict)."""
