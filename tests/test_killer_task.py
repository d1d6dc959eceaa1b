"""A task that kills its worker fails alone: the other tasks of its slice succeed.

A worker runs a slice's tasks side by side, so a death cannot say which task caused
it: every task that was running is charged an attempt. An entry taken over again and
again (``SUMBATCH_MAX_ATTEMPTS`` deliveries) has its unended tasks run one at a time,
each outcome recorded before the next task begins, so from then on a death is charged
to the one task that was running."""

from __future__ import annotations

import asyncio
import os
from collections import Counter

import msgspec

from consumers.lane import Lane, runs_alone
from consumers.projector import Projector
from consumers.worker import Worker
from sumbatch.config import Settings
from sumbatch.model.events import TaskCompleted, TaskFailed
from sumbatch.replay import differences
from sumbatch.store import HANDED_BACK_MS, Store, open_store
from tests.support import (
    Processes,
    env_for,
    group_finished,
    hang_forever,
    log_events,
    submit,
    wait_until,
    work_pending,
)

KILLER = 13


def dies_at_13(a: int, b: int) -> int:
    """Exits its process, at once and without cleanup, when ``a`` is 13 (a worker
    process takes it as SUMBATCH_HANDLER=tests.test_killer_task:dies_at_13)."""
    if a == KILLER:
        os._exit(17)
    return a + b


async def _nothing_pending(store: Store) -> bool:
    return await work_pending(store) == 0


def test_the_task_that_kills_its_worker_fails_alone(settings: Settings, procs: Processes) -> None:
    """One 32-task group (one slice), no delay, a 1 s claim timeout, one worker process
    started again after each death: the killer dies three times (its three attempts)
    and ends FAILURE; the 31 others complete, each once, with its sum."""
    settings = msgspec.structs.replace(
        settings, handler="tests.test_killer_task:dies_at_13", claim_timeout=1.0
    )
    assert settings.max_attempts == 3
    env = env_for(settings)
    env["SUMBATCH_LOG_LEVEL"] = "INFO"

    async def scenario() -> None:
        async with open_store(settings) as store:
            await store.ensure_worker_group()
            gid, tids = await submit(store, [(n, 1) for n in range(32)])
            deaths: list[int] = []
            worker = procs.start(settings, "worker", env=env)

            async def finished_or_restarted() -> bool:
                nonlocal worker
                if await group_finished(store, gid):
                    return True
                code = worker.poll()
                if code is not None:
                    deaths.append(code)
                    worker = procs.start(settings, "worker", env=env)
                return False

            await wait_until(finished_or_restarted, within=120, what="the group to finish")
            assert deaths == [17, 17, 17], deaths
            said = "".join(procs.log_of(w).read_text() for w in procs.started)
            assert "one at a time" in said, said
            await wait_until(
                lambda: _nothing_pending(store), within=30, what="every entry acknowledged"
            )
            await Projector(store).run_until_idle()
            events = [e for e in await log_events(store) if getattr(e, "group_task_id", "") == gid]
            completed = [e for e in events if isinstance(e, TaskCompleted)]
            failed = [e for e in events if isinstance(e, TaskFailed)]
            assert [e.index for e in failed] == [KILLER]
            assert failed[0].attempts == 3
            assert "worker lost" in failed[0].error
            assert Counter(e.task_id for e in completed) == Counter(
                t for n, t in enumerate(tids) if n != KILLER
            )
            assert all(e.result == e.index + 1 for e in completed)
            # Runs after the second death are one at a time: no innocent is charged a
            # third death, so none completes past its last attempt.
            assert all(e.attempt <= settings.max_attempts for e in completed)
            assert (await differences(store)).differences == []

    asyncio.run(scenario())


def test_an_entry_runs_alone_once_few_attempts_are_left() -> None:
    """The first takeover still runs side by side (an ordinary crash recovers at full
    speed); the delivery that would spend a task's last attempt runs in the lane."""
    assert [runs_alone(d, 3) for d in (1, 2, 3, 4)] == [False, False, True, True]
    assert [runs_alone(d, 1) for d in (1, 2)] == [False, True]
    assert [runs_alone(d, 2) for d in (1, 2)] == [False, True]
    assert [runs_alone(d, 5) for d in (4, 5)] == [False, True]


def test_only_the_task_that_holds_the_lane_frees_it() -> None:
    async def scenario() -> None:
        lane = Lane()
        one, other = object(), object()
        lane.take(one, "1-0:5")
        lane.release(other, "1-0:5")  # another worker's task of the same key
        lane.release(one, "1-0:6")
        assert lane.busy
        waiting = asyncio.create_task(lane.wait(within=60))
        woken, _ = await asyncio.wait({waiting}, timeout=0.05)
        assert not woken  # still held: the waiter is not let through
        lane.release(one, "1-0:5")
        await asyncio.wait_for(waiting, 5)
        assert not lane.busy

    asyncio.run(scenario())


def test_a_stopping_worker_hands_back_the_tasks_waiting_for_the_lane(
    settings: Settings,
) -> None:
    """An entry on its third delivery, its four tasks waiting for the lane, which
    another worker of the process holds (a run that never ends): nothing of ours runs.
    Told to stop, the worker hands the entry back (idle ``HANDED_BACK_MS``: claimable
    at once), rather than leave it to age a claim timeout on a worker that is gone."""
    settings = msgspec.structs.replace(settings, claim_timeout=0.5, shutdown_grace=0.2)

    async def scenario() -> None:
        async with open_store(settings) as store:
            await store.ensure_worker_group()
            await submit(store, [(n, 1) for n in range(4)])
            [(entry_id, _)] = await store.read_work("gone-1", 10, block_ms=100)
            # Taken over once before: the worker's claim is its third delivery.
            await store.redis.xclaim(store.keys.work, "workers", "gone-2", 0, [entry_id])
            worker = Worker(settings, store, handler=hang_forever)
            worker.load.lane.take(object(), "another worker's task")
            running = asyncio.create_task(worker.run())

            async def waiting() -> bool:
                return len(worker.alone) == 4

            await wait_until(waiting, within=30, what="four tasks waiting for the lane")
            assert len(worker.runs) == 0
            worker.should_exit = True
            await asyncio.wait_for(running, 30)
            [pending] = await store.pending_idle(0)
            assert (pending.entry_id, pending.consumer) == (entry_id, worker.name)
            assert pending.idle_ms >= HANDED_BACK_MS
            assert pending.deliveries == 3

    asyncio.run(scenario())
