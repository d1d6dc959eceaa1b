"""Nothing holds an entry or a worker loop forever: a run that never returns is cut
off by SUMBATCH_TASK_TIMEOUT and counts as a failed attempt, and an outcome the
server rejects for a reason that is no outage is set aside without stalling the rest
of its batch or spinning."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter

import msgspec
import pytest
import redis

from consumers.projector import Projector
from consumers.worker import Worker
from sumbatch.config import Settings
from sumbatch.model.events import (
    GroupFinished,
    TaskCompleted,
    TaskDeadLettered,
    TaskRetried,
    TaskStarted,
)
from sumbatch.model.keys import Keys
from sumbatch.store import open_store
from tests.support import (
    Gate,
    Processes,
    env_for,
    group_finished,
    hang_forever,
    log_events,
    log_of,
    runs_started,
    stream_entries,
    submit,
    wait_until,
    with_credentials,
    work_pending,
    worker_idle,
)


def test_a_run_that_never_returns_times_out_and_the_task_ends_as_failure(
    settings: Settings,
) -> None:
    settings = msgspec.structs.replace(settings, task_timeout=0.5, max_attempts=2)

    async def scenario() -> None:
        async with open_store(settings) as store:
            gid, (hung, fine) = await submit(store, [(1, 2), (3, 4)])

            async def sometimes_hangs(a: int, b: int) -> int:
                if a == 1:
                    await hang_forever(a, b)
                return a + b

            worker = Worker(settings, store, handler=sometimes_hangs)
            began = time.monotonic()
            # Without the timeout this never returns; the deadline makes that a failure.
            await asyncio.wait_for(worker.run_until_idle(), 20)
            took = time.monotonic() - began
            assert took >= 2 * 0.5  # two runs, each cut off at the timeout

            await Projector(store).run_until_idle()
            view = await store.group_view(gid)
            assert view is not None
            assert (view.processed, view.succeeded, view.tasks_failed) == (True, False, 1)
            assert view.results == [None, 7]
            task = await store.task_view(hung)
            assert task is not None
            assert (task.state, task.attempts) == ("FAILURE", 2)
            assert task.error == "TimeoutError: the run took longer than 0.5 s"
            other = await store.task_view(fine)
            assert other is not None and (other.state, other.result) == ("SUCCESS", 7)

            events = await log_events(store)
            retried = [e for e in events if isinstance(e, TaskRetried)]
            assert [(e.task_id, e.attempt) for e in retried] == [(hung, 1)]
            assert "longer than 0.5 s" in retried[0].error
            dead = [e for e in events if isinstance(e, TaskDeadLettered)]
            assert [e.task_id for e in dead] == [hung]
            assert await store.redis.xlen(store.keys.dead_letters) == 1
            assert sum(isinstance(e, GroupFinished) for e in events) == 1
            assert await work_pending(store) == 0

    asyncio.run(scenario())


def test_a_run_that_hangs_once_succeeds_on_its_second_attempt(settings: Settings) -> None:
    settings = msgspec.structs.replace(settings, task_timeout=0.5, max_attempts=2)
    calls: Counter[tuple[int, int]] = Counter()

    async def hangs_the_first_time(a: int, b: int) -> int:
        calls[(a, b)] += 1
        if calls[(a, b)] == 1:
            await hang_forever(a, b)
        return a + b

    async def scenario() -> None:
        async with open_store(settings) as store:
            gid, (tid,) = await submit(store, [(20, 22)])
            worker = Worker(settings, store, handler=hangs_the_first_time)
            await asyncio.wait_for(worker.run_until_idle(), 20)
            await Projector(store).run_until_idle()
            task = await store.task_view(tid)
            assert task is not None
            assert (task.state, task.result, task.attempts, task.error) == ("SUCCESS", 42, 2, None)
            view = await store.group_view(gid)
            assert view is not None and (view.processed, view.succeeded) == (True, True)
            events = await log_events(store)
            completed = [e for e in events if isinstance(e, TaskCompleted)]
            assert [(e.result, e.attempt) for e in completed] == [(42, 2)]
            assert [e.attempt for e in events if isinstance(e, TaskStarted)] == [1, 2]

    asyncio.run(scenario())
    assert calls == Counter({(20, 22): 2})


def test_a_worker_process_reads_the_timeout_from_its_environment(
    settings: Settings, procs: Processes
) -> None:
    """SUMBATCH_TASK_TIMEOUT in a real worker: a hung run ends as FAILURE; the other
    tasks of the group are not held up by it."""
    settings = msgspec.structs.replace(
        settings, max_attempts=2, handler="tests.support:hang_forever"
    )

    async def scenario() -> None:
        async with open_store(settings) as store:
            await store.ensure_worker_group()
            env = env_for(settings)
            env["SUMBATCH_TASK_TIMEOUT"] = "0.3"
            procs.start(settings, "worker", env=env)
            gid, tids = await submit(store, [(1, 1), (2, 2)])
            await wait_until(
                lambda: group_finished(store, gid), within=20, what="the group to finish"
            )
            await Projector(store).run_until_idle()
            for tid in tids:
                task = await store.task_view(tid)
                assert task is not None
                assert (task.state, task.attempts) == ("FAILURE", 2)
                assert task.error == "TimeoutError: the run took longer than 0.3 s"

    asyncio.run(scenario())


# -- outcomes that cannot be recorded ---------------------------------------------


def test_a_group_with_a_damaged_key_does_not_hold_up_the_batch_nor_spin(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """One group's fence key is replaced by hand with a hash (where the bitmap goes),
    after its tasks started, so the completion script refuses its outcomes (before
    any write), which share one batch with another group's. The other group
    completes; the damaged group's entries, which no outcome can ever count for, are
    dead-lettered (acknowledged: nothing left pending to spin on, or to hold back the
    work stream's trimming), and said once."""
    caplog.set_level(logging.INFO, logger="sumbatch.worker")

    async def scenario() -> None:
        async with open_store(settings) as store:
            gate = Gate()
            worker = Worker(settings, store, handler=gate.handler)
            await store.ensure_worker_group()
            good, good_tids = await submit(store, [(1, 1), (2, 2), (3, 3)])
            bad, bad_tids = await submit(store, [(4, 4), (5, 5), (6, 6)])
            running = asyncio.create_task(worker.run())
            await wait_until(runs_started(store, 6), what="all six runs to start")
            work = await stream_entries(store, store.keys.work)
            await store.redis.hset(store.keys.ended(bad), "not", "a bitmap")
            gate.open()  # all six outcomes land in the same flush
            await wait_until(worker_idle(store, worker), within=10, what="every entry acknowledged")
            worker.should_exit = True
            await asyncio.wait_for(running, 10)

            events = await log_events(store)
            completed = Counter(e.task_id for e in events if isinstance(e, TaskCompleted))
            assert completed == Counter(good_tids)
            assert any(isinstance(e, GroupFinished) and e.group_task_id == good for e in events)
            assert not any(
                isinstance(e, TaskCompleted | GroupFinished) and e.group_task_id == bad
                for e in events
            )
            # The bad group's one work entry (a slice of its three tasks), once.
            [(slice_id, _)] = [e for e in work if e[1]["groupTaskId"] == bad]
            [dead] = [f for _, f in await stream_entries(store, store.keys.dead_letters)]
            assert (dead["type"], dead["workEntryId"]) == ("RefusedWorkEntry", slice_id)
            assert dead["groupTaskId"] == bad and dead["taskId"] in bad_tids

    asyncio.run(scenario())
    messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(messages) == 1 and "of 3 refused tasks" in messages[0], messages


def fails_with_undecodable_text(a: int, b: int) -> int:
    """Raises an error whose text holds a lone surrogate (as a file name read with
    surrogateescape can): no event can carry it as UTF-8."""
    if a < 0:
        raise OSError(f"cannot open '{bytes([0xFF]).decode('utf-8', 'surrogateescape')}'")
    return a + b


def test_an_error_text_that_cannot_be_encoded_is_kept_escaped(settings: Settings) -> None:
    """A handler's error with a lone surrogate in its text (a file name read with
    surrogateescape) once made its outcome unsendable, so the worker retried it
    forever. It is now escaped like any other odd byte, and the task ends as FAILURE
    with it, beside its neighbours' results."""
    settings = msgspec.structs.replace(settings, max_attempts=2)

    async def scenario() -> None:
        async with open_store(settings) as store:
            gid, tids = await submit(store, [(1, 1), (-1, 1), (2, 2)])
            await asyncio.wait_for(
                Worker(settings, store, handler=fails_with_undecodable_text).run_until_idle(), 20
            )
            await Projector(store).run_until_idle()
            view = await store.group_view(gid)
            assert view is not None
            assert (view.processed, view.results, view.tasks_failed) == (True, [2, None, 4], 1)
            task = await store.task_view(tids[1])
            assert task is not None and task.state == "FAILURE"
            assert task.error == "OSError: cannot open '\\udcff'"

    asyncio.run(scenario())


def test_a_step_the_server_refuses_for_one_group_is_isolated_and_the_rest_go_through(
    settings: Settings, raw: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """A refusal that is no outage: the worker's ACL user may not touch one group's
    keys (NOPERM, raised by the server inside the script, before its first write).
    The worker splits its batch until that group's entries are alone, runs the rest
    at once, leaves those pending without spinning, and logs one traceback."""
    ns = settings.namespace
    keys = Keys(ns)

    async def prepare() -> tuple[str, str]:
        async with open_store(settings) as store:
            await store.ensure_worker_group()
            denied, _ = await submit(store, [(5, 5), (6, 6)])
            allowed, _ = await submit(store, [(1, 1), (2, 2), (3, 3)])
            return denied, allowed

    denied, allowed = asyncio.run(prepare())
    user = f"w{ns}"
    raw.acl_setuser(
        user, enabled=True, passwords=["+pw"], commands=["+@all"], channels=["*"],
        keys=[keys.events, keys.work, keys.dead_letters, keys.stats, f"{keys.tag}:cache:*",
              f"{keys.tag}:call:*", f"{keys.tag}:fair:*",
              f"{keys.tag}:*:{allowed}"],
    )  # fmt: skip
    limited = msgspec.structs.replace(
        settings, redis_url=with_credentials(settings.client_url, user, "pw")
    )
    caplog.set_level(logging.INFO, logger="sumbatch.worker")

    async def scenario() -> None:
        async with open_store(limited) as store:
            worker = Worker(limited, store)
            running = asyncio.create_task(worker.run())
            try:
                await wait_until(
                    lambda: group_finished(store, allowed),
                    within=20,
                    what="the allowed group to finish",
                )
                assert await work_pending(store) == 1  # the denied group's slice, untouched
            finally:
                worker.should_exit = True
                await asyncio.wait_for(running, 10)

    try:
        asyncio.run(scenario())
    finally:
        raw.acl_deluser(user)
    of_denied = [e for e in asyncio.run(log_of(settings)) if e.group_task_id == denied]
    assert [type(e).__name__ for e in of_denied] == ["GroupSubmitted"]
    tracebacks = [r for r in caplog.records if r.exc_info is not None]
    assert len(tracebacks) == 1 and "isolating" in tracebacks[0].getMessage()
