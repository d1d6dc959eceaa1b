"""sumbatch's benchmark: the real processes, driven over HTTP, beside the ceiling.

    .venv/bin/python ops/bench/bench.py            # everything (about 3 minutes)
    .venv/bin/python ops/bench/bench.py --quick    # smaller counts, no 3-10 s cases
    .venv/bin/python ops/bench/bench.py --strict   # exit 1 when a goal is not met

Starts its own Redis-compatible server, measures the raw Streams ceiling loop on it
(ops/bench/ceiling.py) and the HTTP client's floor against an in-memory stub
(ops/bench/stub.py), then runs each scenario against `sumbatch api`, `sumbatch
worker` and `sumbatch projector` processes, checking every sum. Prints a table, each
goal beside its figure with pass or FAIL, and writes JSON to ops/bench/results/
(ops/bench/report.py); a figure not measured is printed as missing (and fails its goal).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ceiling
import httpx2 as httpx
import redis
from common import peak_rss_kib, service, tasks_for, wait_ready
from report import Goal, Row, report

from sumbatch.model.keys import Keys
from sumbatch.processes.embedded import EmbeddedServer
from sumbatch.testing.ports import free_port
from sumbatch.testing.waiting import wait_until_sync

HERE = Path(__file__).resolve().parent
# Groups each client keeps in flight: one at a time, a client polling every 50 ms can
# never pass 100 tasks / 50 ms = 2,000 tasks/s, whatever the server does.
WINDOW = 4


# The namespace of the no-delay scenarios.
NAMESPACE = "bench0"


# How the client learns a group is processed: polling every `poll` s, or long-polls.
LONG_POLL = -1.0


async def run_group(client: httpx.AsyncClient, size: int, poll: float) -> tuple[float, float, int]:
    """POST one group, poll until processed (or long-poll, with ``poll=LONG_POLL``),
    check the sums. Returns (post s, total s, GETs made)."""
    body, expected = tasks_for(size)
    start = time.perf_counter()
    response = await client.post("/grouptasks", json=body)
    response.raise_for_status()
    posted = time.perf_counter() - start
    gid = response.json()["groupTaskId"]
    gets = 0
    path = f"/grouptasks/{gid}?wait=30" if poll == LONG_POLL else f"/grouptasks/{gid}"
    while True:
        group = (await client.get(path)).json()
        gets += 1
        if group["grouptaskProcessed"]:
            break
        if poll > 0:
            await asyncio.sleep(poll)
    total = time.perf_counter() - start
    if group["results"] != expected:
        raise SystemExit(f"wrong results for group {gid}")
    return posted, total, gets


async def one_group(base: str, size: int, poll: float) -> tuple[float, float, int]:
    async with httpx.AsyncClient(base_url=base, timeout=120) as client:
        return await run_group(client, size, poll)


async def throughput(
    base: str, groups: int, size: int, clients: int, poll: float, window: int = 1
) -> float:
    """tasks/s with `clients` concurrent clients, each with up to `window` groups in
    flight, each group posted then polled every `poll` s until processed."""
    todo = list(range(groups))

    async def group_loop(client: httpx.AsyncClient) -> None:
        while todo:
            todo.pop()
            await run_group(client, size, poll)

    async def one_client() -> None:
        async with httpx.AsyncClient(base_url=base, timeout=60) as client:
            await asyncio.gather(*(group_loop(client) for _ in range(window)))

    start = time.perf_counter()
    await asyncio.gather(*(one_client() for _ in range(clients)))
    return groups * size / (time.perf_counter() - start)


async def latencies(base: str, reps: int, size: int, poll: float) -> list[tuple[float, float]]:
    async with httpx.AsyncClient(base_url=base, timeout=60) as client:
        await run_group(client, size, poll)  # warm up
        out = []
        for _ in range(reps):
            posted, total, _ = await run_group(client, size, poll)
            out.append((posted, total))
        return out


async def poll_cost(base: str, size: int) -> dict[str, float | None]:
    """GET latency of one big group while it runs, early in its life, and once finished
    (its log longest); and, GET by GET beside the running group's, of a finished group
    of the same size, which shows what the run costs every request on this machine's
    cores (the processes busy with the run take them from the API). A phase no GET
    landed in has no figure (None)."""
    body, expected = tasks_for(size)
    async with httpx.AsyncClient(base_url=base, timeout=60) as client:
        done_gid = (await client.post("/grouptasks", json=body)).json()["groupTaskId"]
        for _ in range(10):
            answer = (await client.get(f"/grouptasks/{done_gid}?wait=30")).json()
            if answer["grouptaskProcessed"]:
                break
        else:
            raise SystemExit(f"group {done_gid} not processed in 300 s")
        gid = (await client.post("/grouptasks", json=body)).json()["groupTaskId"]
        samples: list[tuple[int, float]] = []  # (tasks completed, seconds)
        beside: list[float] = []  # the finished group's GETs meanwhile
        while True:
            start = time.perf_counter()
            group = (await client.get(f"/grouptasks/{gid}")).json()
            samples.append((group["tasksCompleted"], time.perf_counter() - start))
            if group["grouptaskProcessed"]:
                break
            start = time.perf_counter()
            await client.get(f"/grouptasks/{done_gid}")
            beside.append(time.perf_counter() - start)
            await asyncio.sleep(0.005)
        if group["results"] != expected:
            raise SystemExit(f"wrong results for group {gid}")
        late = []
        for _ in range(50):
            start = time.perf_counter()
            await client.get(f"/grouptasks/{gid}")
            late.append(time.perf_counter() - start)
    running = [s for done, s in samples if done < size]
    early = [s for done, s in samples if done <= size // 10]
    return {
        "p50_while_running_ms": p50_ms(running),
        "p50_early_ms": p50_ms(early),
        "p50_finished_ms": p50_ms(late),
        "p50_finished_beside_ms": p50_ms(beside),
    }


def p50_ms(seconds: list[float]) -> float | None:
    return statistics.median(seconds) * 1000 if seconds else None


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def redis_memory_per_task(url: str, namespace: str, base: str, groups: int, size: int) -> float:
    """Redis memory per finished task, before anything expires: once the run is over and
    the workers' trim has dropped the work entries every worker acknowledged, the least
    of a few samples (the server's buffers for clients and the AOF come and go)."""
    client = redis.Redis.from_url(url)
    work = Keys(namespace).work

    def at_rest() -> int:
        wait_until_sync(lambda: client.xlen(work) <= 1, 30, "the work stream's trim")
        samples = []
        for _ in range(5):
            samples.append(int(client.info("memory")["used_memory"]))
            time.sleep(0.1)
        return min(samples)

    try:
        before = at_rest()
        asyncio.run(throughput(base, groups, size, clients=4, poll=0.05))
        after = at_rest()
    finally:
        client.close()
    return (after - before) / (groups * size)


def main() -> None:
    parser = argparse.ArgumentParser(description="sumbatch benchmark")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--workers", type=int, default=1, help="worker processes (0-delay cases)")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a goal is not met")
    args = parser.parse_args()
    quick = args.quick
    rows: list[Row] = []
    data = Path(tempfile.mkdtemp(prefix="sumbatch-bench-"))
    server = EmbeddedServer(data, free_port())
    server.start()
    stub_port = free_port()
    stub = subprocess.Popen([sys.executable, str(HERE / "stub.py"), str(stub_port)])
    try:
        wait_ready(f"http://127.0.0.1:{stub_port}")
        print("measuring the ceiling loop ...", flush=True)
        loop_tasks = 50_000 if quick else 200_000
        ceil = ceiling.measure(server.url, loop_tasks)
        e2e_ceiling = ceil["end_to_end_tasks_per_s"]
        produce_ceiling = ceil["produce_tasks_per_s"]
        rows.append(Row(f"ceiling: end-to-end tasks/s ({loop_tasks:,} tasks)", e2e_ceiling,
                        "tasks/s"))  # fmt: skip
        rows.append(Row(f"ceiling: produce tasks/s ({loop_tasks:,} tasks)", produce_ceiling,
                        "tasks/s"))  # fmt: skip

        stub_base = f"http://127.0.0.1:{stub_port}"
        groups = 50 if quick else 200
        floor_tps = asyncio.run(throughput(stub_base, groups, 100, 8, 0.05, WINDOW))
        rows.append(Row(f"client floor (stub): tasks/s, 8 clients x {WINDOW} groups of 100",
                        floor_tps, "tasks/s"))  # fmt: skip
        stub_lat = asyncio.run(latencies(stub_base, 100, 4, poll=0))
        floor_p50 = pct([t for _, t in stub_lat], 0.5) * 1000
        rows.append(Row("client floor (stub): 4-task round trip p50", floor_p50, "ms"))

        print("end-to-end, ingest, latency, polling (SUMBATCH_DELAY=0) ...", flush=True)
        with service(server.url, NAMESPACE, "0", args.workers) as (base, _):
            tps = asyncio.run(throughput(base, groups, 100, 8, 0.05, WINDOW))
            rows.append(Row(f"end-to-end tasks/s: {groups} x 100, 8 clients x {WINDOW} in flight",
                            tps, "tasks/s", e2e_ceiling, "ceiling e2e",
                            Goal("ratio", ">=", 0.5)))  # fmt: skip
            rows.append(Row("  same, client floor as reference", tps, "tasks/s", floor_tps,
                            "client floor"))  # fmt: skip
            waited = asyncio.run(throughput(base, groups, 100, 8, LONG_POLL, WINDOW))
            rows.append(Row("  same, long-polling (?wait=) instead", waited, "tasks/s",
                            e2e_ceiling, "ceiling e2e"))  # fmt: skip
            seq = asyncio.run(throughput(base, groups, 100, 8, 0.05, 1))
            rows.append(Row("end-to-end tasks/s: 8 clients, one group at a time each", seq,
                            "tasks/s", e2e_ceiling, "ceiling e2e"))  # fmt: skip
            ingest = asyncio.run(latencies(base, 10 if quick else 30, 1000, poll=0.05))
            post_p50 = pct([p for p, _ in ingest], 0.5)
            rows.append(Row("ingest: POST of 1,000 tasks p50", post_p50 * 1000, "ms"))
            rows.append(Row("ingest: accepted tasks/s (1,000 / POST p50)", 1000 / post_p50,
                            "tasks/s", produce_ceiling, "ceiling produce",
                            Goal("ratio", ">=", 1.0)))  # fmt: skip
            lat = asyncio.run(latencies(base, 100 if quick else 300, 4, poll=0))
            totals = [t * 1000 for _, t in lat]
            rows.append(Row("latency: 4 tasks, POST until a GET shows processed, p50",
                            pct(totals, 0.5), "ms", floor_p50, "client floor",
                            Goal("ratio", "<=", 2.0)))  # fmt: skip
            rows.append(Row("latency: the same, p99", pct(totals, 0.99), "ms", floor_p50,
                            "client floor"))  # fmt: skip
            lat_wait = asyncio.run(latencies(base, 100 if quick else 300, 4, poll=LONG_POLL))
            waits = [t * 1000 for _, t in lat_wait]
            rows.append(Row("latency: 4 tasks, POST until ?wait= answers processed, p50",
                            pct(waits, 0.5), "ms", floor_p50, "client floor",
                            Goal("ratio", "<=", 1.5)))  # fmt: skip
            rows.append(Row("latency: the same, p99", pct(waits, 0.99), "ms", floor_p50,
                            "client floor"))  # fmt: skip
            big = 2000 if quick else 10_000
            cost = asyncio.run(poll_cost(base, big))
            rows.append(Row(f"polling: GET of a {big:,}-task group while running p50",
                            cost["p50_while_running_ms"], "ms", cost["p50_finished_ms"],
                            "finished GET", Goal("ratio", "<=", 2.0)))  # fmt: skip
            rows.append(Row("polling: GET p50 when <= 10% done / when finished",
                            cost["p50_early_ms"], "ms", cost["p50_finished_ms"],
                            "finished GET"))  # fmt: skip
            rows.append(Row("  GET of a finished group that size, meanwhile, p50",
                            cost["p50_finished_beside_ms"], "ms", cost["p50_finished_ms"],
                            "finished GET"))  # fmt: skip
            per_task = redis_memory_per_task(server.url, NAMESPACE, base, 20, 500)
            rows.append(Row("Redis memory per finished task: 20 x 500, at rest, before expiry",
                            per_task, "bytes", goal=Goal("value", "<=", 400)))  # fmt: skip

        if not quick:
            print("the original workload: 1,000 x 3-10 s on one worker ...", flush=True)
            with service(server.url, "bench1", "3-10", 1) as (base, _):
                _, total, _ = asyncio.run(one_group(base, 1000, 0.05))
                # The longest delay is 10 s: the reference is that floor.
                rows.append(Row("1,000 tasks x 3-10 s, one worker: processed in", total, "s",
                                10.0, "longest delay", Goal("ratio", "<=", 1.2)))  # fmt: skip
            print("10,000 x 3-10 s under `sumbatch up` defaults ...", flush=True)
            with service(server.url, "bench2", "3-10", 0, up=True) as (base, procs):
                _, total, _ = asyncio.run(one_group(base, 10_000, 0.1))
                rows.append(Row("10,000 tasks x 3-10 s, `sumbatch up`: processed in", total, "s",
                                10.0, "longest delay", Goal("ratio", "<=", 1.5)))  # fmt: skip
                rss = peak_worker_rss(procs[0].pid)
                rows.append(Row("  worker peak RSS", None if rss is None else rss / 1024, "MiB"))
    finally:
        stub.send_signal(signal.SIGTERM)
        stub.wait(10)
        server.stop()

    unmet = report(rows, args)
    if args.strict and unmet:
        sys.exit(1)


def peak_worker_rss(up_pid: int) -> int | None:
    """The largest peak RSS (KiB) of the `sumbatch worker` children of a `sumbatch up`
    process; None unless every one was found and read, since the largest of some is
    not the figure."""
    out = subprocess.run(["ps", "-o", "pid=,args=", "--ppid", str(up_pid)],
                         capture_output=True, text=True, check=False).stdout  # fmt: skip
    pids = [int(line.split()[0]) for line in out.splitlines() if " worker" in line]
    peaks = [peak_rss_kib(pid) for pid in pids]
    known = [kib for kib in peaks if kib is not None]
    return max(known) if known and len(known) == len(peaks) else None


if __name__ == "__main__":
    main()
