"""The read model's views: a group's (its counts, its results, its tasks' states by
letter) and one task's, as the fold keeps them and the API reads them; and the chunks
of CHUNK_TASKS tasks a stored view is kept in, loaded in part. Pure: the fold
(``projection``) changes these, the store keeps them."""

from __future__ import annotations

from typing import Literal

import msgspec

TaskState = Literal["PENDING", "STARTED", "RETRY", "FAILURE", "SUCCESS", "REVOKED"]

# One letter per task in GroupView.states; C is a SUCCESS served from the cache.
STATE_OF_LETTER: dict[str, TaskState] = {
    "P": "PENDING",
    "S": "STARTED",
    "R": "RETRY",
    "D": "SUCCESS",
    "C": "SUCCESS",
    "F": "FAILURE",
    "X": "REVOKED",
}
ENDED = frozenset("DCFX")
# Marks a task of a chunk that was not loaded (``projection.Views.partial``): no state of the fold,
# so a view holding one is never taken for a whole one.
UNLOADED = "?"
TERMINAL: frozenset[str] = frozenset({"FAILURE", "SUCCESS", "REVOKED"})


# Tasks per chunk of a stored view: a big running group's step rewrites the few chunks
# its outcomes touch, ~15 KB each, not the whole view (~150 KB for 10,000 tasks); and a
# small group's view stays one chunk. A power of two, so a chunk's tasks are a range.
CHUNK_TASKS = 1024


def chunk_of(index: int) -> int:
    """The chunk of a stored view that holds a task, by its index."""
    return index // CHUNK_TASKS


def chunk_count(tasks_total: int) -> int:
    return -(-tasks_total // CHUNK_TASKS)


class GroupCounts(msgspec.Struct, rename="camel", kw_only=True):
    """A group view less its tasks: what a stored view keeps in its ``summary``."""

    group_task_id: str
    tasks_total: int
    tasks_completed: int = 0
    tasks_failed: int = 0
    tasks_revoked: int = 0
    cancelled: bool = False
    # Set by GroupFinished: the write side's word (its ledger, which also answers a
    # DELETE with 409) that every task has ended. The one source of "processed"; the
    # counts above are for progress.
    finished: bool = False

    @property
    def processed(self) -> bool:
        return self.finished

    @property
    def succeeded(self) -> bool:
        """No task failed or was revoked: ``results`` has every task's sum in the end."""
        return self.tasks_failed == 0 and self.tasks_revoked == 0

    def counts_ok(self) -> bool:
        """Whether the counts are ones the fold can reach."""
        total = self.tasks_total
        return (
            0 <= self.tasks_failed + self.tasks_revoked <= self.tasks_completed <= total
            and self.tasks_failed >= 0
            and self.tasks_revoked >= 0
            and (not self.finished or self.tasks_completed == total)
        )


class GroupSummary(GroupCounts, kw_only=True):
    """What GET /grouptasks/{id} needs of a group view: reading only this part of a
    stored view skips the per-task details, which big groups make long."""

    # By submission index; None until that task succeeded.
    results: list[int | None] = msgspec.field(default_factory=list)


class GroupView(GroupSummary, kw_only=True):
    # Per task, by submission index.
    states: list[str] = msgspec.field(default_factory=list)
    attempts: list[int] = msgspec.field(default_factory=list)
    errors: dict[int, str] = msgspec.field(default_factory=dict)

    def well_formed(self) -> bool:
        """Whether this view has the shape the fold keeps (one stored by hand may not:
        then it counts as absent rather than fail the fold or a read)."""
        total = self.tasks_total
        return (
            len(self.states) == len(self.results) == len(self.attempts) == total
            and all(letter in STATE_OF_LETTER for letter in self.states)
            and self.counts_ok()
        )

    @classmethod
    def submitted(cls, group_task_id: str, tasks_total: int) -> GroupView:
        return cls(
            group_task_id=group_task_id,
            tasks_total=tasks_total,
            states=["P"] * tasks_total,
            results=[None] * tasks_total,
            attempts=[0] * tasks_total,
        )


class TaskView(msgspec.Struct, kw_only=True):
    task_id: str
    group_task_id: str
    index: int
    state: TaskState
    result: int | None
    from_cache: bool
    attempts: int
    error: str | None

    @classmethod
    def of(
        cls,
        task_id: str,
        group_task_id: str,
        index: int,
        letter: str,
        result: int | None,
        attempts: int,
        error: str | None,
    ) -> TaskView:
        """A task's view from what a group view keeps of it: its state's letter (C, a
        SUCCESS from the cache), its result, attempts and error."""
        return cls(
            task_id=task_id,
            group_task_id=group_task_id,
            index=index,
            state=STATE_OF_LETTER[letter],
            result=result,
            from_cache=letter == "C",
            attempts=attempts,
            error=error,
        )


def task_view(group: GroupView, task_id: str, index: int) -> TaskView | None:
    if not 0 <= index < group.tasks_total:
        return None
    return TaskView.of(
        task_id,
        group.group_task_id,
        index,
        group.states[index],
        group.results[index],
        group.attempts[index],
        group.errors.get(index),
    )
