"""How long a killed worker's tasks take to complete elsewhere, per claim timeout.

Starts its own server (embedded binary, temp dir, free port). For each claim timeout:
two `sumbatch worker` processes and `sumbatch projector`; submits one group of tasks
of 1-2 s, waits until every task has started, kills -9 the worker that holds the
entries, and measures from the kill until the orphaned tasks complete on the other
worker. Times come from the event log's entry ids (ms timestamps of this host's clock).

    python ops/bench/recovery.py                       # claim timeouts 1, 5, 30 s
    python ops/bench/recovery.py --timeouts 1 5 --tasks 50

Expected: the orphans' idle time starts at their owner's last renewal (every quarter
of the timeout), the survivor sweeps every quarter of the timeout, then reruns the
task from scratch; so recovery is about timeout x [0.75, 1.25] + the task's delay.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

from common import free_port

from sumbatch.config import Settings
from sumbatch.embedded import EmbeddedServer
from sumbatch.events import WORKER_GROUP
from sumbatch.projection import GroupView
from sumbatch.store import Entry, Store, open_store
from sumbatch.submission import Submission
from sumbatch.wire import TaskIn

ROOT = Path(__file__).resolve().parents[2]
DELAY = "1-2"


@dataclass
class Result:
    claim_timeout_s: float
    tasks: int
    orphaned: int
    first_restart_s: float  # kill -> first orphan started again (attempt 2)
    last_restart_s: float
    first_completion_s: float  # kill -> first orphan completed elsewhere
    median_completion_s: float
    recovery_s: float  # kill -> last orphan completed elsewhere
    expected_s: str  # the window the policy predicts, delay included
    group_processed: bool


def entry_ms(entry_id: str) -> int:
    return int(entry_id.partition("-")[0])


async def wait_for(what: str, within: float, predicate: Any) -> Any:
    deadline = time.monotonic() + within
    while True:
        value = await predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {within:.0f} s waiting for {what}")
        await asyncio.sleep(0.02)


def local_ports(pid: int) -> set[int]:
    """The local ports of the TCP sockets process ``pid`` holds (from Linux /proc)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:  # closed meanwhile
            continue
        if target.startswith("socket:["):
            inodes.add(target.removeprefix("socket:[").removesuffix("]"))
    ports = set()
    for table in ("tcp", "tcp6"):
        path = Path(f"/proc/{pid}/net/{table}")
        for line in path.read_text().splitlines()[1:] if path.exists() else []:
            columns = line.split()
            if columns[9] in inodes:
                ports.add(int(columns[1].rsplit(":", 1)[1], 16))
    return ports


async def blocked_in_xreadgroup(store: Store, workers: list[subprocess.Popen[bytes]]) -> bool:
    """Whether every one of ``workers`` has a connection blocked in XREADGROUP."""
    for worker in workers:
        if worker.poll() is not None:
            raise SystemExit(f"worker {worker.pid} exited with {worker.returncode}")
    blocked = {
        int(c["addr"].rsplit(":", 1)[1])
        for c in await store.redis.client_list()
        if c["cmd"] == "xreadgroup" and "b" in c["flags"]
    }
    return all(local_ports(worker.pid) & blocked for worker in workers)


