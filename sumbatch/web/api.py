"""The REST API: validates submissions, appends them as events, reads projections.
It never computes a task."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import msgspec
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from sumbatch.config import Settings
from sumbatch.model import ids
from sumbatch.model.submission import Submission
from sumbatch.model.views import TERMINAL, GroupView
from sumbatch.model.wire import (
    MAX_IDEMPOTENCY_KEY,
    Cancelled,
    GroupCreated,
    GroupIn,
    GroupStatus,
    TaskStatus,
)
from sumbatch.outage import is_transient
from sumbatch.store import CancelOutcome, NotDurable
from sumbatch.store.partitions import LazyPartitions, open_partitions
from sumbatch.web import dashboard, docs, metrics, state
from sumbatch.web.live import Live, sse, waiting
from sumbatch.web.live import routes as live_routes
from sumbatch.web.openapi import openapi_schema
from sumbatch.web.responses import EXCEPTION_HANDLERS, JSONResponse, error

log = logging.getLogger("sumbatch.api")

_encoder = msgspec.json.Encoder()
_group_decoder = msgspec.json.Decoder(GroupIn)
_created_decoder = msgspec.json.Decoder(GroupCreated)
# Seconds any one call to Redis may take before the API answers 503: a hung server
# (SIGSTOP, a stalled host) must not hold requests for the client's whole patience.
REDIS_TIMEOUT = 1.0
# How long durable mode waits for the fsync; the socket timeout is raised above it, so
# a slow fsync answers "not confirmed", never a timeout.
FSYNC_TIMEOUT_MS = 2000


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"body larger than {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise HTTPException(413, f"body larger than {limit} bytes")
    return bytes(body)


class _Duplicate(Exception):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise _Duplicate(key)
        seen[key] = value
    return seen


def _duplicate_key(body: bytes, tasks: int) -> str | None:
    """A key given twice in one object (msgspec, like most parsers, keeps the last one
    silently; an ambiguous body is refused instead). The body already decoded to a
    valid submission, so its only keys are ``tasks``, ``paramA`` and ``paramB``: with
    no escapes in it, counting them is exact and cheap; otherwise parse it again."""
    if (
        b"\\" not in body
        and body.count(b'"tasks"') == 1
        and body.count(b'"paramA"') == tasks
        and body.count(b'"paramB"') == tasks
    ):
        return None
    try:
        json.loads(body, object_pairs_hook=_no_duplicates)
    except _Duplicate as exc:
        return str(exc)
    return None


def _authorised(request: Request, settings: Settings) -> bool:
    if not settings.api_token:
        return True
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(
        token.strip().encode(), settings.api_token.encode()
    )


def _unauthorised() -> JSONResponse:
    return error(401, "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"})


async def create_group(request: Request) -> Response:
    settings: Settings = request.state.settings
    if not _authorised(request, settings):
        return _unauthorised()
    content_type = request.headers.get("content-type", "")
    if content_type.split(";")[0].strip().lower() != "application/json":
        return error(415, "Content-Type must be application/json")
    idem_key = request.headers.get("idempotency-key")
    if idem_key is not None and not 0 < len(idem_key) <= MAX_IDEMPOTENCY_KEY:
        return error(400, f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} characters")
    body = await _read_body(request, settings.max_body_bytes)
    try:
        submitted = _group_decoder.decode(body)
    except msgspec.ValidationError as exc:
        return error(422, f"invalid request: {exc}")
    except msgspec.DecodeError as exc:
        return error(400, f"malformed JSON: {exc}")
    duplicate = _duplicate_key(body, len(submitted.tasks))
    if duplicate is not None:
        return error(400, f"malformed JSON: duplicate key `{duplicate}`")
    if len(submitted.tasks) > settings.max_tasks_per_group:
        return error(413, f"at most {settings.max_tasks_per_group} tasks per group - at `$.tasks`")
    # Hashed: a client's header never becomes part of a key name as it is.
    key_hash = None if idem_key is None else hashlib.sha256(idem_key.encode()).hexdigest()
    partitions = await state.partitions(request)
    partition = partitions.for_new_group(key_hash)
    submission = Submission.of(submitted.tasks, partition)
    created = submission.created
    answer = _encoder.encode(created)
    idempotency = None
    if key_hash is not None:
        idempotency = (key_hash, f"{hashlib.sha256(body).hexdigest()} {answer.decode()}")
    store = partitions.stores[partition]
    if settings.durable and store.durable is None:
        try:  # Redis was away when the API started
            await store.check_durable()
        except NotDurable as exc:
            log.error("%s", exc)
            return error(503, f"{exc}", {"Retry-After": "60"})
    group = GroupView.submitted(created.group_task_id, len(submitted.tasks))
    fsync_ms = FSYNC_TIMEOUT_MS if settings.durable else None
    written = await store.submit(submission.event, group, idempotency, fsync_ms)
    if written.fsynced is False:
        where = "by a replica" if store.durable == "replica" else "on disk"
        return error(503, f"not confirmed {where} in time; retry with the same Idempotency-Key",
                     {"Retry-After": "1"})  # fmt: skip
    if written.earlier is None:
        return Response(answer, media_type="application/json")
    assert idempotency is not None
    earlier_hash, _, earlier_answer = written.earlier.partition(" ")
    if earlier_hash != idempotency[1].partition(" ")[0]:
        return error(422, "Idempotency-Key was used before with a different body")
    replay = _created_decoder.decode(earlier_answer)
    return JSONResponse(replay, headers={"Idempotent-Replayed": "true"})


async def cancel_group(request: Request) -> Response:
    settings: Settings = request.state.settings
    if not _authorised(request, settings):
        return _unauthorised()
    gid = ids.parse_uuid(request.path_params["group_task_id"])
    outcome = (
        CancelOutcome("unknown")
        if gid is None or not ids.is_group_id(gid)
        else await (await state.partitions(request)).of(gid).cancel(gid)
    )
    if outcome.status == "unknown":
        return error(404, "no such groupTaskId")
    if outcome.status == "finished":
        return error(409, "the group has already finished: nothing to cancel")
    assert gid is not None
    return JSONResponse(
        Cancelled(group_task_id=gid, grouptask_cancelled=True, tasks_revoked=outcome.revoked),
        status_code=202,
    )


async def group(request: Request) -> Response:
    # One route for both methods, so a 405 names them both in Allow.
    return await (cancel_group if request.method == "DELETE" else get_group)(request)


async def get_group(request: Request) -> Response:
    try:
        wait = sse.parse_wait(request.query_params.get("wait"))
    except ValueError:
        return _bad_wait()
    gid = ids.parse_uuid(request.path_params["group_task_id"])
    view = None
    if gid is not None:
        partitions = await state.partitions(request)
        store = partitions.of(gid)
        view = await store.group_summary(gid)
        if view is not None and not view.processed and wait > 0:
            live: Live = request.state.live
            view = await live.waited(
                list(partitions), view, lambda feed: waiting.group_processed(store, feed, gid, wait)
            )
    if view is None:
        return error(404, "no such groupTaskId")
    return JSONResponse(GroupStatus.of(view))


async def get_task(request: Request) -> Response:
    try:
        wait = sse.parse_wait(request.query_params.get("wait"))
    except ValueError:
        return _bad_wait()
    tid = ids.parse_uuid(request.path_params["task_id"])
    view = None
    if tid is not None:
        partitions = await state.partitions(request)
        store = partitions.of(tid)
        view = await store.task_view(tid)
        if view is not None and view.state not in TERMINAL and wait > 0:
            live: Live = request.state.live
            view = await live.waited(
                list(partitions), view, lambda feed: waiting.task_ended(store, feed, tid, wait)
            )
    if view is None:
        return error(404, "no such taskId")
    return JSONResponse(TaskStatus.of(view))


def _bad_wait() -> Response:
    return error(422, f"wait must be a number of seconds from 0 to {sse.MAX_WAIT:g}")


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
            # One retry for a pooled connection the server closed (it restarted); none
            # for a timeout: a hung server gets its 503 after one REDIS_TIMEOUT.
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
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
