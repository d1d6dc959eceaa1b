"""A server stall longer than the claim timeout takes no live worker's tasks (issue 17,
item 3): a sweep takes over an entry only once it has watched its owner miss its
renewals for the claim timeout on its own clock (consumers/takeover.py), never on one
reading of idle time, which a stall ages all at once. Five worker processes, a 2 s
claim timeout, tasks of 7-8 s, and a 3 s DEBUG SLEEP or CLIENT PAUSE (ALL, WRITE)
while they run: every task starts once, on attempt 1, and completes once. A worker
killed with kill -9 still has its tasks taken over. Then the rule itself, on a real
server and on made-up readings."""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from collections.abc import Iterator

import msgspec
import pytest
import redis

from consumers.takeover import Watch, longest_gap
from sumbatch.config import Settings
from sumbatch.model.events import TaskStarted
from sumbatch.model.keys import WORKER_GROUP
from sumbatch.model.tasks import Delay
from sumbatch.processes.embedded import EmbeddedServer
from sumbatch.store import HANDED_BACK_MS, Pending, Store, open_store
from tests.support import (
    Groups,
    Processes,
    all_processed,
    assert_exactly_once,
    blocked_in_xreadgroup,
    debug_server,
    drop_namespace,
    fresh_namespace,
    log_events,
    runs_started,
    stalled,
    submit,
    wait_until,
    wait_until_sync,
)

CLAIM = 2.0
STALL = 3  # seconds: longer than the claim timeout
WORKERS = 5
GROUPS, TASKS = 5, 6


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedServer]:
    with debug_server(tmp_path_factory.mktemp("stall")) as own:
        yield own


@pytest.fixture
def stall_settings(server: EmbeddedServer) -> Iterator[Settings]:
    namespace = fresh_namespace("s")
    yield Settings(
        redis_url=server.url,
        namespace=namespace,
        delay=Delay(7.0, 8.0),
        claim_timeout=CLAIM,
        retry_base=0.01,
    )
    drop_namespace(server.url, namespace)


def _debug_sleep(server: EmbeddedServer) -> None:
    admin = redis.Redis.from_url(server.url, socket_timeout=60)
    try:
        admin.execute_command("DEBUG", "SLEEP", STALL)  # type: ignore[no-untyped-call]
    finally:
        admin.close()


def _pause(server: EmbeddedServer, what: str) -> None:
    admin = redis.Redis.from_url(server.url, socket_timeout=60)
    try:
        admin.execute_command("CLIENT", "PAUSE", STALL * 1000, what)  # type: ignore[no-untyped-call]
    finally:
        admin.close()


async def _start_spread(store: Store, settings: Settings, procs: Processes) -> Groups:
    """Five workers and a projector; five groups submitted one at a time, each once the
    one before has started, so that the workers (blocked in their reads, served in
    turn) hold them between them. Returns once every task runs."""
    await store.ensure_worker_group()
    workers = [procs.start(settings, "worker") for _ in range(WORKERS)]
    procs.start(settings, "projector")
    await wait_until(lambda: blocked_in_xreadgroup(store, workers), what="every worker to read")
    groups: Groups = []
    for n in range(GROUPS):
        groups.append(await submit(store, [(n, i) for i in range(TASKS)]))
        await wait_until(runs_started(store, TASKS * (n + 1)), what=f"group {n} to start")
    return groups


async def _assert_each_ran_once(store: Store, groups: Groups) -> None:
    await wait_until(lambda: all_processed(store, groups), within=90, what="every group")
    await assert_exactly_once(store, groups)
    starts = [e for e in await log_events(store) if isinstance(e, TaskStarted)]
    assert Counter(e.attempt for e in starts) == Counter({1: GROUPS * TASKS}), [
        (e.task_id, e.worker, e.attempt) for e in starts if e.attempt != 1
    ]
    assert len({e.worker for e in starts}) > 1  # the tasks were spread: others swept
    assert set(Counter(e.task_id for e in starts).values()) == {1}


