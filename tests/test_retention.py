"""Retention: what a finished group leaves behind expires, the streams are trimmed, and
under a steady load the server's memory levels off instead of growing without bound."""

from __future__ import annotations

import asyncio
import random
import time
from functools import partial
from typing import Any

import msgspec

from consumers.projector import Projector
from consumers.worker import Worker
from sumbatch.config import Settings
from sumbatch.replay import differences
from sumbatch.store import Store, open_store
from sumbatch.tasks import Delay
from tests.support import submit, wait_until


def global_keys(store: Store) -> set[str]:
    """Keys that live as long as the namespace; everything else must expire."""
    keys = store.keys
    return {keys.events, keys.work, keys.projector_position, keys.dead_letters}


async def namespace_keys(store: Store) -> list[str]:
    pattern = f"{store.keys.tag}:*".replace("{", "\\{").replace("}", "\\}")
    return [key async for key in store.redis.scan_iter(match=pattern, count=1000)]


async def ended(store: Store, groups: list[tuple[str, list[str]]]) -> bool:
    """Every group processed, or its view gone: views get their TTL only once processed."""
    for gid, _ in groups:
        view = await store.group_view(gid)
        if view is not None and not view.processed:
            return False
    return True


async def used_memory(store: Store) -> int:
    info: dict[str, Any] = await store.redis.info("memory")
    return int(info["used_memory"])


def test_a_finished_group_s_keys_expire_after_the_result_ttl(settings: Settings) -> None:
    settings = msgspec.structs.replace(settings, result_ttl=300, cache_ttl=120, log_retention=600)
    pairs = [(1, 2), (3, 4), (1, 2)]

    async def scenario() -> None:
        store = open_store(settings)
        keys = store.keys
        try:
            gid, tids = await submit(store, pairs)
            per_group = [keys.ledger(gid), keys.group_log(gid), keys.group_view(gid)]
            # Written as tasks start and end: the fence bitmap and the attempt counters.
            per_task = [keys.ended(gid), keys.attempts(gid)]
            caches = [keys.cache(a, b) for a, b in set(pairs)]
            # While the group runs, nothing of it expires.
            for key in per_group:
                assert await store.redis.ttl(key) == -1, key
            assert all([await store.redis.ttl(key) == -2 for key in caches])

            await Worker(settings, store).run_until_idle()
            await Projector(store).run_until_idle()
            view = await store.group_view(gid)
            assert view is not None and view.processed and view.results == [3, 7, 3]

            # result_ttl > cache_ttl here, so each key shows which setting it got.
            for key in per_group + per_task:
                ttl = await store.redis.ttl(key)
                assert settings.cache_ttl < ttl <= settings.result_ttl, (key, ttl)
            for key in caches:
                ttl = await store.redis.ttl(key)
                assert 0 < ttl <= settings.cache_ttl, (key, ttl)
            # And no other per-group key was left without a TTL.
            for key in set(await namespace_keys(store)) - global_keys(store):
                assert await store.redis.ttl(key) > 0, key
        finally:
            await store.aclose()

    asyncio.run(scenario())


