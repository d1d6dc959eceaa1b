"""``sumbatch submit`` and ``sumbatch status``: submit a group over the API and follow
it to its end (a progress bar on a terminal), or show a group's or a task's status.

What they print on stdout is one JSON document, the API's own answer, so a script can
read it whole; everything else (the ids, errors) goes to stderr, and the bar is drawn
only when stdout is a terminal. Exit status:

- 0: submit: the group succeeded; status: found.
- 1: submit: the group ended with failed or revoked tasks, or was cancelled;
  status: no such group or task.
- 2: a usage error, or a request the API refused (4xx: nothing was submitted).
- 3: the API cannot be reached, or cannot serve now (5xx).
- 130: interrupted (Ctrl-C); a submitted group goes on.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any, TypeVar

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from sumbatch.client.rest import Api, ApiError, Unreachable, path_of
from sumbatch.model import ids

T = TypeVar("T")

# Exit statuses.
OK, ENDED_BADLY, USAGE, UNREACHABLE, INTERRUPTED = 0, 1, 2, 3, 130

PAIR = re.compile(r"\s*(-?\d+)\s*\+\s*(-?\d+)\s*")
INT64 = range(-(2**63), 2**63)
# The events that end a task; a task counts once, whichever comes first.
ENDINGS = ("TaskCompleted", "TaskFailed", "TaskRevoked")
# Seconds a long poll of the group may wait for it to be processed.
POLL_WAIT = 10.0
# Seconds between polls at least, should the API answer a long poll at once.
POLL_FLOOR = 0.5
# Seconds the API may stay unreachable (or answer 503) while we wait on a group.
PATIENCE = 30.0


class InputError(ValueError):
    """What the user gave cannot be submitted; the message says why."""


# -- what to submit ------------------------------------------------------------------


def parse_pair(text: str) -> tuple[int, int]:
    """``"1+2"`` as (1, 2); either side may be negative (``-3+4``, ``5+-2``)."""
    found = PAIR.fullmatch(text)
    if found is None:
        raise InputError(f"{text!r} is not a pair of integers such as 1+2 or -3+4")
    a, b = int(found[1]), int(found[2])
    for name, value in (("paramA", a), ("paramB", b)):
        if value not in INT64:
            raise InputError(f"{text!r}: {name} is outside the signed 64-bit range")
    return a, b


def body_of_pairs(pairs: Sequence[tuple[int, int]]) -> bytes:
    tasks = [{"paramA": a, "paramB": b} for a, b in pairs]
    return json.dumps({"tasks": tasks}).encode()


def check_json(text: str, source: str) -> bytes:
    """A JSON body as given (the API checks its shape), once it is seen to be JSON."""
    if not text.strip():
        raise InputError(f"{source} is empty")
    try:
        json.loads(text)
    except ValueError as exc:
        raise InputError(f"{source} is not JSON: {exc}") from None
    return text.encode()


def read_input(args: Sequence[str], stdin: IO[str]) -> bytes:
    """The POST /grouptasks body from the command's arguments: pairs (``1+2 3+4``),
    one JSON file in the API's format, or ``-`` for that JSON on stdin."""
    if not args:
        raise InputError("nothing to submit: give pairs such as 1+2, a JSON file, or -")
    if len(args) == 1 and args[0] == "-":
        return check_json(stdin.read(), "stdin")
    if len(args) == 1 and not PAIR.fullmatch(args[0]):
        path = Path(args[0])
        if path.is_file():
            try:
                return check_json(path.read_text(), args[0])
            except (OSError, UnicodeDecodeError) as exc:
                raise InputError(f"cannot read {args[0]}: {exc}") from None
        if "+" not in args[0]:
            raise InputError(f"{args[0]!r} is neither a file nor a pair such as 1+2")
    if "-" in args:
        raise InputError("- (JSON on stdin) cannot go with other arguments")
    return body_of_pairs([parse_pair(arg) for arg in args])


# -- following a group ---------------------------------------------------------------


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


# -- the commands --------------------------------------------------------------------


