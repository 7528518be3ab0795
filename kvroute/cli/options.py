"""Every option more than one command takes: one definition per concern, each validated, its
default shown in ``--help`` and taken from the library (the configs, the client, the protocol),
never from a number repeated here.

- client (here): ``--connect``, ``--timeout``, ``--max-tokens``, sampling, ``--server-key
  --key``: chat, bench, status, gateway (and worker: ``--connect``, the keys);
- model (here): ``--model --ctx`` (:data:`model_options`): generate, serve, worker, bench;
  tokenize takes ``--model`` alone;
- heartbeat, broker, worker (:mod:`.service_options`): ``--heartbeat --liveness`` for broker,
  serve and worker; CURVE server keys and per-client limits for broker and serve;
  ``--capacity --kv-budget-mb --prefill-chunk --threads`` for serve and worker.

A set that fills one config is handed to the command as one dict of that config's keywords
(:func:`option_group`), so a command cannot forget an option of the set. Anything the click
types cannot check alone (combinations of settings) is checked by the configs themselves; the
commands build them inside :func:`config_errors`, which makes their ``ValueError`` a usage error.

Addresses go through :func:`kvroute.proto.endpoint.parse_endpoint` (the client library and the
configs use the same parser, so a mistake reads the same everywhere).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import click

from kvroute.client import DEFAULT_MAX_TOKENS, DEFAULT_TIMEOUT
from kvroute.engine import quant
from kvroute.engine.engine import MIN_N_CTX
from kvroute.proto import TurnRequest
from kvroute.proto.endpoint import EndpointError, parse_endpoint
from kvroute.proto.limits import MAX_MAX_TOKENS, MAX_N_CTX, MAX_SEED, MAX_TEMPERATURE, MAX_TOP_K
from kvroute.worker.config import WorkerConfig

Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]
Check = Callable[[dict[str, Any]], None]

_W = WorkerConfig()


def option_group(
    name: str, options: Sequence[tuple[str, Decorator]], check: Check | None = None
) -> Decorator:
    """Options several commands share, handed to the command as one dict of config keywords.

    ``options`` pairs each click option with the parameter name it produces; the command gets
    them as ``name`` (e.g. ``broker_kw``), ready for ``Config(**kw)``, after ``check`` (which
    raises ``click.UsageError`` for combinations that make no sense).
    """

    def decorate(f: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(f)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            kw = {key: kwargs.pop(key) for key, _ in options}
            if check is not None:
                check(kw)
            return f(*args, **{name: kw}, **kwargs)

        decorated: Callable[..., Any] = wrapper
        for _, option in reversed(options):
            decorated = option(decorated)
        return decorated

    return decorate


@contextmanager
def config_errors() -> Iterator[None]:
    """Build configs in here: their ``ValueError`` (a setting that cannot work) becomes a
    one-line usage error (exit status 2), like a value click refused."""
    try:
        yield
    except ValueError as exc:
        raise click.UsageError(str(exc), click.get_current_context(silent=True)) from None


class FiniteRange(click.FloatRange):
    """A ``FloatRange`` that also refuses ``nan`` and ``inf`` (which compare as in range)."""

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        rv = super().convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{rv} is not a finite number.", param, ctx)
        return rv


# --- addresses ---

FORMS_HELP = "tcp://HOST:PORT, HOST:PORT or ipc://PATH"


class Endpoint(click.ParamType[str]):
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


def bind_option(flag: str, default: str, what: str) -> Decorator:
    """``--frontend`` or ``--backend ADDRESS``: where the broker binds (parameter ``flag``)."""
    return click.option(
        f"--{flag}", type=BIND, default=default, show_default=True, help=f"Bind here {what}."
    )


# --- client ---


def timeout_option(what: str = "each reply frame (first token, next token)") -> Decorator:
    """``--timeout SECONDS``: how long a client waits before giving up."""
    return click.option(
        "--timeout",
        type=click.FloatRange(0.0, min_open=True),
        default=DEFAULT_TIMEOUT,
        show_default=True,
        help=f"Seconds to wait for {what} before giving up.",
    )


def curve_client_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """``--server-key`` and ``--key``: CURVE for a connecting side (chat, bench, worker, ...)."""
    f = click.option(
        "--key",
        "key",
        default=None,
        metavar="FILE",
        help="This side's secret certificate (NAME.key_secret); with --server-key.",
    )(f)
    return click.option(
        "--server-key",
        "server_key",
        default=None,
        metavar="FILE|Z85",
        help="The broker's public key (server.key, or its z85 text): talk CURVE. With --key.",
    )(f)


MAX_TOKENS = click.IntRange(1, MAX_MAX_TOKENS)
TEMPERATURE = FiniteRange(0.0, MAX_TEMPERATURE)
TOP_P = FiniteRange(0.0, 1.0, min_open=True)
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

sampling_options = option_group(
    "sampling",
    (
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
    ),
)
"""``--temperature --top-p --top-k --seed``, handed to the command as ``sampling`` (a dict)."""

# --- model ---

model_option: Decorator = click.option(
    "--model",
    "model",
    default=_W.model,
    show_default=True,
    help="A GGUF path, or 'default' for SmolLM2-135M-Instruct Q4_1 (fetched on first use).",
)
"""``--model`` alone (tokenize: no context to size)."""

model_options = option_group(
    "model_kw",
    (
        ("model", model_option),
        (
            "n_ctx",
            click.option(
                "--ctx",
                "n_ctx",
                type=click.IntRange(MIN_N_CTX, MAX_N_CTX),
                default=_W.n_ctx,
                show_default=True,
                help="Context positions per session (prompt + reply), at most the model's own.",
            ),
        ),
        (
            "kernels",
            click.option(
                "--kernels",
                "kernels",
                type=click.Choice(quant.ASKS),
                default=None,
                help="Quantized matmul kernels: auto (exact where this CPU runs them), exact "
                "(float32 results), int8 (llama.cpp's arithmetic, fastest; needs AVX-512 "
                "VNNI) or off (float32 BLAS only). Default: $KVROUTE_QUANT, else auto.",
            ),
        ),
    ),
)
"""``--model --ctx --kernels``, handed over as ``model_kw`` (WorkerConfig keywords)."""
