"""Every event sumbatch writes, and every Redis key name it uses.

Events are tagged msgspec Structs. In a stream entry they are flat field/value
pairs with ``type`` first and every value as plain text, so ``redis-cli XRANGE``
reads like a log line. ``to_flat`` (XADD arguments, on the hot path) and
``from_fields`` are the codec; ``to_fields`` is the plain reference the tests hold
``to_flat`` to.

All keys of one namespace share the hash tag ``{<namespace>}``: every atomic step
(submission, completion, projection commit) touches several of them at once, and a
shared tag keeps them in one cluster slot.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable
from typing import Any, Final, get_args

import msgspec
from redis.crc import key_slot

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
# does not take many more than that (``consumers/worker.py``).
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


WORKER_GROUP: Final = "workers"


class Keys:
    """Every key name of one partition of a namespace, built in one place; nothing else
    writes a key literal. A partition's keys share one hash tag (one cluster slot),
    so every atomic step stays within it; the cache's keys have no tag and spread."""

    def __init__(
        self, namespace: str = "sumbatch", partition: int = 0, partitions: int = 1
    ) -> None:
        self.namespace = namespace
        self.partition = partition
        self.partitions = partitions
        self.tag = partition_tag(namespace, partition, partitions)

    @staticmethod
    def partitions_key(namespace: str) -> str:
        """How many partitions the namespace has, written by the first process to start:
        every id's partition depends on it, so it cannot change under live data."""
        return "{" + namespace + "}:partitions"

    @property
    def events(self) -> str:
        """The event log: every event of every group, in order. Tail and replay this."""
        return f"{self.tag}:events"

    @property
    def work(self) -> str:
        """Work entries, read by the ``workers`` consumer group."""
        return f"{self.tag}:work"

    @property
    def projector_position(self) -> str:
        """Id of the last event the views include; written with the views."""
        return f"{self.tag}:projector:position"

    @property
    def dead_letters(self) -> str:
        """TaskFailed events of tasks that ran out of attempts (each naming its log
        entry in ``eventId``), and work entries no worker can run
        (``UnreadableWorkEntry``, ``RefusedWorkEntry``): for inspection or rerun."""
        return f"{self.tag}:dead"

    @property
    def cancellations(self) -> str:
        """Pub/sub channel: the cancel script publishes a group's id once it has
        revoked its tasks, so workers stop those runs at once (best effort: a run
        nobody stops meets the fence at its end and writes nothing)."""
        return f"{self.tag}:cancelled"

    @property
    def rejected(self) -> str:
        """Log entries the projector could not apply, each with its entry id and the
        reason, for an operator to inspect."""
        return f"{self.tag}:rejected"

    @property
    def stats(self) -> str:
        """The partition's counters and histograms (a hash, ``scripts/stats.py``),
        written by the scripts that append what they count, in the same step; /metrics
        and /system add up the partitions'."""
        return f"{self.tag}:stats"

    def cache(self, param_a: int, param_b: int) -> str:
        """A computed sum, with its own TTL; shared by every partition. With several
        partitions each sum is a hash tag of its own, spread over a cluster's slots;
        with one, the partition's tag, as before partitions existed."""
        if self.partitions == 1:
            return f"{self.tag}:cache:{param_a}:{param_b}"
        return "{" + f"{self.namespace}:cache:{param_a}:{param_b}" + "}"

    @property
    def pattern(self) -> str:
        """A glob that matches every key of the namespace, in every partition, and no
        other namespace's: for an ACL user's key pattern, or SCAN."""
        if self.partitions == 1:
            return f"{self.tag}:*"
        return "{" + self.namespace + "[:}]*"

    def idempotency(self, key: str) -> str:
        """The answer given to a POST with this Idempotency-Key (hashed by the API)."""
        return f"{self.tag}:idem:{key}"

    def of_group(self, group_task_id: str) -> list[str]:
        """A group's write-side keys, in the order the scripts declare them."""
        return [
            self.ledger(group_task_id),
            self.ended(group_task_id),
            self.attempts(group_task_id),
            self.group_log(group_task_id),
        ]

    def group_log(self, group_task_id: str) -> str:
        """One group's history (same entry ids as in the event log), for audit; its
        entries leave out GROUP_LOG_OMITS, which ``from_group_log`` puts back."""
        return f"{self.tag}:log:{group_task_id}"

    def ledger(self, group_task_id: str) -> str:
        """Write-side counters of a group: ``total``, ``finished``, ``failed``,
        ``revoked`` and ``cancelled``."""
        return f"{self.tag}:ledger:{group_task_id}"

    def ended(self, group_task_id: str) -> str:
        """The completion fence: one bit per task index, set when the task ends."""
        return f"{self.tag}:ended:{group_task_id}"

    def attempts(self, group_task_id: str) -> str:
        """One byte per task index: how many times a worker started it (BITFIELD u8)."""
        return f"{self.tag}:attempts:{group_task_id}"

    def group_view(self, group_task_id: str) -> str:
        """The projected status of a group and its tasks: a hash, its counts in one
        field and its tasks in chunks (``chunks.py``)."""
        return f"{self.tag}:view:{group_task_id}"


def partition_tag(namespace: str, partition: int, partitions: int) -> str:
    """The hash tag of one partition's keys. With one partition, ``{namespace}``, as
    before partitions existed. With more, each tag is picked to hash into the middle
    of its own equal share of the 16,384 cluster slots, so that a cluster whose masters
    hold equal slot ranges (as ``--cluster create`` makes them) gets an equal share of
    partitions on each master."""
    if partitions == 1:
        return "{" + namespace + "}"
    share = SLOTS / partitions
    low, high = (partition + 0.25) * share, (partition + 0.75) * share
    for attempt in itertools.count():
        name = f"{namespace}:{partition}" + (f"~{attempt}" if attempt else "")
        if low <= key_slot(name.encode()) < high:
            return "{" + name + "}"
    raise AssertionError("unreachable")


SLOTS = 16384
