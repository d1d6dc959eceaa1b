"""A plain (synchronous) handler runs off the event loop, on a bounded pool of threads:
a blocking handler starves no renewal (so no live worker's task is taken over), the
task timeout applies to it, its calls run at once up to the pool's size, and a call
that outlives its timeout keeps its thread, counted, until it really returns, while
its late result is never written."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter

import msgspec

from consumers.projector import Projector
from consumers.threads import THREADS_CAP, NoThread, Threads
from consumers.worker import Worker
from sumbatch.config import Settings
from sumbatch.model.events import TaskCompleted, TaskRetried, TaskStarted
from sumbatch.store import open_store
from tests.support import (
    Processes,
    assert_exactly_once,
    blocked_in_xreadgroup,
    env_for,
    group_finished,
    log_events,
    submit,
    wait_until,
)

SLEEP = 0.5


def sleepy(a: int, b: int) -> int:
    """Blocks its thread (a worker process takes it as
    SUMBATCH_HANDLER=tests.test_sync_handler:sleepy)."""
    time.sleep(SLEEP)
    return a + b


def test_a_sleeping_sync_handler_starves_no_renewal_and_no_task_is_taken_over(
    settings: Settings, procs: Processes
) -> None:
    """Two worker processes, 8 threads each, a 2 s claim timeout and 128 tasks of
    0.5 s: 64 s of calls over at most 16 threads, so the batch takes at least 4 s and
    each worker holds its entries past the claim timeout. Run on the event loop, 8
    calls back to back held it 4 s, its renewals stopped and the other worker claimed
    its entry and ran its tasks again (a second attempt). Off the loop, no entry is
    claimed and every task starts once and completes once, on its first attempt."""
    assert settings.claim_timeout == 2.0
    settings = msgspec.structs.replace(settings, handler="tests.test_sync_handler:sleepy")
    env = env_for(settings)
    env["SUMBATCH_WORKER_CONCURRENCY"] = "8"
    env["SUMBATCH_LOG_LEVEL"] = "INFO"  # a takeover says "claimed", the loser "taken over"

    async def scenario() -> None:
        async with open_store(settings) as store:
            await store.ensure_worker_group()
            workers = [procs.start(settings, "worker", env=env) for _ in range(2)]
            await wait_until(
                lambda: blocked_in_xreadgroup(store, workers), within=30, what="both workers"
            )
            began = time.monotonic()
            gid, tids = await submit(store, [(n, 1) for n in range(128)])
            await wait_until(
                lambda: group_finished(store, gid), within=60, what="the group to finish"
            )
            # Not a timing bound: 128 calls of 0.5 s over at most 16 threads take 4 s.
            assert time.monotonic() - began > settings.claim_timeout
            await Projector(store).run_until_idle()
            await assert_exactly_once(store, [(gid, tids)])
            for worker in workers:
                said = procs.log_of(worker).read_text()
                assert "claimed" not in said and "taken over" not in said, said
            events = await log_events(store)
            completed = [e for e in events if isinstance(e, TaskCompleted)]
            assert Counter(e.attempt for e in completed) == {1: 128}, "a task was taken over"
            assert sorted(e.result for e in completed) == [n + 1 for n in range(128)]
            started = Counter(e.task_id for e in events if isinstance(e, TaskStarted))
            assert started == Counter(tids), "a task started more than once"
            # Both workers ran tasks: each had a live peer that could have taken over.
            assert len({e.worker for e in completed}) == 2

    asyncio.run(scenario())


class Hangs:
    """A plain handler that blocks its thread on ``(1, x)`` until ``release()``
    (at most 60 s, so that a run on the event loop fails rather than hangs for ever);
    ``returned`` counts the calls that have returned."""

    def __init__(self) -> None:
        self.released = threading.Event()
        self.lock = threading.Lock()
        self.returned = 0

    def __call__(self, a: int, b: int) -> int:
        if a == 1:
            self.released.wait(60)
        with self.lock:
            self.returned += 1
        return a + b

    def release(self) -> None:
        self.released.set()


def test_the_task_timeout_cuts_off_a_hung_sync_call_and_its_late_result_is_dropped(
    settings: Settings,
) -> None:
    """A plain handler that hangs: each run fails at the 0.5 s timeout, the task ends
    as FAILURE after its two attempts, its neighbour succeeds; the two hung calls keep
    their threads (counted busy and overdue) until they return, and when they do,
    with the worker still running, nothing of theirs is written."""
    settings = msgspec.structs.replace(settings, task_timeout=0.5, max_attempts=2)
    hangs = Hangs()

    async def scenario() -> None:
        async with open_store(settings) as store:
            await store.ensure_worker_group()
            gid, (hung, fine) = await submit(store, [(1, 2), (3, 4)])
            worker = Worker(settings, store, handler=hangs)
            running = asyncio.create_task(worker.run())
            try:
                await wait_until(
                    lambda: group_finished(store, gid), within=20, what="the group to finish"
                )
                threads = worker.runs.threads
                assert (threads.busy, threads.overdue) == (2, 2)
                written = await log_events(store)
                hangs.release()

                async def calls_returned() -> bool:
                    return threads.busy == 0 and hangs.returned == 3

                await wait_until(calls_returned, within=10, what="the hung calls to return")
                assert threads.overdue == 0
            finally:
                worker.should_exit = True
                await asyncio.wait_for(running, 10)
            # The worker has stopped and drained what it had: the late calls added nothing.
            assert await log_events(store) == written
            await Projector(store).run_until_idle()
            task = await store.task_view(hung)
            assert task is not None
            assert (task.state, task.attempts) == ("FAILURE", 2)
            assert task.error == "TimeoutError: the run took longer than 0.5 s"
            other = await store.task_view(fine)
            assert other is not None and (other.state, other.result) == ("SUCCESS", 7)
            retried = [e for e in written if isinstance(e, TaskRetried)]
            assert [(e.task_id, e.attempt) for e in retried] == [(hung, 1)]

    asyncio.run(scenario())


class Holds:
    """A plain handler that holds every call until ``release()`` (at most 60 s) and
    counts the calls in it at once, and their peak."""

    def __init__(self) -> None:
        self.released = threading.Event()
        self.lock = threading.Lock()
        self.inside = 0
        self.peak = 0

    def __call__(self, a: int, b: int) -> int:
        with self.lock:
            self.inside += 1
            self.peak = max(self.peak, self.inside)
        self.released.wait(60)
        with self.lock:
            self.inside -= 1
        return a + b


def test_sync_calls_run_at_once_up_to_the_pool_size(settings: Settings) -> None:
    """Room for 64 runs, 40 tasks: all 40 runs start, 32 calls (the pool's size) are in
    the handler at once and the other 8 wait for a thread; released, all complete."""
    settings = msgspec.structs.replace(settings, worker_concurrency=64)
    holds = Holds()
    assert THREADS_CAP == 32

    async def scenario() -> None:
        async with open_store(settings) as store:
            await store.ensure_worker_group()
            gid, tids = await submit(store, [(n, n) for n in range(40)])
            worker = Worker(settings, store, handler=holds)
            threads = worker.runs.threads
            running = asyncio.create_task(worker.run())
            try:

                async def pool_full() -> bool:
                    return len(worker.runs) == 40 and threads.busy == 32 and threads.waiting == 8

                await wait_until(pool_full, within=20, what="32 calls in, 8 waiting")
                # The 32 are in the handler at once (each counted itself in).
                await wait_until(lambda: _true(holds.inside == 32), within=10, what="32 inside")
                holds.released.set()
                await wait_until(
                    lambda: group_finished(store, gid), within=20, what="the group to finish"
                )
            finally:
                holds.released.set()
                worker.should_exit = True
                await asyncio.wait_for(running, 10)
            assert holds.peak == 32
            await Projector(store).run_until_idle()
            await assert_exactly_once(store, [(gid, tids)])

    asyncio.run(scenario())


async def _true(value: bool) -> bool:
    return value


def test_a_pool_held_by_abandoned_calls_fails_the_waiting_calls_after_its_patience() -> None:
    """A pool of one thread, held by a call past its timeout: the next call waits, and
    fails with NoThread once the thread has been held that way for the patience; once
    the hung call returns, the thread serves again."""
    released = threading.Event()

    def hang() -> str:
        released.wait(60)
        return "late"

    async def scenario() -> None:
        threads = Threads(1, patience=0.2)
        try:
            async with asyncio.timeout(0.05):
                await threads.call(hang)
            raise AssertionError("the call should have timed out")
        except TimeoutError:
            pass
        assert (threads.busy, threads.overdue) == (1, 1)
        waiting = asyncio.create_task(threads.call(lambda: "never"))
        try:
            await asyncio.wait_for(waiting, 10)
            raise AssertionError("the waiting call should have failed")
        except NoThread as exc:
            assert "all 1 are held by calls past their timeout" in str(exc)
        released.set()
        await wait_until(lambda: _true(threads.busy == 0), within=10, what="the thread back")
        assert threads.overdue == 0
        assert await threads.call(lambda: "again") == "again"

    try:
        asyncio.run(scenario())
    finally:
        released.set()
