"""The client family of ``sumbatch`` subcommands: ``submit``, ``status`` and ``top``,
clients of the API over HTTP (the work is done in ``sumbatch.client``)."""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sumbatch.config import Settings

if TYPE_CHECKING:
    from sumbatch.client.rest import Api


def _api(settings: Settings, args: argparse.Namespace) -> Api:
    from sumbatch.client.rest import Api, default_url

    return Api(args.api or default_url(settings), settings.api_token)


def cmd_submit(settings: Settings, args: argparse.Namespace) -> int:
    from sumbatch.client import console

    return console.submit_command(
        _api(settings, args), args.input, key=args.idempotency_key, wait=not args.no_wait
    )


def cmd_status(settings: Settings, args: argparse.Namespace) -> int:
    from sumbatch.client import console

    api = _api(settings, args)
    return console.run(
        lambda: console.status(api, args.id, wait=args.wait, out=sys.stdout, err=sys.stderr)
    )


def cmd_top(settings: Settings, args: argparse.Namespace) -> int:
    from sumbatch.client.top import top

    api = _api(settings, args)
    return top(api, once=args.once, interval=args.interval, out=sys.stdout, err=sys.stderr)


def _url_arg(text: str) -> str:
    from sumbatch.client.rest import check_url

    try:
        return check_url(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _seconds_arg(low: float, high: float) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a number of seconds {low:g} to {high:g}"
            )
        return value

    return parse


def add_client_commands(sub: argparse._SubParsersAction[Any]) -> None:
    """submit, status, top: clients of the API over HTTP."""
    api_help = "the API's URL (default: http://127.0.0.1:SUMBATCH_PORT)"
    submit = sub.add_parser(
        "submit",
        help="submit a group and follow it to its end",
        description="Submit a group: pairs such as 1+2 -3+4, a JSON file in the API's "
        'format ({"tasks": [{"paramA": 1, "paramB": 2}]}), or - for that JSON on '
        "stdin. Shows a progress bar on a terminal, then prints the group's status as "
        "JSON. Exit status: 0 the group succeeded, 1 a task failed or was revoked (or "
        "the group was cancelled), 2 bad input or refused by the API (nothing "
        "submitted), 3 the API cannot be reached or answers 5xx, 130 Ctrl-C (the group "
        "goes on).",
    )
    submit.add_argument("input", nargs="*", metavar="PAIR|FILE|-")
    submit.add_argument("--no-wait", action="store_true", help="print the new ids and return")
    submit.add_argument("--idempotency-key", metavar="KEY", help="sent as Idempotency-Key")
    submit.add_argument("--api", type=_url_arg, metavar="URL", help=api_help)
    # Pairs such as -3+4 are arguments, not options (argparse only takes plain
    # negative numbers such as -3 for arguments).
    submit._negative_number_matcher = re.compile(r"^-\d+(\s*\+\s*-?\d+)?$")
    submit.set_defaults(func=cmd_submit)

    status = sub.add_parser(
        "status",
        help="print a group's or a task's status as JSON",
        description="Print the status of a group or a task (by its id) as JSON. Exit "
        "status: 0 found, 1 no such id, 3 the API cannot be reached.",
    )
    status.add_argument("id", metavar="ID", help="a groupTaskId or a taskId")
    status.add_argument(
        "--wait",
        type=_seconds_arg(0, 60),
        metavar="S",
        help="answer once it has ended, or after S seconds (0 to 60)",
    )
    status.add_argument("--api", type=_url_arg, metavar="URL", help=api_help)
    status.set_defaults(func=cmd_status)

    top = sub.add_parser(
        "top", help="a live view of throughput, lag, pending work and workers (Ctrl-C ends)"
    )
    top.add_argument("--once", action="store_true", help="print one frame as text and exit")
    top.add_argument(
        "--interval", type=_seconds_arg(0.1, 3600), default=1.0, metavar="S",
        help="seconds between samples (default 1)",
    )  # fmt: skip
    top.add_argument("--api", type=_url_arg, metavar="URL", help=api_help)
    top.set_defaults(func=cmd_top)
