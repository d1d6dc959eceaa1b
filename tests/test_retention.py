"""Retention: what a finished group leaves behind expires, the streams are trimmed, and
under a steady load the server's memory levels off instead of growing without bound."""

from __future__ import annotations

import asyncio
import random
import time
from functools import partial
from typing import Any, cast

import msgspec

from consumers.projector import READ_BLOCK_MS as PROJECTOR_READ_BLOCK_MS
from consumers.projector import Projector
from consumers.worker import TRIM_EVERY as WORKER_TRIM_EVERY
from consumers.worker import Worker
from sumbatch.config import Settings
from sumbatch.model.tasks import Delay
from sumbatch.replay import differences
from sumbatch.scripts.lib import CALL_TTL
from sumbatch.store import Entry, Store, open_store
from tests.support import entry_ms, submit, wait_until


def global_keys(store: Store) -> set[str]:
    """Keys that live as long as the namespace; everything else must expire."""
    keys = store.keys
    return {keys.events, keys.work, keys.projector_position, keys.dead_letters, keys.stats}


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


# The projector's trim period in the steady-load test, passed to its run(): it checks
# it after each read, which blocks up to PROJECTOR_READ_BLOCK_MS. A worker trims every
# WORKER_TRIM_EVERY seconds (both from consumers/).
PROJECTOR_TRIM_EVERY = 1.0


async def loop_lag(lags: list[float], stop: asyncio.Event) -> None:
    """How late this event loop wakes a sleeper, until ``stop``: the in-process worker's
    and projector's timers run on it, and are late by as much."""
    tick = 0.02
    while not stop.is_set():
        due = time.monotonic() + tick
        await asyncio.sleep(tick)  # the probe's period, not a wait for a state
        lags.append(time.monotonic() - due)


async def used_memory(store: Store) -> int:
    info: dict[str, Any] = await store.redis.info("memory")
    return int(info["used_memory"])


async def stream_node(store: Store) -> int:
    """How many entries a stream node holds at most on this server: a trim that may
    keep a node straddling its cutoff keeps up to that many it was not asked to."""
    node_max = await store.redis.config_get("stream-node-max-entries")
    return int(str(node_max["stream-node-max-entries"]))


def test_a_finished_group_s_keys_expire_after_the_result_ttl(settings: Settings) -> None:
    settings = msgspec.structs.replace(settings, result_ttl=300, cache_ttl=120, log_retention=600)
    pairs = [(1, 2), (3, 4), (1, 2)]

    async def scenario() -> None:
        async with open_store(settings) as store:
            keys = store.keys
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

    asyncio.run(scenario())


