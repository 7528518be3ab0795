"""What a lifecycle machine (:mod:`~kvroute.client.core`) and its driver say to each other.

A driver asks the machine for its next action and performs it: send frames, wait for a reply
and hand it back, stop collecting replies, give a piece of text to the caller, end the call, or
raise an error. :data:`Cleanup` is what a caller leaving early has to do, without waiting.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from kvroute.proto import Reply

from .demux import Key
from .errors import KvrouteError
from .result import TurnResult

Clock = Callable[[], float]
"""Seconds from an arbitrary origin (``time.perf_counter``); tests pass their own."""

# --- actions -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Send:
    """Send ``frames`` (one message); first collect replies for ``key``, unless it is None."""

    frames: list[bytes]
    key: Key | None = None


@dataclass(frozen=True, slots=True)
class Receive:
    """Wait for the next reply for ``key`` and pass it to ``on_reply``.

    ``draining``: the request is being waited out; if the transport knows nothing more will come
    for it (a reader took its end, then was interrupted), pass None instead of waiting.
    """

    key: Key
    waiting_for: str
    draining: bool = False


@dataclass(frozen=True, slots=True)
class Discard:
    """Stop collecting replies for ``key``; late ones are dropped."""

    key: Key


@dataclass(frozen=True, slots=True)
class Yield:
    """Hand a non-empty piece of the reply to the caller."""

    text: str


@dataclass(frozen=True, slots=True)
class Done:
    """The call is over; ``result`` is the turn it committed, if any."""

    result: TurnResult | None = None


@dataclass(frozen=True, slots=True)
class Raise:
    """Raise ``error`` (and then, as for any exception, perform ``fail(error)``)."""

    error: KvrouteError


Action = Send | Receive | Discard | Yield | Done | Raise
Cleanup = list[Send | Discard]
"""What to do when a caller leaves a call: nothing that waits, and best effort."""


class Phase(enum.Enum):
    NEW = "new"  # nothing done yet: start() claims the session
    SETTLING = "settling"  # the session's pending request is waited out, then ours goes out
    RUNNING = "running"  # our request is on the wire
    DONE = "done"


class Machine(Protocol):
    """What a driver runs: a :class:`~kvroute.client.core.RequestMachine` or a
    :class:`~kvroute.client.core.PingMachine`."""

    @property
    def phase(self) -> Phase: ...
    def start(self) -> None: ...
    def next_action(self) -> Action: ...
    def on_reply(self, reply: Reply | None) -> None: ...
    def fail(self, exc: BaseException) -> Cleanup: ...
