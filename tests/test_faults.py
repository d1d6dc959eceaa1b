"""Real processes, really killed: nothing lost, nothing counted twice."""

from __future__ import annotations

import asyncio
from collections import Counter

import msgspec

from sumbatch.config import Settings
from sumbatch.events import WORKER_GROUP, GroupFinished, TaskCompleted, TaskStarted
from sumbatch.replay import differences
from sumbatch.store import Store
from sumbatch.tasks import Delay
from tests.support import Processes, log_events, make_store, wait_until
from tests.test_workers import submit


async def assert_exactly_once(store: Store, groups: list[tuple[str, list[str]]]) -> None:
    """Every task completed once with the right sum, every group finished once, no
    entry left pending, and the views equal a replay of the log."""
    events = await log_events(store)
    completed = Counter(e.task_id for e in events if isinstance(e, TaskCompleted))
    finished = Counter(e.group_task_id for e in events if isinstance(e, GroupFinished))
    all_tasks = [tid for _, tids in groups for tid in tids]
    assert completed == Counter(all_tasks)
    assert finished == Counter(gid for gid, _ in groups)
    pending = await store.redis.xpending(store.keys.work, WORKER_GROUP)
    assert pending["pending"] == 0
    diffs = (await differences(store)).differences
    assert diffs == []


async def all_processed(store: Store, groups: list[tuple[str, list[str]]]) -> bool:
    for gid, _ in groups:
        view = await store.group_view(gid)
        if view is None or not view.processed:
            return False
    return True


def test_a_killed_worker_s_tasks_complete_elsewhere_exactly_once(
    settings: Settings, procs: Processes
) -> None:
    settings = msgspec.structs.replace(settings, delay=Delay(1.5, 2.0), claim_timeout=1.0)

    async def scenario() -> None:
        store = make_store(settings)
        try:
            await store.ensure_worker_group()
            doomed = procs.start(settings, "worker")
            groups = [await submit(store, [(i, 100) for i in range(20)])]

            async def all_started() -> bool:
                return sum(isinstance(e, TaskStarted) for e in await log_events(store)) == 20

            await wait_until(all_started, what="the first worker to start all 20 tasks")
            procs.kill9(doomed)
            assert not any(isinstance(e, TaskCompleted) for e in await log_events(store))
            procs.start(settings, "worker")
            procs.start(settings, "projector")
            await wait_until(lambda: all_processed(store, groups), what="the group to finish")
            await assert_exactly_once(store, groups)
            starts = Counter(
                e.attempt for e in await log_events(store) if isinstance(e, TaskStarted)
            )
            assert starts == Counter({1: 20, 2: 20})  # each ran again, once, elsewhere
            view = await store.group_view(groups[0][0])
            assert view is not None and view.results == [i + 100 for i in range(20)]
        finally:
            await store.redis.aclose()

    asyncio.run(scenario())


def test_a_live_worker_keeps_tasks_longer_than_the_claim_timeout(
    settings: Settings, procs: Processes
) -> None:
    """Tasks run 2.5-3 s, claims time out after 1 s: the owner renews, so the other
    worker, sweeping all the while, never runs one a second time."""
    settings = msgspec.structs.replace(settings, delay=Delay(2.5, 3.0), claim_timeout=1.0)

    async def scenario() -> None:
        store = make_store(settings)
        try:
            await store.ensure_worker_group()
            for _ in range(2):
                procs.start(settings, "worker")
            procs.start(settings, "projector")
            groups = [await submit(store, [(i, -i) for i in range(30)]) for _ in range(3)]
            await wait_until(lambda: all_processed(store, groups), what="all groups to finish")
            await assert_exactly_once(store, groups)
            started = Counter(
                e.task_id for e in await log_events(store) if isinstance(e, TaskStarted)
            )
            assert set(started.values()) == {1}
        finally:
            await store.redis.aclose()

    asyncio.run(scenario())


def test_a_killed_projector_resumes_without_loss_or_double_counting(
    settings: Settings, procs: Processes
) -> None:
    settings = msgspec.structs.replace(settings, delay=Delay(0.0, 0.05))

    async def scenario() -> None:
        store = make_store(settings)
        try:
            await store.ensure_worker_group()
            procs.start(settings, "worker")
            projector = procs.start(settings, "projector")
            groups = []
            for round_ in range(5):
                groups += [await submit(store, [(round_, j) for j in range(200)]) for _ in range(4)]
                before = await store.position()

                async def moved(before: str | None = before) -> bool:
                    return await store.position() != before

                await wait_until(moved, what="the projector to make progress")
                procs.kill9(projector)
                projector = procs.start(settings, "projector")
            await wait_until(lambda: all_processed(store, groups), what="all groups to finish")
            await assert_exactly_once(store, groups)
            for gid, tids in groups:
                view = await store.group_view(gid)
                assert view is not None and view.tasks_completed == len(tids) == 200
        finally:
            await store.redis.aclose()

    asyncio.run(scenario())
