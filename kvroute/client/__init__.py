"""The kvroute client library: blocking (:class:`Client`) and asyncio (:class:`AsyncClient`).

>>> from kvroute import Client
>>> with Client("tcp://127.0.0.1:5555", timeout=30) as client:
...     chat = client.session(system="You are terse.")
...     for piece in chat.send("What is a KV cache?", max_tokens=64):
...         print(piece, end="", flush=True)
...     print()
...     print(chat.last)  # cached/prompt tokens, TTFT, speed, worker, cache path
...     print(chat.ask("Why does it help?"))  # the whole reply at once

Each session keeps its history (``session.history``) and sends it with every turn, appending the
reply exactly as streamed, so the worker that holds the session's KV cache reuses it (the
text-prefix path). Errors are typed (:mod:`kvroute.client.errors`); a failed or interrupted turn
leaves the history as it was (:mod:`kvroute.client.core` has the whole rule). Defaults
shared with the ``kvroute`` commands: :data:`DEFAULT_MAX_TOKENS`, :data:`DEFAULT_ON_OVERFLOW`,
:data:`DEFAULT_TIMEOUT`.
"""

from .aio import AsyncClient, AsyncReplyStream, AsyncSession
from .api import DEFAULT_MAX_TOKENS, DEFAULT_ON_OVERFLOW, DEFAULT_TIMEOUT
from .conversation import OnOverflow
from .errors import (
    ContextOverflow,
    KvrouteError,
    LimitReached,
    NotOwner,
    ProtocolError,
    ServiceUnavailable,
    SessionBusy,
    SessionLost,
    Timeout,
)
from .result import TurnResult
from .sync import Client, ReplyStream, Session

__all__ = [
    "DEFAULT_MAX_TOKENS",
    "DEFAULT_ON_OVERFLOW",
    "DEFAULT_TIMEOUT",
    "AsyncClient",
    "AsyncReplyStream",
    "AsyncSession",
    "Client",
    "ContextOverflow",
    "KvrouteError",
    "LimitReached",
    "NotOwner",
    "OnOverflow",
    "ProtocolError",
    "ReplyStream",
    "ServiceUnavailable",
    "Session",
    "SessionBusy",
    "SessionLost",
    "Timeout",
    "TurnResult",
]
