"""The read-eval-print loop of ``kvroute chat``: one session, its replies, its slash commands.

A reply streams in a thread of its own while the main thread waits in slices of 0.1 s, so the
terminal stays responsive: a spinner runs until the first token, and Ctrl-C is handled at once.
The first Ctrl-C cancels the reply (the worker keeps the partial reply, as the library commits
it); if the service has not confirmed within :data:`CANCEL_GRACE_S` seconds, or on a second
Ctrl-C, the prompt comes back anyway and the turn finishes ending in the background.

When the worker holding the session crashes mid-reply, the message is sent once more (the
broker places the session on another worker, cold) and the partial reply is erased on a
terminal, so the screen shows one reply. A worker that stopped in an orderly way, or a service
that is shutting down, is said as such and nothing is resent.
"""

from __future__ import annotations

import contextlib
import queue
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from types import FrameType
from typing import Any

import click

from kvroute.client import (
    DEFAULT_MAX_TOKENS,
    DEFAULT_ON_OVERFLOW,
    KvrouteError,
    OnOverflow,
    ServiceUnavailable,
    Session,
    SessionLost,
    Timeout,
    TurnResult,
)
from kvroute.proto import ErrorCode
from kvroute.proto.control import LostReason

from .chat_file import ChatFileError, SavedChat, save_chat
from .options import MAX_TOKENS, SEED, TEMPERATURE, TOP_K, TOP_P
from .terminal import ReadLine, Spinner, erase, no_echo, read_message

PROMPT = ">>> "
CANCEL_GRACE_S = 0.4
"""Seconds after Ctrl-C the REPL waits for the service to confirm the cancel."""
HELP = """commands:
  /set              show the reply settings
  /set NAME VALUE   change one: max_tokens, temperature, top_p, top_k, seed (or random),
                    overflow (drop_oldest or raise)
  /save FILE        write the conversation to FILE (resume with kvroute chat --resume FILE)
  /reset            forget the conversation (the system prompt stays)
  /stats            numbers of the last turn
  /help             this text
  /exit             leave (also Ctrl-D, or Ctrl-C twice at the prompt)
input: end a line with \\ to continue it; \"\"\" opens and closes a multi-line block.
Ctrl-C while a reply streams cancels it."""

_ORDERLY = frozenset({LostReason.DISCONNECTED.value})
"""The reason of a worker that stopped on purpose (it sent DISCONNECT): its fleet may be
stopping, do not resend."""
_KEPT = "your message was not answered; the conversation is kept"


