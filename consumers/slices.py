"""What a work entry holds: the tasks in it, each with its key, or why no worker can
run it (it is then dead-lettered)."""

from __future__ import annotations

from typing import NamedTuple

import msgspec

from sumbatch.model import ids
from sumbatch.model.events import (
    AnyEvent,
    TasksSubmitted,
    TaskSubmitted,
    from_fields,
    tasks_of,
)
from sumbatch.store import task_key

WRONG_TASK_ID = "its taskId is not the one its groupTaskId and index name"
NOT_A_SLICE = "not a slice of a group's tasks as SUBMIT writes them"

# A task taken from a work entry: its key (``store.task_key``) and what it runs.
Task = tuple[str, TaskSubmitted]


class Refusal(NamedTuple):
    """Why no worker can run a work entry: the dead letter's kind and reason."""

    kind: str
    why: str


def names_itself(item: TaskSubmitted) -> bool:
    """Whether a work entry's task id is its group's id with its index (ids.py)."""
    return item.task_id == ids.task_id(item.group_task_id, item.index)


def tasks_in(entry_id: str, fields: dict[str, str]) -> list[Task] | Refusal:
    """The tasks a work entry holds, each with its key; or why none can run."""
    try:
        item: AnyEvent | None = from_fields(fields)
    except msgspec.ValidationError:
        item = None
    if isinstance(item, TasksSubmitted):
        try:
            return [(task_key(entry_id, task.index), task) for task in tasks_of(item)]
        except ValueError:
            return Refusal("RefusedWorkEntry", NOT_A_SLICE)
    if isinstance(item, TaskSubmitted) and not names_itself(item):
        # Its outcome would be logged for another task than its fence bit's: refused,
        # as the scripts refuse an index outside the group.
        return Refusal("RefusedWorkEntry", WRONG_TASK_ID)
    if isinstance(item, TaskSubmitted):
        return [(entry_id, item)]
    # Not a task we can run: kept for inspection, never blocking the batch.
    return Refusal("UnreadableWorkEntry", "")
