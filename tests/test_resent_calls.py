"""A state-changing call sent twice changes nothing more (issue 17, item 2).

A client resends a call after its socket timeout (redis-py's retry) and the worker's
loops resend a step whose outcome they could not hear; when the first run did happen
(its reply lost, or queued behind a server stall), the resend must find it: attempts
count runs that began, each task has one outcome, one progress event, one dead-letter
copy. Faults come from a proxy between the store and the server (the reply of a call
dropped after the call was forwarded) and from the server itself (DEBUG SLEEP longer
than the client's socket timeout)."""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import redis
from redis.commands.core import AsyncScript

from consumers.projector import Projector
from consumers.worker import Worker
from sumbatch.config import Settings
from sumbatch.model.events import (
    TaskCompleted,
    TaskDeadLettered,
    TaskFailed,
    TaskRevoked,
    TasksSubmitted,
    TaskStarted,
    TaskSubmitted,
    from_fields,
    tasks_of,
)
from sumbatch.model.projection import Views
from sumbatch.model.tasks import Delay
from sumbatch.processes.embedded import EmbeddedServer
from sumbatch.replay import differences
from sumbatch.store import Outcome, Store, open_store, task_key
from sumbatch.testing.proxy import FaultProxy, running_proxy
from tests.support import (
    debug_server,
    drop_namespace,
    fresh_namespace,
    log_events,
    submit,
    wait_until,
    wait_until_sync,
)

# The store's socket timeout in these tests: a dropped reply or a stall longer than it
# makes redis-py resend the call.
TIMEOUT = 0.5


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedServer]:
    with debug_server(tmp_path_factory.mktemp("resent")) as own:
        yield own


@pytest.fixture
def proxy(server: EmbeddedServer) -> Iterator[FaultProxy]:
    with running_proxy(server.port) as running:
        yield running


@pytest.fixture
def settings(server: EmbeddedServer, proxy: FaultProxy) -> Iterator[Settings]:
    namespace = fresh_namespace("r")
    yield Settings(
        redis_url=proxy.url,
        namespace=namespace,
        delay=Delay(0.0, 0.0),
        claim_timeout=30.0,
        retry_base=0.01,
        max_attempts=1,
    )
    drop_namespace(server.url, namespace)


@asynccontextmanager
async def store_of(settings: Settings) -> AsyncIterator[Store]:
    """A store with a short socket timeout (and redis-py's one retry, as every store)."""
    store = open_store(settings, socket_timeout=TIMEOUT)
    try:
        # Loaded first: a dropped reply to an EVALSHA of a script the server does not
        # have yet (NOSCRIPT) would be resent before the script ever ran.
        for script in vars(store).values():
            if isinstance(script, AsyncScript):
                await store.redis.script_load(script.script)
        yield store
    finally:
        await store.aclose()


async def lost_reply(proxy: FaultProxy, call: Callable[[], Awaitable[Any]]) -> Any:
    """Run ``call`` with the reply of its first send dropped after the server ran it:
    the client times out and resends the same call, whose reply it gets."""
    before = proxy.dropped
    proxy.drop_replies_of_next_call()
    try:
        return await call()
    finally:
        proxy.stop_dropping()
        assert proxy.dropped > before, "no reply was dropped: the call was not resent"


async def attempt_bytes(server: EmbeddedServer, store: Store, gid: str) -> list[int]:
    raw = redis.Redis.from_url(server.url)
    try:
        kept: Any = raw.get(store.keys.attempts(gid))
        return list(kept or b"")
    finally:
        raw.close()


def tasks_in(fields: dict[str, str]) -> list[TaskSubmitted]:
    work = from_fields(fields)
    assert isinstance(work, TasksSubmitted)
    return tasks_of(work)


async def read_tasks(store: Store, size: int) -> tuple[str, list[str], list[TaskSubmitted]]:
    await store.ensure_worker_group()
    gid, _ = await submit(store, [(n, n + 1) for n in range(size)])
    keys: list[str] = []
    items: list[TaskSubmitted] = []
    for entry_id, fields in await store.read_work("a", 10, block_ms=100):
        for task in tasks_in(fields):
            items.append(task)
            keys.append(task_key(entry_id, task.index))
    return gid, keys, items


def test_a_begin_whose_reply_is_lost_counts_one_attempt(
    server: EmbeddedServer, proxy: FaultProxy, settings: Settings
) -> None:
    async def scenario() -> None:
        async with store_of(settings) as store:
            gid, keys, items = await read_tasks(store, 3)
            begun = await lost_reply(proxy, lambda: store.begin(items, keys))
            assert [(b.kind, b.value) for b in begun] == [("run", 1)] * 3
            assert await attempt_bytes(server, store, gid) == [1, 1, 1]

    asyncio.run(scenario())


