"""kvroute: serve multi-turn LLM chat from CPU workers with each session's KV cache kept warm.

The client API is importable from here (``from kvroute import Client, AsyncClient``). It is
loaded on first use, so ``import kvroute`` stays cheap (no ZeroMQ, no numpy) for code that only
needs, say, ``kvroute.__version__``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from .client import (
        AsyncClient,
        AsyncSession,
        Client,
        ContextOverflow,
        KvrouteError,
        LimitReached,
        NotOwner,
        ProtocolError,
        ServiceUnavailable,
        Session,
        SessionBusy,
        SessionLost,
        Timeout,
        TurnResult,
    )

__all__ = [
    "AsyncClient",
    "AsyncSession",
    "Client",
    "ContextOverflow",
    "KvrouteError",
    "LimitReached",
    "NotOwner",
    "ProtocolError",
    "ServiceUnavailable",
    "Session",
    "SessionBusy",
    "SessionLost",
    "Timeout",
    "TurnResult",
    "__version__",
]

_CLIENT_NAMES = frozenset(__all__) - {"__version__"}


def __getattr__(name: str) -> Any:
    # PEP 562: import the client (pyzmq, msgpack) only when one of its names is asked for.
    if name in _CLIENT_NAMES:
        return getattr(importlib.import_module(".client", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_CLIENT_NAMES})
