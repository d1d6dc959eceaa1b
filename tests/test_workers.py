"""Workers against a real server: the completion fence, concurrency, load spread."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import msgspec
import pytest

from consumers.projector import Projector
from consumers.worker import Worker
from sumbatch.config import Settings
from sumbatch.model.events import GroupFinished, TaskCompleted, TaskStarted
from sumbatch.model.tasks import Delay
from sumbatch.store import Outcome, Store, open_store
from tests.support import (
    Gate,
    Processes,
    assert_exactly_once,
    blocked_in_xreadgroup,
    group_finished,
    log_events,
    pending_by_consumer,
    stream_entries,
    submit,
    wait_until,
    work_pending,
)


def test_two_consumers_completing_one_entry_count_it_once(settings: Settings) -> None:
    async def scenario() -> None:
        store = open_store(settings)
        try:
            await store.ensure_worker_group()
            gid, (tid,) = await submit(store, [(2, 3)])
            [(entry_id, _)] = await store.read_work("a", 10, block_ms=100)
            [(claimed_id, _)] = await store.autoclaim("b", min_idle_ms=0)
            assert claimed_id == entry_id  # both now believe they own it

            def outcome(worker: str) -> Outcome:
                event = TaskCompleted(
                    task_id=tid,
                    group_task_id=gid,
                    index=0,
                    result=5,
                    from_cache=False,
                    attempt=1,
                    worker=worker,
                )
                return Outcome(entry_id, event, 2, 3)

            recorded = await asyncio.gather(
                store.complete([outcome("a")]), store.complete([outcome("b")])
            )
            assert sorted(r.recorded for r in recorded) == [0, 1]
            events = await log_events(store)
            assert sum(isinstance(e, TaskCompleted) for e in events) == 1
            assert sum(isinstance(e, GroupFinished) for e in events) == 1
            assert await work_pending(store) == 0
        finally:
            await store.aclose()

    asyncio.run(scenario())


def test_two_workers_running_the_same_entry_count_it_once(settings: Settings) -> None:
    """A stuck worker's entry is taken over; when the stuck one wakes up and finishes
    too, the fence keeps the first outcome only."""

    async def scenario() -> None:
        store = open_store(settings)
        gate = asyncio.Event()

        async def stuck_sum(a: int, b: int) -> int:
            await gate.wait()
            return a + b

        slow = Worker(msgspec.structs.replace(settings, claim_timeout=60), store, handler=stuck_sum)
        fast = Worker(msgspec.structs.replace(settings, claim_timeout=0.1), store)
        try:
            await store.ensure_worker_group()
            gid, (tid,) = await submit(store, [(20, 22)])
            slow_run = asyncio.create_task(slow.run())

            async def started_by(n: int) -> bool:
                return sum(isinstance(e, TaskStarted) for e in await log_events(store)) >= n

            await wait_until(lambda: started_by(1), what="the slow worker to start")
            fast_run = asyncio.create_task(fast.run())

            async def fast_done() -> bool:
                return any(isinstance(e, TaskCompleted) for e in await log_events(store))

            # No delay: the fast worker runs it at once; its TaskCompleted is its start.
            await wait_until(fast_done, what="the fast worker to take over")
            gate.set()  # the stuck worker finishes too
            await wait_until(lambda: _no_work_in_flight(slow, fast), what="both to finish")
            slow.should_exit = fast.should_exit = True
            await asyncio.gather(slow_run, fast_run)
            await Projector(store).run_until_idle()

            events = await log_events(store)
            starts = [e for e in events if isinstance(e, TaskStarted)]
            assert [(e.worker, e.attempt) for e in starts] == [(slow.name, 1)]
            completed = [e for e in events if isinstance(e, TaskCompleted)]
            assert [(e.task_id, e.result, e.worker, e.attempt) for e in completed] == [
                (tid, 42, fast.name, 2)
            ]
            view = await store.group_view(gid)
            assert view is not None and (view.tasks_completed, view.results) == (1, [42])
        finally:
            await store.aclose()

    asyncio.run(scenario())


async def _no_work_in_flight(*workers: Worker) -> bool:
    return not any(w.busy for w in workers)


def test_one_worker_runs_many_delayed_tasks_at_once(settings: Settings) -> None:
    """200 tasks of 1-2 s: every one starts before the first one ends, so the delay
    of one never holds up another (the 3-10 s timing is in ops/bench)."""

    async def scenario() -> None:
        store = open_store(settings)
        try:
            gid, _ = await submit(store, [(i, i) for i in range(200)])
            worker = Worker(msgspec.structs.replace(settings, delay=Delay(1.0, 2.0)), store)
            await worker.run_until_idle()
            events = await log_events(store)
            kinds = [type(e).__name__ for e in events if isinstance(e, TaskStarted | TaskCompleted)]
            first_done = kinds.index("TaskCompleted")
            assert kinds[:first_done] == ["TaskStarted"] * 200
            await Projector(store).run_until_idle()
            view = await store.group_view(gid)
            assert view is not None and view.results == [2 * i for i in range(200)]
        finally:
            await store.aclose()

    asyncio.run(scenario())


def test_load_spreads_over_worker_processes(settings: Settings, procs: Processes) -> None:
    if not Path("/proc/self/net/tcp").exists():
        pytest.skip("needs Linux /proc to tell the worker processes' connections apart")
    settings = msgspec.structs.replace(settings, delay=Delay(0.2, 0.4))
    names = ["w0", "w1"]

    async def scenario() -> None:
        store = open_store(settings)
        try:
            await store.ensure_worker_group()
            workers = [procs.start(settings, "worker", "--name", name) for name in names]

            async def all_reading() -> bool:
                return await blocked_in_xreadgroup(store, workers)

            # Both waiting for work, or the first to come up would take every group.
            await wait_until(all_reading, what="both worker processes to block in XREADGROUP")
            groups = []
            for g in range(10):
                groups.append(await submit(store, [(g, j) for j in range(20)]))
                await asyncio.sleep(0.05)  # spacing submissions, not synchronisation

            async def all_done() -> bool:
                done = [e for e in await log_events(store) if isinstance(e, GroupFinished)]
                return len(done) == 10

            await wait_until(all_done, what="all groups to finish")
            events = await log_events(store)
            by_worker = Counter(e.worker for e in events if isinstance(e, TaskCompleted))
            assert set(by_worker) == set(names), by_worker
            assert sum(by_worker.values()) == 200
        finally:
            await store.aclose()

    asyncio.run(scenario())


def test_a_failing_task_is_retried_then_ends_as_failure_and_the_group_finishes(
    settings: Settings,
) -> None:
    calls: Counter[tuple[int, int]] = Counter()

    def flaky(a: int, b: int) -> int:
        calls[(a, b)] += 1
        if a < 0:
            raise ValueError("negative paramA")
        if calls[(a, b)] == 1:
            raise RuntimeError("first try fails")
        return a + b

    async def scenario() -> None:
        store = open_store(settings)
        try:
            gid, tids = await submit(store, [(1, 2), (-1, 2)])
            await Worker(settings, store, handler=flaky).run_until_idle()
            await Projector(store).run_until_idle()
            group = await store.group_view(gid)
            assert group is not None
            assert (group.processed, group.succeeded, group.tasks_failed) == (True, False, 1)
            assert group.results == [3, None]
            ok, bad = await store.task_view(tids[0]), await store.task_view(tids[1])
            assert ok is not None and (ok.state, ok.result, ok.attempts) == ("SUCCESS", 3, 2)
            assert bad is not None and (bad.state, bad.attempts) == ("FAILURE", 3)
            assert bad.error == "ValueError: negative paramA"
            events = await log_events(store)
            finished = [e for e in events if isinstance(e, GroupFinished)]
            assert [(f.succeeded, f.tasks_failed) for f in finished] == [(False, 1)]
        finally:
            await store.aclose()

    asyncio.run(scenario())
    assert calls == Counter({(1, 2): 2, (-1, 2): 3})


def test_an_unreadable_work_entry_is_dead_lettered_and_blocks_nothing(settings: Settings) -> None:
    async def scenario() -> None:
        store = open_store(settings)
        try:
            await store.ensure_worker_group()
            await store.redis.xadd(store.keys.work, {"type": "Nonsense", "x": "1"})
            gid, _ = await submit(store, [(1, 2), (3, 4)])
            await Worker(settings, store).run_until_idle()
            await Projector(store).run_until_idle()
            view = await store.group_view(gid)
            assert view is not None and view.results == [3, 7]
            [(_, dead)] = await stream_entries(store, store.keys.dead_letters)
            assert dead["type"] == "UnreadableWorkEntry" and dead["x"] == "1"
            assert await work_pending(store) == 0
        finally:
            await store.aclose()

    asyncio.run(scenario())


def test_a_result_that_is_no_integer_fails_that_task_only(settings: Settings) -> None:
    def odd(a: int, b: int) -> int:
        return "many" if a == 13 else a + b  # type: ignore[return-value]

    async def scenario() -> None:
        store = open_store(settings)
        try:
            gid, _ = await submit(store, [(1, 2), (13, 1), (3, 4)])
            await Worker(settings, store, handler=odd).run_until_idle()
            await Projector(store).run_until_idle()
            view = await store.group_view(gid)
            assert view is not None
            assert (view.results, view.states, view.tasks_failed) == (
                [3, None, 7],
                ["D", "F", "D"],
                1,
            )
            assert "invalid literal for int()" in view.errors[1]
        finally:
            await store.aclose()

    asyncio.run(scenario())


def test_a_worker_stops_even_when_a_helper_loses_its_cancellation(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On Python 3.11, redis-py's wait_for around each command can swallow a
    cancellation (CPython gh-86296): the helper loop that made the call goes on as if
    never cancelled. A worker told to stop must still end, and leave no task behind
    (asyncio.run would wait for it for ever: a benchmark saw a worker hang on SIGTERM)."""

    async def scenario() -> None:
        async with open_store(settings) as store:
            worker = Worker(settings, store)
            real_renew = store.renew
            renewing = asyncio.Event()

            async def renew_that_loses_a_cancel(*args: object, **kwargs: object) -> list[str]:
                renewing.set()
                try:
                    await asyncio.sleep(3600)
                except asyncio.CancelledError:
                    pass  # swallowed, as that wait_for can: no uncancel, no re-raise
                return await real_renew(*args, **kwargs)  # type: ignore[arg-type]

            monkeypatch.setattr(store, "renew", renew_that_loses_a_cancel)
            running = asyncio.create_task(worker.run())
            await asyncio.wait_for(renewing.wait(), 10)
            worker.should_exit = True
            await asyncio.wait_for(running, 10)
            left = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
            assert left == []

    asyncio.run(scenario())