def test_memory_levels_off_under_a_steady_load_with_short_ttls(settings: Settings) -> None:
    """10 waves of 20 groups x 40 tasks, one group every 0.1 s (400 tasks/s, about
    1,250 events/s), with every TTL and the log retention at 2 s, through an in-process
    worker and projector (their own trim cadence: every 5 s). Memory, the number of
    keys and both streams' lengths stop growing after a few waves, and fall back once
    the load stops."""
    settings = msgspec.structs.replace(
        settings, result_ttl=2, cache_ttl=2, log_retention=2, delay=Delay(0.0, 0.0)
    )
    waves, groups_per_wave, tasks_per_group = 10, 20, 40
    rng = random.Random()

    async def scenario() -> None:
        store = open_store(settings)
        worker = Worker(settings, open_store(settings))
        projector = Projector(open_store(settings))
        await store.ensure_worker_group()
        baseline = await used_memory(store)
        running = [asyncio.create_task(worker.run()), asyncio.create_task(projector.run())]
        samples: list[dict[str, int]] = []
        started = time.monotonic()
        try:
            for _ in range(waves):
                wave = []
                for _ in range(groups_per_wave):
                    pairs = [
                        (rng.randrange(10**12), rng.randrange(10**12))
                        for _ in range(tasks_per_group)
                    ]
                    wave.append(await submit(store, pairs))
                    await asyncio.sleep(0.1)  # arrival pacing: 400 tasks/s
                await wait_until(partial(ended, store, wave), within=10, what="the wave to end")
                keys = await namespace_keys(store)
                samples.append(
                    {
                        "memory": await used_memory(store) - baseline,
                        "keys": len(keys),
                        "task_views": tasks_per_group * sum(":view:" in key for key in keys),
                        "events_len": await store.redis.xlen(store.keys.events),
                        "work_len": await store.redis.xlen(store.keys.work),
                        "streams": sum(
                            [
                                await store.redis.memory_usage(key, samples=0) or 0
                                for key in (store.keys.events, store.keys.work)
                            ]
                        ),
                    }
                )
            load_s = time.monotonic() - started
            print(f"\n{waves * groups_per_wave * tasks_per_group} tasks in {load_s:.1f} s")
            print(
                "wave  used_memory-base  of it streams   keys  task views  XLEN events  XLEN work"
            )
            for n, s in enumerate(samples, 1):
                print(
                    f"{n:>4}  {s['memory']:>16,}  {s['streams']:>13,}  {s['keys']:>5}"
                    f"  {s['task_views']:>10}  {s['events_len']:>11}  {s['work_len']:>9}"
                )
            # Leak-free, the last three waves sit on the plateau of waves 3-5; keeping
            # everything would put them over twice as high (8,000 tasks against 3,600).
            # Averages, because the 5 s trims make the streams a saw-tooth.
            plateau, last = samples[2:5], samples[-3:]
            for what in ("memory", "keys", "task_views"):
                high = sum(s[what] for s in plateau) / 3
                assert sum(s[what] for s in last) / 3 <= 1.4 * high, (what, samples)
            # The streams hold at most retention (2 s) + one trim period (5 s) of entries
            # (plus slack): ~4.5 waves of events and ~3.5 waves of work entries, where
            # keeping them would reach 10 waves.
            events_per_wave = groups_per_wave * (2 + 3 * tasks_per_group)
            tasks_per_wave = groups_per_wave * tasks_per_group
            assert max(s["events_len"] for s in samples) <= 4.5 * events_per_wave, samples
            assert max(s["work_len"] for s in samples) <= 3.5 * tasks_per_wave, samples

            # Load stopped: every per-group key and the cache expire, both streams are
            # trimmed, and the memory falls below anything seen under load.
            async def only_global_keys() -> bool:
                return set(await namespace_keys(store)) <= global_keys(store)

            await wait_until(only_global_keys, within=10, what="per-group keys to expire")

            async def streams_trimmed() -> bool:
                events = await store.redis.xlen(store.keys.events)
                return events <= 200 and await store.redis.xlen(store.keys.work) <= 1

            await wait_until(streams_trimmed, within=15, what="both streams to be trimmed")
            drained = await used_memory(store) - baseline
            print(f"after the load: {drained:,} B above the baseline")
            assert drained < min(s["memory"] for s in samples[2:]), (drained, samples)
            steady = samples[3:]
            retained = sum(s["task_views"] for s in steady)
            per_task = sum(s["memory"] - drained for s in steady) // retained
            keyed = sum(s["memory"] - drained - s["streams"] for s in steady) // retained
            per_entry = sum(s["streams"] for s in steady) // sum(
                s["events_len"] + s["work_len"] for s in steady
            )
            print(
                f"steady state (waves 4-10, over the drained level): {per_task:,} B of "
                f"used_memory per retained task, {keyed:,} B of it in its keys (views, "
                f"ledger, group log, cache), the rest in the two streams "
                f"({per_entry:,} B per stream entry)"
            )
        finally:
            worker.should_exit = projector.should_exit = True
            await asyncio.gather(*running)
            for each in (store, worker.store, projector.store):
                await each.redis.aclose()

    asyncio.run(scenario())


