"""Submitting groups straight to a store and reading what became of them: the
streams, when an entry was written, which worker holds which work, whether the groups
are processed."""

from __future__ import annotations

from typing import Any, cast

from sumbatch.model.events import TasksSubmitted, TaskSubmitted, from_fields, tasks_of
from sumbatch.model.ids import entry_order
from sumbatch.model.keys import WORKER_GROUP
from sumbatch.model.submission import Submission
from sumbatch.model.views import GroupView
from sumbatch.model.wire import TaskIn
from sumbatch.store import Entry, Store

Groups = list[tuple[str, list[str]]]
"""Submitted groups: each group's id and its task ids."""


def body_of(pairs: list[tuple[int, int]]) -> dict[str, Any]:
    """The POST /grouptasks body of these (paramA, paramB) pairs."""
    return {"tasks": [{"paramA": a, "paramB": b} for a, b in pairs]}


async def submit(store: Store, pairs: list[tuple[int, int]]) -> tuple[str, list[str]]:
    """Submit the group straight to the store (its partition), as the API does; (group
    id, task ids)."""
    sub = Submission.of([TaskIn(a, b) for a, b in pairs], store.keys.partition)
    created = sub.created
    await store.submit(sub.event, GroupView.submitted(created.group_task_id, len(pairs)))
    return created.group_task_id, created.task_ids


async def stream_entries(store: Store, key: str) -> list[Entry]:
    """The whole stream ``key``: each entry's id and fields."""
    return cast(list[Entry], await store.redis.xrange(key))


def entry_ms(entry_id: str) -> int:
    """When a stream entry was written: the ms timestamp its id starts with, by the
    server's clock (the wall clock of this host, for a server running here)."""
    return entry_order(entry_id)[0]


async def pending_by_consumer(store: Store) -> dict[str, int]:
    """How many work entries each worker holds (delivered, not acknowledged), by its
    consumer name; a worker that holds none may be missing."""
    summary: dict[str, Any] = await store.redis.xpending(store.keys.work, WORKER_GROUP)
    return {c["name"]: int(c["pending"]) for c in summary["consumers"] or []}


async def tasks_held_by(store: Store, consumer: str) -> list[str]:
    """The ids of the tasks ``consumer`` holds and that have not ended: the tasks of
    the work entries it holds (delivered, not acknowledged) whose fence bit is not set
    (an entry waits for the last of its tasks; the others may have ended)."""
    pending: list[dict[str, Any]] = await store.redis.xpending_range(
        store.keys.work, WORKER_GROUP, min="-", max="+", count=10_000, consumername=consumer
    )
    held = []
    for entry in pending:
        entry_id = entry["message_id"]
        found = cast(list[Entry], await store.redis.xrange(store.keys.work, entry_id, entry_id))
        for _, fields in found:
            work = from_fields(fields)
            tasks = tasks_of(work) if isinstance(work, TasksSubmitted) else [work]
            held += [cast(TaskSubmitted, task).task_id for task in tasks]
    return [tid for tid in held if not await store.task_ended(tid)]


async def all_processed(store: Store, groups: Groups) -> bool:
    """Whether every one of ``groups`` has a view that says processed."""
    for gid, _ in groups:
        view = await store.group_view(gid)
        if view is None or not view.processed:
            return False
    return True
