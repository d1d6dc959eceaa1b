"""The REST API: validates submissions, appends them as events, reads projections.
It never computes a task."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import msgspec
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from sumbatch.config import Settings
from sumbatch.events import GroupSubmitted, Keys, TaskSubmitted
from sumbatch.projection import GroupView, TaskView, fold
from sumbatch.store import Store, connect

INT64 = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]


class TaskIn(msgspec.Struct, rename="camel", forbid_unknown_fields=True):
    param_a: INT64
    param_b: INT64


class GroupIn(msgspec.Struct, forbid_unknown_fields=True):
    tasks: Annotated[list[TaskIn], msgspec.Meta(min_length=1)]


class GroupCreated(msgspec.Struct, rename="camel"):
    group_task_id: str
    task_ids: list[str]


class GroupStatus(msgspec.Struct, rename="camel"):
    group_task_id: str
    grouptask_processed: bool
    grouptask_succeeded: bool
    results: list[int]
    tasks_completed: int
    tasks_total: int
    tasks_failed: int

    @classmethod
    def of(cls, view: GroupView) -> GroupStatus:
        return cls(
            group_task_id=view.group_task_id,
            grouptask_processed=view.processed,
            grouptask_succeeded=view.succeeded,
            results=[r for r in view.results if r is not None],
            tasks_completed=view.tasks_completed,
            tasks_total=view.tasks_total,
            tasks_failed=view.tasks_failed,
        )


class TaskStatus(msgspec.Struct, rename="camel"):
    result: int | None
    result_ready: bool
    task_id: str
    task_state: str
    task_succeeded: bool
    group_task_id: str
    from_cache: bool
    attempts: int
    error: str | None

    @classmethod
    def of(cls, view: TaskView) -> TaskStatus:
        ready = view.state in ("SUCCESS", "FAILURE", "REVOKED")
        return cls(
            result=view.result,
            result_ready=ready,
            task_id=view.task_id,
            task_state=view.state,
            task_succeeded=view.state == "SUCCESS",
            group_task_id=view.group_task_id,
            from_cache=view.from_cache,
            attempts=view.attempts,
            error=view.error,
        )


_encoder = msgspec.json.Encoder()
_group_decoder = msgspec.json.Decoder(GroupIn)


class JSONResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return _encoder.encode(content)


def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "status": status}, status_code=status, headers=headers)


def new_submission(tasks: list[TaskIn]) -> tuple[GroupCreated, list[Any]]:
    """The events one POST appends, and the response that names their ids."""
    gid = str(uuid.uuid4())
    tids = [str(uuid.uuid4()) for _ in tasks]
    events: list[Any] = [GroupSubmitted(group_task_id=gid, tasks_total=len(tasks))]
    events += [
        TaskSubmitted(task_id=tid, group_task_id=gid, index=i, param_a=t.param_a, param_b=t.param_b)
        for i, (tid, t) in enumerate(zip(tids, tasks, strict=True))
    ]
    return GroupCreated(group_task_id=gid, task_ids=tids), events


def _valid_id(text: str) -> str | None:
    try:
        return str(uuid.UUID(text))
    except ValueError:
        return None


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


async def create_group(request: Request) -> Response:
    settings: Settings = request.state.settings
    content_type = request.headers.get("content-type", "")
    if content_type.split(";")[0].strip().lower() != "application/json":
        return error(415, "Content-Type must be application/json")
    body = await _read_body(request, settings.max_body_bytes)
    try:
        submitted = _group_decoder.decode(body)
    except msgspec.ValidationError as exc:
        return error(422, f"invalid request: {exc}")
    except msgspec.DecodeError as exc:
        return error(400, f"malformed JSON: {exc}")
    if len(submitted.tasks) > settings.max_tasks_per_group:
        return error(413, f"at most {settings.max_tasks_per_group} tasks per group - at `$.tasks`")
    created, events = new_submission(submitted.tasks)
    store: Store = request.state.store
    await store.submit(events, fold(events))
    return JSONResponse(created)


async def get_group(request: Request) -> Response:
    gid = _valid_id(request.path_params["group_task_id"])
    store: Store = request.state.store
    view = None if gid is None else await store.group_view(gid)
    if view is None:
        return error(404, "no such groupTaskId")
    return JSONResponse(GroupStatus.of(view))


async def get_task(request: Request) -> Response:
    tid = _valid_id(request.path_params["task_id"])
    store: Store = request.state.store
    view = None if tid is None else await store.task_view(tid)
    if view is None:
        return error(404, "no such taskId")
    return JSONResponse(TaskStatus.of(view))


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    store: Store = request.state.store
    await store.redis.ping()
    return JSONResponse({"status": "ready"})


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return error(exc.status_code, exc.detail, dict(exc.headers or {}))


async def _redis_down(request: Request, exc: Exception) -> Response:
    return error(503, "storage unavailable, retry later", {"Retry-After": "1"})


def create_app(settings: Settings) -> Starlette:
    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        redis = connect(settings.client_url, socket_timeout=5)
        try:
            yield {"settings": settings, "store": Store(redis, Keys(settings.namespace))}
        finally:
            await redis.aclose()

    routes = [
        Route("/grouptasks", create_group, methods=["POST"]),
        Route("/grouptasks/{group_task_id}", get_group, methods=["GET"]),
        Route("/tasks/{task_id}", get_task, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
    ]
    return Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={
            HTTPException: _http_error,
            RedisConnectionError: _redis_down,
            RedisTimeoutError: _redis_down,
        },
    )
