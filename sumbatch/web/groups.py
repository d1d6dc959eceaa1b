"""A group or a task once submitted: its status (long-polled, if asked, until it has
ended) and the group's cancellation."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from sumbatch.config import Settings
from sumbatch.model import ids
from sumbatch.model.views import TERMINAL
from sumbatch.model.wire import Cancelled, GroupStatus, TaskStatus
from sumbatch.store import CancelOutcome
from sumbatch.web import state
from sumbatch.web.auth import authorised, unauthorised
from sumbatch.web.live import Live, sse, waiting
from sumbatch.web.responses import JSONResponse, error


async def group(request: Request) -> Response:
    # One route for both methods, so a 405 names them both in Allow.
    return await (cancel_group if request.method == "DELETE" else get_group)(request)


async def cancel_group(request: Request) -> Response:
    settings: Settings = request.state.settings
    if not authorised(request, settings):
        return unauthorised()
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
