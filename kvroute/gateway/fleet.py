"""What the fleet behind the broker looks like, for ``/health`` and ``/v1/models``.

The broker answers STATUS with its fleet view (:class:`~kvroute.proto.status.Fleet`): every
registered worker (a worker silent for longer than the broker's liveness is no longer
registered), with the model its READY named. :func:`fleet_status` asks for it, bounded by a
timeout, and keeps what the two endpoints need:

- ``/health``: 200 with the live worker count when the broker answers and at least one worker
  is registered; 503 when there is none, or the broker does not answer;
- ``/v1/models``: the distinct models the live workers serve.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from kvroute.client import AsyncClient, KvrouteError


@dataclass(frozen=True, slots=True)
class FleetStatus:
    """One look at the fleet."""

    broker: bool  # the broker answered STATUS in time
    workers: int  # live (registered) workers; 0 when the broker did not answer
    models: tuple[str, ...]  # what they serve, in registration order, each once
    error: str = ""  # why the broker did not answer

    @property
    def healthy(self) -> bool:
        """Whether turns can be served now: the broker answers and a worker is live."""
        return self.broker and self.workers > 0


async def fleet_status(client: AsyncClient, timeout: float) -> FleetStatus:
    """Ask the broker for its fleet view (STATUS) within ``timeout`` seconds."""
    try:
        fleet = await asyncio.wait_for(client.status(), timeout)
    except TimeoutError:
        return FleetStatus(False, 0, (), f"no answer from the broker within {timeout:g} s")
    except KvrouteError as exc:
        return FleetStatus(False, 0, (), str(exc))
    models = tuple(dict.fromkeys(w.model for w in fleet.workers))
    return FleetStatus(True, len(fleet.workers) + fleet.unlisted, models)
