"""Following a submitted group to its end over the API: its events as they come, then
long polls of its status until it is processed, counted in a Tally and shown (on a
terminal) by a progress bar."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any, TypeVar

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from sumbatch.client.rest import Api, ApiError, Unreachable, path_of

T = TypeVar("T")

# The events that end a task; a task counts once, whichever comes first.
ENDINGS = ("TaskCompleted", "TaskFailed", "TaskRevoked")
# Seconds a long poll of the group may wait for it to be processed.
POLL_WAIT = 10.0
# Seconds between polls at least, should the API answer a long poll at once.
POLL_FLOOR = 0.5
# Seconds the API may stay unreachable (or answer 503) while we wait on a group.
PATIENCE = 30.0


class Tally:
    """How far a group is: tasks ended (and how many of them failed or were revoked),
    from its events or from its status."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.done = self.failed = self.revoked = 0
        self.finished = False
        self._ended: set[str] = set()

    def apply(self, event: dict[str, Any]) -> None:
        """Count one of the group's events."""
        kind = event.get("type")
        if kind in ENDINGS:
            task = str(event.get("taskId"))
            if task in self._ended:
                return
            self._ended.add(task)
            self.done += 1
            self.failed += kind == "TaskFailed"
            self.revoked += kind == "TaskRevoked"
        elif kind == "GroupSubmitted" and isinstance(event.get("tasksTotal"), int):
            self.total = event["tasksTotal"]
        elif kind == "GroupFinished":
            self.finished = True

    def read(self, status: dict[str, Any]) -> None:
        """Take the counts of a GET /grouptasks/{id} answer."""
        self.total = int(status.get("tasksTotal", self.total))
        self.done = int(status.get("tasksCompleted", self.done))
        self.failed = int(status.get("tasksFailed", self.failed))
        self.revoked = int(status.get("tasksRevoked", self.revoked))
        self.finished = bool(status.get("grouptaskProcessed"))


Show = Callable[[Tally], None]


def follow_events(api: Api, gid: str, tally: Tally, show: Show) -> bool:
    """Count the group's events as they come, until its GroupFinished; False if the
    stream is not there (an older API) or broke before it."""
    try:
        for message in api.events(path_of("grouptasks", gid) + "/events"):
            try:
                event = json.loads(message.data)
            except ValueError:
                continue
            if isinstance(event, dict):
                tally.apply(event)
                show(tally)
            if tally.finished:
                return True
    except (ApiError, Unreachable):
        pass
    return False


def until_processed(api: Api, gid: str, tally: Tally, show: Show) -> dict[str, Any]:
    """Long-poll the group until it is processed; its last status."""
    while True:
        asked = time.monotonic()
        status: dict[str, Any] = patiently(
            lambda: api.get(path_of("grouptasks", gid), wait=POLL_WAIT)
        )
        tally.read(status)
        show(tally)
        if status.get("grouptaskProcessed"):
            return status
        time.sleep(max(0.0, asked + POLL_FLOOR - time.monotonic()))


def patiently(call: Callable[[], T], patience: float = PATIENCE) -> T:
    """``call()``, tried again each second while the API is unreachable or answers
    503, for up to ``patience`` seconds (an API restarting under a long wait)."""
    deadline = time.monotonic() + patience
    while True:
        try:
            return call()
        except (Unreachable, ApiError) as exc:
            if isinstance(exc, ApiError) and exc.status != 503 or time.monotonic() > deadline:
                raise
        time.sleep(1.0)


class Bar:
    """A rich progress bar of the group's tasks, drawn on stdout while in a ``with``;
    called with a Tally, it shows it."""

    def __init__(self, gid: str, total: int) -> None:
        self.progress = Progress(
            TextColumn("group {task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[failures]}"),
            TimeElapsedColumn(),
        )
        self.task = self.progress.add_task(gid[:8], total=total, failures="")

    def __call__(self, tally: Tally) -> None:
        counts = ((tally.failed, "failed"), (tally.revoked, "revoked"))
        failures = ", ".join(f"{n} {word}" for n, word in counts if n)
        self.progress.update(self.task, completed=tally.done, total=tally.total, failures=failures)

    def __enter__(self) -> Bar:
        self.progress.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.progress.stop()
