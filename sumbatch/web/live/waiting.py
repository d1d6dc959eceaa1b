"""Long-poll: answer once a group is processed (or a task has ended), or when the wait
is over, with no polling loop against Redis while nothing happens.

The feed says when the group's last task ended (GroupFinished) or the task ended; the
view says so once the projector has folded that in, usually milliseconds later. Only
in that window is the view read again, on a short backoff.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

from sumbatch.model import ids
from sumbatch.model.views import TERMINAL, GroupSummary, TaskView
from sumbatch.store import Store
from sumbatch.web.live.feed import Feed, Interrupted

V = TypeVar("V")

# Backoff of the view's reads between the end and the projector's fold.
SETTLE_FIRST = 0.0005
SETTLE_MAX = 0.02
_TASK_ENDS = frozenset({"TaskCompleted", "TaskFailed", "TaskRevoked"})


async def group_processed(store: Store, feed: Feed, gid: str, wait: float) -> GroupSummary | None:
    """The group's status once it is processed, or after ``wait`` seconds."""
    return await _until(
        feed,
        gid,
        wait,
        read=lambda: store.group_summary(gid),
        done=lambda view: view is None or view.processed,
        logged=lambda: store.group_finished_logged(gid),
        ends=lambda fields: fields.get("type") == "GroupFinished",
    )


async def task_ended(store: Store, feed: Feed, tid: str, wait: float) -> TaskView | None:
    """The task's status once it has ended, or after ``wait`` seconds."""
    where = ids.split_task_id(tid)
    if where is None:
        return None

    def ends(fields: dict[str, str]) -> bool:
        kind = fields.get("type")
        return kind == "GroupFinished" or (kind in _TASK_ENDS and fields.get("taskId") == tid)

    return await _until(
        feed,
        where[0],
        wait,
        read=lambda: store.task_view(tid),
        done=lambda view: view is None or view.state in TERMINAL,
        logged=lambda: store.task_ended(tid),
        ends=ends,
    )


async def _until(
    feed: Feed,
    group: str,
    wait: float,
    *,
    read: Callable[[], Awaitable[V]],
    done: Callable[[V], bool],
    logged: Callable[[], Awaitable[bool]],
    ends: Callable[[dict[str, str]], bool],
) -> V:
    """``read()`` once ``done`` says so, or after ``wait`` seconds. The listener comes
    first, then the reads: an end after them reaches the listener (``ends``), one before
    them is in the view already or in the log (``logged``)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    async with feed.listen(group) as listener:
        # Both at once: one round trip instead of two before the wait starts.
        view, ended = await asyncio.gather(read(), logged())
        if done(view):
            return view
        if ended:
            return await _settle(read, done, deadline)
        while (remaining := deadline - loop.time()) > 0:
            try:
                entry = await listener.next(remaining)
            except Interrupted:
                break
            if entry is None:
                break
            if ends(entry.fields):
                return await _settle(read, done, deadline)
    return await read()


async def _settle(
    read: Callable[[], Awaitable[V]], done: Callable[[V], bool], deadline: float
) -> V:
    """Read until the view says what the log already does, or the deadline."""
    delay = SETTLE_FIRST
    loop = asyncio.get_running_loop()
    while True:
        view = await read()
        if done(view) or loop.time() + delay > deadline:
            return view
        await asyncio.sleep(delay)
        delay = min(delay * 1.5, SETTLE_MAX)
