"""How a group view is stored: a Redis hash whose ``summary`` field holds the group's
counts and whose fields ``0``, ``1``... hold its tasks in chunks of CHUNK_TASKS, by
submission index. Pure: the store does the I/O.

The summary is a JSON array of ``GroupCounts``'s fields in their order: ``[groupTaskId,
tasksTotal, tasksCompleted, tasksFailed, tasksRevoked, cancelled, finished]``. Unlike
an object, it stays under the 64 bytes up to which Redis keeps a small hash's fields
in one compact listpack, so a small group's whole view does too (a hash of bigger
fields costs about 130 B more, a third of what a finished task keeps).

A chunk is a JSON array ``[results, states, attempts, errors]``: the states as one
string of letters (``views.STATE_OF_LETTER``), errors by task index. Results come
first, so a status read decodes them and skips the rest.

A stored view that does not decode, or is not of the fold's shape (written by hand),
raises ``NotAView``: the store counts it as absent.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import msgspec

from sumbatch.model.views import (
    CHUNK_TASKS,
    STATE_OF_LETTER,
    UNLOADED,
    GroupCounts,
    GroupSummary,
    GroupView,
    TaskView,
    chunk_count,
    chunk_of,
)

SUMMARY = "summary"
Blob = str | bytes


class Chunk(msgspec.Struct, array_like=True):
    results: list[int | None]
    states: str
    attempts: list[int]
    errors: dict[int, str]


class ChunkResults(msgspec.Struct, array_like=True):
    """A chunk's first element only: the rest of the array is skipped, not built."""

    results: list[int | None]


class NotAView(ValueError):
    """A stored view that is no view of the fold's shape; the message says why."""


_encoder = msgspec.json.Encoder()
# GroupCounts's fields, stored as an array (see above): made from it, so they cannot
# drift apart.
_StoredCounts = msgspec.defstruct(
    "StoredCounts",
    [(f.name, f.type, f.default) for f in msgspec.structs.fields(GroupCounts)],
    array_like=True,
)
_counts = msgspec.json.Decoder(_StoredCounts)
_chunk = msgspec.json.Decoder(Chunk)
_chunk_results = msgspec.json.Decoder(ChunkResults)
_COUNT_FIELDS = tuple(f.name for f in msgspec.structs.fields(GroupCounts))


def field_name(chunk: int) -> str:
    return str(chunk)


def span(chunk: int, tasks_total: int) -> range:
    """The task indexes a chunk holds."""
    return range(chunk * CHUNK_TASKS, min((chunk + 1) * CHUNK_TASKS, tasks_total))


# -- writing ----------------------------------------------------------------------------


def encode_summary(view: GroupCounts) -> bytes:
    return _encoder.encode(_StoredCounts(**_counts_of(view)))


def encode_chunk(view: GroupView, chunk: int) -> bytes:
    """One chunk of a view; ValueError when it holds a task that was not loaded, so
    that a placeholder can never be stored."""
    tasks = span(chunk, view.tasks_total)
    if not tasks:
        raise ValueError(f"chunk {chunk} is outside a group of {view.tasks_total} tasks")
    states = "".join(view.states[tasks.start : tasks.stop])
    if UNLOADED in states:
        raise ValueError(f"chunk {chunk} of group {view.group_task_id} was not loaded")
    errors = {i: e for i, e in view.errors.items() if i in tasks}
    part = Chunk(
        view.results[tasks.start : tasks.stop],
        states,
        view.attempts[tasks.start : tasks.stop],
        errors,
    )
    return _encoder.encode(part)


def to_fields(view: GroupView, chunks: Iterable[int] | None = None) -> dict[str, bytes]:
    """A view's hash fields: the summary and ``chunks`` (every chunk when None)."""
    which = range(chunk_count(view.tasks_total)) if chunks is None else sorted(chunks)
    fields = {SUMMARY: encode_summary(view)}
    fields.update((field_name(k), encode_chunk(view, k)) for k in which)
    return fields


def flat_fields(view: GroupView, chunks: Iterable[int] | None = None) -> list[str | bytes]:
    """``to_fields`` as HSET's arguments: field, value, field, value..."""
    return [item for pair in to_fields(view, chunks).items() for item in pair]


# -- reading ----------------------------------------------------------------------------


