"""Work is handed out in turn across the groups with queued slices (issue 18, item 1):
a group's wait depends on how many groups are ahead of it, not how many tasks.

The slices of a group wait in its queue; a reader takes them in turn from the groups
in the ring (``scripts/dispatch.py``), and the work stream's consumer group does the
rest as before (pending, claims, acknowledgement)."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path
from typing import Any

import msgspec
import redis

from consumers.projector import Projector
from consumers.worker import Worker
from sumbatch.config import Settings
from sumbatch.model.events import TaskCompleted
from sumbatch.model.keys import DEFAULT_FAIRNESS_KEY, WORKER_GROUP, Keys
from sumbatch.model.tasks import Delay
from sumbatch.store import HANDED_BACK_MS, Store, open_store
from tests.support import assert_exactly_once, log_events, own_server, submit

SLICE = 32


async def read_one_at_a_time(store: Store, count: int) -> list[str]:
    """The group of each entry a reader takes, one entry a read."""
    groups = []
    for _ in range(count):
        [(_, fields)] = await store.read_work("reader", 1, block_ms=100)
        groups.append(fields["groupTaskId"])
    return groups


def test_slices_are_handed_out_in_turn_across_groups(settings: Settings) -> None:
    """Two groups of 10 slices, then one of 1: FIFO, the small group's slice would come
    21st. In turn, it comes within the first four (one slice is handed out ahead, to
    wake a reader), and every prefix of the order is shared within a slice or two."""

    async def scenario() -> None:
        async with open_store(settings) as store:
            await store.ensure_worker_group()
            a, _ = await submit(store, [(n, 1) for n in range(10 * SLICE)])
            b, _ = await submit(store, [(n, 2) for n in range(10 * SLICE)])
            c, _ = await submit(store, [(n, 3) for n in range(3)])
            order = await read_one_at_a_time(store, 21)
            assert order.index(c) < 4, order
            for end in range(1, len(order) + 1):
                seen = Counter(order[:end])
                assert abs(seen[a] - seen[b]) <= 2, order[:end]
            assert Counter(order) == {a: 10, b: 10, c: 1}
            assert await store.read_work("reader", 1, block_ms=50) == []

    asyncio.run(scenario())


def test_a_read_of_many_takes_them_in_turn(settings: Settings) -> None:
    """A reader that asks for six entries gets the one waiting in the stream (the first
    group's, handed out at its submit to wake a reader), then five in turn from the
    three groups of four slices: the first group's turn comes round again first."""

    async def scenario() -> None:
        async with open_store(settings) as store:
            await store.ensure_worker_group()
            a, b, c = [
                (await submit(store, [(n, g) for n in range(4 * SLICE)]))[0] for g in range(3)
            ]
            taken = await store.read_work("reader", 6, block_ms=100)
            assert [f["groupTaskId"] for _, f in taken] == [a, a, b, c, a, b]

    asyncio.run(scenario())


def test_a_cancelled_group_leaves_nothing_queued_and_the_rest_still_runs(
    settings: Settings, raw: redis.Redis
) -> None:
    """A cancel takes the group's queued slices and its place in the ring at once; the
    other group's slices are still handed out, and once all is read no scheduling key
    is left."""
    keys = Keys(settings.namespace)

    async def scenario() -> None:
        async with open_store(settings) as store:
            await store.ensure_worker_group()
            doomed, _ = await submit(store, [(n, 1) for n in range(5 * SLICE)])
            kept, _ = await submit(store, [(n, 2) for n in range(3 * SLICE)])
            assert raw.exists(keys.queue(doomed)) == 1
            assert (await store.cancel(doomed)).status == "cancelled"
            assert raw.exists(keys.queue(doomed)) == 0
            assert raw.lrange(keys.fair_groups(DEFAULT_FAIRNESS_KEY), 0, -1) == [kept]
            order = []
            while got := await store.read_work("reader", 1, block_ms=50):
                order += [fields["groupTaskId"] for _, fields in got]
            # The one slice of the doomed group handed out at its submit, then the kept.
            assert order == [doomed] + [kept] * 3, order
            left = list(raw.scan_iter(match=f"{keys.tag}:fair:*"))
            left += list(raw.scan_iter(match=keys.queue_prefix + "*"))
            assert left == []

    asyncio.run(scenario())


def test_a_small_group_runs_before_the_big_ones_ahead_of_it_end(settings: Settings) -> None:
    """A worker with room for one slice at a time, three groups of 20 slices, then a
    group of four tasks: FIFO, its tasks would complete after all 1,920 others; in
    turn, at most a few slices of the big groups complete before it does. Every task
    still completes once."""
    settings = msgspec.structs.replace(settings, worker_concurrency=SLICE, delay=Delay(0.0, 0.0))

    async def scenario() -> None:
        async with open_store(settings) as store:
            await store.ensure_worker_group()
            groups = [await submit(store, [(n, g) for n in range(20 * SLICE)]) for g in range(3)]
            small = await submit(store, [(n, 9) for n in range(4)])
            await Worker(settings, store, read_count=1).run_until_idle()
            completed = [e for e in await log_events(store) if isinstance(e, TaskCompleted)]
            first_small = next(n for n, e in enumerate(completed) if e.group_task_id == small[0])
            assert first_small <= 6 * SLICE, first_small
            await Projector(store).run_until_idle()
            await assert_exactly_once(store, [*groups, small])

    asyncio.run(scenario())


def test_the_work_lag_counts_the_slices_queued_in_turn(settings: Settings) -> None:
    """/metrics' and /system's lag: the slices not handed to a worker, queued or in
    the stream (three groups of four slices, one handed out to the stream at once),
    going down as readers take them."""

    async def scenario() -> None:
        async with open_store(settings) as store:
            await store.ensure_worker_group()
            for g in range(3):
                await submit(store, [(n, g) for n in range(4 * SLICE)])
            assert (await store.state()).work_lag == 12
            await store.read_work("reader", 5, block_ms=100)
            # Five read, and one more handed out to wake a reader: still not read.
            assert (await store.state()).work_lag == 7

    asyncio.run(scenario())


def test_what_waits_in_turn_outlives_a_restart_of_redis(tmp_path: Path) -> None:
    """The queues and rings are Redis keys like the rest, in the AOF: kill -9 of the
    server with three groups waiting, a restart on the same directory, and a worker
    then runs every task once, still in turn."""
    with own_server(tmp_path) as server:
        settings = Settings(redis_url=server.url, namespace="restart", delay=Delay(0.0, 0.0))

        async def before() -> list[tuple[str, list[str]]]:
            async with open_store(settings) as store:
                await store.ensure_worker_group()
                return [await submit(store, [(n, g) for n in range(3 * SLICE)]) for g in range(3)]

        groups = asyncio.run(before())
        server.kill()  # SIGKILL: only what the AOF kept (appendfsync everysec: flushed)
        server.start()

        async def after() -> None:
            async with open_store(settings) as store:
                order = await read_one_at_a_time(store, 9)
                assert [order.count(gid) for gid, _ in groups] == [3, 3, 3]
                assert order[:4] == [groups[0][0], groups[0][0], groups[1][0], groups[2][0]]
                # Read, never run: handed back at once, then run by a worker.
                await store.renew("reader", await pending_ids(store), idle_ms=HANDED_BACK_MS)
                await Worker(settings, store).run_until_idle()
                await Projector(store).run_until_idle()
                await assert_exactly_once(store, groups)

        asyncio.run(after())


async def pending_ids(store: Store) -> list[str]:
    rows: Any = await store.redis.xpending_range(
        store.keys.work, WORKER_GROUP, min="-", max="+", count=100
    )
    return [str(row["message_id"]) for row in rows]
