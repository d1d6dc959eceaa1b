"""The whole path in-process: API → log → worker → projector → API, and replay."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest
from starlette.testclient import TestClient

from consumers.projector import Projector
from consumers.worker import Worker
from sumbatch.config import Settings
from sumbatch.model.events import GroupFinished, TaskCompleted, TaskStarted
from sumbatch.replay import differences
from sumbatch.store import Entry, open_store
from tests.support import hang_forever, log_of, post_group, wait_until, work_and_project


def test_group_is_computed_and_projected(client: TestClient, settings: Settings) -> None:
    pairs = [(1, 5), (9, 10), (12, 13), (8, 1)]
    created = post_group(client, pairs)
    work_and_project(settings)
    group = client.get(f"/grouptasks/{created['groupTaskId']}").json()
    assert group["grouptaskProcessed"] is True
    assert group["grouptaskSucceeded"] is True
    assert group["results"] == [6, 19, 25, 9]
    assert (group["tasksCompleted"], group["tasksTotal"]) == (4, 4)
    task = client.get(f"/tasks/{created['taskIds'][1]}").json()
    assert task["taskState"] == "SUCCESS"
    assert (task["result"], task["resultReady"], task["taskSucceeded"]) == (19, True, True)


def test_progress_is_visible_before_the_group_ends(client: TestClient, settings: Settings) -> None:
    first = post_group(client, [(1, 1), (2, 2)])
    work_and_project(settings)
    second = post_group(client, [(40, 2), (1, 1)])  # (1, 1) is cached now

    async def only_cache_hits() -> None:
        async with open_store(settings) as store:
            # A handler that never finishes: only cached tasks can end.
            worker = Worker(settings, store, handler=hang_forever)
            worker_task = asyncio.create_task(worker.run())
            projector = Projector(store)

            async def one_done() -> bool:
                await projector.step(block_ms=None)
                view = await store.group_view(second["groupTaskId"])
                return view is not None and view.tasks_completed == 1

            await wait_until(one_done, what="the cached task to be projected")
            worker_task.cancel()

    asyncio.run(only_cache_hits())
    group = client.get(f"/grouptasks/{second['groupTaskId']}").json()
    assert group["grouptaskProcessed"] is False
    assert (group["results"], group["tasksCompleted"], group["tasksTotal"]) == ([2], 1, 2)
    assert client.get(f"/grouptasks/{first['groupTaskId']}").json()["results"] == [2, 4]


def test_repeated_parameters_are_served_from_the_cache(
    client: TestClient, settings: Settings
) -> None:
    post_group(client, [(20, 22)])
    work_and_project(settings)
    again = post_group(client, [(20, 22), (20, 23)])
    work_and_project(settings)
    cached = client.get(f"/tasks/{again['taskIds'][0]}").json()
    fresh = client.get(f"/tasks/{again['taskIds'][1]}").json()
    assert (cached["result"], cached["fromCache"]) == (42, True)
    assert (fresh["result"], fresh["fromCache"]) == (43, False)
    events = asyncio.run(log_of(settings))
    completed = {e.task_id: e for e in events if isinstance(e, TaskCompleted)}
    assert completed[again["taskIds"][0]].from_cache is True
    assert completed[again["taskIds"][1]].from_cache is False
    # A cache hit is never started: no simulated delay was run for it.
    started = {e.task_id for e in events if isinstance(e, TaskStarted)}
    assert again["taskIds"][0] not in started


def test_every_task_counted_once_and_one_group_finished(
    client: TestClient, settings: Settings
) -> None:
    groups = [post_group(client, [(i, j) for j in range(7)]) for i in range(5)]
    work_and_project(settings)
    log = asyncio.run(log_of(settings))
    completed = Counter(e.task_id for e in log if isinstance(e, TaskCompleted))
    finished = Counter(e.group_task_id for e in log if isinstance(e, GroupFinished))
    assert sorted(completed.values()) == [1] * 35
    assert finished == Counter({g["groupTaskId"]: 1 for g in groups})
    for i, g in enumerate(groups):
        body = client.get(f"/grouptasks/{g['groupTaskId']}").json()
        assert body["results"] == [i + j for j in range(7)]


def test_replay_check_ignores_views_that_expired(client: TestClient, settings: Settings) -> None:
    created = post_group(client, [(1, 1)])
    work_and_project(settings)

    async def check() -> None:
        async with open_store(settings) as store:
            gid = created["groupTaskId"]
            # What expiry does: the view and the ledger go, the log stays.
            await store.redis.delete(store.keys.group_view(gid), store.keys.ledger(gid))
            check = await differences(store)
            assert (check.events, check.differences) == (3, [])

    asyncio.run(check())


def test_replay_check_is_not_fooled_by_a_projector_at_work(
    client: TestClient, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The views move on while the check runs; it must still find no difference."""
    for _ in range(5):
        post_group(client, [(1, 2), (3, 4)])
    work_and_project(settings)

    async def check() -> None:
        async with open_store(settings) as store:
            base = (await differences(store)).events
            # More work lands between the check's fold and its reads.
            original = store.event_range

            async def slow_range(
                start: str = "-", end: str = "+", count: int = 1000
            ) -> list[Entry]:
                entries = await original(start, end, count)
                if not moved:
                    moved.append(True)
                    post_group(client, [(5, 6)])
                    await Worker(settings, store).run_until_idle()
                    await Projector(store).run_until_idle()
                return entries

            moved: list[bool] = []
            monkeypatch.setattr(store, "event_range", slow_range)
            check = await differences(store)
            count, diffs = check.events, check.differences
            assert moved and diffs == []
            assert count == base + 3

    asyncio.run(check())


def test_replay_matches_the_projection_and_rebuilds_it(
    client: TestClient, settings: Settings
) -> None:
    created = post_group(client, [(3, 4), (5, 6)])
    work_and_project(settings)

    async def check() -> None:
        async with open_store(settings) as store:
            check = await differences(store)
            assert (check.events, check.differences) == (4, [])  # submitted, 2 completed, finished
            # Damage a view; the check must see it and the rebuild must mend it.
            await store.redis.delete(store.keys.group_view(created["groupTaskId"]))
            diffs = (await differences(store)).differences
            assert len(diffs) == 1 and diffs[0].startswith(f"group {created['groupTaskId']}")
            await store.forget_position()
            await Projector(store).run_until_idle()
            check = await differences(store)
            assert (check.events, check.differences) == (4, [])

    asyncio.run(check())
    assert client.get(f"/grouptasks/{created['groupTaskId']}").json()["results"] == [7, 11]


def test_an_entry_in_the_log_that_is_no_event_is_skipped(
    client: TestClient, settings: Settings
) -> None:
    async def scenario() -> None:
        async with open_store(settings) as store:
            await store.redis.xadd(store.keys.events, {"type": "FromTheFuture", "x": "1"})
            created = post_group(client, [(2, 3)])
            await Worker(settings, store).run_until_idle()
            await Projector(store).run_until_idle()
            view = await store.group_view(created["groupTaskId"])
            assert view is not None and view.results == [5]
            assert (await differences(store)).differences == []

    asyncio.run(scenario())