@dataclass
class Settings:
    """The reply options of every turn (``/set`` changes them)."""

    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    overflow: OnOverflow = DEFAULT_ON_OVERFLOW

    def send_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :meth:`Session.send`."""
        kw = asdict(self)
        kw["on_overflow"] = kw.pop("overflow")
        return kw

    def describe(self) -> str:
        """``name value`` pairs on one line."""
        values = ((f.name, getattr(self, f.name)) for f in fields(self))
        return " · ".join(f"{k} {'random' if v is None else v}" for k, v in values)


SETTABLE: dict[str, click.ParamType[Any]] = {
    "max_tokens": MAX_TOKENS,
    "temperature": TEMPERATURE,
    "top_p": TOP_P,
    "top_k": TOP_K,
    "seed": SEED,
    "overflow": click.Choice(["drop_oldest", "raise"]),
}


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


class TurnThread:
    """One turn streamed in a daemon thread; pieces arrive on :attr:`pieces`."""

    def __init__(self, session: Session, text: str, settings: Settings) -> None:
        self.session = session
        self.text = text
        self.kwargs = settings.send_kwargs()
        self.pieces: queue.SimpleQueue[str] = queue.SimpleQueue()
        self.error: Exception | None = None
        self.done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kvroute-chat-turn", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        try:
            for piece in self.session.send(self.text, **self.kwargs):
                self.pieces.put(piece)
        except Exception as exc:  # handed to the main thread, which prints it
            self.error = exc
        finally:
            self.done.set()


class CtrlC:
    """Counts Ctrl-C presses while installed as the SIGINT handler (instead of raising)."""

    def __init__(self) -> None:
        self.presses = 0
        self.first_at = 0.0

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        if not self.presses:
            self.first_at = time.monotonic()
        self.presses += 1


@contextlib.contextmanager
def counting_ctrl_c() -> Iterator[CtrlC]:
    """SIGINT counts presses in the yielded :class:`CtrlC` (main thread; elsewhere no-op)."""
    ctrl = CtrlC()
    if threading.current_thread() is not threading.main_thread():
        yield ctrl  # signal handlers live in the main thread only
        return
    previous = signal.signal(signal.SIGINT, ctrl)
    try:
        yield ctrl
    finally:
        signal.signal(signal.SIGINT, previous)


class ChatRepl:
    """The read-eval-print loop over one session.

    Parameters
    ----------
    session
        The chat session.
    settings
        Reply options of every turn.
    read_line
        Returns the next line without its newline; raises EOFError at the end of input and
        KeyboardInterrupt on Ctrl-C.
    """

    def __init__(self, session: Session, settings: Settings, read_line: ReadLine) -> None:
        self.session = session
        self.settings = settings
        self.read_line = read_line
        self._pending: TurnThread | None = None  # cancelled, not yet confirmed by the service

    def run(self) -> None:
        """Loop until /exit, EOF or two Ctrl-C in a row at the prompt."""
        interrupted = False
        while True:
            try:
                text = read_message(self.read_line, PROMPT)
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
            if not text.strip():
                continue
            if text.startswith("/") and "\n" not in text:
                if not self.command(text.strip()):
                    return
                continue
            self.reply(text.strip())

    # --- commands ------------------------------------------------------------------------

    def command(self, line: str) -> bool:
        """Run a slash command; False means exit."""
        name, _, arg = line.partition(" ")
        name, arg = name.lower(), arg.strip()
        if name in ("/exit", "/quit", "/bye"):
            return False
        if name == "/help":
            click.echo(HELP)
        elif name == "/stats":
            click.echo(stats_text(self.session))
        elif name == "/set":
            self._set(arg)
        elif name == "/save":
            self._save(arg)
        elif name == "/reset":
            if not self._wait_pending():
                return True
            try:
                self.session.reset()
                click.echo("conversation reset; the next reply starts cold")
            except KvrouteError as exc:
                _error(str(exc))
        else:
            click.echo(f"unknown command {name}; try /help")
        return True

    def _set(self, arg: str) -> None:
        if not arg:
            click.echo(self.settings.describe())
            return
        key, _, value = arg.replace("=", " ", 1).partition(" ")
        key, value = key.replace("-", "_").lower(), value.strip()
        kind = SETTABLE.get(key)
        if kind is None or not value:
            _error(f"usage: /set NAME VALUE, NAME one of {', '.join(SETTABLE)}")
            return
        try:
            new = None if key == "seed" and value in ("random", "none") else kind(value)
        except click.BadParameter as exc:
            _error(f"{key}: {exc.message}")
            return
        setattr(self.settings, key, new)
        click.echo(self.settings.describe())

    def _save(self, arg: str) -> None:
        if not arg:
            _error("usage: /save FILE")
            return
        if not self._wait_pending():
            return
        chat = SavedChat(list(self.session.history), asdict(self.settings))
        try:
            save_chat(arg, chat)
        except ChatFileError as exc:
            _error(str(exc))
            return
        click.echo(f"saved {len(chat.messages)} messages to {arg}")

    # --- replies -------------------------------------------------------------------------

    def reply(self, text: str) -> None:
        """Stream one reply and print its status line; errors become one line each."""
        if not self._wait_pending():
            return
        for attempt in range(2):
            turn = TurnThread(self.session, text, self.settings)
            shown, abandoned = self._follow(turn)
            if abandoned:
                self._pending = turn
                click.echo("\n[cancelled]")
                return
            err = turn.error
            if err is None:
                self._finish()
                return
            if isinstance(err, SessionLost) and attempt == 0 and _resend(err):
                if shown and not erase(shown):
                    click.echo()  # not a terminal: the partial reply stays, on its own line
                click.echo(
                    click.style(
                        f"[worker {err.worker} failed mid-reply ({err.reason}); "
                        "answering again on another worker]",
                        dim=True,
                    )
                )
                continue
            if shown:
                click.echo()
            _error(_explain(err, again=attempt > 0))
            return

    def _follow(self, turn: TurnThread) -> tuple[str, bool]:
        """Print the turn's pieces as they come; returns (text shown, abandoned after Ctrl-C)."""
        spinner = Spinner()
        shown: list[str] = []
        cancel_sent = False
        with counting_ctrl_c() as ctrl, no_echo():
            turn.start()
            while True:
                if ctrl.presses:
                    if not cancel_sent:
                        cancel_sent = self.session.cancel()  # False until the TURN is out
                    late = time.monotonic() - ctrl.first_at > CANCEL_GRACE_S
                    if (ctrl.presses > 1 or late) and not turn.done.is_set():
                        spinner.clear()
                        return "".join(shown), True
                try:
                    piece = turn.pieces.get(timeout=0.1)
                except queue.Empty:
                    if turn.done.is_set() and turn.pieces.empty():
                        break
                    if not shown:
                        spinner.tick("cancelling" if ctrl.presses else "thinking")
                    continue
                spinner.clear()
                shown.append(piece)
                click.echo(piece, nl=False)
        spinner.clear()
        return "".join(shown), False

    def _finish(self) -> None:
        last = self.session.last
        assert last is not None, "a turn that ended normally has a result"
        click.echo()
        if last.finish_reason == "cancelled":
            click.echo("[cancelled]")
        click.echo(click.style(status_line(last), dim=True))

    def _wait_pending(self) -> bool:
        """Wait for a cancelled turn to end (Ctrl-C gives up); True when the session is free."""
        turn = self._pending
        if turn is None:
            return True
        spinner = Spinner()
        with counting_ctrl_c() as ctrl:
            while not turn.done.wait(0.1):
                if ctrl.presses:
                    spinner.clear()
                    click.echo("[the cancelled reply has not ended yet; nothing was sent]")
                    return False
                spinner.tick("waiting for the cancelled reply to end")
        spinner.clear()
        self._pending = None
        return True


def _resend(err: SessionLost) -> bool:
    """Resend after a crash; not when the worker stopped on purpose (its fleet may be)."""
    return err.retryable and err.reason not in _ORDERLY


def _explain(err: Exception, *, again: bool) -> str:
    """One line for a failed turn, saying what happened rather than echoing a hint to retry."""
    if isinstance(err, SessionLost):
        if err.reason in _ORDERLY:
            what = f"worker {err.worker} stopped mid-reply ({err.reason}): is the service stopping?"
        else:
            what = f"worker {err.worker} failed mid-reply{' too' if again else ''} ({err.reason})"
        return f"{what}; {_KEPT}"
    if isinstance(err, ServiceUnavailable) and err.code == ErrorCode.SHUTTING_DOWN:
        return f"the service is shutting down; {_KEPT}"
    if isinstance(err, ServiceUnavailable | Timeout):
        return f"{err}; {_KEPT}"
    return str(err)


def _error(message: str) -> None:
    click.echo(f"error: {message}", err=True)
