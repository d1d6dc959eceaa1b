"""Chaos on real processes: workers and the projector killed with SIGKILL at random
moments, again and again, while groups keep arriving; workers restarted one by one
with SIGTERM. Whatever happens, every task ends exactly once with the right sum, every
group finishes once, nothing stays pending and the views equal a replay of the log.

Each test prints its random seed; ``SUMBATCH_CHAOS_SEED`` replays the same random
choices (the timing of real processes still varies).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import signal
import subprocess
import time
from collections import Counter
from functools import partial
from typing import Any

import msgspec

from consumers.worker import READ_BLOCK_MS as WORKER_READ_BLOCK_MS
from sumbatch.config import Settings
from sumbatch.model.events import GroupSubmitted, TaskCompleted, TaskStarted, from_fields
from sumbatch.model.keys import WORKER_GROUP
from sumbatch.model.tasks import Delay
from sumbatch.store import Store, open_store
from tests.support import (
    Groups,
    Processes,
    all_processed,
    assert_exactly_once,
    entry_ms,
    env_for,
    log_events,
    pending_by_consumer,
    projector_moved,
    runs_started,
    stream_entries,
    submit,
    tasks_held_by,
    wait_until,
)


def chaos_rng() -> random.Random:
    seed = int(os.environ.get("SUMBATCH_CHAOS_SEED") or random.randrange(2**32))
    print(f"chaos seed: SUMBATCH_CHAOS_SEED={seed}")
    return random.Random(seed)


def random_pairs(rng: random.Random, n: int) -> list[tuple[int, int]]:
    # Wide range: almost every task is computed, not served from the cache.
    return [(rng.randrange(-(10**9), 10**9), rng.randrange(-(10**9), 10**9)) for _ in range(n)]


def now_ms() -> int:
    """Wall clock in ms: comparable with stream entry ids written on this host."""
    return int(time.time() * 1000)


async def assert_sums(store: Store, expected: dict[str, list[int]]) -> None:
    """Every TaskCompleted carries the right sum, and every group view holds them all."""
    for event in await log_events(store):
        if isinstance(event, TaskCompleted):
            assert event.result == expected[event.group_task_id][event.index], event
    for gid, sums in expected.items():
        view = await store.group_view(gid)
        assert view is not None
        assert (view.tasks_completed, view.tasks_failed, view.results) == (len(sums), 0, sums)


async def exited(process: subprocess.Popen[bytes]) -> bool:
    return process.poll() is not None


def test_workers_killed_at_random_moments_lose_and_double_nothing(
    settings: Settings, procs: Processes
) -> None:
    """4 workers, 40 groups x 100 tasks arriving over ~8 s; 22 times, at a random
    moment 0.15-0.5 s apart, a random worker (one holding entries, if any) is killed
    and a replacement started. ``max_attempts`` is raised so that a task
    whose runs die with three workers in a row is not given up on: here we test the
    exactly-once effect, not the give-up policy."""
    settings = msgspec.structs.replace(
        settings, delay=Delay(0.0, 0.3), claim_timeout=1.0, max_attempts=50
    )
    rng = chaos_rng()
    kills = 22

    async def scenario() -> None:
        async with open_store(settings) as store:
            workers: dict[str, subprocess.Popen[bytes]] = {}
            serial = itertools.count()

            def start_worker() -> None:
                name = f"w{next(serial)}"
                workers[name] = procs.start(settings, "worker", "--name", name)

            groups: Groups = []
            expected: dict[str, list[int]] = {}
            # Per killed worker, the tasks of the entries it still held once dead: read
            # after the kill, not guessed from a look before it, so no timing decides.
            orphaned: dict[str, list[str]] = {}

            async def feed() -> None:
                for _ in range(40):
                    pairs = random_pairs(rng, 100)
                    gid, tids = await submit(store, pairs)
                    groups.append((gid, tids))
                    expected[gid] = [a + b for a, b in pairs]
                    await asyncio.sleep(rng.uniform(0.1, 0.3))  # arrival pacing

            async def chaos() -> None:
                for _ in range(kills):
                    await asyncio.sleep(rng.uniform(0.15, 0.5))  # a random moment

                    # Then a worker holding entries, if one does within a second: on a
                    # loaded machine the moment alone often finds them all between reads.
                    async def holders() -> list[str]:
                        pending = await pending_by_consumer(store)
                        return sorted(name for name in workers if pending.get(name, 0) > 0)

                    try:
                        busy = await wait_until(
                            holders, within=1.0, what="a worker holding entries"
                        )
                    except AssertionError:
                        busy = []
                    victim = rng.choice(busy or sorted(workers))
                    procs.kill9(workers.pop(victim))  # returns once it is dead
                    orphaned[victim] = await tasks_held_by(store, victim)
                    start_worker()  # capacity stays

            await store.ensure_worker_group()
            for _ in range(4):
                start_worker()
            procs.start(settings, "projector")
            await asyncio.gather(feed(), chaos())
            await wait_until(
                lambda: all_processed(store, groups), within=25, what="every group to finish"
            )
            await assert_exactly_once(store, groups)
            await assert_sums(store, expected)
            events = await log_events(store)
            reruns = [e for e in events if isinstance(e, TaskStarted) and e.attempt > 1]
            completed_by = {e.task_id: e.worker for e in events if isinstance(e, TaskCompleted)}
            orphaning_kills = sum(bool(tids) for tids in orphaned.values())
            print(
                f"{kills} kills, {orphaning_kills} leaving entries behind "
                f"({sum(map(len, orphaned.values()))} entries), {len(reruns)} reruns"
            )
            # The kills really did orphan running work (else this run tested no
            # takeover), and every task a dead worker held was taken over and ended
            # by another worker (exactly once, checked above).
            assert orphaning_kills > 0, orphaned
            for victim, tids in orphaned.items():
                assert all(completed_by[tid] != victim for tid in tids), (victim, tids)

    asyncio.run(scenario())


def test_projector_killed_at_random_moments_keeps_views_exact(
    settings: Settings, procs: Processes
) -> None:
    """2 steady workers; 15 times: a burst of 4 groups x 150 tasks, then the projector
    is killed a random 0-60 ms after its first commit, while it works through the
    backlog (so often between reading a batch and committing it), and a new one is
    started."""
    settings = msgspec.structs.replace(settings, delay=Delay(0.0, 0.3))
    rng = chaos_rng()
    kills = 15

    async def scenario() -> None:
        groups: Groups = []
        expected: dict[str, list[int]] = {}
        async with open_store(settings) as store:
            await store.ensure_worker_group()
            for _ in range(2):
                procs.start(settings, "worker")
            projector = procs.start(settings, "projector")
            kills_while_behind = 0
            for _ in range(kills):
                for _ in range(4):
                    pairs = random_pairs(rng, 150)
                    gid, tids = await submit(store, pairs)
                    groups.append((gid, tids))
                    expected[gid] = [a + b for a, b in pairs]
                before = await store.position()
                # This projector (just started) applies something before it dies.
                await wait_until(
                    projector_moved(store, before),
                    within=15,
                    what="the projector to make progress",
                )
                await asyncio.sleep(rng.uniform(0.0, 0.06))  # a random moment
                # (The log is not empty: the groups above are in it.)
                kills_while_behind += await store.position() != await store.last_event_id()
                procs.kill9(projector)
                projector = procs.start(settings, "projector")
            await wait_until(
                lambda: all_processed(store, groups), within=25, what="every group to finish"
            )
            await assert_exactly_once(store, groups)  # includes: views == replay
            await assert_sums(store, expected)
            tids = [tid for _, ts in groups for tid in ts]
            tasks = [await store.task_view(tid) for tid in tids]
            assert len(tids) == kills * 4 * 150
            assert Counter(t.state if t else None for t in tasks) == Counter(SUCCESS=len(tids))
            for task in tasks:
                assert task is not None
                assert task.result == expected[task.group_task_id][task.index]
            print(f"{kills} projector kills, {kills_while_behind} while it was behind the log")

    asyncio.run(scenario())


def test_rolling_restart_with_sigterm_finishes_in_flight_work(
    settings: Settings, procs: Processes
) -> None:
    """3 workers running 0.5-1.5 s tasks are replaced one by one with SIGTERM while
    groups keep arriving. Each stops reading, finishes what it runs, exits 0; nothing is
    run twice (claim timeout 10 s: no takeover can explain a second run)."""
    settings = msgspec.structs.replace(settings, delay=Delay(0.5, 1.5), claim_timeout=10.0)
    rng = chaos_rng()

    async def scenario() -> None:
        async with open_store(settings) as store:
            groups: Groups = []
            expected: dict[str, list[int]] = {}
            feeding = True

            async def feed() -> None:
                while feeding:
                    pairs = random_pairs(rng, 30)
                    gid, tids = await submit(store, pairs)
                    groups.append((gid, tids))
                    expected[gid] = [a + b for a, b in pairs]
                    await asyncio.sleep(rng.uniform(0.2, 0.4))  # arrival pacing

            try:
                await store.ensure_worker_group()
                workers = {
                    f"old{i}": procs.start(settings, "worker", "--name", f"old{i}")
                    for i in (0, 1, 2)
                }
                procs.start(settings, "projector")
                feeder = asyncio.create_task(feed())
                stopped_at: dict[str, int] = {}
                for i, (name, process) in enumerate(workers.items()):

                    async def holds_entries(name: str = name) -> bool:
                        return (await pending_by_consumer(store)).get(name, 0) > 0

                    await wait_until(holds_entries, within=10, what=f"{name} to run something")
                    stopped_at[name] = now_ms()
                    process.send_signal(signal.SIGTERM)
                    procs.start(settings, "worker", "--name", f"new{i}")
                    await wait_until(partial(exited, process), within=10, what=f"{name} to exit")
                    assert process.returncode == 0, (name, process.returncode)

                async def replacements_at_work() -> bool:
                    done = {
                        e.worker for e in await log_events(store) if isinstance(e, TaskCompleted)
                    }
                    return {"new0", "new1", "new2"} <= done

                await wait_until(replacements_at_work, within=15, what="every replacement to work")
                feeding = False
                await feeder
                await wait_until(
                    lambda: all_processed(store, groups), within=20, what="every group to finish"
                )
                await assert_exactly_once(store, groups)
                await assert_sums(store, expected)
                events = await log_events(store)
                starts = [e for e in events if isinstance(e, TaskStarted)]
                assert Counter(e.attempt for e in starts) == Counter({1: len(starts)})
                assert len(starts) == sum(len(tids) for _, tids in groups)
                # Each stopped worker finished work after its SIGTERM, and started only
                # tasks it had been handed by then: the read it had in flight returns what
                # exists by the end of its block (consumers/worker.py), or, when nothing
                # came, at the server's first timer tick past it (1000/hz ms, read back).
                # A group's work entries are written in one step with its GroupSubmitted,
                # whose id is that moment on the same clock as ``signalled``.
                hz = int(str((await store.redis.config_get("hz"))["hz"]))
                handed_by_ms = WORKER_READ_BLOCK_MS + 1000 // hz
                raw = await stream_entries(store, store.keys.events)
                stamped = [(entry_ms(eid), from_fields(f)) for eid, f in raw]
                submitted_ms = {
                    e.group_task_id: ms for ms, e in stamped if isinstance(e, GroupSubmitted)
                }
                for name, signalled in stopped_at.items():
                    done_after = [
                        eid
                        for eid, f in raw
                        if f["type"] == "TaskCompleted"
                        and f["worker"] == name
                        and entry_ms(eid) > signalled
                    ]
                    late_starts = [
                        e
                        for _, e in stamped
                        if isinstance(e, TaskStarted)
                        and e.worker == name
                        and submitted_ms[e.group_task_id] > signalled + handed_by_ms
                    ]
                    newest = max(
                        submitted_ms[e.group_task_id]
                        for _, e in stamped
                        if isinstance(e, TaskStarted) and e.worker == name
                    )
                    print(
                        f"{name}: newest group it started was submitted "
                        f"{newest - signalled} ms after its SIGTERM (bound {handed_by_ms} ms)"
                    )
                    assert done_after, f"{name} finished nothing after SIGTERM"
                    assert late_starts == [], (name, late_starts)
                new_workers = {e.worker for e in events if isinstance(e, TaskCompleted)}
                assert {"new0", "new1", "new2"} <= new_workers
            finally:
                feeding = False

    asyncio.run(scenario())


def test_a_short_grace_hands_back_unfinished_entries_for_an_immediate_takeover(
    settings: Settings, procs: Processes
) -> None:
    """Grace 0.2 s, tasks 2-3 s, claim timeout 30 s: the stopping worker cannot finish,
    so it hands its entries back (idle as if long dead): 40 tasks, two slices. Its
    replacement takes them over at its first sweep, long before 30 s of idleness could
    have freed them."""
    settings = msgspec.structs.replace(settings, delay=Delay(2.0, 3.0), claim_timeout=30.0)
    rng = chaos_rng()
    env = env_for(settings) | {"SUMBATCH_SHUTDOWN_GRACE": "0.2"}

    async def scenario() -> None:
        async with open_store(settings) as store:
            await store.ensure_worker_group()
            first = procs.start(settings, "worker", "--name", "first", env=env)
            procs.start(settings, "projector", env=env)
            pairs = random_pairs(rng, 40)
            groups = [await submit(store, pairs)]
            expected = {groups[0][0]: [a + b for a, b in pairs]}
            await wait_until(
                runs_started(store, 40), within=10, what="the first worker to start all 40"
            )
            signalled = now_ms()
            first.send_signal(signal.SIGTERM)
            await wait_until(lambda: exited(first), within=10, what="the first worker to exit")
            assert first.returncode == 0
            assert not any(isinstance(e, TaskCompleted) for e in await log_events(store))
            # Handed back: still pending, still "first"'s, but idle past the timeout.
            handed: list[dict[str, Any]] = await store.redis.xpending_range(
                store.keys.work, WORKER_GROUP, min="-", max="+", count=100
            )
            assert len(handed) == 2  # slices of up to WORK_SLICE (32) tasks
            assert {p["consumer"] for p in handed} == {"first"}
            claim_ms = settings.claim_timeout * 1000
            assert min(p["time_since_delivered"] for p in handed) >= claim_ms

            procs.start(settings, "worker", "--name", "second", env=env)
            await wait_until(lambda: all_processed(store, groups), within=20, what="the group")
            await assert_exactly_once(store, groups)
            await assert_sums(store, expected)
            events = await log_events(store)
            starts = Counter((e.worker, e.attempt) for e in events if isinstance(e, TaskStarted))
            assert starts == Counter({("first", 1): 40, ("second", 2): 40})
            completed_by = Counter(e.worker for e in events if isinstance(e, TaskCompleted))
            assert completed_by == Counter(second=40)
            raw = await stream_entries(store, store.keys.events)
            restarts = [
                entry_ms(eid)
                for eid, f in raw
                if f["type"] == "TaskStarted" and f["attempt"] == "2"
            ]
            takeover_s = (max(restarts) - signalled) / 1000
            print(f"handed-back tasks restarted {takeover_s:.1f} s after SIGTERM")
            # Idleness alone frees an entry a claim timeout after its delivery at the
            # earliest, and none was delivered before its group was submitted (the
            # GroupSubmitted id): every restart before that came from the hand-back.
            submitted = min(entry_ms(eid) for eid, f in raw if f["type"] == "GroupSubmitted")
            assert max(restarts) < submitted + claim_ms, (restarts, submitted, claim_ms)
            for tid in groups[0][1]:
                view = await store.task_view(tid)
                assert view is not None and (view.state, view.attempts) == ("SUCCESS", 2)

    asyncio.run(scenario())
