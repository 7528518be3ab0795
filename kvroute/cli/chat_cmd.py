"""``kvroute chat``: talk to a running service from the terminal, like ``ollama run``.

Replies stream as they are generated; a dim line after each says how much of the prompt came
from the session's KV cache, time to first token, decode speed, the worker and the cache path.
Ctrl-C during a reply cancels it (the partial reply stays in the history, as the worker kept
it); Ctrl-C at the prompt clears the line, a second one in a row exits, as does EOF (Ctrl-D).
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import FrameType

import click

from kvroute.broker.config import BrokerConfig
from kvroute.client import (
    DEFAULT_MAX_TOKENS,
    DEFAULT_TIMEOUT,
    Client,
    KvrouteError,
    OnOverflow,
    ServiceUnavailable,
    Session,
    SessionLost,
    Timeout,
    TurnResult,
)
from kvroute.proto.limits import MAX_MAX_TOKENS, MAX_TEMPERATURE

from .app import curve_client_options, user_errors

PROMPT = ">>> "
HELP = """commands:
  /reset   forget the conversation (the system prompt stays)
  /stats   numbers of the last turn
  /help    this text
  /exit    leave (also Ctrl-D, or Ctrl-C twice at the prompt)
Ctrl-C while a reply streams cancels it."""


def status_line(r: TurnResult) -> str:
    """One line about a finished turn: cache reuse, latency, speed, worker, path."""
    ttft = r.client_ttft_ms if r.client_ttft_ms is not None else r.ttft_ms
    parts = [f"cached {r.cached_tokens}/{r.prompt_tokens} tok", f"TTFT {ttft:.0f} ms"]
    if r.tokens_per_s is not None:
        parts.append(f"{r.tokens_per_s:.0f} tok/s")
    parts.append(f"worker {r.worker}")
    parts.append(f"cold ({r.cold_reason})" if r.cold_reason is not None else str(r.path))
    if r.finish_reason != "stop":
        parts.append(str(r.finish_reason))
    if r.dropped:
        parts.append(f"dropped {r.dropped} old messages")
    return " · ".join(parts)


def stats_text(session: Session) -> str:
    """The ``/stats`` report: every number of the last turn."""
    r = session.last
    head = f"session {session.id} · {len(session.history)} messages in history"
    if session.dropped:
        head += f" · {session.dropped} dropped to fit the context"
    if r is None:
        return head + "\nno turn yet"
    tps = f"{r.tokens_per_s:.1f}" if r.tokens_per_s is not None else "-"
    client_ttft = f"{r.client_ttft_ms:.1f} ms" if r.client_ttft_ms is not None else "-"
    rows = [
        ("worker", r.worker),
        ("path", f"{r.path}" + (f" ({r.cold_reason})" if r.cold_reason else "")),
        ("finish", str(r.finish_reason)),
        (
            "prompt tokens",
            f"{r.prompt_tokens} (cached {r.cached_tokens}, prefilled {r.prefill_tokens})",
        ),
        ("generated tokens", str(r.generated_tokens)),
        ("TTFT", f"{r.ttft_ms:.1f} ms worker, {client_ttft} client"),
        ("decode", f"{r.decode_ms:.1f} ms, {tps} tok/s"),
        ("round trip", f"{r.elapsed_ms:.1f} ms"),
    ]
    return "\n".join([head, *(f"  {k:<17}{v}" for k, v in rows)])


class _Interrupts:
    """Ctrl-C while a reply streams: the first cancels the turn, a second raises as usual."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.pressed = 0

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        self.pressed += 1
        if self.pressed > 1 or not self.session.cancel():
            raise KeyboardInterrupt


@contextlib.contextmanager
def _cancel_on_ctrl_c(session: Session) -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers live in the main thread only; Ctrl-C then aborts the turn
        return
    previous = signal.signal(signal.SIGINT, _Interrupts(session))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@dataclass(frozen=True)
class ReplyOptions:
    """What every turn of the REPL asks for."""

    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = 0.0
    on_overflow: OnOverflow = "drop_oldest"  # a chat should go on, not stop at the context end


