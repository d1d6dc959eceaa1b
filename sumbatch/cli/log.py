"""The log family of ``sumbatch`` subcommands: looking into the event log and the
Redis behind it (``audit``, ``tail``, ``partitions``, ``redis-cli``)."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from typing import Any
from urllib.parse import urlparse

from redis.asyncio.cluster import RedisCluster

from sumbatch.cli.tailing import Merge
from sumbatch.config import Settings
from sumbatch.model import ids
from sumbatch.processes.running import when_reachable
from sumbatch.store import Entry
from sumbatch.store.partitions import Partitions, open_partitions

# Entries read from one partition at a time; how long tail waits when all are idle.
TAIL_BATCH = 1000
TAIL_IDLE = 0.1


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


def add_log_commands(sub: argparse._SubParsersAction[Any]) -> None:
    """audit, tail, partitions, redis-cli: straight to Redis, with no API between."""
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
