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

from sumbatch import ids
from sumbatch.live.feed import Feed, Interrupted
from sumbatch.projection import TERMINAL, GroupSummary, TaskView
from sumbatch.store import Store

V = TypeVar("V")

# Backoff of the view's reads between the end and the projector's fold.
SETTLE_FIRST = 0.0005
SETTLE_MAX = 0.02
_TASK_ENDS = frozenset({"TaskCompleted", "TaskFailed", "TaskRevoked"})


async def group_processed(store: Store, feed: Feed, gid: str, wait: float) -> GroupSummary | None:
    """The group's status once it is processed, or after ``wait`` seconds."""
    deadline = asyncio.get_running_loop().time() + wait

    async def read() -> GroupSummary | None:
        return await store.group_summary(gid)

    def done(view: GroupSummary | None) -> bool:
        return view is None or view.processed

    async with feed.listen(gid) as listener:
        view = await read()
        if done(view):
            return view
        if await store.group_finished_logged(gid):
            return await _settle(read, done, deadline)
        while (remaining := deadline - asyncio.get_running_loop().time()) > 0:
            try:
                entry = await listener.next(remaining)
            except Interrupted:
                break
            if entry is None:
                break
            if entry.fields.get("type") == "GroupFinished":
                return await _settle(read, done, deadline)
    return await read()


async def task_ended(store: Store, feed: Feed, tid: str, wait: float) -> TaskView | None:
    """The task's status once it has ended, or after ``wait`` seconds."""
    deadline = asyncio.get_running_loop().time() + wait
    where = ids.split_task_id(tid)
    if where is None:
        return None

    async def read() -> TaskView | None:
        return await store.task_view(tid)

    def done(view: TaskView | None) -> bool:
        return view is None or view.state in TERMINAL

    async with feed.listen(where[0]) as listener:
        view = await read()
        if done(view):
            return view
        if await store.task_ended(tid):
            return await _settle(read, done, deadline)
        while (remaining := deadline - asyncio.get_running_loop().time()) > 0:
            try:
                entry = await listener.next(remaining)
            except Interrupted:
                break
            if entry is None:
                break
            kind = entry.fields.get("type")
            if (kind in _TASK_ENDS and entry.fields.get("taskId") == tid) or (
                kind == "GroupFinished"
            ):
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