def decode_counts(group_task_id: str, blob: Blob | None) -> GroupCounts:
    if blob is None:
        raise NotAView("no summary field")
    try:
        counts = GroupCounts(**_counts_of(_counts.decode(blob)))
    except msgspec.DecodeError as exc:
        raise NotAView(f"summary: {exc}") from None
    if counts.group_task_id != group_task_id:
        raise NotAView(f"summary of another group ({counts.group_task_id})")
    if counts.tasks_total < 1 or not counts.counts_ok():
        raise NotAView("summary counts the fold cannot reach")
    return counts


def decode_chunk(counts: GroupCounts, chunk: int, blob: Blob | None) -> Chunk:
    tasks = span(chunk, counts.tasks_total)
    if blob is None:
        raise NotAView(f"chunk {chunk} is missing")
    try:
        part = _chunk.decode(blob)
    except msgspec.DecodeError as exc:
        raise NotAView(f"chunk {chunk}: {exc}") from None
    n = len(tasks)
    if not (
        n == len(part.results) == len(part.states) == len(part.attempts)
        and all(letter in STATE_OF_LETTER for letter in part.states)
        and all(i in tasks for i in part.errors)
    ):
        raise NotAView(f"chunk {chunk} is not of a chunk's shape")
    return part


def decode_view(
    group_task_id: str, summary: Blob | None, chunks: Mapping[int, Blob | None]
) -> GroupView:
    """A view from its summary and some of its chunks; the tasks of chunks not given
    are UNLOADED. Chunks outside the group are left out (an event's index outside
    its group asks for one, which the fold sets aside)."""
    return _assemble(decode_counts(group_task_id, summary), chunks)


def decode_task(
    task_id: str, group_task_id: str, index: int, summary: Blob | None, chunk: Blob | None
) -> TaskView | None:
    """One task's view from its group's summary and the one chunk that holds it; None
    when the group has no such index."""
    counts = decode_counts(group_task_id, summary)
    if not 0 <= index < counts.tasks_total:
        return None
    k = chunk_of(index)
    part = decode_chunk(counts, k, chunk)
    at = index - span(k, counts.tasks_total).start
    return TaskView.of(
        task_id,
        group_task_id,
        index,
        part.states[at],
        part.results[at],
        part.attempts[at],
        part.errors.get(index),
    )


def decode_whole(group_task_id: str, fields: Mapping[str, Blob]) -> GroupView:
    """A whole stored view (HGETALL)."""
    return _assemble(*_whole(group_task_id, fields))


def decode_summary(group_task_id: str, fields: Mapping[str, Blob]) -> GroupSummary:
    """A whole stored view's counts and results, leaving the other task details
    undecoded."""
    counts, chunks = _whole(group_task_id, fields)
    results: list[int | None] = []
    for k, blob in chunks.items():
        try:
            part = _chunk_results.decode(blob)
        except msgspec.DecodeError as exc:
            raise NotAView(f"chunk {k}: {exc}") from None
        if len(part.results) != len(span(k, counts.tasks_total)):
            raise NotAView(f"chunk {k} is not of a chunk's shape")
        results += part.results
    return GroupSummary(**_counts_of(counts), results=results)


def _counts_of(view: Any) -> dict[str, Any]:
    """The counts of a GroupCounts (a view too) or of a stored summary, as keywords."""
    return {name: getattr(view, name) for name in _COUNT_FIELDS}


def _whole(group_task_id: str, fields: Mapping[str, Blob]) -> tuple[GroupCounts, dict[int, Blob]]:
    """The counts and chunks of a whole stored view, checking that it has every chunk
    and nothing else."""
    counts = decode_counts(group_task_id, fields.get(SUMMARY))
    names = [field_name(k) for k in range(chunk_count(counts.tasks_total))]
    if set(fields) != {SUMMARY, *names}:
        raise NotAView("fields other than the summary and its chunks")
    return counts, {k: fields[name] for k, name in enumerate(names)}


def _assemble(counts: GroupCounts, chunks: Mapping[int, Blob | None]) -> GroupView:
    total = counts.tasks_total
    view = GroupView(
        **_counts_of(counts),
        states=[UNLOADED] * total,
        results=[None] * total,
        attempts=[0] * total,
    )
    for k, blob in chunks.items():
        tasks = span(k, total)
        if not tasks:
            continue
        part = decode_chunk(counts, k, blob)
        view.states[tasks.start : tasks.stop] = part.states
        view.results[tasks.start : tasks.stop] = part.results
        view.attempts[tasks.start : tasks.stop] = part.attempts
        view.errors.update(part.errors)
    return view
