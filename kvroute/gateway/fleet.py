"""What the gateway knows about the fleet behind the broker, for ``/health`` and ``/v1/models``.

The client library can ask the broker one thing about the service: PING, which proves the broker
is up. Workers it only learns about from turns: every END names the worker that served it, and
a turn refused with ``no_worker`` says none is live. :class:`FleetView` keeps those facts:

- ``workers``: distinct workers that served a turn in the last :data:`SEEN_WINDOW_S` seconds
  (None before any turn; a lower bound of the live workers, not a count of them);
- ``no_worker``: the last turn was refused for want of a worker and none has ended since.

``/health`` answers 503 when the broker does not answer PING or ``no_worker`` is set, else 200.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from kvroute.client import AsyncClient, KvrouteError, TurnResult

from .turns import is_unavailable

SEEN_WINDOW_S: float = 60.0
"""How long a worker that served a turn counts as seen."""


@dataclass(frozen=True, slots=True)
class FleetStatus:
    """One health answer."""

    broker: bool  # the broker answered PING in time
    workers: int | None  # workers seen serving recently (None: no turn yet)
    no_worker: bool  # the last placement failed for want of a live worker

    @property
    def healthy(self) -> bool:
        """Whether requests can be served now, as far as this gateway can tell."""
        return self.broker and not self.no_worker


class FleetView:
    """Facts about the fleet learnt from turns (see the module docstring).

    Parameters
    ----------
    models
        The model names the fleet serves.
    """

    def __init__(self, models: tuple[str, ...]) -> None:
        self.models = models
        self._seen: dict[str, float] = {}
        self._no_worker = False

    def observe(self, outcome: TurnResult | KvrouteError) -> None:
        """Learn from a turn's result or error (a :data:`~.turns.Observer`)."""
        if isinstance(outcome, TurnResult):
            self._seen[outcome.worker] = time.monotonic()
            self._no_worker = False
        elif is_unavailable(outcome):
            self._no_worker = True

    def workers_seen(self) -> int | None:
        """Workers that served a turn within the window (None before any turn)."""
        if not self._seen:
            return None
        horizon = time.monotonic() - SEEN_WINDOW_S
        for w in [w for w, t in self._seen.items() if t < horizon]:
            del self._seen[w]
        return len(self._seen)

    async def status(self, client: AsyncClient, timeout: float) -> FleetStatus:
        """PING the broker (within ``timeout`` seconds) and report what is known."""
        try:
            await asyncio.wait_for(client.ping(), timeout)
            broker = True
        except (KvrouteError, TimeoutError):
            broker = False
        return FleetStatus(broker, self.workers_seen(), self._no_worker)