async def measure(url: str, claim_timeout: float, tasks: int, logs: Path) -> Result:
    namespace = f"recovery-{uuid.uuid4().hex[:8]}"
    settings = Settings(redis_url=url, namespace=namespace)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SUMBATCH_")}
    env.update(
        REDIS_URL=url,
        SUMBATCH_NAMESPACE=namespace,
        SUMBATCH_DELAY=DELAY,
        SUMBATCH_CLAIM_TIMEOUT=str(claim_timeout),
        SUMBATCH_LOG_LEVEL="WARNING",
    )
    store: Store = open_store(settings)
    children: dict[str, subprocess.Popen[bytes]] = {}
    files = []

    def start(name: str, *args: str) -> None:
        log = (logs / f"{namespace}-{name}.log").open("wb")
        files.append(log)
        children[name] = subprocess.Popen(
            [sys.executable, "-m", "sumbatch", *args],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )

    try:
        await store.ensure_worker_group()
        for name in ("w1", "w2"):
            start(name, "worker", "--name", name)
        start("projector", "projector")

        async def both_reading() -> bool:
            # Not XINFO CONSUMERS: before Redis 7.2 it lists a consumer only once it has
            # been served an entry, so it would never list a worker that waits for work.
            return await blocked_in_xreadgroup(store, [children["w1"], children["w2"]])

        await wait_for("both workers to block in XREADGROUP", 30, both_reading)
        rand = random.randrange
        sub = Submission.of([TaskIn(rand(10**9), rand(10**9)) for _ in range(tasks)])
        gid = sub.created.group_task_id
        await store.submit([sub.event], sub.work, GroupView.submitted(gid, tasks))

        async def log_of(kind: str) -> list[tuple[str, dict[str, str]]]:
            entries = cast(list[Entry], await store.redis.xrange(store.keys.group_log(gid)))
            return [(eid, f) for eid, f in entries if f["type"] == kind]

        async def all_started() -> bool:
            return len(await log_of("TaskStarted")) >= tasks

        await wait_for("every task to start", 30, all_started)
        summary: dict[str, Any] = await store.redis.xpending(store.keys.work, WORKER_GROUP)
        holders = {c["name"]: int(c["pending"]) for c in summary["consumers"] or []}
        victim = max(holders, key=lambda name: holders[name])
        pending: list[dict[str, Any]] = await store.redis.xpending_range(
            store.keys.work, WORKER_GROUP, min="-", max="+", count=tasks, consumername=victim
        )
        orphan_entries = [p["message_id"] for p in pending]
        orphans = set()
        for entry_id in orphan_entries:
            work = await store.redis.xrange(store.keys.work, entry_id, entry_id)
            [(_, fields)] = cast(list[Entry], work)
            orphans.add(fields["taskId"])

        children[victim].send_signal(signal.SIGKILL)
        killed_ms = time.time() * 1000
        children[victim].wait(10)

        async def orphans_done() -> list[tuple[str, dict[str, str]]]:
            done = [(e, f) for e, f in await log_of("TaskCompleted") if f["taskId"] in orphans]
            return done if len(done) == len(orphans) else []

        completions = await wait_for(
            "the orphans to complete elsewhere", claim_timeout * 1.5 + 15, orphans_done
        )
        restarts = [
            entry_ms(e)
            for e, f in await log_of("TaskStarted")
            if f["taskId"] in orphans and f["attempt"] != "1"
        ]
        done_s = sorted((entry_ms(e) - killed_ms) / 1000 for e, _ in completions)
        assert all(f["worker"] != victim for _, f in completions)

        async def processed() -> bool:
            view = await store.group_view(gid)
            return view is not None and view.processed

        group_processed = bool(await wait_for("the group view", 15, processed))
        low, high = (float(x) for x in DELAY.split("-"))
        return Result(
            claim_timeout_s=claim_timeout,
            tasks=tasks,
            orphaned=len(orphans),
            first_restart_s=round((min(restarts) - killed_ms) / 1000, 3),
            last_restart_s=round((max(restarts) - killed_ms) / 1000, 3),
            first_completion_s=round(done_s[0], 3),
            median_completion_s=round(statistics.median(done_s), 3),
            recovery_s=round(done_s[-1], 3),
            expected_s=f"{0.75 * claim_timeout + low:.2f}-{1.25 * claim_timeout + high:.2f}",
            group_processed=group_processed,
        )
    finally:
        for child in children.values():
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for child in children.values():
            try:
                child.wait(30)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        for log in files:
            log.close()
        keys = [k async for k in store.redis.scan_iter(match=f"{{{namespace}}}:*")]
        if keys:
            await store.redis.delete(*keys)
        await store.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--timeouts", type=float, nargs="+", default=[1.0, 5.0, 30.0])
    parser.add_argument("--tasks", type=int, default=20)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as data:
        server = EmbeddedServer(data, free_port())
        print(f"server: {server.binary} (SUMBATCH_REDIS_SERVER picks another)", flush=True)
        server.start()
        try:
            results = [
                asyncio.run(measure(server.url, timeout, args.tasks, Path(data)))
                for timeout in args.timeouts
            ]
        finally:
            server.stop()

    print(f"recovery after kill -9 of the worker holding the entries (tasks of {DELAY} s)")
    head = ("timeout", "orphans", "restart 1st", "restart last", "done 1st", "median")
    print("  ".join(f"{h:>12}" for h in head) + "      recovery  expected (s)")
    for r in results:
        row = (
            r.first_restart_s,
            r.last_restart_s,
            r.first_completion_s,
            r.median_completion_s,
            r.recovery_s,
        )
        print(
            f"{r.claim_timeout_s:>11.0f}s  {r.orphaned:>12}  "
            + "  ".join(f"{x:>11.2f}s" for x in row)
            + f"  {r.expected_s}"
        )
    print(json.dumps([asdict(r) for r in results], indent=2))


if __name__ == "__main__":
    main()
