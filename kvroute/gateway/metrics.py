"""``GET /metrics``: the service in the Prometheus text format (via ``prometheus_client``).

Two sources, one registry per gateway:

- **The fleet view**, asked from the broker with STATUS at every scrape
  (:meth:`kvroute.AsyncClient.status`): requests by outcome, turns by cache path and cold reason,
  token counters, evictions, workers lost, and the gauges of every worker. These count every
  client of the broker (the native library's too, other gateways'), not only this gateway's
  HTTP requests, and they are what workers last reported (within a heartbeat interval).
- **This gateway's latencies**, measured on its own chat requests as it streams them: time to
  first token, inter-token latency and end-to-end latency histograms.

A scrape that gets no STATUS answer in time reports ``kvroute_broker_up 0`` and the gateway's
histograms only, so a dead broker shows as missing series rather than as frozen counters.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from kvroute.client import AsyncClient, KvrouteError
from kvroute.proto import CachePath, ColdReason, Fleet, TurnOutcome

from .turns import Finished

logger = logging.getLogger(__name__)

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 20)
"""Seconds; a warm turn of the default model lands around 0.1, a long cold prefill in seconds."""
ITL_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300)
REMEMBERED_WORKERS = 256
"""Workers that left the fleet, still reported with ``kvroute_worker_up 0``."""


class FleetCollector(Collector):
    """Metric families from the last fleet view (:attr:`fleet`; None: the broker did not
    answer, and only ``kvroute_broker_up 0`` is reported)."""

    def __init__(self) -> None:
        self.fleet: Fleet | None = None
        self._gone: OrderedDict[str, None] = OrderedDict()  # workers seen before, now missing

    def collect(self) -> Iterator[Metric]:
        fleet = self.fleet
        up = GaugeMetricFamily("kvroute_broker_up", "Whether the broker answered STATUS.")
        up.add_metric([], 0 if fleet is None else 1)
        yield up
        if fleet is None:
            return
        yield from self._counters(fleet)
        yield from self._gauges(fleet)

    def _counters(self, fleet: Fleet) -> Iterator[Metric]:
        b, t = fleet.broker, fleet.totals
        requests = CounterMetricFamily(
            "kvroute_requests",
            "Chat turns (TURN requests) by how they ended, over all the broker's clients.",
            labels=["status"],
        )
        for outcome in TurnOutcome:
            requests.add_metric([str(outcome)], b.requests.get(outcome, 0))
        yield requests
        turns = CounterMetricFamily(
            "kvroute_turns",
            "Finished turns by KV cache path, and by reason for cold ones.",
            labels=["path", "cold_reason"],
        )
        for path in CachePath:
            if path is CachePath.COLD:
                for reason in ColdReason:
                    turns.add_metric([str(path), str(reason)], t.cold_reasons.get(reason, 0))
            else:
                turns.add_metric([str(path), ""], t.paths.get(path, 0))
        yield turns
        for name, value, what in (
            ("kvroute_prompt_tokens", t.prompt_tokens, "Prompt tokens of finished turns."),
            ("kvroute_cached_tokens", t.cached_tokens, "Prompt tokens reused from KV caches."),
            ("kvroute_prefill_tokens", t.prefill_tokens, "Prompt tokens computed (prefilled)."),
            ("kvroute_generation_tokens", t.generated_tokens, "Tokens generated."),
            ("kvroute_workers_lost", b.workers_lost, "Workers the broker declared lost."),
        ):
            yield CounterMetricFamily(name, what, value=value)
        evictions = CounterMetricFamily(
            "kvroute_evictions",
            "Idle sessions a worker evicted to stay within its KV budget.",
            labels=["worker"],
        )
        for w in fleet.workers:
            if w.gauges is not None:
                evictions.add_metric([w.worker], w.gauges.counters.evictions)
        yield evictions

    def _gauges(self, fleet: Fleet) -> Iterator[Metric]:
        listed = {w.worker for w in fleet.workers}
        for worker in listed:
            self._gone.pop(worker, None)
        worker_up = GaugeMetricFamily(
            "kvroute_worker_up",
            "1 for a registered worker, 0 for one that left.",
            labels=["worker"],
        )
        for worker in listed:
            worker_up.add_metric([worker], 1)
        for worker in self._gone:
            worker_up.add_metric([worker], 0)
        yield worker_up
        families = {
            name: GaugeMetricFamily(name, what, labels=["worker"])
            for name, what in (
                ("kvroute_sessions_resident", "Sessions a worker holds in memory."),
                ("kvroute_kv_bytes", "KV cache bytes a worker uses."),
                ("kvroute_kv_budget_bytes", "A worker's KV budget in bytes (absent: none)."),
                ("kvroute_requests_waiting", "Turns waiting on a worker for a slot or KV room."),
            )
        }
        for w in fleet.workers:
            families["kvroute_sessions_resident"].add_metric([w.worker], w.sessions)
            families["kvroute_kv_bytes"].add_metric([w.worker], w.kv_bytes)
            if w.gauges is not None:
                if w.gauges.kv_budget_bytes:
                    families["kvroute_kv_budget_bytes"].add_metric(
                        [w.worker], w.gauges.kv_budget_bytes
                    )
                families["kvroute_requests_waiting"].add_metric([w.worker], w.gauges.queue_depth)
        yield from families.values()
        yield GaugeMetricFamily(
            "kvroute_requests_in_flight",
            "Requests the broker has forwarded and not seen end, over all its clients.",
            value=fleet.broker.requests_in_flight,
        )

    def update(self, fleet: Fleet | None) -> None:
        """Take a new view; workers that were listed before and are not now are remembered
        (reported ``kvroute_worker_up 0``)."""
        if self.fleet is not None and fleet is not None:
            now = {w.worker for w in fleet.workers}
            for w in self.fleet.workers:
                if w.worker not in now:
                    self._gone[w.worker] = None
                    self._gone.move_to_end(w.worker)
            while len(self._gone) > REMEMBERED_WORKERS:
                self._gone.popitem(last=False)
        self.fleet = fleet


class GatewayMetrics:
    """The gateway's metrics registry: latency histograms it observes, the fleet it asks for."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.ttft = Histogram(
            "kvroute_time_to_first_token_seconds",
            "Time from a chat request to its first streamed text, through this gateway.",
            ["path"],
            buckets=TTFT_BUCKETS,
            registry=self.registry,
        )
        self.itl = Histogram(
            "kvroute_inter_token_latency_seconds",
            "Time between consecutive streamed pieces of a reply, through this gateway.",
            buckets=ITL_BUCKETS,
            registry=self.registry,
        )
        self.e2e = Histogram(
            "kvroute_e2e_request_latency_seconds",
            "Time from a chat request to its last piece, through this gateway.",
            ["path"],
            buckets=E2E_BUCKETS,
            registry=self.registry,
        )
        self.fleet = FleetCollector()
        self.registry.register(self.fleet)

    async def watch(
        self, events: AsyncIterator[str | Finished], clock: Callable[[], float] = time.perf_counter
    ) -> AsyncGenerator[str | Finished, None]:
        """Pass a turn's events through, timing them. The path of a turn is known at its end,
        so its TTFT and end-to-end latency are observed then; an inter-token gap as it
        happens. A turn that fails is not observed."""
        t0 = clock()
        first = last = None
        async with contextlib.aclosing(events):  # type: ignore[type-var]
            async for ev in events:
                now = clock()
                if isinstance(ev, Finished):
                    path = str(ev.result.path)
                    if first is not None:
                        self.ttft.labels(path).observe(first - t0)
                    self.e2e.labels(path).observe(now - t0)
                elif ev:
                    if last is None:
                        first = now
                    else:
                        self.itl.observe(now - last)
                    last = now
                yield ev

    async def scrape(self, client: AsyncClient, timeout: float) -> bytes:
        """Ask the broker for the fleet view (within ``timeout`` seconds) and render every
        metric in the Prometheus text format."""
        try:
            fleet: Fleet | None = await asyncio.wait_for(client.status(), timeout)
        except (KvrouteError, TimeoutError) as exc:
            logger.info("metrics: no fleet view from the broker: %s", exc)
            fleet = None
        self.fleet.update(fleet)
        return generate_latest(self.registry)


def metrics_route(
    metrics: GatewayMetrics, client: Callable[[], AsyncClient], timeout: float
) -> Route:
    """``GET /metrics`` over ``client()`` (the gateway's broker connection, made at startup)."""

    async def endpoint(request: Request) -> Response:
        body = await metrics.scrape(client(), timeout)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    return Route("/metrics", endpoint, methods=["GET"])
