"""DELETE stops tasks that are running: the cancel script revokes them and publishes
the group's id; workers stop those runs and acknowledge their entries at once. When
the message is lost, the run ends on its own and the fence keeps its outcome out."""

from __future__ import annotations

import asyncio
import time

import msgspec
import redis
from starlette.testclient import TestClient

from consumers.worker import Worker
from sumbatch.config import Settings
from sumbatch.model.events import GroupFinished, TaskCompleted, TaskRevoked
from sumbatch.model.tasks import Delay
from sumbatch.store import CancelOutcome, open_store
from tests.support import (
    Gate,
    Processes,
    events,
    group_finished,
    group_processed,
    log_events,
    runs_started,
    submit,
    wait_until,
    wait_until_sync,
    work_pending,
    work_pending_sync,
    worker_idle,
)

LONG = Delay(30.0, 30.0)  # far longer than any wait below


def test_delete_stops_running_tasks_of_a_worker_process(
    settings: Settings, client: TestClient, raw: redis.Redis, procs: Processes
) -> None:
    settings = msgspec.structs.replace(settings, delay=LONG)
    procs.start(settings, "worker")
    procs.start(settings, "projector")
    pairs = [{"paramA": i, "paramB": i} for i in range(5)]
    created = client.post("/grouptasks", json={"tasks": pairs}).json()
    gid, tids = created["groupTaskId"], created["taskIds"]

    def all_started() -> bool:
        states = [client.get(f"/tasks/{tid}").json()["taskState"] for tid in tids]
        return states == ["STARTED"] * 5

    wait_until_sync(all_started, what="every task to be STARTED")
    assert work_pending_sync(raw, settings) == 1  # the five tasks are one slice

    asked = time.monotonic()
    response = client.delete(f"/grouptasks/{gid}")
    assert response.status_code == 202
    assert response.json() == {"groupTaskId": gid, "grouptaskCancelled": True, "tasksRevoked": 5}
    # The runs had 30 s to go: only a worker that stops them frees the entries now.
    wait_until_sync(
        lambda: work_pending_sync(raw, settings) == 0, 5.0, "the worker to drop the entries"
    )
    assert time.monotonic() - asked < 5.0

    wait_until_sync(
        lambda: group_processed(client, gid), what="the projector to show the group processed"
    )
    group = client.get(f"/grouptasks/{gid}").json()
    assert (group["grouptaskCancelled"], group["grouptaskSucceeded"]) == (True, False)
    assert (group["tasksCompleted"], group["tasksRevoked"], group["results"]) == (5, 5, [])
    for tid in tids:
        task = client.get(f"/tasks/{tid}").json()
        assert (task["taskState"], task["result"], task["resultReady"]) == ("REVOKED", None, True)
    history = events(raw, settings, gid)
    assert not any(isinstance(e, TaskCompleted) for e in history)
    assert sum(isinstance(e, TaskRevoked) for e in history) == 5
    assert sum(isinstance(e, GroupFinished) for e in history) == 1
    assert all(p.poll() is None for p in procs.started)  # nothing crashed on the way


def test_a_run_whose_cancel_message_is_lost_ends_and_writes_nothing(settings: Settings) -> None:
    """A worker that does not listen (an older version, or one whose message was
    lost) runs the revoked tasks to their end; their outcomes meet the fence: nothing
    is written, and the entries are acknowledged."""
    gate = Gate()

    async def scenario() -> None:
        async with open_store(settings) as store:
            worker = Worker(settings, store, handler=gate.handler, watch_cancels=False)
            await store.ensure_worker_group()
            gid, _ = await submit(store, [(1, 2), (3, 4)])
            running = asyncio.create_task(worker.run())
            await wait_until(runs_started(store, 2), what="both runs to start")
            assert await store.cancel(gid) == CancelOutcome("cancelled", 2)
            assert worker.busy  # nobody told it
            gate.open()
            await wait_until(
                worker_idle(store, worker), within=10, what="the runs to end and be acknowledged"
            )
            worker.should_exit = True
            await asyncio.wait_for(running, 10)
            events = await log_events(store)
            assert not any(isinstance(e, TaskCompleted) for e in events)
            assert not await store.redis.exists(store.keys.cache(1, 2))
            (finished,) = [e for e in events if isinstance(e, GroupFinished)]
            assert (finished.tasks_revoked, finished.succeeded) == (2, False)

    asyncio.run(scenario())
    assert sorted(gate.returned) == [3, 7]  # the runs did end on their own


def test_the_worker_listens_again_after_its_connection_is_killed(settings: Settings) -> None:
    settings = msgspec.structs.replace(settings, delay=LONG)

    async def scenario() -> None:
        async with open_store(settings) as store:
            worker = Worker(settings, store)
            channel = store.keys.cancellations
            await store.ensure_worker_group()
            gid, _ = await submit(store, [(1, 2), (3, 4), (5, 6)])
            running = asyncio.create_task(worker.run())

            async def subscribed() -> bool:
                [(_, count)] = await store.redis.pubsub_numsub(channel)
                return count == 1

            await wait_until(runs_started(store, 3), what="the runs to start")
            await wait_until(subscribed, what="the worker to subscribe")
            # CLIENT KILL TYPE pubsub: the number of connections killed.
            killed = await store.redis.client_kill_filter(_type="pubsub")
            assert killed >= 1
            await wait_until(subscribed, what="the worker to subscribe again")

            assert await store.cancel(gid) == CancelOutcome("cancelled", 3)
            asked = time.monotonic()
            await wait_until(worker_idle(store, worker), within=5, what="the runs to stop")
            assert time.monotonic() - asked < 5
            worker.should_exit = True
            await asyncio.wait_for(running, 10)
            assert not any(isinstance(e, TaskCompleted) for e in await log_events(store))

    asyncio.run(scenario())


def test_a_cancel_of_another_group_leaves_our_runs_alone(settings: Settings) -> None:
    """The message names one group: runs of other groups go on and complete."""

    async def scenario() -> None:
        async with open_store(settings) as store:
            gate = Gate()
            worker = Worker(settings, store, handler=gate.handler)
            await store.ensure_worker_group()
            doomed, _ = await submit(store, [(1, 1), (2, 2)])
            kept, kept_tids = await submit(store, [(3, 3), (4, 4)])
            running = asyncio.create_task(worker.run())
            await wait_until(runs_started(store, 4), what="the runs to start")
            assert await store.cancel(doomed) == CancelOutcome("cancelled", 2)

            async def doomed_dropped() -> bool:
                # The kept group's slice is the one entry still pending.
                return await work_pending(store) == 1 and len(worker.runs) == 2

            await wait_until(doomed_dropped, within=5, what="the cancelled runs to stop")
            gate.open()
            await wait_until(
                lambda: group_finished(store, kept), within=10, what="the other group to finish"
            )
            worker.should_exit = True
            await asyncio.wait_for(running, 10)
            events = await log_events(store)
            assert sorted(e.task_id for e in events if isinstance(e, TaskCompleted)) == kept_tids

    asyncio.run(scenario())