@pytest.mark.parametrize("stall", ["DEBUG SLEEP", "CLIENT PAUSE ALL", "CLIENT PAUSE WRITE"])
def test_a_stall_longer_than_the_claim_timeout_takes_no_live_worker_s_tasks(
    server: EmbeddedServer, stall_settings: Settings, procs: Processes, stall: str
) -> None:
    """Every task runs 7-8 s, claims time out after 2 s, the server stalls 3 s while
    all run: at wake-up the entries are idle past the timeout, and the sweeps of four
    other workers race their owners' renewals. None is taken over."""

    async def scenario() -> None:
        async with open_store(stall_settings) as store:
            groups = await _start_spread(store, stall_settings, procs)
            if stall == "DEBUG SLEEP":
                sleeper = threading.Thread(target=_debug_sleep, args=(server,))
                sleeper.start()
                try:
                    wait_until_sync(lambda: stalled(server), 10, "the server to sleep")
                finally:
                    await asyncio.to_thread(sleeper.join, 60)
            else:
                _pause(server, stall.rsplit(" ", 1)[1])
                # Over once a write goes through again (CLIENT PAUSE holds it).
                admin = redis.Redis.from_url(server.url, socket_timeout=60)
                key = f"{stall_settings.namespace}:probe"
                await asyncio.to_thread(admin.set, key, 1)
                admin.delete(key)
                admin.close()
            await _assert_each_ran_once(store, groups)

    asyncio.run(scenario())


def test_a_killed_worker_s_tasks_are_still_taken_over(
    stall_settings: Settings, procs: Processes
) -> None:
    """kill -9 of the worker that runs a group: another worker, watching its entry go
    unrenewed for the claim timeout, takes it over and runs each task once more."""
    settings = msgspec.structs.replace(stall_settings, delay=Delay(3.0, 4.0))

    async def scenario() -> None:
        async with open_store(settings) as store:
            await store.ensure_worker_group()
            doomed = procs.start(settings, "worker")
            groups = [await submit(store, [(i, 7) for i in range(TASKS)])]
            await wait_until(runs_started(store, TASKS), what="the doomed worker to start")
            procs.start(settings, "worker")
            procs.start(settings, "projector")
            procs.kill9(doomed)
            await wait_until(lambda: all_processed(store, groups), within=60, what="the group")
            await assert_exactly_once(store, groups)
            starts = [e for e in await log_events(store) if isinstance(e, TaskStarted)]
            assert Counter(e.attempt for e in starts) == Counter({1: TASKS, 2: TASKS})
            assert len({e.worker for e in starts if e.attempt == 2}) == 1

    asyncio.run(scenario())


def test_an_entry_aged_in_one_reading_is_not_claimed_on_that_reading(
    settings: Settings,
) -> None:
    """On a real server: an entry whose idle time jumps past the claim timeout at once
    (what a stall does) is watched, not claimed, and XCLAIM leaves an entry renewed
    since its reading to its owner."""

    async def scenario() -> None:
        async with open_store(settings) as store:
            await store.ensure_worker_group()
            await submit(store, [(1, 2)])
            [(entry_id, _)] = await store.read_work("owner", 10, block_ms=100)
            aged = int(settings.claim_timeout * 1000) * 30
            await store.redis.xclaim(
                store.keys.work, WORKER_GROUP, "owner", 0, [entry_id], idle=aged, justid=True
            )
            watch = Watch(settings.claim_timeout, longest_gap(settings.claim_timeout, 0.5))
            [seen] = await store.pending_idle(0)
            assert (seen.entry_id, seen.consumer, seen.deliveries) == (entry_id, "owner", 1)
            assert seen.idle_ms >= aged
            assert watch.observe([seen], 100.0, 100.01) == []
            assert watch.overdue == 1
            # Seen again a moment later, unchanged: still not long enough on our clock.
            [again] = await store.pending_idle(0)
            assert abs(again.delivered_ms - seen.delivered_ms) <= 5
            assert watch.observe([again], 100.5, 100.51) == []
            # The owner renews (idle 0): a claim made on the old reading takes nothing.
            assert await store.renew("owner", [entry_id]) == []
            assert await store.claim_idle("taker", seen.idle_ms, [entry_id]) == []
            [renewed] = await store.pending_idle(0)
            assert renewed.consumer == "owner" and renewed.delivered_ms > seen.delivered_ms
            assert watch.observe([renewed], 101.0, 101.01) == []
            assert watch.seen[entry_id].since == 101.01  # the watch starts again

    asyncio.run(scenario())