def test_a_worker_runs_no_more_tasks_than_its_limit_however_big_a_slice(
    settings: Settings,
) -> None:
    """A read takes a whole slice (here 5 tasks, one work entry) even with room for one
    task; the rest wait in the worker's backlog, begun one by one as runs end, and the
    entry is acknowledged with the last of them."""
    settings = msgspec.structs.replace(settings, worker_concurrency=1)
    gates = [asyncio.Event() for _ in range(5)]
    running: list[int] = []
    most = 0

    async def handler(a: int, b: int) -> int:
        nonlocal most
        running.append(a)
        most = max(most, len(running))
        await gates[a].wait()
        running.remove(a)
        return a + b

    async def scenario() -> None:
        async with open_store(settings) as store:
            await store.ensure_worker_group()
            gid, _ = await submit(store, [(n, 10) for n in range(5)])
            worker = Worker(settings, store, handler=handler)
            task = asyncio.create_task(worker.run())
            for n in range(5):

                async def alone(n: int = n) -> bool:
                    return running == [n]

                await wait_until(alone, what=f"task {n} to run alone")
                assert len(worker.backlog) == 4 - n
                assert await work_pending(store) == 1  # the one slice, held throughout
                gates[n].set()
            await wait_until(lambda: group_finished(store, gid), what="the group to finish")
            await wait_until(lambda: work_pending_is(store, 0), what="the slice to be acknowledged")
            worker.should_exit = True
            await asyncio.wait_for(task, 10)

    asyncio.run(scenario())
    assert most == 1


