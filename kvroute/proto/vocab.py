"""Values of the turn-stats fields that travel in END (and that worker, client and bench share).

Kept apart from the frame codec so the I/O-free worker core can import it without pulling in
socket code.
"""

from __future__ import annotations

from typing import Final

# How the prompt of a turn met the session's cache.
PATH_COLD: Final = "cold"
PATH_TEXT_PREFIX: Final = "text_prefix"
PATH_TOKEN_PREFIX: Final = "token_prefix"
PATHS: Final = frozenset({PATH_COLD, PATH_TEXT_PREFIX, PATH_TOKEN_PREFIX})

# Why a turn ran cold (only set when path == cold).
COLD_NEW: Final = "new"  # first turn of the session
COLD_EVICTED: Final = "evicted"  # the worker dropped the idle session to fit its KV budget
COLD_RESET: Final = "reset"  # the client reset the session (or the worker invalidated it)
COLD_DIVERGED: Final = "diverged"  # the history shares no token with what was cached
COLD_WORKER_LOST: Final = "worker_lost"  # the session's previous worker died
COLD_REASONS: Final = frozenset(
    {COLD_NEW, COLD_EVICTED, COLD_RESET, COLD_DIVERGED, COLD_WORKER_LOST}
)

# Why generation stopped.
FINISH_STOP: Final = "stop"  # an end-of-turn / EOS token was sampled (not fed, not streamed)
FINISH_LENGTH: Final = "length"  # max_tokens reached
FINISH_CANCELLED: Final = "cancelled"  # CANCEL, RESET or a vanished client
FINISH_REASONS: Final = frozenset({FINISH_STOP, FINISH_LENGTH, FINISH_CANCELLED})
