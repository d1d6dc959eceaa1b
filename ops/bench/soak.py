"""A soak: a million tasks (100 groups of 10,000, no delay) through the real processes,
every sum checked, with Redis memory and the streams' lengths sampled all along.

    .venv/bin/python ops/bench/soak.py                      # 100 x 10,000, retention 30 s
    .venv/bin/python ops/bench/soak.py --groups 10 --retention 10   # a quick look

Results, cache entries and the log are kept for --retention seconds
(SUMBATCH_RESULT_TTL, SUMBATCH_CACHE_TTL, SUMBATCH_LOG_RETENTION), so once that much time
has passed, memory should stop growing: what is kept is what the last --retention
seconds wrote. The soak prints memory over time, how flat it is after the first two
retention periods (the largest sample over the smallest), the streams' lengths at the
end beside what a retention period of tasks would hold, and exits 1 if a sum is wrong
or a group never finished.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx2 as httpx
import redis
from common import service, tasks_for

from sumbatch.model.keys import Keys
from sumbatch.processes.embedded import EmbeddedServer
from sumbatch.testing.ports import free_port

NAMESPACE = "soak"


@dataclass
class Sample:
    at: float
    used_memory: int
    events: int
    work: int
    keys: int
    done: int


@dataclass
class Soak:
    samples: list[Sample] = field(default_factory=list)
    done: int = 0
    wrong: list[str] = field(default_factory=list)


async def run_groups(base: str, groups: int, size: int, window: int, soak: Soak) -> None:
    todo = list(range(groups))

    async def one(client: httpx.AsyncClient) -> None:
        while todo:
            todo.pop()
            body, expected = tasks_for(size)
            posted = await client.post("/grouptasks", json=body)
            posted.raise_for_status()
            gid = posted.json()["groupTaskId"]
            while True:
                status = (await client.get(f"/grouptasks/{gid}?wait=30")).json()
                if status["grouptaskProcessed"]:
                    break
            if status["results"] != expected:
                soak.wrong.append(gid)
            soak.done += size

    async with httpx.AsyncClient(base_url=base, timeout=120) as client:
        await asyncio.gather(*(one(client) for _ in range(window)))


async def sample(url: str, soak: Soak, stop: asyncio.Event, start: float) -> None:
    client = redis.asyncio.Redis.from_url(url)
    keys = Keys(NAMESPACE)
    try:
        while not stop.is_set():
            memory = await client.info("memory")
            soak.samples.append(
                Sample(
                    at=time.monotonic() - start,
                    used_memory=int(memory["used_memory"]),
                    events=int(await client.xlen(keys.events)),
                    work=int(await client.xlen(keys.work)),
                    keys=int(await client.dbsize()),
                    done=soak.done,
                )
            )
            try:
                await asyncio.wait_for(stop.wait(), 1.0)
            except TimeoutError:
                pass
    finally:
        await client.aclose()


async def soak_run(url: str, base: str, args: argparse.Namespace) -> Soak:
    soak = Soak()
    stop = asyncio.Event()
    start = time.monotonic()
    sampler = asyncio.create_task(sample(url, soak, stop, start))
    try:
        await run_groups(base, args.groups, args.size, args.window, soak)
    finally:
        stop.set()
        await sampler
    return soak


def main() -> None:
    parser = argparse.ArgumentParser(description="sumbatch soak")
    parser.add_argument("--groups", type=int, default=100)
    parser.add_argument("--size", type=int, default=10_000)
    parser.add_argument("--window", type=int, default=2, help="groups in flight at once")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--retention", type=int, default=30, help="seconds results are kept")
    args = parser.parse_args()
    data = Path(tempfile.mkdtemp(prefix="sumbatch-soak-"))
    server = EmbeddedServer(data, free_port())
    server.start()
    ttl = str(args.retention)
    env = {"SUMBATCH_RESULT_TTL": ttl, "SUMBATCH_CACHE_TTL": ttl, "SUMBATCH_LOG_RETENTION": ttl}
    try:
        client = redis.Redis.from_url(server.url)
        empty = int(client.info("memory")["used_memory"])
        client.close()
        started = time.monotonic()
        with service(server.url, NAMESPACE, "0", args.workers, env=env) as (base, _):
            soak = asyncio.run(soak_run(server.url, base, args))
        took = time.monotonic() - started
    finally:
        server.stop()
    report(soak, args, empty, took)
    if soak.wrong or soak.done != args.groups * args.size:
        sys.exit(1)


def report(soak: Soak, args: argparse.Namespace, empty: int, took: float) -> None:
    total = args.groups * args.size
    print(f"\n{soak.done:,} of {total:,} tasks processed in {took:.0f} s "
          f"({soak.done / took:,.0f} tasks/s); wrong sums in {len(soak.wrong)} groups")  # fmt: skip
    print(f"\n{'s':>6} {'tasks done':>12} {'used_memory MiB':>16} {'events':>9} {'work':>8} "
          f"{'keys':>9}")  # fmt: skip
    step = max(1, len(soak.samples) // 25)
    for s in soak.samples[::step]:
        print(f"{s.at:6.0f} {s.done:12,} {(s.used_memory - empty) / 2**20:16.1f} "
              f"{s.events:9,} {s.work:8,} {s.keys:9,}")  # fmt: skip
    settled = [s for s in soak.samples if s.at > 2 * args.retention]
    if len(settled) < 3:
        print("\nmemory flat: missing (the run was shorter than two retention periods)")
        return
    memory = [s.used_memory - empty for s in settled]
    rate = soak.done / took
    kept = rate * args.retention
    # Memory beside what it should hold: the tasks finished in the retention period up
    # to each sample (the rate varies, and what is kept with it).
    per_retained = []
    for s in settled:
        window = [x for x in soak.samples if s.at - args.retention <= x.at <= s.at]
        retained = window[-1].done - window[0].done
        if retained:
            per_retained.append((s.used_memory - empty) / retained)
    print(f"\nafter {2 * args.retention} s (two retention periods), {len(settled)} samples:")
    print(f"  memory max / min: {max(memory) / min(memory):.2f} (1.00 is flat); "
          f"median {statistics.median(memory) / 2**20:.1f} MiB")  # fmt: skip
    print(f"  memory per task of one retention period ({kept:,.0f} tasks at the run's rate): "
          f"{statistics.median(memory) / kept:,.0f} B")  # fmt: skip
    if per_retained:
        print(f"  memory per task finished in the retention period before each sample: "
              f"median {statistics.median(per_retained):,.0f} B, "
              f"min {min(per_retained):,.0f}, max {max(per_retained):,.0f}")  # fmt: skip
    last = soak.samples[-1]
    print(f"  at the end: events {last.events:,} (one retention period of events is about "
          f"{kept:,.0f} tasks' worth), work {last.work:,}, keys {last.keys:,}")  # fmt: skip


if __name__ == "__main__":
    main()