async def work_pending_is(store: Store, count: int) -> bool:
    return await work_pending(store) == count


def test_a_taken_over_slice_runs_only_its_tasks_that_have_not_ended(
    settings: Settings, procs: Processes
) -> None:
    """A worker ends the even tasks of a 40-task group (two slices) and hangs on the odd
    ones; kill -9. The worker that takes its two entries over runs only the odd tasks:
    the even ones, ended, are neither started nor counted again."""
    settings = msgspec.structs.replace(settings, claim_timeout=1.0)

    async def scenario() -> None:
        async with open_store(settings) as store:
            await store.ensure_worker_group()
            gid, tids = await submit(store, [(n, 1) for n in range(40)])
            hanging = msgspec.structs.replace(settings, handler="tests.support:hang_on_odd")
            first = procs.start(hanging, "worker", "--name", "first")

            async def evens_done() -> bool:
                done = [e for e in await log_events(store) if isinstance(e, TaskCompleted)]
                return len(done) == 20

            await wait_until(evens_done, within=20, what="the first worker to end the evens")
            assert await work_pending(store) == 2  # both slices wait for their odd tasks
            procs.kill9(first)
            procs.start(settings, "worker", "--name", "second")
            await wait_until(lambda: group_finished(store, gid), within=20, what="the group")
            await assert_exactly_once(store, [(gid, tids)])
            events = await log_events(store)
            completed_by = {e.index: e.worker for e in events if isinstance(e, TaskCompleted)}
            assert completed_by == {n: "first" if n % 2 == 0 else "second" for n in range(40)}
            # Begun (and their attempts counted) only where they had not ended: the
            # second worker began none of the even ones.
            counted = str(await store.redis.get(store.keys.attempts(gid)))
            assert [ord(c) for c in counted] == [1 if n % 2 == 0 else 2 for n in range(40)]
            attempts = {e.index: e.attempt for e in events if isinstance(e, TaskCompleted)}
            assert attempts == {n: 1 if n % 2 == 0 else 2 for n in range(40)}
            sums = {e.index: e.result for e in events if isinstance(e, TaskCompleted)}
            assert sums == {n: n + 1 for n in range(40)}

    asyncio.run(scenario())


