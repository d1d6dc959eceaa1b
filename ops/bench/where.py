"""Where the time goes: CPU per task of every process at full load, Redis's share by
command and by script, and the stages of a small group's latency.

    .venv/bin/python ops/bench/where.py            # about a minute
    .venv/bin/python ops/bench/where.py --groups 100

Runs the real processes (API, one worker, projector) on a server of its own and drives
them as bench.py does: groups of 100 tasks from 8 clients with 4 groups in flight each,
polling every 50 ms, then one 4-task group at a time with ``?wait=``. Prints:

- CPU µs per task of each process, this load generator included, read from /proc, and
  the cores the machine was busy meanwhile: on a machine with few cores every process
  takes its CPU from the others, so this is what bounds tasks/s;
- Redis µs per task by command (``INFO commandstats``; a script's time includes the
  commands it runs) and by script (``SLOWLOG`` at threshold 0, each script named);
- for 4-task groups, the median of each stage: the POST, its GroupSubmitted to the
  group's GroupFinished (ms resolution: stream ids), GroupFinished to the answer; and
  the CPU each process spends per group (the 10 warm-up groups included);
- the trace of one such group: every command Redis ran for it, with its time and
  connection (MONITOR), from the POST to the answer.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import cast

import bench
import httpx2 as httpx
import redis
from common import service, tasks_for
from cpu import cpu_seconds, machine_busy_seconds

from sumbatch import scripts
from sumbatch.model.keys import Keys
from sumbatch.processes.embedded import EmbeddedServer
from sumbatch.testing.monitor import Monitor
from sumbatch.testing.ports import free_port

SCRIPT_NAMES = {hashlib.sha1(getattr(scripts, n).encode()).hexdigest(): n for n in scripts.__all__}
NAMESPACE = "where"


def cpu_per_task(spent: dict[str, float], tasks: int, run: float, busy: float | None) -> None:
    """Prints each role's CPU µs per task; ``busy``: machine CPU seconds meanwhile."""
    print(f"\nCPU µs per task ({tasks:,} tasks in {run:.1f} s: {tasks / run:,.0f} tasks/s)")
    total = 0.0
    for role, seconds in spent.items():
        per_task = seconds / tasks * 1e6
        total += per_task
        print(f"  {role:<16} {per_task:7.1f}")
    print(f"  {'all of them':<16} {total:7.1f}")
    if busy is not None:
        print(f"  cores busy, whole machine: {busy / run:.2f} of {os.cpu_count()}")


def redis_per_task(client: redis.Redis, tasks: int) -> None:
    stats = client.info("commandstats")
    print("\nRedis µs per task, by command (a script's time includes its commands)")
    for name, row in sorted(stats.items(), key=lambda kv: -kv[1]["usec"])[:10]:
        command = name.removeprefix("cmdstat_")
        print(f"  {command:<18} {row['usec'] / tasks:7.1f}   ({row['calls'] / tasks:.2f} calls)")
    scripts_by: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for entry in client.slowlog_get(1_000_000):
        words = entry["command"].split()
        if words[0].upper() == b"EVALSHA":
            name = SCRIPT_NAMES.get(words[1].decode(), words[1].decode()[:12])
            scripts_by[name][0] += 1
            scripts_by[name][1] += entry["duration"]
    print("Redis µs per task, by script")
    for name, (calls, usec) in sorted(scripts_by.items(), key=lambda kv: -kv[1][1]):
        print(f"  {name:<18} {usec / tasks:7.1f}   ({calls} calls, {usec / calls:,.0f} µs each)")


async def stages(base: str, client: redis.Redis, groups: int) -> None:
    keys = Keys(NAMESPACE)
    rows = []
    async with httpx.AsyncClient(base_url=base, timeout=30) as http:
        for n in range(groups + 10):
            body, expected = tasks_for(4)
            sent = time.time() * 1000
            gid = (await http.post("/grouptasks", json=body)).json()["groupTaskId"]
            posted = time.time() * 1000
            group = (await http.get(f"/grouptasks/{gid}?wait=30")).json()
            answered = time.time() * 1000
            if group["results"] != expected:
                raise SystemExit(f"wrong results for group {gid}")
            first: dict[str, int] = {}
            log = cast(list[tuple[bytes, dict[bytes, bytes]]], client.xrange(keys.group_log(gid)))
            for entry_id, fields in log:
                first.setdefault(fields[b"type"].decode(), int(entry_id.split(b"-")[0]))
            if n >= 10:  # the first ones warm up
                logged = first["GroupSubmitted"], first["GroupFinished"]
                rows.append((sent, posted, *logged, answered))
    median = statistics.median
    print(f"\n4-task groups with ?wait=, medians of {groups} (ms; stream ids count whole ms)")
    print(f"  POST answered           {median([r[1] - r[0] for r in rows]):6.2f}")
    print(f"  submitted -> finished   {median([r[3] - r[2] for r in rows]):6.1f}")
    print(f"  finished -> answered    {median([r[4] - r[3] for r in rows]):6.1f}")
    print(f"  POST sent -> answered   {median([r[4] - r[0] for r in rows]):6.2f}")


