"""What crosses the wire: request and response bodies, validated by their types."""

from __future__ import annotations

from typing import Annotated

import msgspec

from sumbatch.model.views import TERMINAL, GroupSummary, TaskView

# The longest Idempotency-Key header accepted (the API refuses a longer one with 400).
MAX_IDEMPOTENCY_KEY = 255

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
    tasks_revoked: int
    grouptask_cancelled: bool

    @classmethod
    def of(cls, view: GroupSummary) -> GroupStatus:
        return cls(
            group_task_id=view.group_task_id,
            grouptask_processed=view.processed,
            grouptask_succeeded=view.succeeded,
            results=[r for r in view.results if r is not None],
            tasks_completed=view.tasks_completed,
            tasks_total=view.tasks_total,
            tasks_failed=view.tasks_failed,
            tasks_revoked=view.tasks_revoked,
            grouptask_cancelled=view.cancelled,
        )


class Cancelled(msgspec.Struct, rename="camel"):
    group_task_id: str
    grouptask_cancelled: bool
    tasks_revoked: int


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
        ready = view.state in TERMINAL
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


class ErrorBody(msgspec.Struct):
    error: str
    status: int
