"""The REST API's ASGI app: its routes (a submission in ``submit``, a group's or a
task's status and the group's cancellation in ``groups``, the event feeds in ``live``),
the lifespan that opens storage, the liveness and readiness probes, and the durable
mode check made before serving. It validates, appends events and reads the views the
projector stores; it never computes a task."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import msgspec
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from sumbatch.config import Settings
from sumbatch.outage import is_transient
from sumbatch.store import NotDurable
from sumbatch.store.partitions import LazyPartitions, open_partitions
from sumbatch.web import dashboard, docs, metrics, state
from sumbatch.web.groups import get_task, group
from sumbatch.web.live import Live
from sumbatch.web.live import routes as live_routes
from sumbatch.web.openapi import openapi_schema
from sumbatch.web.responses import EXCEPTION_HANDLERS, JSONResponse, error
from sumbatch.web.submit import FSYNC_TIMEOUT_MS, create_group

log = logging.getLogger("sumbatch.api")

_encoder = msgspec.json.Encoder()
# Seconds any one call to Redis may take before the API answers 503: a hung server
# (SIGSTOP, a stalled host) must not hold requests for the client's whole patience.
REDIS_TIMEOUT = 1.0


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    partitions = await state.partitions(request)
    if not all([await store.workers_ready() for store in partitions]):
        return error(503, "the workers' consumer group does not exist yet", {"Retry-After": "1"})
    return JSONResponse({"status": "ready"})


async def openapi(request: Request) -> Response:
    return Response(request.state.openapi, media_type="application/json")


async def durable_problem(settings: Settings) -> str | None:
    """Why durable mode cannot run on the configured server, or None (also when Redis
    cannot be reached: then the first POST checks). For a clean refusal at start,
    before the app is served."""
    try:
        partitions = await open_partitions(
            settings, socket_connect_timeout=REDIS_TIMEOUT, socket_timeout=5
        )
    except RedisError as exc:
        if is_transient(exc):
            return None
        raise
    try:
        await partitions.stores[0].check_durable()
    except NotDurable as exc:
        return str(exc)
    except RedisError as exc:
        if is_transient(exc):
            return None
        raise
    finally:
        await partitions.aclose()
    return None


def create_app(settings: Settings) -> Starlette:
    live = Live(settings)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        lazy = LazyPartitions(
            settings,
            socket_connect_timeout=REDIS_TIMEOUT,
            socket_timeout=REDIS_TIMEOUT + (FSYNC_TIMEOUT_MS / 1000 if settings.durable else 0),
            # One resend for a pooled connection the server closed (it restarted), and
            # for a timeout: on a machine starved of CPU a healthy server's reply can
            # come (or be read) past one REDIS_TIMEOUT; a hung server gets its 503
            # after two. Every state-changing call of the API is safe to resend: the
            # submit resends itself (``web/submit.py``), a cancel finds its first run.
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError, RedisTimeoutError)),
        )
        try:
            try:
                partitions = await lazy.get()
                if settings.durable:
                    mode = await partitions.stores[0].check_durable()
                    log.info("durable mode: a POST is answered once it is fsynced (%s)", mode)
            except RedisError as exc:
                if not is_transient(exc):
                    raise
                log.warning("redis unavailable at start (%s); /readyz will say so", exc)
            except NotDurable as exc:
                log.error("%s", exc)
                raise
            yield {
                "settings": settings,
                "partitions": lazy,
                "openapi": _encoder.encode(openapi_schema(settings)),
                "live": live,
            }
        finally:
            await live.close()
            await lazy.aclose()

    routes = [
        Route("/grouptasks", create_group, methods=["POST"]),
        Route("/grouptasks/{group_task_id}", group, methods=["GET", "DELETE"]),
        Route("/grouptasks/{group_task_id}/events", live_routes.group_events, methods=["GET"]),
        Route("/events", live_routes.log_events, methods=["GET"]),
        Route("/tasks/{task_id}", get_task, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
    ]
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers=EXCEPTION_HANDLERS,
    )
    # For the server: streams end and waits answer as soon as it starts to stop.
    app.state.live = live
    metrics.install(app, settings)
    dashboard.install(app)
    docs.install(app)
    return app
