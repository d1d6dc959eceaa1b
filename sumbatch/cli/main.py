"""``sumbatch`` command line: run the service or one of its processes, and look into
the log (audit, tail, replay)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from redis.asyncio.cluster import RedisCluster

from sumbatch.cli.tailing import Merge
from sumbatch.config import PARENT_PID_ENV, ConfigError, Settings, parse_port, resolve_handler
from sumbatch.model import ids
from sumbatch.processes.running import run_async, when_reachable
from sumbatch.store import Entry
from sumbatch.store.partitions import Partitions, open_partitions

if TYPE_CHECKING:
    from sumbatch.client.rest import Api

log = logging.getLogger("sumbatch")

# The entry-point group through which other packages add subcommands (as Flask's
# "flask.commands"): each entry is a function given the subparsers to add to.
COMMANDS = "sumbatch.commands"


def cmd_api(settings: Settings, args: argparse.Namespace) -> int:
    from sumbatch.web.api import create_app, durable_problem
    from sumbatch.web.http import serve

    if settings.durable and (problem := run_async(durable_problem(settings))):
        print(f"sumbatch: {problem}", file=sys.stderr)
        return 2
    app = create_app(settings)
    host, port = args.host or settings.host, args.port or settings.port
    serve(app, host, port, settings, stopping=app.state.live.close)
    return 0


def cmd_up(settings: Settings, args: argparse.Namespace) -> int:
    from sumbatch.processes.supervisor import Supervisor

    # Here, not in each worker: a handler that cannot load would make them crash-loop.
    resolve_handler(settings.handler)
    workers = args.workers if args.workers is not None else settings.workers
    if args.cluster and settings.redis_url is not None:
        print(
            "sumbatch: --cluster starts a local cluster; it cannot go with REDIS_URL",
            file=sys.stderr,
        )
        return 2
    supervisor = Supervisor(
        settings, host=args.host, port=args.port, workers=workers, cluster=args.cluster
    )
    return supervisor.run()


def _describe(entry: Entry) -> str:
    entry_id, fields = entry
    rest = "  ".join(f"{k}={v}" for k, v in fields.items() if k != "type")
    return f"{entry_id}  {fields.get('type', '?'):<15} {rest}"


def cmd_audit(settings: Settings, args: argparse.Namespace) -> int:
    async def audit() -> int:
        async with await open_partitions(settings) as partitions:
            gid = args.group_task_id
            history = (
                [] if ids.parse_uuid(gid) != gid else await partitions.of(gid).group_history(gid)
            )
        if not history:
            print(f"no events for group {args.group_task_id}", file=sys.stderr)
            return 1
        for entry in history:
            print(_describe(entry))
        return 0

    return asyncio.run(audit())


def cmd_tail(settings: Settings, args: argparse.Namespace) -> int:
    try:
        asyncio.run(_tail(settings, from_start=args.from_start))
    except KeyboardInterrupt:
        pass
    except BrokenPipeError:
        # The reader left (`sumbatch tail | head`): end quietly, as `cat` does. Point
        # stdout at /dev/null so the interpreter's last flush cannot fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


# Entries read from one partition at a time; how long tail waits when all are idle.
TAIL_BATCH = 1000
TAIL_IDLE = 0.1


async def _until_more(partitions: Partitions, after: list[str | None]) -> None:
    """Wait while the log is idle. One partition: a blocking read, which returns as
    soon as an entry comes, or fails at once when Redis goes away. Several: a short
    pause, as one read cannot block on streams in different cluster slots."""
    if partitions.count == 1:
        # Bounded, below the client's socket timeout; what it returns is read again.
        await partitions.stores[0].read_events(str(after[0]), 1, block_ms=5000)
    else:
        await asyncio.sleep(TAIL_IDLE)


async def _tail(settings: Settings, *, from_start: bool) -> None:
    """Print events as they are appended, every partition's merged in id order. Across
    a Redis restart it reconnects with backoff and goes on after the last id read:
    nothing missed, nothing twice."""
    partitions = await when_reachable("tail", lambda: open_partitions(settings))
    merge = Merge(partitions.count)
    after: list[str | None] = ["0-0" if from_start else None] * partitions.count

    async def once() -> None:
        """Read every partition once, print what is complete, wait while idle."""
        for n, store in enumerate(partitions):
            if after[n] is None:
                # A real id rather than "$", so a reconnect cannot skip what was
                # appended while we were away.
                after[n] = await store.last_event_id()
            now_ms, entries = await store.read_since(str(after[n]), TAIL_BATCH)
            merge.read(n, now_ms, entries, TAIL_BATCH)
            if entries:
                after[n] = entries[-1][0]
        ready = merge.release()
        for entry in ready:
            print(_describe(entry), flush=True)
        if merge.held and not ready:
            # Held entries wait for a slower partition's clock: ask again soon.
            await asyncio.sleep(TAIL_IDLE / 10)
        elif not ready:
            await _until_more(partitions, after)

    try:
        while True:
            await when_reachable("tail", once)
    finally:
        await partitions.aclose()


def cmd_partitions(settings: Settings, args: argparse.Namespace) -> int:
    """Each partition's hash tag and event log, and on a cluster the master serving it:
    the key names to give redis-cli."""

    async def show() -> int:
        async with await open_partitions(settings) as partitions:
            for store in partitions:
                where = ""
                if isinstance(partitions.redis, RedisCluster):
                    node = partitions.redis.get_node_from_key(store.keys.events)
                    where = f"  on {node.name}" if node is not None else "  (slot unserved)"
                print(f"{store.keys.partition:>3}  {store.keys.events}{where}")
        return 0

    return asyncio.run(show())


def cmd_redis_cli(settings: Settings, args: argparse.Namespace) -> int:
    from sumbatch.processes.embedded import find_cli

    binary = find_cli()
    if binary is None:
        print("no redis-cli or valkey-cli found", file=sys.stderr)
        return 1
    url = urlparse(settings.client_url)
    argv = [binary, "-h", url.hostname or "127.0.0.1", "-p", str(url.port or 6379)]
    if url.password:
        argv += ["--user", url.username or "default", "--pass", url.password, "--no-auth-warning"]
    if url.scheme == "rediss":
        argv.append("--tls")
    if url.path.strip("/"):
        argv += ["-n", url.path.strip("/")]
    os.execv(binary, argv + args.args)
    return 0  # not reached


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


def _add_client_commands(sub: argparse._SubParsersAction[Any]) -> None:
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


def _port_arg(text: str) -> int:
    try:
        return parse_port(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port: {exc}") from None


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="sumbatch",
        description="Event-sourced batch task service on Redis Streams. "
        "Configured by environment variables (REDIS_URL, SUMBATCH_*); see the README.",
    )
    sub = top.add_subparsers(dest="command", required=True)

    up = sub.add_parser(
        "up", help="run everything: server (if no REDIS_URL), api, workers, projector"
    )
    up.add_argument("--host", default=None)
    up.add_argument("--port", type=_port_arg, default=None)
    up.add_argument("--workers", type=int, default=None, help="worker processes (SUMBATCH_WORKERS)")
    up.add_argument(
        "--cluster",
        type=int,
        default=0,
        metavar="N",
        help="with no REDIS_URL: start a local Redis Cluster of N masters instead of one server",
    )
    up.set_defaults(func=cmd_up)

    api = sub.add_parser("api", help="run the REST API")
    api.add_argument("--host", default=None)
    api.add_argument("--port", type=_port_arg, default=None)
    api.set_defaults(func=cmd_api)

    audit = sub.add_parser("audit", help="print one group's whole history")
    audit.add_argument("group_task_id")
    audit.set_defaults(func=cmd_audit)

    tail = sub.add_parser("tail", help="print events live as they are appended")
    tail.add_argument("--from-start", action="store_true", help="print the whole log first")
    tail.set_defaults(func=cmd_tail)

    sub.add_parser(
        "partitions", help="each partition's event log (and master, on a cluster)"
    ).set_defaults(func=cmd_partitions)

    cli = sub.add_parser("redis-cli", help="run redis-cli/valkey-cli against the configured server")
    cli.add_argument("args", nargs=argparse.REMAINDER)
    cli.set_defaults(func=cmd_redis_cli)

    _add_client_commands(sub)

    # The commands that run the consumers of the log (worker, projector, replay) come
    # from the consumers package, which depends on this one and never the other way.
    for plugin in entry_points(group=COMMANDS):
        plugin.load()(sub)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        print(f"sumbatch: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level,
        format="%(asctime)s %(process)d %(name)s %(levelname)s %(message)s",
    )
    parent = os.environ.pop(PARENT_PID_ENV, None)
    if parent:
        _exit_with_parent(int(parent), settings.shutdown_grace + 10)
    try:
        result: int = args.func(settings, args)
    except ConfigError as exc:
        print(f"sumbatch: {exc}", file=sys.stderr)
        return 2
    return result


def _exit_with_parent(parent: int, grace: float) -> None:
    """For the children of `up`: when it dies, even by `kill -9`, we are reparented;
    then stop as on its SIGTERM (finish or hand back work), and at once after
    ``grace``. Polling getppid works wherever we run, unlike PR_SET_PDEATHSIG."""
    if os.getppid() != parent:
        log.warning("sumbatch up (pid %d) is already gone; exiting", parent)
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        log.warning("sumbatch up (pid %d) is gone; stopping", parent)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
