"""Real processes, really killed: nothing lost, nothing counted twice."""

from __future__ import annotations

import asyncio
from collections import Counter

import msgspec

from sumbatch.config import Settings
from sumbatch.model.events import TaskCompleted, TaskStarted
from sumbatch.model.tasks import Delay
from sumbatch.store import open_store
from tests.support import (
    Processes,
    all_processed,
    assert_exactly_once,
    log_events,
    projector_moved,
    runs_started,
    submit,
    wait_until,
)


def test_a_killed_worker_s_tasks_complete_elsewhere_exactly_once(
    settings: Settings, procs: Processes
) -> None:
    settings = msgspec.structs.replace(settings, delay=Delay(1.5, 2.0), claim_timeout=1.0)

    async def scenario() -> None:
        async with open_store(settings) as store:
            await store.ensure_worker_group()
            doomed = procs.start(settings, "worker")
            groups = [await submit(store, [(i, 100) for i in range(20)])]
            await wait_until(runs_started(store, 20), what="the first worker to start all 20 tasks")
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

    asyncio.run(scenario())


def test_a_live_worker_keeps_tasks_longer_than_the_claim_timeout(
    settings: Settings, procs: Processes
) -> None:
    """Tasks run 2.5-3 s, claims time out after 1 s: the owner renews, so the other
    worker, sweeping all the while, never runs one a second time."""
    settings = msgspec.structs.replace(settings, delay=Delay(2.5, 3.0), claim_timeout=1.0)

    async def scenario() -> None:
        async with open_store(settings) as store:
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

    asyncio.run(scenario())


def test_a_killed_projector_resumes_without_loss_or_double_counting(
    settings: Settings, procs: Processes
) -> None:
    settings = msgspec.structs.replace(settings, delay=Delay(0.0, 0.05))

    async def scenario() -> None:
        async with open_store(settings) as store:
            await store.ensure_worker_group()
            procs.start(settings, "worker")
            projector = procs.start(settings, "projector")
            groups = []
            for round_ in range(5):
                groups += [await submit(store, [(round_, j) for j in range(200)]) for _ in range(4)]
                before = await store.position()
                await wait_until(
                    projector_moved(store, before), what="the projector to make progress"
                )
                procs.kill9(projector)
                projector = procs.start(settings, "projector")
            await wait_until(lambda: all_processed(store, groups), what="all groups to finish")
            await assert_exactly_once(store, groups)
            for gid, tids in groups:
                view = await store.group_view(gid)
                assert view is not None and view.tasks_completed == len(tids) == 200

    asyncio.run(scenario())
