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

import redis

WORK, RESULTS, GROUP = "ceiling:work", "ceiling:results", "ceiling"
BATCH = 500


def produce(url: str, tasks: int) -> float:
    client = redis.Redis.from_url(url)
    start = time.perf_counter()
    for base in range(0, tasks, BATCH):
        pipe = client.pipeline(transaction=False)
        for i in range(base, min(tasks, base + BATCH)):
            pipe.xadd(WORK, {"taskId": str(i), "paramA": str(i), "paramB": "1"})
        pipe.execute()
    return time.perf_counter() - start


def consume(url: str, tasks: int, done: mp.Queue) -> None:  # type: ignore[type-arg]
    client = redis.Redis.from_url(url)
    seen = 0
    while seen < tasks:
        reply = client.xreadgroup(GROUP, "c1", {WORK: ">"}, count=BATCH, block=1000)
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
    done.put(time.perf_counter())


def measure(url: str, tasks: int) -> dict[str, float]:
    """Produce rate alone, then produce and consume together end to end."""
    client = redis.Redis.from_url(url)
    client.delete(WORK, RESULTS)
    produce_s = produce(url, tasks)
    client.delete(WORK, RESULTS)
    client.xgroup_create(WORK, GROUP, id="0", mkstream=True)
    done: mp.Queue = mp.Queue()  # type: ignore[type-arg]
    consumer = mp.Process(target=consume, args=(url, tasks, done))
    consumer.start()
    start = time.perf_counter()
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