def test_a_begin_resent_by_its_caller_after_a_stall_counts_one_attempt(
    server: EmbeddedServer, settings: Settings
) -> None:
    """A stall longer than the timeout and its retry: the call raises, its outcome
    unknown (it did run when the server woke); the caller's resend of the same step
    gets the first reply."""

    async def scenario() -> None:
        async with store_of(settings) as store:
            gid, keys, items = await read_tasks(store, 3)
            with server_asleep(server, 4 * TIMEOUT):
                with pytest.raises(redis.exceptions.RedisError):
                    await store.begin(items, keys)
            begun = await store.begin(items, keys)
            assert [(b.kind, b.value) for b in begun] == [("run", 1)] * 3
            assert await attempt_bytes(server, store, gid) == [1, 1, 1]

    asyncio.run(scenario())


@pytest.mark.parametrize("step", ["append", "complete", "cancel", "commit"])
def test_a_step_resent_by_its_caller_after_a_stall_answers_as_the_first(
    server: EmbeddedServer, settings: Settings, step: str
) -> None:
    """The same for the other steps the worker, the API and the projector resend."""

    async def scenario() -> None:
        async with store_of(settings) as store:
            gid, keys, items = await read_tasks(store, 3)
            await store.begin(items, keys)
            started = TaskStarted(
                task_id=items[0].task_id, group_task_id=gid, index=0, attempt=1, worker="a"
            )
            outcomes = [outcome_of(k, i, True) for k, i in zip(keys, items, strict=True)]
            calls: dict[str, Callable[[], Awaitable[Any]]] = {
                "append": lambda: store.append([started]),
                "complete": lambda: store.complete(outcomes),
                "cancel": lambda: store.cancel(gid),
                "commit": lambda: store.commit_views(None, "1-1", Views()),
            }
            with server_asleep(server, 4 * TIMEOUT):
                with pytest.raises(redis.exceptions.RedisError):
                    await calls[step]()
            reply = await calls[step]()
            events = await log_events(store)
            if step == "append":
                assert [e for e in events if isinstance(e, TaskStarted)] == [started]
            elif step == "complete":
                assert reply.recorded == 3
                assert sum(isinstance(e, TaskCompleted) for e in events) == 3
            elif step == "cancel":
                assert (reply.status, reply.revoked) == ("cancelled", 3)
                assert sum(isinstance(e, TaskRevoked) for e in events) == 3
            else:
                assert reply is True and await store.position() == "1-1"

    asyncio.run(scenario())


class server_asleep:  # noqa: N801  # a context manager, named as one
    """DEBUG SLEEP on a thread of its own: entered once the server sleeps (a probe with
    a short timeout gets no answer), left once it answers again."""

    def __init__(self, server: EmbeddedServer, seconds: float) -> None:
        self.server, self.seconds = server, seconds
        self.thread: threading.Thread | None = None

    def _sleep(self) -> None:
        raw = redis.Redis.from_url(self.server.url, socket_timeout=60)
        try:
            raw.execute_command("DEBUG", "SLEEP", self.seconds)  # type: ignore[no-untyped-call]
        finally:
            raw.close()

    def __enter__(self) -> server_asleep:
        self.thread = threading.Thread(target=self._sleep, daemon=True)
        self.thread.start()
        probe = redis.Redis.from_url(self.server.url, socket_timeout=0.1)

        def asleep() -> bool:
            try:
                probe.ping()
            except redis.exceptions.TimeoutError:
                return True
            return False

        try:
            wait_until_sync(asleep, 10, "the server to sleep")
        finally:
            probe.close()
        return self

    def __exit__(self, *exc_info: object) -> None:
        assert self.thread is not None
        self.thread.join(60)
        assert not self.thread.is_alive()


def test_a_next_attempt_whose_reply_is_lost_counts_one(
    server: EmbeddedServer, proxy: FaultProxy, settings: Settings
) -> None:
    async def scenario() -> None:
        async with store_of(settings) as store:
            gid, keys, items = await read_tasks(store, 2)
            await store.begin(items, keys)
            counted = await lost_reply(proxy, lambda: store.next_attempt(gid, 1))
            assert counted == 2
            assert await attempt_bytes(server, store, gid) == [1, 2]
            # A later call with the same arguments is the task's next attempt.
            assert await store.next_attempt(gid, 1) == 3

    asyncio.run(scenario())