def _pending(idle_ms: int, delivered_ms: int, consumer: str = "owner", n: int = 1) -> Pending:
    return Pending("1-0", consumer, idle_ms, n, delivered_ms)


def test_the_watch_takes_only_what_it_saw_unrenewed_for_the_claim_timeout() -> None:
    """The rule on made-up readings, our clock in seconds, the server's in ms."""
    watch = Watch(claim_timeout=2.0, gap=1.0)
    # A stall has aged it 60 s: the first reading only starts the watch.
    assert watch.observe([_pending(60_000, 1_000)], 10.0, 10.1) == []
    assert watch.observe([_pending(60_500, 1_000)], 10.6, 10.7) == []
    assert watch.observe([_pending(61_000, 1_000)], 11.2, 11.3) == []
    assert watch.observe([_pending(61_500, 1_000)], 11.8, 11.9) == []
    # 2 s of our clock from the first reply to this sending, unchanged: taken.
    assert watch.observe([_pending(62_000, 1_000)], 12.1, 12.2) == [_pending(62_000, 1_000)]

    # Renewed between readings (delivered later), or claimed (another owner, one more
    # delivery): watched again from the reading that shows it.
    watch = Watch(claim_timeout=2.0, gap=1.0)
    watch.observe([_pending(5_000, 1_000)], 0.0, 0.1)
    watch.observe([_pending(600, 6_000)], 0.6, 0.7)  # renewed: watched from 0.7
    for at in (1.2, 1.7, 2.2):
        assert watch.observe([_pending(2_000, 6_000)], at, at + 0.1) == []
    assert watch.observe([_pending(2_000, 6_000)], 2.7, 2.75) != []
    watch.observe([_pending(100, 9_000, "taker", 2)], 2.8, 2.9)  # taken: from 2.9
    for at in (3.3, 3.8, 4.3, 4.85):
        assert watch.observe([_pending(2_500, 9_000, "taker", 2)], at, at + 0.05) == []
    assert watch.observe([_pending(3_000, 9_000, "taker", 2)], 4.9, 4.95) != []

    # A gap between readings longer than ``gap`` (the server, or we, stalled) forgets
    # everything seen before it, and an entry missing from a reading is forgotten.
    watch = Watch(claim_timeout=2.0, gap=1.0)
    watch.observe([_pending(5_000, 1_000)], 0.0, 0.1)
    watch.observe([_pending(6_000, 1_000)], 0.9, 1.0)
    watch.observe([_pending(9_000, 1_000)], 1.1, 4.0)  # 4.0 - 0.9 > 1.0
    assert watch.observe([_pending(9_500, 1_000)], 4.5, 4.6) == []
    watch.observe([], 5.0, 5.1)
    watch.observe([_pending(11_000, 1_000)], 5.6, 5.7)
    assert watch.observe([_pending(11_500, 1_000)], 6.1, 6.2) == []

    # A server clock stepped back or forward leaves delivered_ms as it is: no effect.
    watch = Watch(claim_timeout=2.0, gap=1.0)
    watch.observe([_pending(5_000, 1_000)], 0.0, 0.1)
    for step, at in enumerate((0.6, 1.1, 1.6, 2.05)):
        idle = 900_000 if step % 2 else 100
        assert watch.observe([_pending(idle, 1_000)], at, at + 0.05) == []
    assert watch.observe([_pending(100, 1_000)], 2.2, 2.25) == [_pending(100, 1_000)]

    # Handed back by a stopping worker: taken at once.
    watch = Watch(claim_timeout=2.0, gap=1.0)
    handed = _pending(HANDED_BACK_MS + 5, 1_000)
    assert watch.observe([handed], 0.0, 0.1) == [handed]