def test_memory_levels_off_under_a_steady_load_with_short_ttls(settings: Settings) -> None:
    """10 waves of 20 groups x 40 tasks, one group every 0.1 s (400 tasks/s), with every
    TTL and the log retention at 2 s, through an in-process worker and projector (their
    own trim cadence: the projector trims the log every second, the worker the work
    stream every half second). Memory, the number of keys and both streams' lengths stop growing
    after a few waves, and fall back once the load stops."""
    settings = msgspec.structs.replace(
        settings, result_ttl=2, cache_ttl=2, log_retention=2, delay=Delay(0.0, 0.0)
    )
    waves, groups_per_wave, tasks_per_group = 10, 20, 40
    rng = random.Random()

    async def scenario() -> None:
        async with (
            open_store(settings) as store,
            open_store(settings) as worker_store,
            open_store(settings) as projector_store,
        ):
            worker = Worker(settings, worker_store)
            projector = Projector(projector_store)
            await store.ensure_worker_group()
            baseline = await used_memory(store)
            node = await stream_node(store)
            lags: list[float] = []
            probing = asyncio.Event()
            running = [
                asyncio.create_task(worker.run()),
                asyncio.create_task(projector.run(trim_every=PROJECTOR_TRIM_EVERY)),
                asyncio.create_task(loop_lag(lags, probing)),
            ]
            samples: list[dict[str, int]] = []
            started = time.monotonic()

            async def older_than(key: str, ms: int) -> int:
                """Entries of ``key`` whose id is below ``ms`` (counted up to node + 1)."""
                older = await store.redis.xrange(key, "-", str(ms - 1), count=node + 1)
                return len(cast(list[Entry], older))

            def reference(now_ms: int, period: float) -> dict[str, int] | None:
                """The latest earlier wave end that a trim of this ``period`` must have
                followed by ``now_ms``: one period after it, late by at most the
                slowest wake-up of this event loop measured so far."""
                due_ms = 1000 * (period + max(lags, default=0.0))
                return next((s for s in reversed(samples) if now_ms - s["at_ms"] >= due_ms), None)

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
                    await wait_until(partial(ended, store, wave), within=10, what="the wave")
                    at_ms = int(time.time() * 1000)  # the clock of entry ids and the trims
                    position = await store.position()
                    assert position is not None
                    # Stream trims, checked against an earlier wave end (-1: none yet):
                    # the projector drops whole nodes of applied entries past the
                    # retention, so one node may straddle its cutoff; a worker drops
                    # exactly what every worker has acknowledged, but for the last
                    # entry delivered. By a wave's end all its work is acknowledged.
                    # The projector trims between reads, each blocking up to its read block.
                    events_old = work_old = -1
                    read_block = PROJECTOR_READ_BLOCK_MS / 1000
                    if ref := reference(at_ms, PROJECTOR_TRIM_EVERY + read_block):
                        cutoff = min(ref["at_ms"] - 1000 * settings.log_retention, ref["position"])
                        events_old = await older_than(store.keys.events, cutoff)
                    if ref := reference(at_ms, WORKER_TRIM_EVERY):
                        work_old = await older_than(store.keys.work, ref["at_ms"])
                    keys = await namespace_keys(store)
                    samples.append(
                        {
                            "at_ms": at_ms,
                            "position": entry_ms(position),
                            "memory": await used_memory(store) - baseline,
                            "keys": len(keys),
                            "task_views": tasks_per_group * sum(":view:" in key for key in keys),
                            "events_len": await store.redis.xlen(store.keys.events),
                            "work_len": await store.redis.xlen(store.keys.work),
                            "events_old": events_old,
                            "work_old": work_old,
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
                    f"slowest wake-up of the event loop: {1000 * max(lags):.0f} ms; "
                    f"stream node: {node} entries"
                )
                print(
                    "wave  used_memory-base  of it streams   keys  task views"
                    "  XLEN events (past cutoff)  XLEN work (past cutoff)"
                )
                for n, s in enumerate(samples, 1):
                    print(
                        f"{n:>4}  {s['memory']:>16,}  {s['streams']:>13,}  {s['keys']:>5}"
                        f"  {s['task_views']:>10}  {s['events_len']:>11} ({s['events_old']:>4})"
                        f"  {s['work_len']:>9} ({s['work_old']:>4})"
                    )
                # The streams hold what the retention and one trim period allow, by the
                # entry ids (their timestamps) against the wave ends measured above,
                # where keeping everything would leave whole waves past each cutoff.
                assert samples[-1]["events_old"] >= 0 and samples[-1]["work_old"] >= 0, samples
                assert all(s["events_old"] <= node for s in samples), (node, samples)
                assert all(s["work_old"] <= 1 for s in samples), samples

                # Leak-free, the last three waves sit on the plateau of waves 3-5; keeping
                # everything would put them over twice as high (8,000 tasks against 3,600).
                # Averages, because the trims make the streams a saw-tooth.
                plateau, last = samples[2:5], samples[-3:]
                for what in ("memory", "keys", "task_views"):
                    high = sum(s[what] for s in plateau) / 3
                    assert sum(s[what] for s in last) / 3 <= 1.4 * high, (what, samples)

                # Load stopped: every per-group key and the cache expire, both streams
                # are trimmed, and the memory falls below anything seen under load.
                # A call's record (Keys.call) lives CALL_TTL s, whatever the retention:
                # bounded by the call rate, not per group.
                calls = store.keys.call("")

                async def only_global_keys() -> bool:
                    kept = {k for k in await namespace_keys(store) if not k.startswith(calls)}
                    return kept <= global_keys(store)

                await wait_until(only_global_keys, within=10, what="per-group keys to expire")
                for key in [k for k in await namespace_keys(store) if k.startswith(calls)]:
                    assert await store.redis.ttl(key) in (-2, *range(1, CALL_TTL + 1)), key

                # Past the retention, the trims leave the log at most two stream nodes
                # (by the node size read back above), the work stream one entry.
                async def streams_trimmed() -> bool:
                    events = await store.redis.xlen(store.keys.events)
                    return events <= 2 * node and await store.redis.xlen(store.keys.work) <= 1

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
                probing.set()
                await asyncio.gather(*running)

    asyncio.run(scenario())


def test_one_trim_pass_drops_every_projected_event_older_than_the_retention(
    settings: Settings,
) -> None:
    settings = msgspec.structs.replace(settings, log_retention=1)

    async def scenario() -> None:
        async with open_store(settings) as store, open_store(settings) as projector_store:
            projector = Projector(projector_store)
            for g in range(5):  # 12,510 events (no delay: each task logs its end only)
                await submit(store, [(g, i) for i in range(2500)])  # no cache hits
            await Worker(settings, store).run_until_idle()
            await projector.run_until_idle()
            position = await store.position()
            assert position is not None
            written = await store.redis.xlen(store.keys.events)
            assert written == 12_510  # past the server's default cap of 10,000 per XTRIM

            async def retention_passed() -> bool:
                return time.time() * 1000 > entry_ms(position) + 1000

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
            # all but the last, partly filled stream node; allowed for: two nodes'
            # worth, by the node size read back from the server.
            assert await store.redis.xlen(store.keys.events) <= 2 * await stream_node(store)

    asyncio.run(scenario())


def test_a_late_retry_does_not_resurrect_an_expired_group_log(settings: Settings) -> None:
    settings = msgspec.structs.replace(settings, result_ttl=1, cache_ttl=1, retry_base=0.01)
    gate = asyncio.Event()

    async def stuck_then_failing(a: int, b: int) -> int:
        await gate.wait()
        raise RuntimeError("late failure")

    async def scenario() -> None:
        async with open_store(settings) as store:
            # Renewing every 15 s, the slow worker does not notice the takeover in time.
            slow = Worker(
                msgspec.structs.replace(settings, claim_timeout=60),
                store,
                handler=stuck_then_failing,
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

                await wait_until(
                    finished_and_expired, within=10, what="the group to end and expire"
                )
                gate.set()  # the stale run fails, retries, fails, ... and ends, fenced out

                async def slow_done() -> bool:
                    return not slow.busy

                await wait_until(slow_done, within=10, what="the stale run to end")
                assert await store.redis.ttl(store.keys.group_log(gid)) != -1
            finally:
                slow.should_exit = fast.should_exit = True
                gate.set()
                await asyncio.gather(*running)

    asyncio.run(scenario())


def test_replay_check_passes_once_results_have_expired(settings: Settings) -> None:
    settings = msgspec.structs.replace(settings, result_ttl=1, cache_ttl=1, log_retention=3600)

    async def scenario() -> None:
        async with open_store(settings) as store:
            gid, _ = await submit(store, [(1, 2), (3, 4)])
            await Worker(settings, store).run_until_idle()
            await Projector(store).run_until_idle()
            assert (await differences(store)).differences == []

            async def expired() -> bool:
                return await store.group_view(gid) is None

            await wait_until(expired, within=5, what="the group view to expire")
            assert (await differences(store)).differences == []

    asyncio.run(scenario())
