"""How long a small group waits behind big ones: fair share (issue 18), measured.

Starts its own server (embedded binary, temp dir, free port), two `sumbatch worker`
processes with SUMBATCH_WORKER_CONCURRENCY=100 and tasks of SUMBATCH_DELAY=0.5-1 s (a
worker that runs tens of tasks at once, as real work does), and `sumbatch projector`.
First the small group's time on the idle service (submit to GroupFinished, the median
of a few); then ``--big`` groups of ``--size`` tasks are submitted and, just after
them, the small group again: its time there, as a ratio to the idle one. First come,
first served, it would wait for every task ahead of it (``fifo estimate``: those tasks
over the throughput measured meanwhile). Then the big groups are cancelled.

    python ops/bench/fairness.py                  # 10 groups of 10,000 tasks
    python ops/bench/fairness.py --big 3 --size 2000 --strict

``--strict`` exits 1 when the small group's time behind the big ones is more than 3
times its idle time.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import statistics
import tempfile
import time
import uuid
from pathlib import Path

from sumbatch.config import Settings
from sumbatch.model.tasks import Delay
from sumbatch.processes.embedded import EmbeddedServer
from sumbatch.store import Store, open_store
from sumbatch.testing.groups import submit
from sumbatch.testing.ports import free_port
from sumbatch.testing.processes import Processes, blocked_in_xreadgroup, env_for, processes
from sumbatch.testing.waiting import wait_until

DELAY = Delay(0.5, 1.0)
CONCURRENCY = 100
SMALL = 4
BOUND = 3.0


async def time_to_finish(store: Store, gid: str, within: float) -> float:
    """Seconds from now until the group's log ends with GroupFinished."""
    began = time.monotonic()
    await wait_until(lambda: store.group_finished_logged(gid), within, f"group {gid} to finish")
    return time.monotonic() - began


async def small_group(store: Store, within: float) -> float:
    began = time.monotonic()
    # Parameters never seen before: no cache hit, every task runs its delay.
    gid, _ = await submit(store, [(random.randrange(10**12), n) for n in range(SMALL)])
    await time_to_finish(store, gid, within)
    return time.monotonic() - began


async def measure(settings: Settings, procs: Processes, big: int, size: int) -> dict[str, float]:
    store = open_store(settings)
    try:
        await store.ensure_worker_group()
        env = env_for(settings)
        env["SUMBATCH_WORKER_CONCURRENCY"] = str(CONCURRENCY)
        workers = [procs.start(settings, "worker", env=env) for _ in range(2)]
        procs.start(settings, "projector", env=env)

        async def reading() -> bool:
            return await blocked_in_xreadgroup(store, workers)

        await wait_until(reading, 60, "both workers reading")
        idle = statistics.median([await small_group(store, 60) for _ in range(3)])
        before = int(await store.redis.hget(store.keys.stats, "tasksCompleted") or 0)
        began = time.monotonic()
        bigs = [
            await submit(store, [(random.randrange(10**12), n) for n in range(size)])
            for _ in range(big)
        ]
        behind = await small_group(store, 600)
        elapsed = time.monotonic() - began
        done = int(await store.redis.hget(store.keys.stats, "tasksCompleted") or 0) - before
        rate = done / elapsed if elapsed > 0 else 0.0
        for gid, _ in bigs:
            await store.cancel(gid)
        return {
            "idle_s": idle,
            "behind_s": behind,
            "ratio": behind / idle,
            "tasks_per_s": rate,
            "fifo_estimate_s": big * size / rate if rate else float("inf"),
        }
    finally:
        await store.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--big", type=int, default=10)
    parser.add_argument("--size", type=int, default=10_000)
    parser.add_argument("--strict", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as data:
        server = EmbeddedServer(data, free_port())
        server.start()
        try:
            settings = Settings(
                redis_url=server.url, namespace=f"fair-{uuid.uuid4().hex[:6]}", delay=DELAY
            )
            with processes(Path(data)) as procs:
                figures = asyncio.run(measure(settings, procs, args.big, args.size))
        finally:
            server.stop()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, "
          f"{platform.python_implementation()} {platform.python_version()}; "
          f"server: {server.binary}")  # fmt: skip
    print(f"2 workers x {CONCURRENCY} at once, tasks of {DELAY.low:g}-{DELAY.high:g} s; "
          f"a {SMALL}-task group behind {args.big} x {args.size:,} tasks")  # fmt: skip
    print(f"  idle (median of 3)    {figures['idle_s']:8.2f} s")
    print(f"  behind the big groups {figures['behind_s']:8.2f} s   "
          f"ratio {figures['ratio']:.2f} (bound {BOUND:g})")  # fmt: skip
    print(f"  throughput meanwhile  {figures['tasks_per_s']:8.0f} tasks/s; first come, first "
          f"served it would wait about {figures['fifo_estimate_s']:.0f} s")  # fmt: skip
    if args.strict and figures["ratio"] > BOUND:
        raise SystemExit(f"--strict: ratio {figures['ratio']:.2f} > {BOUND:g}")


if __name__ == "__main__":
    main()
