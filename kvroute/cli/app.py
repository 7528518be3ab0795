"""The root click group and helpers shared by every command."""

from __future__ import annotations

import functools
import logging
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from types import FrameType
from typing import Any

import click

from kvroute import __version__
from kvroute.engine.errors import EngineError
from kvroute.proto.identity import KeyFileError


@click.group()
@click.version_option(__version__, prog_name="kvroute")
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
def main(verbose: int) -> None:
    """kvroute: multi-turn LLM chat served from CPU workers, each session's KV cache kept warm."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")


@contextmanager
def user_errors(*extra: type[Exception]) -> Iterator[None]:
    """Turn expected errors into ``error: <message>`` on stderr and exit status 1 (a model
    that cannot load and a CURVE key that cannot be used always count as expected)."""
    try:
        yield
    except (EngineError, KeyFileError, *extra) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)


def echo_err(message: str) -> None:
    """Print a status line on stderr (stdout stays clean for --json output)."""
    click.echo(message, err=True)


ModelOption = Callable[[Callable[..., object]], Callable[..., object]]

model_option: ModelOption = click.option(
    "--model",
    "model",
    default="default",
    show_default=True,
    help="A GGUF path, or 'default' for SmolLM2-135M-Instruct Q4_1 (fetched on first use).",
)


def curve_client_options(f: Callable[..., object]) -> Callable[..., object]:
    """``--server-key`` and ``--key``: CURVE for a connecting side (chat, bench, worker)."""
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


@contextmanager
def stop_on_signals() -> Iterator[threading.Event]:
    """SIGINT/SIGTERM set the yielded event instead of raising in the middle of cleanup.

    The previous handlers are restored on exit. Main thread only (Python's rule for signals).
    """
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


def option_group(
    name: str,
    options: Sequence[tuple[str, Decorator]],
    check: Callable[[dict[str, Any]], None] | None = None,
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

        for _, option in reversed(options):
            wrapper = option(wrapper)
        return wrapper

    return decorate