def describe(created: dict[str, Any]) -> str:
    """The ids of a new group in a line: its id, and its tasks' (consecutive) ids."""
    gid, tids = created["groupTaskId"], created["taskIds"]
    if len(tids) == 1:
        return f"group {gid}: 1 task, {tids[0]}"
    return f"group {gid}: {len(tids)} tasks, {tids[0]} to {tids[-1]}"


def submit(
    api: Api, body: bytes, *, key: str | None, wait: bool, bar: bool, out: IO[str], err: IO[str]
) -> int:
    """POST the group; without ``wait`` print its ids (the API's answer) and return,
    else follow it to its end and print its status."""
    headers = {"Idempotency-Key": key} if key is not None else {}
    try:
        created: dict[str, Any] = api.post("/grouptasks", body, headers)
    except ApiError as refused:
        if refused.status >= 500:
            raise
        print(f"sumbatch: the API refused the group: {refused}", file=err)
        return USAGE
    if not wait:
        print(json.dumps(created), file=out, flush=True)
        return OK
    gid = created["groupTaskId"]
    tally = Tally(len(created["taskIds"]))
    try:
        print(describe(created), file=err, flush=True)
        if bar:
            with Bar(gid, tally.total) as show:
                status = _follow(api, gid, tally, show)
        else:
            status = _follow(api, gid, tally, lambda _: None)
    except KeyboardInterrupt:
        print(f"sumbatch: stopped waiting; the group goes on: sumbatch status {gid}", file=err)
        return INTERRUPTED
    except (Unreachable, ApiError) as exc:
        print(f"sumbatch: lost the API ({exc}); the group goes on: sumbatch status {gid}", file=err)
        return UNREACHABLE
    print(json.dumps(status), file=out, flush=True)
    return OK if status.get("grouptaskSucceeded") else ENDED_BADLY


def _follow(api: Api, gid: str, tally: Tally, show: Show) -> dict[str, Any]:
    # The events show each task as it ends; the view may lag GroupFinished by the
    # projector's lag, so the status comes from the view once it says processed.
    follow_events(api, gid, tally, show)
    return until_processed(api, gid, tally, show)


def status(api: Api, id_: str, *, wait: float | None, out: IO[str], err: IO[str]) -> int:
    """Print the status of the group or task ``id_`` (a task id ends in its index, a
    group id in zeros: ``sumbatch.model.ids``)."""
    canonical = ids.parse_uuid(id_) or id_
    kind = "grouptasks" if ids.is_group_id(canonical) else "tasks"
    try:
        found = api.get(path_of(kind, canonical), wait=wait)
    except ApiError as refused:
        if refused.status == 404:
            print(f"sumbatch: no group or task {id_}", file=err)
            return ENDED_BADLY
        if refused.status >= 500:
            raise
        print(f"sumbatch: {refused}", file=err)
        return USAGE
    print(json.dumps(found), file=out, flush=True)
    return OK


def submit_command(api: Api, inputs: Sequence[str], *, key: str | None, wait: bool) -> int:
    """``sumbatch submit``: the input read and checked first, so a bad one submits
    nothing; the bar only when stdout is a terminal."""
    try:
        body = read_input(inputs, sys.stdin)
    except InputError as exc:
        print(f"sumbatch: {exc}", file=sys.stderr)
        return USAGE
    bar = wait and sys.stdout.isatty()
    return run(
        lambda: submit(api, body, key=key, wait=wait, bar=bar, out=sys.stdout, err=sys.stderr)
    )


def run(command: Callable[[], int]) -> int:
    """``command()``, with the API's absence (or 5xx) as a message on stderr and
    status 3, and Ctrl-C as status 130 without a traceback."""
    err = sys.stderr
    try:
        return command()
    except KeyboardInterrupt:
        return INTERRUPTED
    except Unreachable as exc:
        print(f"sumbatch: {exc}", file=err)
    except ApiError as exc:
        print(f"sumbatch: the API cannot serve now: {exc}", file=err)
    return UNREACHABLE
