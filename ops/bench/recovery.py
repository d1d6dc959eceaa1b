"""How long a killed worker's tasks take to complete elsewhere, per claim timeout.

Starts its own server (embedded binary, temp dir, free port). For each claim timeout:
two `sumbatch worker` processes and `sumbatch projector`; submits one group of tasks
of 1-2 s, waits until every task has started, kills -9 the worker that holds the
entries, and measures from the kill until the orphaned tasks complete on the other
worker. Times come from the event log's entry ids (ms timestamps of this host's clock).

    python ops/bench/recovery.py                       # claim timeouts 1, 5, 30 s
    python ops/bench/recovery.py --timeouts 1 5 --tasks 50

Expected: the orphans' idle time starts at their owner's last renewal (every quarter
of the timeout); the survivor sweeps every quarter of the timeout (0.2 to 2 s), sees
them once a renewal is due, takes them once it has watched them unrenewed for the
timeout on its own clock (consumers/takeover.py), then reruns the task from scratch;
so recovery is about timeout x [0.75, 1.75] from the kill (at most timeout + 6 s above 8 s),
plus the task's delay.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from consumers.intake import sweep_period
from consumers.takeover import watch_from
from sumbatch.config import Settings
from sumbatch.model.tasks import Delay
from sumbatch.processes.embedded import EmbeddedServer
from sumbatch.store import Entry, Store, open_store
from sumbatch.testing.groups import (
    all_processed,
    entry_ms,
    pending_by_consumer,
    submit,
    tasks_held_by,
)
from sumbatch.testing.ports import free_port
from sumbatch.testing.processes import Processes, blocked_in_xreadgroup, processes
from sumbatch.testing.waiting import eventually, wait_until

DELAY = Delay(1.0, 2.0)


@dataclass
class Result:
    """One claim timeout's figures, in seconds from the kill; None where nothing was
    measured (no orphan restarted, or none completed within the wait)."""

    claim_timeout_s: float
    tasks: int
    orphaned: int
    orphans_completed: int  # of them, within claim timeout x 1.5 + 15 s of the kill
    first_restart_s: float | None  # kill -> first orphan started again (attempt 2+)
    last_restart_s: float | None
    first_completion_s: float | None  # kill -> first orphan completed elsewhere
    median_completion_s: float | None
    recovery_s: float | None  # kill -> last orphan completed elsewhere; None if not all did
    expected_s: str  # the window the policy predicts, delay included
    group_processed: bool  # the group's view says processed, within 15 s after that


def since(killed_ms: float, times_ms: list[int]) -> list[float]:
    return sorted(round((ms - killed_ms) / 1000, 3) for ms in times_ms)


async def measure(url: str, claim_timeout: float, tasks: int, logs: Path) -> Result:
    namespace = f"recovery-{uuid.uuid4().hex[:8]}"
    settings = Settings(
        redis_url=url, namespace=namespace, delay=DELAY, claim_timeout=claim_timeout
    )
    logs = logs / namespace
    logs.mkdir()
    store: Store = open_store(settings)
    try:
        with processes(logs) as procs:
            return await _measure(store, settings, tasks, procs)
    finally:
        keys = [k async for k in store.redis.scan_iter(match=f"{{{namespace}}}:*")]
        if keys:
            await store.redis.delete(*keys)
        await store.aclose()


async def _measure(store: Store, settings: Settings, tasks: int, procs: Processes) -> Result:
    await store.ensure_worker_group()
    workers = {name: procs.start(settings, "worker", "--name", name) for name in ("w1", "w2")}
    procs.start(settings, "projector")

    async def both_reading() -> bool:
        return await blocked_in_xreadgroup(store, list(workers.values()))

    # Both waiting for work, so that both take entries and one has some to orphan.
    await wait_until(both_reading, 30, "both workers to block in XREADGROUP")
    rand = random.randrange
    group = await submit(store, [(rand(10**9), rand(10**9)) for _ in range(tasks)])
    gid = group[0]

    async def log_of(kind: str) -> list[Entry]:
        entries = await store.group_history(gid)  # the ids its copies leave out put back
        return [(eid, f) for eid, f in entries if f["type"] == kind]

    async def all_started() -> bool:
        return len(await log_of("TaskStarted")) >= tasks

    await wait_until(all_started, 30, "every task to start")
    holders = await pending_by_consumer(store)
    victim = max(holders, key=lambda name: holders[name])
    orphans = set(await tasks_held_by(store, victim))

    workers[victim].kill()
    # The log's entry ids carry the server's clock in ms: the same host's wall clock.
    killed_ms = time.time() * 1000
    workers[victim].wait(10)

    async def orphans_done() -> list[Entry]:
        return [(e, f) for e, f in await log_of("TaskCompleted") if f["taskId"] in orphans]

    async def all_orphans_done() -> bool:
        return len(await orphans_done()) == len(orphans)

    # A timeout is a figure here (recovery took longer than this), not a failure.
    await eventually(all_orphans_done, settings.claim_timeout * 1.5 + 15)
    completions = await orphans_done()
    if any(f["worker"] == victim for _, f in completions):
        raise SystemExit(f"an orphan completed on {victim}, which was killed")
    restarts = since(
        killed_ms,
        [
            entry_ms(e)
            for e, f in await log_of("TaskStarted")
            if f["taskId"] in orphans and f["attempt"] != "1"
        ],
    )
    done_s = since(killed_ms, [entry_ms(e) for e, _ in completions])

    group_processed = bool(await eventually(lambda: all_processed(store, [group]), 15))
    low, high = DELAY
    timeout = settings.claim_timeout
    # Sweeps come every ``every`` s and watch an entry once a renewal is due (``due``).
    every = sweep_period(timeout)
    due = watch_from(timeout, every)
    return Result(
        claim_timeout_s=timeout,
        tasks=tasks,
        orphaned=len(orphans),
        orphans_completed=len(completions),
        first_restart_s=restarts[0] if restarts else None,
        last_restart_s=restarts[-1] if restarts else None,
        first_completion_s=done_s[0] if done_s else None,
        median_completion_s=round(statistics.median(done_s), 3) if done_s else None,
        recovery_s=done_s[-1] if done_s and len(done_s) == len(orphans) else None,
        expected_s=f"{0.75 * timeout + due + low:.2f}-{timeout + due + 2 * every + high:.2f}",
        group_processed=group_processed,
    )


def seconds(value: float | None) -> str:
    return f"{'missing':>12}" if value is None else f"{value:>11.2f}s"


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

    print(f"recovery after kill -9 of the worker holding the entries (tasks of "
          f"{DELAY.low:g}-{DELAY.high:g} s)")  # fmt: skip
    head = ("timeout", "orphans", "completed", "restart 1st", "restart last", "done 1st")
    print("  ".join(f"{h:>12}" for h in head)
          + f"  {'median':>12}  {'recovery':>12}  group done  expected (s)")  # fmt: skip
    for r in results:
        row = (
            r.first_restart_s,
            r.last_restart_s,
            r.first_completion_s,
            r.median_completion_s,
            r.recovery_s,
        )
        print(
            f"{r.claim_timeout_s:>11g}s  {r.orphaned:>12}  {r.orphans_completed:>12}  "
            + "  ".join(seconds(x) for x in row)
            + f"  {'yes' if r.group_processed else 'NO':>10}  {r.expected_s}"
        )
    print(json.dumps([asdict(r) for r in results], indent=2))


if __name__ == "__main__":
    main()