def test_an_append_whose_reply_is_lost_logs_one_event(
    proxy: FaultProxy, settings: Settings
) -> None:
    async def scenario() -> None:
        async with store_of(settings) as store:
            gid, keys, items = await read_tasks(store, 1)
            [item] = items
            started = TaskStarted(
                task_id=item.task_id, group_task_id=gid, index=0, attempt=1, worker="a"
            )
            await lost_reply(proxy, lambda: store.append([started]))
            logged = [e for e in await log_events(store) if isinstance(e, TaskStarted)]
            assert logged == [started]

    asyncio.run(scenario())


def outcome_of(key: str, item: TaskSubmitted, ok: bool) -> Outcome:
    tid, gid, index = item.task_id, item.group_task_id, item.index
    event: TaskCompleted | TaskFailed
    if ok:
        result = item.param_a + item.param_b
        event = TaskCompleted(
            task_id=tid, group_task_id=gid, index=index, result=result, from_cache=False,
            attempt=1, worker="a",
        )  # fmt: skip
    else:
        event = TaskFailed(
            task_id=tid, group_task_id=gid, index=index, attempts=1, error="ValueError: no",
            worker="a",
        )  # fmt: skip
    return Outcome(key, event, item.param_a, item.param_b, 0.01)


def test_a_complete_whose_reply_is_lost_records_one_outcome_and_one_dead_letter(
    server: EmbeddedServer, proxy: FaultProxy, settings: Settings
) -> None:
    async def scenario() -> None:
        async with store_of(settings) as store:
            gid, keys, items = await read_tasks(store, 4)
            await store.begin(items, keys)
            outcomes = [outcome_of(k, i, i.index != 2) for k, i in zip(keys, items, strict=True)]
            completed = await lost_reply(proxy, lambda: store.complete(outcomes))
            assert completed.recorded == 4 and completed.refused == []
            events = await log_events(store)
            ended = Counter(e.task_id for e in events if isinstance(e, TaskCompleted | TaskFailed))
            assert ended == Counter(i.task_id for i in items)
            assert sum(isinstance(e, TaskDeadLettered) for e in events) == 1
            raw = redis.Redis.from_url(server.url, decode_responses=True)
            try:
                assert raw.xlen(store.keys.dead_letters) == 1
                assert raw.hget(store.keys.ledger(gid), "finished") == "4"
                assert raw.xpending(store.keys.work, "workers")["pending"] == 0
            finally:
                raw.close()

    asyncio.run(scenario())


def test_a_dead_lettering_whose_reply_is_lost_makes_one_copy(
    server: EmbeddedServer, proxy: FaultProxy, settings: Settings
) -> None:
    """A work entry no worker can run, moved to the dead-letter stream by a call whose
    reply is lost: the resend finds it acknowledged and copies nothing more; so does
    a second worker refusing the same entry."""

    async def scenario() -> None:
        async with store_of(settings) as store:
            await store.ensure_worker_group()
            raw = redis.Redis.from_url(server.url, decode_responses=True)
            try:
                entry_id = str(raw.xadd(store.keys.work, {"type": "Garbage", "x": "1"}))
                read: Any = raw.xreadgroup("workers", "a", {store.keys.work: ">"}, count=1)
                [(_, [(read_id, fields)])] = read
                assert read_id == entry_id
                copied = await lost_reply(
                    proxy, lambda: store.dead_letter_entry(entry_id, fields, reason="bad")
                )
                # The resend found the entry acknowledged by the first run.
                assert copied is False
                assert not await store.dead_letter_entry(entry_id, fields, reason="bad")
                copies: Any = raw.xrange(store.keys.dead_letters)
                [(_, copy)] = copies
                assert copy == {
                    "type": "UnreadableWorkEntry", "workEntryId": entry_id,
                    "reason": "bad", "x": "1",
                }  # fmt: skip
                assert raw.xpending(store.keys.work, "workers")["pending"] == 0
            finally:
                raw.close()

    asyncio.run(scenario())


def test_a_release_whose_reply_is_lost_answers_the_same(
    proxy: FaultProxy, settings: Settings
) -> None:
    async def scenario() -> None:
        async with store_of(settings) as store:
            gid, keys, items = await read_tasks(store, 3)
            await store.begin(items, keys)
            await store.cancel(gid)
            released = await lost_reply(proxy, lambda: store.release_ended(items, keys))
            assert sorted(released) == sorted(keys)
            assert await store.release_ended(items, keys) == released

    asyncio.run(scenario())