class ChatRepl:
    """The read-eval-print loop over one session.

    Parameters
    ----------
    session
        The chat session.
    options
        Sampling and overflow policy of every turn.
    read_line
        Returns the next line without its newline; raises EOFError at the end of input and
        KeyboardInterrupt on Ctrl-C.
    """

    def __init__(
        self, session: Session, options: ReplyOptions, read_line: Callable[[str], str]
    ) -> None:
        self.session = session
        self.options = options
        self.read_line = read_line

    def run(self) -> None:
        """Loop until /exit, EOF or two Ctrl-C in a row at the prompt."""
        interrupted = False
        while True:
            try:
                line = self.read_line(PROMPT).strip()
            except EOFError:
                click.echo()
                return
            except KeyboardInterrupt:
                if interrupted:
                    click.echo()
                    return
                interrupted = True
                click.echo("\n(Ctrl-C again or /exit to quit)")
                continue
            interrupted = False
            if not line:
                continue
            if line.startswith("/"):
                if not self.command(line):
                    return
                continue
            self.reply(line)

    def command(self, line: str) -> bool:
        """Run a slash command; False means exit."""
        name = line.split()[0].lower()
        if name in ("/exit", "/quit", "/bye"):
            return False
        if name == "/help":
            click.echo(HELP)
        elif name == "/stats":
            click.echo(stats_text(self.session))
        elif name == "/reset":
            try:
                self.session.reset()
                click.echo("conversation reset; the next reply starts cold")
            except KvrouteError as exc:
                _error(exc)
        else:
            click.echo(f"unknown command {name}; try /help")
        return True

    def reply(self, text: str) -> None:
        """Stream one reply and print its status line; errors become one line each."""
        for attempt in range(2):
            try:
                self._stream(text)
                return
            except SessionLost as exc:
                click.echo()
                if attempt or not exc.retryable:
                    _error(exc)
                    return
                click.echo(click.style(f"[{exc}; resending]", dim=True))
            except (Timeout, ServiceUnavailable) as exc:
                click.echo()
                _error(exc, "your message was not answered; the conversation is kept")
                return
            except KvrouteError as exc:
                click.echo()
                _error(exc)
                return
            except KeyboardInterrupt:
                click.echo("\n[interrupted]")
                return

    def _stream(self, text: str) -> None:
        with _cancel_on_ctrl_c(self.session):
            o = self.options
            stream = self.session.send(
                text, max_tokens=o.max_tokens, temperature=o.temperature, on_overflow=o.on_overflow
            )
            for piece in stream:
                click.echo(piece, nl=False)
        last = self.session.last
        assert last is not None, "a turn that ended normally has a result"
        click.echo()
        if last.finish_reason == "cancelled":
            click.echo("[cancelled]")
        click.echo(click.style(status_line(last), dim=True))


def _error(exc: Exception, note: str = "") -> None:
    click.echo(f"error: {exc}" + (f" ({note})" if note else ""), err=True)


def _line_reader() -> Callable[[str], str]:
    """``input`` with line editing and history on a terminal; plain lines otherwise."""
    if sys.stdin.isatty():
        # Imported for its side effect: input() gains line editing and history. Missing on
        # some platforms (Windows), where plain input() still works.
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401
        return input

    def read(prompt: str) -> str:
        line = sys.stdin.readline()
        if not line:
            raise EOFError
        return line.rstrip("\n")

    return read


@click.command()
@click.option(
    "--connect",
    "url",
    default=BrokerConfig().frontend,
    show_default=True,
    help="The broker's frontend address.",
)
@click.option("--system", default=None, help="System prompt for the conversation.")
@click.option(
    "--max-tokens",
    type=click.IntRange(1, MAX_MAX_TOKENS),
    default=ReplyOptions.max_tokens,
    show_default=True,
    help="Longest reply, in tokens.",
)
@click.option(
    "--temperature",
    type=click.FloatRange(0.0, MAX_TEMPERATURE),
    default=ReplyOptions.temperature,
    show_default=True,
    help="Sampling temperature (0: greedy).",
)
@click.option(
    "--timeout",
    type=click.FloatRange(0.0, min_open=True),
    default=DEFAULT_TIMEOUT,
    show_default=True,
    help="Seconds to wait for each reply frame before giving up.",
)
@click.option(
    "--overflow",
    type=click.Choice(["drop_oldest", "raise"]),
    default=ReplyOptions.on_overflow,
    show_default=True,
    help="When the conversation outgrows the context: drop the oldest turns, or stop.",
)
@curve_client_options
def chat(
    url: str,
    system: str | None,
    max_tokens: int,
    temperature: float,
    timeout: float,
    overflow: str,
    server_key: str | None,
    key: str | None,
) -> None:
    """Chat with a kvroute service: streaming replies, /reset, /stats, /exit."""
    options = ReplyOptions(
        max_tokens, temperature, "raise" if overflow == "raise" else "drop_oldest"
    )
    with user_errors():
        client = Client(url, timeout=timeout, server_key=server_key, key=key)
    with client:
        session = client.session(system=system)
        click.echo(f"kvroute chat · {url} · session {session.id} · /help for commands", err=True)
        ChatRepl(session, options, _line_reader()).run()
