"""Group and task status as a pure fold of events. No I/O: the projector and
``sumbatch replay`` run this same code; the API reads the views they store (their
types are in ``views``).

The log can hold entries the fold cannot apply (written by hand, or by another
version): ``fold_entries`` checks each event against the group it names and sets
aside what it cannot apply, with the reason, so that one bad entry never stalls the
projector.

One view per group holds its tasks too, by submission index. The store keeps it in
chunks of CHUNK_TASKS tasks, and the projector loads only the chunks a batch of events
touches (``Views.partial``): the fold never reads a task outside them (``problem``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

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
from sumbatch.model.views import ENDED, GroupView, chunk_of

Entry = tuple[str, dict[str, str]]


@dataclass
class Views:
    """The slice of the read model a fold works on: group views by id.

    ``partial`` names the views loaded in part, with the chunks loaded: their other
    tasks are UNLOADED, which the store never writes back. A view not named there is
    whole; GroupSubmitted makes one whole afresh."""

    groups: dict[str, GroupView] = field(default_factory=dict)
    partial: dict[str, frozenset[int]] = field(default_factory=dict)
    # Where the log of each group submitted in the entries folded begins (its
    # GroupSubmitted's entry id; None: no log): the one GroupSubmitted that may start
    # a view. Without it (a fold of events, not entries), any may.
    origins: dict[str, str | None] = field(default_factory=dict)


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


# A signed 64-bit integer as SUBMIT writes one: ASCII digits, no sign but minus.
_INT64 = re.compile(r"-?[0-9]{1,19}")


def _integers(params: str) -> bool:
    return all(
        _INT64.fullmatch(value) and -(2**63) <= int(value) < 2**63 for value in params.split()
    )


def problem(views: Views, event: AnyEvent, entry_id: str | None = None) -> str | None:
    """Why ``event`` (the log's entry ``entry_id``) cannot be applied to ``views``, or
    None when it can. ``views`` must hold the group the event names, if it exists, and
    the origin of a group it submits (``Views.origins``)."""
    gid = event.group_task_id
    if isinstance(event, GroupSubmitted):
        if ids.parse_uuid(gid) != gid or not ids.is_group_id(gid):
            return f"groupTaskId {gid!r} is not a group id"
        if event.tasks_total < 1:
            return f"tasksTotal {event.tasks_total} is not a positive count"
        if not len(event.params_a.split()) == len(event.params_b.split()) == event.tasks_total:
            return "paramsA and paramsB do not hold tasksTotal values each"
        if not (_integers(event.params_a) and _integers(event.params_b)):
            return "paramsA and paramsB must be signed 64-bit integers"
        if entry_id is not None and gid in views.origins:
            origin = views.origins[gid]
            if origin is None:
                return "no such group was submitted (its log is absent): written by hand?"
            if origin != entry_id:
                # Folded, it would start the view afresh under a group under way.
                return f"a copy of the group's GroupSubmitted (its log begins at {origin})"
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


def submitted_groups(entries: Iterable[Entry]) -> set[str]:
    """The groups some entries submit: whose log's beginning to read before
    ``fold_entries`` (``Views.origins``)."""
    return {
        gid
        for _, fields in entries
        if fields.get("type") == "GroupSubmitted" and (gid := fields.get("groupTaskId"))
    }


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

    An event of a group that is not in ``views`` (a GroupSubmitted: whose log is gone),
    in an entry older than ``expired_before`` (an entry id: now less the result TTL),
    is of a group that expired: history, skipped quietly, not a fault. Folding a
    trimmed log again from its start (``sumbatch replay``) meets many such."""
    set_aside = []
    expiry = None if expired_before is None else ids.entry_order(expired_before)
    for entry_id, fields in entries:
        try:
            event = from_fields(fields)
        except msgspec.ValidationError as exc:
            set_aside.append(SetAside(entry_id, f"not an event: {exc}", fields))
            continue
        gid = event.group_task_id
        if (
            expiry is not None
            and ids.entry_order(entry_id) < expiry
            and (
                views.origins.get(gid, "") is None  # its log expired: so did its view
                if isinstance(event, GroupSubmitted)
                else gid not in views.groups
            )
        ):
            continue
        reason = problem(views, event, entry_id)
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
