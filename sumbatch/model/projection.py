"""Group and task status as a pure fold of events. No I/O: the projector and
``sumbatch replay`` run this same code; the API reads the views they store.

The log can hold entries the fold cannot apply (written by hand, or by another
version): ``fold_entries`` checks each event against the group it names and sets
aside what it cannot apply, with the reason, so that one bad entry never stalls the
projector.

One view per group holds its tasks too, by submission index. The store keeps it in
chunks of CHUNK_TASKS tasks, and the projector loads only the chunks a batch of events
touches (``Views.partial``): the fold never reads a task outside them (``problem``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import msgspec

from sumbatch.model import ids
from sumbatch.model.events import (
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
    from_fields,
)

Entry = tuple[str, dict[str, str]]

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
# Marks a task of a chunk that was not loaded (``Views.partial``): no state of the fold,
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


@dataclass
class Views:
    """The slice of the read model a fold works on: group views by id.

    ``partial`` names the views loaded in part, with the chunks loaded: their other
    tasks are UNLOADED, which the store never writes back. A view not named there is
    whole; GroupSubmitted makes one whole afresh."""

    groups: dict[str, GroupView] = field(default_factory=dict)
    partial: dict[str, frozenset[int]] = field(default_factory=dict)


def apply(views: Views, event: AnyEvent) -> None:
    """Fold one event into ``views``. Events of absent groups are ignored; a second
    outcome for an ended task changes nothing. An index outside its group is the
    caller's to prevent (``problem``)."""
    if isinstance(event, GroupSubmitted):
        views.groups[event.group_task_id] = GroupView.submitted(
            event.group_task_id, event.tasks_total
        )
        views.partial.pop(event.group_task_id, None)
        return
    group = views.groups.get(event.group_task_id)
    if group is None:
        return
    match event:
        case TaskStarted(index=i, attempt=attempt) if group.states[i] not in ENDED:
            group.states[i] = "S"
            group.attempts[i] = max(group.attempts[i], attempt)
        case TaskRetried(index=i, attempt=attempt, error=error) if group.states[i] not in ENDED:
            group.states[i] = "R"
            group.attempts[i] = max(group.attempts[i], attempt)
            group.errors[i] = error
        case TaskCompleted(index=i, result=result) if group.states[i] not in ENDED:
            group.states[i] = "C" if event.from_cache else "D"
            group.results[i] = result
            group.attempts[i] = max(group.attempts[i], event.attempt)
            group.errors.pop(i, None)
            group.tasks_completed += 1
        case TaskFailed(index=i, attempts=attempts, error=error) if group.states[i] not in ENDED:
            group.states[i] = "F"
            group.attempts[i] = attempts
            group.errors[i] = error
            group.tasks_completed += 1
            group.tasks_failed += 1
        case TaskRevoked(index=i) if group.states[i] not in ENDED:
            group.states[i] = "X"
            group.tasks_completed += 1
            group.tasks_revoked += 1
        case GroupCancelled():
            group.cancelled = True
        case GroupFinished():
            group.finished = True
        case TaskSubmitted() | TaskDeadLettered():
            # Covered by GroupSubmitted, or derivable; kept in the log for readers.
            pass
        case _:
            # A late event for an ended task: the fence already made it a no-op.
            pass


@dataclass(frozen=True)
class SetAside:
    """A log entry the fold could not apply, and why."""

    entry_id: str
    reason: str
    fields: dict[str, str]


def problem(views: Views, event: AnyEvent) -> str | None:
    """Why ``event`` cannot be applied to ``views``, or None when it can. ``views``
    must hold the group the event names, if it exists."""
    gid = event.group_task_id
    if isinstance(event, GroupSubmitted):
        if ids.parse_uuid(gid) != gid or not ids.is_group_id(gid):
            return f"groupTaskId {gid!r} is not a group id"
        if event.tasks_total < 1:
            return f"tasksTotal {event.tasks_total} is not a positive count"
        if not len(event.params_a.split()) == len(event.params_b.split()) == event.tasks_total:
            return "paramsA and paramsB do not hold tasksTotal values each"
        return None
    group = views.groups.get(gid)
    if group is None:
        return f"unknown group {gid} (never submitted, or expired)"
    if isinstance(event, GroupFinished) and group.tasks_completed < group.tasks_total:
        # The scripts append it after the last task's outcome, never before.
        return "GroupFinished before every task of the group ended"
    index: int | None = getattr(event, "index", None)
    if index is not None:
        if not 0 <= index < group.tasks_total:
            return f"index {index} is outside the group's {group.tasks_total} tasks"
        if event.task_id != ids.task_id(gid, index):  # type: ignore[union-attr]
            return "taskId does not match groupTaskId and index"
        loaded = views.partial.get(gid)
        if loaded is not None and chunk_of(index) not in loaded:
            # The loader read the index otherwise than the event does: folding it
            # would change a task that is not there, and that change would be lost.
            return f"index {index}: its chunk of the view was not loaded"
    return None


def group_ids(entries: Iterable[Entry]) -> set[str]:
    """The groups some entries name, read off their fields: the views to load before
    ``fold_entries``."""
    return {gid for _, fields in entries if (gid := fields.get("groupTaskId"))}


def chunks_touched(entries: Iterable[Entry]) -> dict[str, set[int]]:
    """The chunks of each group's view that some entries touch, read off their fields:
    what to load before ``fold_entries``. An index is read as the event's decoding
    reads it; one that does not read as a number touches no chunk. A group whose first
    entry here is its GroupSubmitted needs nothing loaded: the fold starts its view
    afresh (a small group's whole life often comes in one batch)."""
    touched: dict[str, set[int]] = {}
    fresh: set[str] = set()
    for _, fields in entries:
        gid = fields.get("groupTaskId")
        if not gid:
            continue
        if gid not in touched and fields.get("type") == "GroupSubmitted":
            fresh.add(gid)
        chunks = touched.setdefault(gid, set())
        if (text := fields.get("index")) is not None:
            try:
                chunks.add(chunk_of(msgspec.convert(text, int, strict=False)))
            except msgspec.ValidationError:
                pass
    return {gid: chunks for gid, chunks in touched.items() if gid not in fresh}


def fold_entries(
    entries: Sequence[Entry], views: Views, expired_before: str | None = None
) -> list[SetAside]:
    """Decode, check and fold log entries into ``views`` (which must hold the groups
    of ``group_ids(entries)`` that exist); returns the entries set aside.

    An event of a group that is not in ``views``, in an entry older than
    ``expired_before`` (an entry id: now less the result TTL), is of a group that
    expired: history, skipped quietly, not a fault. Folding a trimmed log again from
    its start (``sumbatch replay``) meets many such."""
    set_aside = []
    expiry = None if expired_before is None else ids.entry_order(expired_before)
    for entry_id, fields in entries:
        try:
            event = from_fields(fields)
        except msgspec.ValidationError as exc:
            set_aside.append(SetAside(entry_id, f"not an event: {exc}", fields))
            continue
        if (
            expiry is not None
            and event.group_task_id not in views.groups
            and not isinstance(event, GroupSubmitted)
            and ids.entry_order(entry_id) < expiry
        ):
            continue
        reason = problem(views, event)
        if reason is None:
            apply(views, event)
        else:
            set_aside.append(SetAside(entry_id, reason, fields))
    return set_aside


def fold(events: Iterable[AnyEvent], views: Views | None = None) -> Views:
    views = Views() if views is None else views
    for event in events:
        apply(views, event)
    return views
