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

Reading the input is ``inputs``' job, following a group ``following``'s: here are the
commands, what they print and the status they end with.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from typing import IO, Any

from sumbatch.client.following import Bar, Show, Tally, follow_events, until_processed
from sumbatch.client.inputs import InputError, read_input
from sumbatch.client.rest import Api, ApiError, Unreachable, path_of
from sumbatch.model import ids

# Exit statuses.
OK, ENDED_BADLY, USAGE, UNREACHABLE, INTERRUPTED = 0, 1, 2, 3, 130


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
