"""Every event sumbatch writes (the key names are in ``keys.py``).

Events are tagged msgspec Structs. In a stream entry they are flat field/value
pairs with ``type`` first and every value as plain text, so ``redis-cli XRANGE``
reads like a log line. ``to_flat`` (XADD arguments, on the hot path) and
``from_fields`` are the codec; ``to_fields`` is the plain reference the tests hold
``to_flat`` to.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable
from typing import Any, Final, get_args

import msgspec

from sumbatch.model import ids


class Event(msgspec.Struct, tag_field="type", rename="camel", frozen=True, kw_only=True):
    """Base of every event; the class name is the ``type`` field. Subclasses inherit
    its configuration; they say ``frozen=True`` again only because mypy's reading of
    dataclass_transform rejects a subclass that does not (msgspec would not need it)."""


class GroupSubmitted(Event, tag=True, frozen=True):
    """A group and all its tasks' parameters, in task order (space-separated); task
    ids follow from the group id (``ids.task_ids``)."""

    group_task_id: str
    tasks_total: int
    params_a: str
    params_b: str


# Tasks per work entry: a group's tasks reach the workers in slices of this many
# consecutive ones. An entry per task cost Redis an XADD, a delivery and an
# acknowledgement per task, and the worker a parse; the begin, fence, attempts, cancel
# and claim still work per task. Small enough that a worker with room for one more task
# does not take many more than that (``consumers/intake.py``).
WORK_SLICE: Final = 32


class TasksSubmitted(Event, tag=True, frozen=True):
    """Tasks to run, the work stream's entries (not the event log's): a slice of a
    group, WORK_SLICE consecutive tasks from ``first`` (a multiple of WORK_SLICE; a
    group's last slice may hold fewer), their parameters space-separated as in
    GroupSubmitted. The entry is acknowledged once every task in it has ended."""

    group_task_id: str
    first: int
    params_a: str
    params_b: str


class TaskSubmitted(Event, tag=True, frozen=True):
    """One task to run. Work entries of this type (older versions wrote one per task,
    and hand-written ones) still run; ``tasks_of`` makes a slice into these."""

    task_id: str
    group_task_id: str
    index: int
    param_a: int
    param_b: int


class TaskStarted(Event, tag=True, frozen=True):
    task_id: str
    group_task_id: str
    index: int
    attempt: int
    worker: str


class TaskRetried(Event, tag=True, frozen=True):
    task_id: str
    group_task_id: str
    index: int
    attempt: int
    error: str
    retry_in: float


class TaskCompleted(Event, tag=True, frozen=True):
    """``attempt`` is the run that produced it (0 for a cache hit: nothing ran). A run
    with no delay logs no TaskStarted: it starts and ends in the same instant."""

    task_id: str
    group_task_id: str
    index: int
    result: int
    from_cache: bool
    attempt: int
    worker: str


class TaskFailed(Event, tag=True, frozen=True):
    task_id: str
    group_task_id: str
    index: int
    attempts: int
    error: str
    worker: str


class TaskDeadLettered(Event, tag=True, frozen=True):
    """A failed task was copied to the dead-letter stream, with what it needs to rerun."""

    task_id: str
    group_task_id: str
    index: int
    param_a: int
    param_b: int
    error: str


class GroupCancelled(Event, tag=True, frozen=True):
    group_task_id: str


class TaskRevoked(Event, tag=True, frozen=True):
    """Appended by the cancel script for each task of the group that had not ended,
    running ones included."""

    task_id: str
    group_task_id: str
    index: int


class GroupFinished(Event, tag=True, frozen=True):
    """Appended by the completion or cancel script when the last task of a group ends."""

    group_task_id: str
    tasks_total: int
    tasks_failed: int
    tasks_revoked: int
    succeeded: bool


AnyEvent = (
    GroupSubmitted
    | TasksSubmitted
    | TaskSubmitted
    | TaskStarted
    | TaskRetried
    | TaskCompleted
    | TaskFailed
    | TaskDeadLettered
    | GroupCancelled
    | TaskRevoked
    | GroupFinished
)

_text_encoder = msgspec.json.Encoder()


def _text(value: object) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    return _text_encoder.encode(value).decode()


def to_fields(event: AnyEvent) -> dict[str, str]:
    """Flat stream fields, ``type`` first, every value plain text."""
    return {name: _text(value) for name, value in msgspec.to_builtins(event).items()}


def to_flat(events: list[AnyEvent]) -> list[list[str]]:
    """``[type, <Type>, field, value, ...]`` per event: XADD's arguments, as text."""
    flat = []
    for event in events:
        fields = ["type", type(event).__name__]
        for name, attribute, text in _FIELDS[type(event)]:
            fields.append(name)
            fields.append(text(getattr(event, attribute)))
        flat.append(fields)
    return flat


# What a group's own log leaves out of each entry, as its key and the entry's index say
# it: the group's id, and the task's (``ids.task_id``). About 75 of a TaskCompleted's
# 180 bytes, for every task; ``from_group_log`` puts them back.
GROUP_LOG_OMITS: Final = ("taskId", "groupTaskId")


_INDEX = re.compile("[0-9]{1,10}")  # ASCII digits only: int() takes other scripts' too


def from_group_log(group_task_id: str, fields: dict[str, str]) -> dict[str, str]:
    """An entry of a group's own log with the fields it leaves out put back, so it reads
    as the same entry of the event log; an entry that has them (written by an older
    version, or by hand) keeps its own."""
    if "groupTaskId" in fields and ("taskId" in fields or "index" not in fields):
        return fields
    put_back = {"groupTaskId": group_task_id}
    index = fields.get("index", "")
    if _INDEX.fullmatch(index) and int(index) < 2**32 - 1:
        put_back = {"taskId": ids.task_id(group_task_id, int(index)), **put_back}
    # In to_flat's order, type first; what the entry has stays as it is.
    kind = {"type": fields["type"]} if "type" in fields else {}
    return {**kind, **put_back, **fields}


_EVENT_TYPES: dict[str, type[Event]] = {cls.__name__: cls for cls in get_args(AnyEvent)}
# Per event type, per field: its stream name, its attribute, and how it becomes text.
# Ints and strings through str(), which is twice as fast as _text: to_flat runs about
# twice per task.
_FIELDS: dict[type[Event], tuple[tuple[str, str, Callable[[Any], str]], ...]] = {
    cls: tuple(
        (field.encode_name, field.name, _text if field.type in (bool, float) else str)
        for field in msgspec.structs.fields(cls)
    )
    for cls in _EVENT_TYPES.values()
}


def from_fields(fields: dict[str, str]) -> AnyEvent:
    """Decode stream fields (all strings) back into their event type."""
    # Dispatch on ``type`` ourselves: lax conversion into the whole union is ~15x slower.
    cls = _EVENT_TYPES.get(fields.get("type", ""))
    if cls is None:
        raise msgspec.ValidationError(f"Invalid value {fields.get('type')!r} - at `$.type`")
    event: AnyEvent = msgspec.convert(fields, cls, strict=False)  # type: ignore[assignment]
    return event


def tasks_of(work: TasksSubmitted) -> list[TaskSubmitted]:
    """The tasks of a slice, each with its id (``ids.task_id``). Raises ValueError for a
    slice no SUBMIT writes (by hand): misaligned, longer than WORK_SLICE, empty, past the
    most tasks a group can have, or with columns of other lengths or not integers."""
    first, gid = work.first, work.group_task_id
    params_a, params_b = work.params_a.split(), work.params_b.split()
    if not (
        first >= 0
        and first % WORK_SLICE == 0
        and 0 < len(params_a) == len(params_b) <= WORK_SLICE
        and first + len(params_a) < 2**32
        and ids.is_group_id(gid)
    ):
        raise ValueError("not a slice of a group's tasks as SUBMIT writes them")
    return [
        TaskSubmitted(
            task_id=ids.task_id(gid, index),
            group_task_id=gid,
            index=index,
            param_a=int(a),
            param_b=int(b),
        )
        for index, a, b in zip(itertools.count(first), params_a, params_b, strict=False)
    ]
