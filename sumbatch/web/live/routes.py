"""HTTP handlers of the event streams."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Callable

from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from sumbatch.model import ids
from sumbatch.web import state
from sumbatch.web.live import Live, sse, streams
from sumbatch.web.live.feed import Feed
from sumbatch.web.responses import error

HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def group_events(request: Request) -> Response:
    gid = ids.parse_uuid(request.path_params["group_task_id"])
    partitions = await state.partitions(request)
    if gid is None or await partitions.of(gid).group_summary(gid) is None:
        return error(404, "no such groupTaskId")
    last = request.headers.get("last-event-id")
    try:
        after = None if not last else sse.parse_entry_id(last.strip())
    except ValueError:
        return error(400, "Last-Event-ID must be a stream entry id such as 1700000000000-0")
    store = partitions.of(gid)
    if after is not None:
        finished = await store.group_finished_id(gid)
        if finished is not None and ids.entry_order(finished) <= ids.entry_order(after):
            # Nothing comes past a group's end. 204 tells an EventSource to stop: a
            # stream that closed, or stayed open, would have it reconnect for ever.
            return Response(status_code=204)
    live: Live = request.state.live
    return await _stream(
        request, lambda feed: streams.group_events(store, feed, gid, after, live.heartbeat)
    )


async def log_events(request: Request) -> Response:
    last = request.headers.get("last-event-id") or request.query_params.get("from")
    try:
        after = None if last in (None, "", "$") else sse.parse_entry_id(last.strip())
    except ValueError:
        return error(422, "from must be an entry id such as 1700000000000-0, a time in ms, or $")
    partitions = await state.partitions(request)
    live: Live = request.state.live
    stores = list(partitions)
    return await _stream(
        request, lambda feed: streams.log_events(stores, feed, after, live.heartbeat)
    )


async def _stream(
    request: Request, body: Callable[[Feed], AsyncGenerator[bytes, None]]
) -> Response:
    live: Live = request.state.live
    if live.closing:
        return error(503, "the server is stopping", {"Retry-After": "1"})
    feed = live.feed(list(await state.partitions(request)))
    if not live.streams.take():
        return error(503, f"{live.streams.limit} event streams are open; retry later",
                     {"Retry-After": "5"})  # fmt: skip
    release = _Once(live.streams.give)
    # Released when the body ends, and also after the response in any case: a client
    # that leaves before the body starts never runs the body's own cleanup.
    return StreamingResponse(
        _releasing(body(feed), release),
        media_type="text/event-stream",
        headers=HEADERS,
        background=BackgroundTask(release),
    )


async def _releasing(
    body: AsyncGenerator[bytes, None], release: Callable[[], None]
) -> AsyncIterator[bytes]:
    try:
        async for chunk in body:
            yield chunk
    finally:
        release()
        await body.aclose()


class _Once:
    def __init__(self, action: Callable[[], None]) -> None:
        self.action: Callable[[], None] | None = action

    def __call__(self) -> None:
        action, self.action = self.action, None
        if action is not None:
            action()
