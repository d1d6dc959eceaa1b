"""What ``sumbatch submit`` is given, read into the POST /grouptasks body: pairs such
as ``1+2 -3+4``, one JSON file in the API's format, or ``-`` for that JSON on stdin.
Pure but for reading the file or stdin; a bad input raises InputError before anything
is sent."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import IO

PAIR = re.compile(r"\s*(-?\d+)\s*\+\s*(-?\d+)\s*")
INT64 = range(-(2**63), 2**63)


class InputError(ValueError):
    """What the user gave cannot be submitted; the message says why."""


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
