"""How a worker names each task of a work entry (its key), and which entry, and which of
its tasks, a key names: the one naming that the workers' steps and their claims share."""

from __future__ import annotations

from collections.abc import Sequence

from sumbatch.model.events import WORK_SLICE


def task_key(entry_id: str, index: int) -> str:
    """How a worker names one task of a work entry that holds several (a slice)."""
    return f"{entry_id}/{index}"


def entry_of(key: str, index: int) -> tuple[str, int, int]:
    """The work entry a task key names, and the tasks it can hold: the first index and
    how many. A slice holds the WORK_SLICE indexes of its task's (``tasks_of`` takes no
    other); a one-task entry (TaskSubmitted), that task alone. The scripts acknowledge
    an entry once all of those that are in its group have ended."""
    entry_id, sliced, _ = key.partition("/")
    if not sliced:
        return key, index, 1
    return entry_id, index - index % WORK_SLICE, WORK_SLICE


def entry_id_of(key: str) -> str:
    """The work entry a task's key names."""
    return key.partition("/")[0]


def entry_ids(keys: Sequence[str]) -> list[str]:
    """The work entries of some tasks' keys, each once, in order."""
    return list(dict.fromkeys(map(entry_id_of, keys)))
