"""Group and task status as a pure fold of events. No I/O: the projector, the API's
read-your-writes path and ``sumbatch replay`` all run this same code."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

import msgspec

from sumbatch.events import (
    AnyEvent,
    GroupCancelled,
    GroupFinished,
    GroupSubmitted,
    TaskCompleted,
    TaskDeadLettered,
    TaskFailed,
    TaskRetried,
    TaskRevoked,
    TaskStarted,
    TaskSubmitted,
)

TaskState = Literal["PENDING", "STARTED", "RETRY", "FAILURE", "SUCCESS", "REVOKED"]
TERMINAL: frozenset[str] = frozenset({"FAILURE", "SUCCESS", "REVOKED"})


class GroupView(msgspec.Struct, rename="camel", kw_only=True):
    group_task_id: str
    tasks_total: int
    tasks_completed: int = 0
    tasks_failed: int = 0
    tasks_revoked: int = 0
    cancelled: bool = False
    # By submission index; None until that task succeeded.
    results: list[int | None] = msgspec.field(default_factory=list)

    @property
    def processed(self) -> bool:
        return self.tasks_completed >= self.tasks_total

    @property
    def succeeded(self) -> bool:
        """No task failed or was revoked: ``results`` has every task's sum in the end."""
        return self.tasks_failed == 0 and self.tasks_revoked == 0


class TaskView(msgspec.Struct, rename="camel", kw_only=True):
    task_id: str
    group_task_id: str
    index: int
    state: TaskState = "PENDING"
    result: int | None = None
    from_cache: bool = False
    attempts: int = 0
    error: str | None = None


@dataclass
class Views:
    """The slice of the read model a fold works on."""

    groups: dict[str, GroupView] = field(default_factory=dict)
    tasks: dict[str, TaskView] = field(default_factory=dict)


def touched(event: AnyEvent) -> tuple[str, str | None]:
    """(group id, task id or None) an event changes: what a projector must load."""
    task_id = getattr(event, "task_id", None)
    return event.group_task_id, task_id


def apply(views: Views, event: AnyEvent) -> None:
    """Fold one event into ``views``. Events for views that are absent are ignored;
    a second outcome for an ended task changes nothing."""
    match event:
        case GroupSubmitted(group_task_id=gid, tasks_total=total):
            views.groups[gid] = GroupView(
                group_task_id=gid, tasks_total=total, results=[None] * total
            )
        case TaskSubmitted(task_id=tid, group_task_id=gid, index=index):
            views.tasks[tid] = TaskView(task_id=tid, group_task_id=gid, index=index)
        case TaskStarted(task_id=tid, attempt=attempt):
            task = views.tasks.get(tid)
            if task is not None and task.state not in TERMINAL:
                task.state = "STARTED"
                task.attempts = max(task.attempts, attempt)
        case TaskRetried(task_id=tid, attempt=attempt, error=error):
            task = views.tasks.get(tid)
            if task is not None and task.state not in TERMINAL:
                task.state = "RETRY"
                task.attempts = max(task.attempts, attempt)
                task.error = error
        case TaskCompleted(task_id=tid, group_task_id=gid, result=result):
            task = _end(views, tid)
            if task is not None:
                task.state = "SUCCESS"
                task.result = result
                task.from_cache = event.from_cache
                task.error = None
                group = views.groups.get(gid)
                if group is not None:
                    group.tasks_completed += 1
                    group.results[task.index] = result
        case TaskFailed(task_id=tid, group_task_id=gid, attempts=attempts, error=error):
            task = _end(views, tid)
            if task is not None:
                task.state = "FAILURE"
                task.attempts = attempts
                task.error = error
                group = views.groups.get(gid)
                if group is not None:
                    group.tasks_completed += 1
                    group.tasks_failed += 1
        case TaskRevoked(task_id=tid, group_task_id=gid):
            task = _end(views, tid)
            if task is not None:
                task.state = "REVOKED"
                group = views.groups.get(gid)
                if group is not None:
                    group.tasks_completed += 1
                    group.tasks_revoked += 1
        case GroupCancelled(group_task_id=gid):
            group = views.groups.get(gid)
            if group is not None:
                group.cancelled = True
        case GroupFinished() | TaskDeadLettered():
            # Derivable from the views; kept in the log for consumers and audit.
            pass


def _end(views: Views, task_id: str) -> TaskView | None:
    task = views.tasks.get(task_id)
    if task is None or task.state in TERMINAL:
        return None
    return task


def fold(events: Iterable[AnyEvent], views: Views | None = None) -> Views:
    views = Views() if views is None else views
    for event in events:
        apply(views, event)
    return views
