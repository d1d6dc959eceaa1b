"""Prometheus /metrics and the /system overview.

What the service did is counted in Redis, by every process alike: each partition has a
stats hash that the scripts appending the events write in the same atomic step
(``scripts/stats.py``), so workers on any host count, a restart loses nothing, and a
retried step or a replay counts nothing twice. /metrics reads those at scrape time,
with the gauges (stream lengths, XINFO of the work stream, the projector's lag, Redis
memory: ``store/inspect.py``, one script run per partition), through a collector of
prometheus-client's metric families; and adds this API process's request latency, kept
in a registry of the app's own (never prometheus-client's global one). /system answers
the same reads as JSON.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from redis.exceptions import RedisError
from starlette.applications import Starlette
from starlette.datastructures import QueryParams
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sumbatch.config import Settings
from sumbatch.outage import BUSY, is_transient
from sumbatch.scripts import stats
from sumbatch.store.inspect import HistogramState, Overview
from sumbatch.web import state
from sumbatch.web.live.sse import parse_wait
from sumbatch.web.responses import JSONResponse

# The counters, by their field in the stats hash.
COUNTERS = {
    "groupsSubmitted": ("sumbatch_groups_submitted", "Groups submitted (accepted POSTs)."),
    "groupsFinished": ("sumbatch_groups_finished", "Groups whose every task has ended."),
    "tasksSubmitted": ("sumbatch_tasks_submitted", "Tasks submitted."),
    "tasksCompleted": (
        "sumbatch_tasks_completed",
        "Tasks that ended with a result, those served from the cache included.",
    ),
    "tasksCached": ("sumbatch_tasks_cached", "Tasks answered from the cache (of completed)."),
    "tasksFailed": ("sumbatch_tasks_failed", "Tasks that ended as FAILURE (out of attempts)."),
    "tasksRevoked": ("sumbatch_tasks_revoked", "Tasks revoked by a cancel."),
}
HTTP_LATENCY = "sumbatch_http_request_duration_seconds"
# Every metric family /metrics exposes (counters without the _total their samples get).
NAMES = (
    *(name for name, _ in COUNTERS.values()),
    "sumbatch_task_run_seconds",
    "sumbatch_group_seconds",
    "sumbatch_work_lag",
    "sumbatch_work_pending",
    "sumbatch_consumer_pending",
    "sumbatch_consumer_idle_seconds",
    "sumbatch_projector_lag_events",
    "sumbatch_dead_letters",
    "sumbatch_stream_length",
    "sumbatch_redis_memory_bytes",
    "sumbatch_redis_up",
    HTTP_LATENCY,
)
# Responses whose duration is the client's to choose, not the API's latency: left out.
STREAMING = "text/event-stream"


def install(app: Starlette, settings: Settings) -> None:
    """Add /metrics, /system and the request-latency middleware to the API's app."""
    registry = CollectorRegistry(auto_describe=False)
    latency = Histogram(
        HTTP_LATENCY,
        "API request latency, by route template, method and status (server-sent event "
        "streams and long-polls, ?wait=, left out).",
        ["route", "method", "status"],
        registry=registry,
    )

    async def metrics(request: Request) -> Response:
        try:
            seen: Overview | None = await (await state.partitions(request)).overview()
        except RedisError as exc:
            # Busy is not away: the scrape fails (503) rather than say sumbatch_redis_up 0.
            if not is_transient(exc) or isinstance(exc, BUSY):
                raise
            seen = None  # Redis away: this process's own metrics, and sumbatch_redis_up 0
        encoder, content_type = choose_encoder(request.headers.get("accept", ""))
        body = encoder(_Scrape(registry, seen))
        return Response(body, headers={"Content-Type": content_type})

    app.router.routes += [
        Route("/metrics", metrics, methods=["GET"]),
        Route("/system", system, methods=["GET"]),
    ]
    app.add_middleware(RequestLatency, histogram=latency)


async def system(request: Request) -> Response:
    partitions = await state.partitions(request)
    return JSONResponse(system_body(await partitions.overview()))


def system_body(seen: Overview) -> dict[str, Any]:
    """/system's JSON: totals over the partitions, and each worker of each partition."""
    parts = seen.partitions
    return {
        "time": seen.time_ms,
        "partitions": len(parts),
        "counters": {name: seen.counter(name) for name in stats.COUNTERS},
        "work": {
            "length": sum(p.work_length for p in parts),
            "lag": seen.total([p.work_lag for p in parts]),
            "pending": sum(p.work_pending for p in parts),
        },
        "projectorLag": seen.total([p.projector_lag for p in parts]),
        "deadLetters": sum(p.dead_letters for p in parts),
        "eventLogLength": sum(p.event_log_length for p in parts),
        "workers": [
            {"name": c.name, "partition": c.partition, "pending": c.pending, "idleMs": c.idle_ms}
            for p in parts
            for c in p.consumers
        ],
        "redisMemoryBytes": sum(seen.memory.values()) if seen.memory else None,
    }


class _Scrape:
    """One scrape: this process's registry, and the families read from Redis."""

    def __init__(self, registry: CollectorRegistry, seen: Overview | None) -> None:
        self.registry = registry
        self.seen = seen

    def collect(self) -> Iterator[Metric]:
        yield from self.registry.collect()
        up = GaugeMetricFamily(
            "sumbatch_redis_up", "Whether this scrape could read Redis (1) or not (0)."
        )
        up.add_metric([], 0 if self.seen is None else 1)
        yield up
        if self.seen is not None:
            yield from families(self.seen)