def test_one_trim_pass_drops_every_projected_event_older_than_the_retention(
    settings: Settings,
) -> None:
    settings = msgspec.structs.replace(settings, log_retention=1)

    async def scenario() -> None:
        store = open_store(settings)
        projector = Projector(open_store(settings))
        try:
            for g in range(5):  # 12,510 events (no delay: each task logs its end only)
                await submit(store, [(g, i) for i in range(2500)])  # no cache hits
            await Worker(settings, store).run_until_idle()
            await projector.run_until_idle()
            position = await store.position()
            assert position is not None
            written = await store.redis.xlen(store.keys.events)
            assert written == 12_510  # past the server's default cap of 10,000 per XTRIM

            async def retention_passed() -> bool:
                return time.time() * 1000 > int(position.partition("-")[0]) + 1000

            await wait_until(retention_passed, within=5, what="the retention to pass")
            running = asyncio.create_task(projector.run())  # first trim after 1 s

            async def trimmed() -> bool:
                return await store.redis.xlen(store.keys.events) < written

            try:
                await wait_until(trimmed, within=10, what="the first trim")
            finally:
                projector.should_exit = True
                await running
            # Everything was projected and is past the retention: one pass drops it
            # all, but for the last, partly filled stream node.
            assert await store.redis.xlen(store.keys.events) <= 200
        finally:
            await store.aclose()
            await projector.store.aclose()

    asyncio.run(scenario())


def test_a_late_retry_does_not_resurrect_an_expired_group_log(settings: Settings) -> None:
    settings = msgspec.structs.replace(settings, result_ttl=1, cache_ttl=1, retry_base=0.01)
    gate = asyncio.Event()

    async def stuck_then_failing(a: int, b: int) -> int:
        await gate.wait()
        raise RuntimeError("late failure")

    async def scenario() -> None:
        store = open_store(settings)
        # Renewing every 15 s, the slow worker does not notice the takeover in time.
        slow = Worker(
            msgspec.structs.replace(settings, claim_timeout=60), store, handler=stuck_then_failing
        )
        fast = Worker(msgspec.structs.replace(settings, claim_timeout=0.1), store)
        running: list[asyncio.Task[None]] = []
        try:
            await store.ensure_worker_group()
            gid, _ = await submit(store, [(5, 6)])
            running.append(asyncio.create_task(slow.run()))

            async def slow_started() -> bool:
                return bool(slow.busy)

            await wait_until(slow_started, within=5, what="the slow worker to start the task")
            running.append(asyncio.create_task(fast.run()))

            async def finished_and_expired() -> bool:
                group = [store.keys.ledger(gid), store.keys.group_log(gid)]
                return await store.redis.exists(*group) == 0

            await wait_until(finished_and_expired, within=10, what="the group to end and expire")
            gate.set()  # the stale run fails, retries, fails, ... and ends, fenced out

            async def slow_done() -> bool:
                return not slow.busy

            await wait_until(slow_done, within=10, what="the stale run to end")
            assert await store.redis.ttl(store.keys.group_log(gid)) != -1
        finally:
            slow.should_exit = fast.should_exit = True
            gate.set()
            await asyncio.gather(*running)
            await store.aclose()

    asyncio.run(scenario())


def test_replay_check_passes_once_results_have_expired(settings: Settings) -> None:
    settings = msgspec.structs.replace(settings, result_ttl=1, cache_ttl=1, log_retention=3600)

    async def scenario() -> None:
        store = open_store(settings)
        try:
            gid, _ = await submit(store, [(1, 2), (3, 4)])
            await Worker(settings, store).run_until_idle()
            await Projector(store).run_until_idle()
            assert (await differences(store)).differences == []

            async def expired() -> bool:
                return await store.group_view(gid) is None

            await wait_until(expired, within=5, what="the group view to expire")
            assert (await differences(store)).differences == []
        finally:
            await store.aclose()

    asyncio.run(scenario())
