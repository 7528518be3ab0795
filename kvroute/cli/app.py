"""The root click group and helpers shared by every command."""

from __future__ import annotations

import functools
import logging
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from types import FrameType
from typing import Any

import click

from kvroute import __version__
from kvroute.engine.errors import EngineError
from kvroute.proto.endpoint import EndpointError
from kvroute.proto.identity import KeyFileError

from .options import curve_client_options as curve_client_options  # for gateway_cmd, status_cmd

# Commands whose process gets a readable title in ps.
_LONG_RUNNING = ("serve", "broker", "worker", "gateway")


def _verbosity(ctx: click.Context, param: click.Parameter, count: int) -> None:
    """``-v`` before or after the command name: each one adds up (-v info, -vv debug)."""
    root = ctx.find_root()
    total = root.meta["kvroute.verbose"] = root.meta.get("kvroute.verbose", 0) + count
    level = logging.WARNING - 10 * min(total, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger().setLevel(level)


def verbose_option() -> click.Option:
    """A fresh ``-v/--verbose`` for one command (click options are not shared objects)."""
    return click.Option(
        ["-v", "--verbose"],
        count=True,
        expose_value=False,
        callback=_verbosity,
        help="More logging: -v info, -vv debug (before or after the command name).",
    )


class KvrouteGroup(click.Group):
    """The ``kvroute`` group: every command takes ``-v``, and a usage error is one line."""

    def add_command(self, cmd: click.Command, name: str | None = None) -> None:
        _add_verbose(cmd)
        super().add_command(cmd, name)

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        run = functools.partial(super().main, args, prog_name, complete_var, **extra)
        if not standalone_mode:
            return run(standalone_mode=False)
        try:
            rv: Any = run(standalone_mode=False)
        except click.UsageError as exc:
            where = exc.ctx.command_path if exc.ctx is not None else "kvroute"
            click.echo(f"error: {exc.format_message()} (see: {where} --help)", err=True)
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            exc.show()
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("interrupted", err=True)
            sys.exit(130)
        except EndpointError as exc:  # an unchecked address reached a config: a usage error too
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
        sys.exit(rv if isinstance(rv, int) else 0)


def _add_verbose(cmd: click.Command) -> None:
    if not any(p.name == "verbose" for p in cmd.params):
        cmd.params.append(verbose_option())
    if isinstance(cmd, click.Group):
        for sub in cmd.commands.values():
            _add_verbose(sub)


@click.group(cls=KvrouteGroup)
@click.version_option(__version__, prog_name="kvroute", help="Show the version and exit.")
@click.pass_context
def main(ctx: click.Context) -> None:
    """kvroute: multi-turn LLM chat served from CPU workers, each session's KV cache kept warm.

    \b
    Start here:
      kvroute serve            a broker and 2 workers on tcp://127.0.0.1:5555
      kvroute chat             talk to it (another terminal)
      kvroute bench --serve 2  a load test that starts its own service
    """
    if ctx.invoked_subcommand in _LONG_RUNNING:
        from kvroute.worker.process import set_title

        set_title(f"kvroute {ctx.invoked_subcommand}")


main.params.append(verbose_option())


@contextmanager
def user_errors(*extra: type[Exception]) -> Iterator[None]:
    """Turn expected errors into ``error: <message>`` on stderr and exit status 1 (a model
    that cannot load and a CURVE key that cannot be used always count as expected)."""
    expected: tuple[type[Exception], ...] = (EngineError, KeyFileError, *extra)
    try:
        yield
    except expected as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)


def echo_err(message: str) -> None:
    """Print a status line on stderr (stdout stays clean for --json output)."""
    click.echo(message, err=True)


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


PING_TIMEOUT_S = 3.0
"""Seconds a command waits for the broker's PONG before saying nobody answers."""


def check_broker(
    url: str, timeout: float, server_key: str | None = None, key: str | None = None
) -> float:
    """Ping the broker at ``url`` first, so a command fails at once when nobody answers.

    Returns the round trip in seconds; exits with one ``error:`` line (status 1) on no answer
    within ``min(timeout, PING_TIMEOUT_S)``. Ctrl-C interrupts the wait.
    """
    from kvroute.client import Client, Timeout  # the client only where one is used

    wait = min(timeout, PING_TIMEOUT_S)
    with user_errors(ValueError):  # the address, the keys: what the user typed
        probe = Client(url, timeout=wait, server_key=server_key, key=key)
    with probe:
        try:
            return probe.ping()
        except Timeout:
            why = "is `kvroute serve` running there?"
            if server_key is not None:
                why = "is it running, and does it allow this --key?"
            echo_err(f"error: no kvroute broker answers at {url} within {wait:g} s ({why})")
            sys.exit(1)


@contextmanager
def quiet_after_ctrl_c(logger_name: str = "kvroute") -> Iterator[None]:
    """Ctrl-C raises KeyboardInterrupt as usual, and the warnings that code logs while it
    unwinds (sessions it could not close, a client already closed) are dropped: the user
    chose to stop, nothing went wrong. Main thread only; elsewhere a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pressed = threading.Event()

    def on_sigint(signum: int, frame: FrameType | None) -> None:
        pressed.set()
        raise KeyboardInterrupt

    def keep(record: logging.LogRecord) -> bool:
        return not (pressed.is_set() and record.name.startswith(logger_name))

    # On the handlers: a logger's own filters do not see its children's records.
    handlers = list(logging.getLogger().handlers)
    for h in handlers:
        h.addFilter(keep)
    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        for h in handlers:
            h.removeFilter(keep)
