"""The kvroute client library: blocking (:class:`Client`) and asyncio (:class:`AsyncClient`).

>>> from kvroute import Client
>>> with Client("tcp://127.0.0.1:5555", timeout=30) as client:
...     chat = client.session(system="You are terse.")
...     for piece in chat.send("What is a KV cache?", max_tokens=64):
...         print(piece, end="", flush=True)
...     print(chat.last.cached_tokens, chat.last.path)

Each session keeps its history (``session.history``) and sends it with every turn, appending the
reply exactly as streamed, so the worker that holds the session's KV cache reuses it (the
text-prefix path). Errors are typed (:mod:`kvroute.client.errors`); a failed turn leaves the
history as it was.
"""

from .aio import AsyncClient, AsyncSession
from .core import DEFAULT_MAX_TOKENS, DEFAULT_TIMEOUT, OnOverflow
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
from .sync import Client, Session

__all__ = [
    "DEFAULT_MAX_TOKENS",
    "DEFAULT_TIMEOUT",
    "AsyncClient",
    "AsyncSession",
    "Client",
    "ContextOverflow",
    "KvrouteError",
    "LimitReached",
    "NotOwner",
    "OnOverflow",
    "ProtocolError",
    "ServiceUnavailable",
    "Session",
    "SessionBusy",
    "SessionLost",
    "Timeout",
    "TurnResult",
]
