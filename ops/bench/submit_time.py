"""How long the SUBMIT script holds the server for one group, by the group's size, set
against the API's time for one call to Redis (``REDIS_TIMEOUT``) and for a whole POST
(``SUBMIT_BUDGET``), which the largest group allowed must fit well within.

Runs a server of its own (``SUMBATCH_REDIS_SERVER`` picks the binary, as for the
tests), submits groups of each size through the store (as the API does, one call), and
prints, per size: the server's time for the script (its ``INFO commandstats`` usec,
the best of ``--rounds``), the client's wall time for the call, µs per task, and each
as a ratio to the 1,000-task group's per-task cost and to the API's budgets::

    .venv/bin/python ops/bench/submit_time.py                 # about 30 s
    .venv/bin/python ops/bench/submit_time.py --sizes 1000,100000 --rounds 5
"""

from __future__ import annotations

import argparse
import asyncio
import random
import tempfile
import time
from typing import Any

import redis.asyncio as aioredis

from sumbatch.config import Settings
from sumbatch.model.submission import Submission
from sumbatch.model.views import GroupView
from sumbatch.model.wire import TaskIn
from sumbatch.processes.embedded import EmbeddedServer
from sumbatch.store import open_store
from sumbatch.testing.ports import free_port
from sumbatch.web.api import REDIS_TIMEOUT
from sumbatch.web.submit import SUBMIT_BUDGET


async def eval_usec(client: Any) -> int:
    stats = await client.info("commandstats")
    return sum(int(stats.get(f"cmdstat_{c}", {}).get("usec", 0)) for c in ("eval", "evalsha"))


async def measure(url: str, size: int, rounds: int) -> tuple[float, float]:
    """The best server seconds and the best wall seconds of ``rounds`` submissions."""
    rng = random.Random(size)
    tasks = [
        TaskIn(param_a=rng.randrange(10**9), param_b=rng.randrange(10**9)) for _ in range(size)
    ]
    settings = Settings(redis_url=url, namespace=f"bench{size}")
    best_server, best_wall = float("inf"), float("inf")
    async with open_store(settings, socket_timeout=600) as store:
        for _ in range(rounds):
            submission = Submission.of(tasks)
            gid = submission.created.group_task_id
            view = GroupView.submitted(gid, size)
            before = await eval_usec(store.redis)
            started = time.perf_counter()
            await store.submit(submission.event, view)
            wall = time.perf_counter() - started
            server = (await eval_usec(store.redis) - before) / 1e6
            best_server, best_wall = min(best_server, server), min(best_wall, wall)
            await store.redis.flushall()
    return best_server, best_wall


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,10000,100000,1000000")
    parser.add_argument("--rounds", type=int, default=3)
    options = parser.parse_args()
    sizes = [int(s) for s in options.sizes.split(",")]
    with tempfile.TemporaryDirectory() as data:
        server = EmbeddedServer(data, free_port(), appendfsync="no")
        server.start()
        try:
            probe = aioredis.Redis.from_url(server.url)
            # Valkey answers redis_version 7.2.4 for its clients; its own version is apart.
            info = await probe.info("server")
            print(f"server: {server.binary} {info.get('valkey_version', info['redis_version'])}")
            await probe.aclose()
            figures = {size: await measure(server.url, size, options.rounds) for size in sizes}
        finally:
            server.stop()
    base_server = figures[sizes[0]][0] / sizes[0]
    print(f"REDIS_TIMEOUT {REDIS_TIMEOUT:g} s, SUBMIT_BUDGET {SUBMIT_BUDGET:g} s; "
          f"per-task cost relative to the {sizes[0]:,}-task group's")  # fmt: skip
    print(f"{'tasks':>10} {'script s':>9} {'wall s':>8} {'µs/task':>8} {'x per-task':>10} "
          f"{'/timeout':>9} {'/budget':>8}")  # fmt: skip
    for size, (server_s, wall_s) in figures.items():
        print(f"{size:>10,} {server_s:>9.3f} {wall_s:>8.3f} {server_s / size * 1e6:>8.2f} "
              f"{server_s / size / base_server:>10.2f} {wall_s / REDIS_TIMEOUT:>9.3f} "
              f"{wall_s / SUBMIT_BUDGET:>8.3f}")  # fmt: skip


if __name__ == "__main__":
    asyncio.run(main())