def families(seen: Overview) -> Iterator[Metric]:
    """The metric families read from Redis at scrape time."""
    for field, (name, documentation) in COUNTERS.items():
        yield CounterMetricFamily(name, documentation, value=seen.counter(field))
    run = HistogramMetricFamily(
        "sumbatch_task_run_seconds",
        "Seconds the run that produced each recorded outcome took, its simulated delay "
        "included, by outcome (completed, failed); cache hits ran nothing.",
        labels=["outcome"],
    )
    for outcome, histogram in stats.TASK_RUN.items():
        state = seen.histogram(histogram)
        run.add_metric([outcome], _buckets(histogram, state), state.sum)
    yield run
    group = seen.histogram(stats.GROUP)
    yield HistogramMetricFamily(
        "sumbatch_group_seconds",
        "Seconds from a group's submission to its GroupFinished event, by the server's "
        "clock (grouptaskProcessed follows when the projector folds it, milliseconds later).",
        buckets=_buckets(stats.GROUP, group),
        sum_value=group.sum,
    )
    yield from _gauges(seen)


def _gauges(seen: Overview) -> Iterator[Metric]:
    def per_partition(
        name: str, documentation: str, labels: Iterable[str] = ()
    ) -> GaugeMetricFamily:
        return GaugeMetricFamily(name, documentation, labels=["partition", *labels])

    lag = per_partition(
        "sumbatch_work_lag",
        "Work entries (each a slice of up to 32 of a group's tasks) not yet handed to a "
        "worker: queued in turn, or waiting in the work stream (XINFO GROUPS lag).",
    )
    pending = per_partition(
        "sumbatch_work_pending", "Work entries handed out and not yet acknowledged."
    )
    consumer_pending = per_partition(
        "sumbatch_consumer_pending", "Work entries a worker holds.", ["consumer"]
    )
    idle = per_partition(
        "sumbatch_consumer_idle_seconds",
        "Seconds since a worker last read or claimed work (XINFO CONSUMERS idle).",
        ["consumer"],
    )
    projector = per_partition(
        "sumbatch_projector_lag_events",
        "Log entries the views do not include yet (counted up to 1,000 when far behind).",
    )
    dead = per_partition("sumbatch_dead_letters", "Entries in the dead-letter stream.")
    length = per_partition("sumbatch_stream_length", "Entries in each stream.", ["stream"])
    for p in seen.partitions:
        at = str(p.partition)
        if p.work_lag is not None:
            lag.add_metric([at], p.work_lag)
        pending.add_metric([at], p.work_pending)
        for c in p.consumers:
            consumer_pending.add_metric([at, c.name], c.pending)
            idle.add_metric([at, c.name], c.idle_ms / 1000)
        if p.projector_lag is not None:
            projector.add_metric([at], p.projector_lag)
        dead.add_metric([at], p.dead_letters)
        for stream, n in (
            ("events", p.event_log_length),
            ("work", p.work_length),
            ("dead", p.dead_letters),
            ("rejected", p.rejected),
        ):
            length.add_metric([at, stream], n)
    yield from (lag, pending, consumer_pending, idle, projector, dead, length)
    memory = GaugeMetricFamily(
        "sumbatch_redis_memory_bytes",
        "Memory the server uses (INFO used_memory), per master on a cluster.",
        labels=["node"],
    )
    for node, used in seen.memory.items():
        memory.add_metric([node], used)
    yield memory


def _buckets(histogram: stats.Histogram, state: HistogramState) -> list[tuple[str, float]]:
    bounds = [repr(float(b)) for b in histogram.bounds] + ["+Inf"]
    return list(zip(bounds, map(float, state.cumulative()), strict=True))


class RequestLatency:
    """ASGI middleware: each request's duration into ``histogram``, labelled by the
    route's path template (``/grouptasks/{group_task_id}``, not the id: one series per
    route), method and status. Server-sent event streams and long-polls (``?wait=``)
    are left out: their duration is the client's wait, not the API's latency."""

    def __init__(self, app: ASGIApp, histogram: Histogram) -> None:
        self.app = app
        self.histogram = histogram

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or _long_poll(scope):
            await self.app(scope, receive, send)
            return
        began = time.perf_counter()
        status, streaming = 500, False

        async def sending(message: Message) -> None:
            nonlocal status, streaming
            if message["type"] == "http.response.start":
                status = message["status"]
                for name, value in message.get("headers", ()):
                    if name.lower() == b"content-type":
                        streaming = value.decode("latin-1").startswith(STREAMING)
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            if not streaming:
                # The router puts the route it matched in the scope.
                route = getattr(scope.get("route"), "path", None) or "unmatched"
                labels = (route, scope["method"], str(status))
                self.histogram.labels(*labels).observe(time.perf_counter() - began)


def _long_poll(scope: Scope) -> bool:
    """Whether the request waits (``?wait=`` over 0 s, read as the handlers read it)."""
    query: bytes = scope.get("query_string", b"")
    if b"wait" not in query:
        return False
    try:
        return parse_wait(QueryParams(query).get("wait")) > 0
    except ValueError:
        return False  # answered at once, with a 422