def test_a_cancel_whose_reply_is_lost_answers_as_the_first(
    proxy: FaultProxy, settings: Settings
) -> None:
    async def scenario() -> None:
        async with store_of(settings) as store:
            gid, keys, items = await read_tasks(store, 3)
            outcome = await lost_reply(proxy, lambda: store.cancel(gid))
            assert (outcome.status, outcome.revoked) == ("cancelled", 3)
            revoked = [e for e in await log_events(store) if isinstance(e, TaskRevoked)]
            assert sorted(e.index for e in revoked) == [0, 1, 2]
            # Another cancel is another call: cancelled before.
            assert (await store.cancel(gid)).status == "before"

    asyncio.run(scenario())


def test_a_commit_whose_reply_is_lost_answers_as_the_first(
    proxy: FaultProxy, settings: Settings
) -> None:
    async def scenario() -> None:
        async with store_of(settings) as store:
            assert await lost_reply(proxy, lambda: store.commit_views(None, "1-1", Views()))
            assert await store.position() == "1-1"
            # Another commit from the same expected position is another call: refused.
            assert not await store.commit_views(None, "1-2", Views())

    asyncio.run(scenario())


def test_a_stall_longer_than_the_worker_timeout_fails_no_task(
    server: EmbeddedServer, settings: Settings
) -> None:
    """SUMBATCH_MAX_ATTEMPTS=1: a begin resent after a stall must not count a second
    attempt, which would give its tasks up as "worker lost" without running them.
    Stalls mid-run, each longer than the worker's socket timeout (its calls are resent
    once) and shorter than two (the resend gets its answer)."""
    groups, size, stalls = 3, 2_000, 3
    # At most 200 runs of 0.1-0.3 s at once: at least 3 s of work, so every stall
    # comes mid-run.
    slow = Settings(
        redis_url=settings.redis_url,
        namespace=settings.namespace,
        delay=Delay(0.1, 0.3),
        worker_concurrency=200,
        claim_timeout=3.0,
        max_attempts=1,
    )
    claim_ms = int(slow.claim_timeout * 1000)

    async def scenario() -> None:
        async with store_of(slow) as store, store_of(slow) as watcher:
            await store.ensure_worker_group()
            submitted = [
                await submit(watcher, [(g, n) for n in range(size)]) for g in range(groups)
            ]
            worker = Worker(slow, store)
            running = asyncio.create_task(worker.run_until_idle())

            def ended_past(count: int) -> Callable[[], Awaitable[bool]]:
                async def check() -> bool:
                    raw = await watcher.redis.hget(watcher.keys.stats, "tasksCompleted")
                    return running.done() or int(raw or 0) >= count

                return check

            for n in range(stalls):
                await wait_until(ended_past((n + 1) * groups * size // (stalls + 1)), 60)
                assert not running.done(), "the run ended before its stalls"
                await asyncio.to_thread(sleep_once, server, 1.6 * TIMEOUT)
            await asyncio.wait_for(running, 300)
            # A read whose reply was lost (XREADGROUP resent) leaves its entries pending
            # on the reader, never begun: a sweep takes them over once idle past the
            # claim timeout, and their tasks run for the first time.
            while await pending(watcher):
                await wait_until(claimable(watcher, claim_ms), 60, "pending entries to age")
                await Worker(slow, store).run_until_idle()
            events = await log_events(watcher)
            completed = Counter(e.task_id for e in events if isinstance(e, TaskCompleted))
            failed = [e for e in events if isinstance(e, TaskFailed)]
            assert failed == []
            assert completed == Counter(tid for _, tids in submitted for tid in tids)
            for gid, _ in submitted:
                assert set(await attempt_bytes(server, watcher, gid)) == {1}
            # Attempts are runs that began: each task's one attempt is its one start.
            starts = Counter(e.task_id for e in events if isinstance(e, TaskStarted))
            assert starts == completed
            await projector_done(watcher)
            assert (await differences(watcher)).differences == []

    asyncio.run(scenario())


def sleep_once(server: EmbeddedServer, seconds: float) -> None:
    with server_asleep(server, seconds):
        pass


async def projector_done(store: Store) -> None:
    await Projector(store).run_until_idle()


async def pending(store: Store) -> int:
    summary: Any = await store.redis.xpending(store.keys.work, "workers")
    return int(summary["pending"])


def claimable(store: Store, idle_ms: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        aged = await store.redis.xpending_range(
            store.keys.work, "workers", min="-", max="+", count=1, idle=idle_ms
        )
        return bool(aged)

    return check