def trace(base: str, url: str) -> None:
    """Every command Redis ran for one 4-task group (MONITOR, µs clock), from the POST
    to the answer of its ``?wait=``: which process did what, and when. MONITOR costs the
    server time of its own, so the times are a little longer than unwatched."""

    async def one_group() -> tuple[float, float, float]:
        async with httpx.AsyncClient(base_url=base, timeout=30) as http:
            for _ in range(5):  # warm: connections made, scripts loaded
                gid = (await http.post("/grouptasks", json=tasks_for(4)[0])).json()["groupTaskId"]
                await http.get(f"/grouptasks/{gid}?wait=30")
            sent = time.time()
            gid = (await http.post("/grouptasks", json=tasks_for(4)[0])).json()["groupTaskId"]
            posted = time.time()
            await http.get(f"/grouptasks/{gid}?wait=30")
            return sent, posted, time.time()

    with Monitor(url) as watched:
        sent, posted, answered = asyncio.run(one_group())
    seen = watched.seen
    print("\nOne 4-task group, traced (ms since the POST was sent; port = a connection)")
    print(f"  {(posted - sent) * 1000:7.2f}  the client has the POST's answer")
    for command in seen:
        at = float(command["time"])
        if sent <= at <= answered:
            text = str(command["command"])[:96]
            print(f"  {(at - sent) * 1000:7.2f}  {command.get('client_port', '?'):>6}  {text}")
    print(f"  {(answered - sent) * 1000:7.2f}  the client has the ?wait= answer")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--groups", type=int, default=300, help="groups of 100 at full load")
    args = parser.parse_args()
    server = EmbeddedServer(Path(tempfile.mkdtemp(prefix="sumbatch-where-")), free_port())
    server.start()
    try:
        with service(server.url, NAMESPACE, "0", 1) as (base, children):
            client = redis.Redis.from_url(server.url)
            asyncio.run(bench.throughput(base, 40, 100, 8, 0.05, bench.WINDOW))  # warm up
            assert server.process is not None
            roles = {"redis": server.process.pid, "api": children[0].pid,
                     "worker": children[1].pid, "projector": children[2].pid,
                     "load generator": os.getpid()}  # fmt: skip
            client.config_resetstat()
            client.config_set("slowlog-max-len", 1_000_000)
            client.config_set("slowlog-log-slower-than", 0)
            client.slowlog_reset()
            before = {role: cpu_seconds(pid) for role, pid in roles.items()}
            busy_before, started = machine_busy_seconds(), time.perf_counter()
            asyncio.run(bench.throughput(base, args.groups, 100, 8, 0.05, bench.WINDOW))
            run = time.perf_counter() - started
            busy_after = machine_busy_seconds()
            spent = {role: (cpu_seconds(pid) or 0.0) - (before[role] or 0.0)
                     for role, pid in roles.items()}  # fmt: skip
            client.config_set("slowlog-log-slower-than", 10_000)
            busy = None if busy_before is None or busy_after is None else busy_after - busy_before
            tasks = args.groups * 100
            cpu_per_task(spent, tasks, run, busy)
            redis_per_task(client, tasks)
            before = {role: cpu_seconds(pid) for role, pid in roles.items()}
            started = time.perf_counter()
            asyncio.run(stages(base, client, 200))
            run = time.perf_counter() - started
            spent = {role: (cpu_seconds(pid) or 0.0) - (before[role] or 0.0)
                     for role, pid in roles.items()}  # fmt: skip
            print(f"  CPU ms per group, one group at a time ({run / 210 * 1000:.1f} ms each):")
            for role, seconds in spent.items():
                print(f"    {role:<16} {seconds / 210 * 1000:6.2f}")
            print(f"    {'all of them':<16} {sum(spent.values()) / 210 * 1000:6.2f}")
            client.close()
            trace(base, server.url)
    finally:
        server.stop()


if __name__ == "__main__":
    main()
