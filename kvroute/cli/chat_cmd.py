"""``kvroute chat``: talk to a running service from the terminal, like ``ollama run``.

It pings the broker before anything else and says plainly when none answers. Replies stream
as they are generated, after a spinner; a dim line after each says how much of the prompt came
from the session's KV cache, time to first token, decode speed, the worker and the cache path.
The loop itself lives in :mod:`.chat_repl`; saved conversations in :mod:`.chat_file`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from kvroute.broker.config import BrokerConfig
from kvroute.client import Client

from .app import check_broker, echo_err, user_errors
from .chat_file import ChatFileError, SavedChat, load_chat
from .chat_repl import SETTABLE, ChatRepl, Settings
from .options import (
    connect_option,
    curve_client_options,
    max_tokens_option,
    sampling_options,
    timeout_option,
)
from .terminal import line_reader


def _settings(ctx: click.Context, given: dict[str, Any], saved: SavedChat | None) -> Settings:
    """The command line's reply options; with --resume, the saved ones where none was given."""
    settings = Settings(**given)
    if saved is None:
        return settings
    for name, value in saved.settings.items():
        if name not in SETTABLE:
            continue
        if ctx.get_parameter_source(name) is not ParameterSource.DEFAULT:
            continue  # what was typed now wins over the file
        try:
            setattr(settings, name, None if value is None else SETTABLE[name](value))
        except click.BadParameter:
            echo_err(f"warning: ignoring saved {name} {value!r} (out of range)")
    return settings


@click.command()
@connect_option(BrokerConfig().frontend)
@click.option("--system", default=None, help="System prompt for a new conversation.")
@click.option(
    "--resume",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Continue a conversation written by /save (its reply settings too, unless given).",
)
@max_tokens_option
@sampling_options
@click.option(
    "--overflow",
    type=SETTABLE["overflow"],
    default=Settings.overflow,
    show_default=True,
    help="When the conversation outgrows the context: drop the oldest turns, or stop.",
)
@timeout_option()
@curve_client_options
@click.pass_context
def chat(
    ctx: click.Context,
    url: str,
    system: str | None,
    resume: Path | None,
    max_tokens: int,
    sampling: dict[str, Any],
    overflow: str,
    timeout: float,
    server_key: str | None,
    key: str | None,
) -> None:
    """Chat with a kvroute service: streaming replies, /set, /save, /reset, /stats, /exit.

    Type a message and press Enter. End a line with \\ to go on on the next one, or put a
    block between two lines of \"\"\". Ctrl-C cancels a reply; Ctrl-D or /exit leaves.
    """
    saved = None
    if resume is not None:
        try:
            saved = load_chat(resume)
        except ChatFileError as exc:
            raise click.BadParameter(str(exc), param_hint="--resume") from None
    settings = _settings(ctx, {"max_tokens": max_tokens, "overflow": overflow, **sampling}, saved)
    rtt = check_broker(url, timeout, server_key, key)
    history = saved.messages if saved is not None else None
    with user_errors(ValueError):  # e.g. --system given and the saved chat has one too
        client = Client(url, timeout=timeout, server_key=server_key, key=key)
        try:
            session = client.session(system=system, history=history)
        except ValueError:
            client.close()
            raise
    with client:
        resumed = f" · resumed {len(history)} messages" if history else ""
        echo_err(
            f"kvroute chat · {url} (broker {rtt * 1e3:.1f} ms) · session {session.id[:8]}"
            f"{resumed} · /help for commands"
        )
        ChatRepl(session, settings, line_reader()).run()
