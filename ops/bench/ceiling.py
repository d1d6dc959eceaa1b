"""The ceiling: the least a Python task service on Redis Streams must do per task,
with nothing else. XADD work in pipelines of 500; one consumer process reads with
XREADGROUP COUNT 500 and answers each batch with one pipeline of result XADDs and
XACKs. sumbatch's figures are printed as ratios of these, measured on the same server
in the same run.

    python ops/bench/ceiling.py --url redis://127.0.0.1:6379/0 --tasks 200000
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import time
from multiprocessing.queues import Queue
from typing import cast

import redis

WORK, RESULTS, GROUP = "ceiling:work", "ceiling:results", "ceiling"
BATCH = 500
# XREADGROUP's reply on a client that does not decode: [(stream, [(id, fields)])].
Reply = list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]]


def now_s() -> float:
    """Seconds on CLOCK_MONOTONIC, one clock for the whole system on Linux: a time
    taken in the consumer process compares with one taken here (perf_counter's
    reference point is undefined across processes)."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) / 1e9


def produce(url: str, tasks: int) -> float:
    client = redis.Redis.from_url(url)
    start = time.perf_counter()
    for base in range(0, tasks, BATCH):
        pipe = client.pipeline(transaction=False)
        for i in range(base, min(tasks, base + BATCH)):
            pipe.xadd(WORK, {"taskId": str(i), "paramA": str(i), "paramB": "1"})
        pipe.execute()
    return time.perf_counter() - start


def consume(url: str, tasks: int, done: Queue[float]) -> None:
    client = redis.Redis.from_url(url)
    seen = 0
    while seen < tasks:
        reply = cast(Reply, client.xreadgroup(GROUP, "c1", {WORK: ">"}, count=BATCH, block=1000))
        if not reply:
            continue
        entries = reply[0][1]
        pipe = client.pipeline(transaction=False)
        for _, fields in entries:
            result = int(fields[b"paramA"]) + int(fields[b"paramB"])
            pipe.xadd(RESULTS, {"taskId": fields[b"taskId"], "result": str(result)})
        pipe.xack(WORK, GROUP, *[entry_id for entry_id, _ in entries])
        pipe.execute()
        seen += len(entries)
    done.put(now_s())


def measure(url: str, tasks: int) -> dict[str, float]:
    """Produce rate alone, then produce and consume together end to end."""
    client = redis.Redis.from_url(url)
    client.delete(WORK, RESULTS)
    produce_s = produce(url, tasks)
    client.delete(WORK, RESULTS)
    client.xgroup_create(WORK, GROUP, id="0", mkstream=True)
    done: Queue[float] = mp.Queue()
    consumer = mp.Process(target=consume, args=(url, tasks, done))
    consumer.start()
    start = now_s()
    produce(url, tasks)
    end = done.get(timeout=600)
    consumer.join()
    client.delete(WORK, RESULTS)
    return {
        "produce_tasks_per_s": tasks / produce_s,
        "end_to_end_tasks_per_s": tasks / (end - start),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--tasks", type=int, default=200_000)
    args = parser.parse_args()
    print(json.dumps(measure(args.url, args.tasks), indent=2))