def test_a_sweep_takes_over_only_as_many_entries_as_the_worker_has_room_for(
    settings: Settings,
) -> None:
    """Three entries a dead worker left idle; a worker with room for one task claims
    one of them per sweep (once it has watched them for the claim timeout), not all
    three, so that other workers can take the rest."""
    settings = msgspec.structs.replace(settings, worker_concurrency=1)

    async def scenario() -> None:
        async with open_store(settings) as store:
            await store.ensure_worker_group()
            groups = [await submit(store, [(n, n)]) for n in range(3)]
            read = await store.read_work("dead", 10, 0)
            assert len(read) == 3
            idle = int(settings.claim_timeout * 1000) * 10
            await store.redis.xclaim(
                store.keys.work, "workers", "dead", 0, [eid for eid, _ in read], idle=idle
            )
            gate = Gate()
            worker = Worker(settings, store, handler=gate.handler)
            # Idle past the timeout at once: taken once watched that long (takeover.py).
            taken = await wait_until(worker._sweep, within=10, what="a sweep to take one")
            assert taken == 1
            assert await pending_by_consumer(store) == {"dead": 2, worker.name: 1}
            assert await worker._sweep() == 0  # its one slot is taken: nothing more
            running = asyncio.create_task(worker.run())
            gate.open()

            async def all_finished() -> bool:
                return all([await group_finished(store, gid) for gid, _ in groups])

            await wait_until(all_finished, what="every group to finish")
            worker.should_exit = True
            await asyncio.wait_for(running, 10)
            await assert_exactly_once(store, groups)

    asyncio.run(scenario())
