"""The tasks a worker runs: each entry's run from its first attempt to its outcome
(the simulated delay, the timeout, retries), and the map of what runs, which renewals,
cancels and a stopping worker consult. A plain (synchronous) handler runs on the
process's thread pool (``threads.py``), never on the event loop; only the built-in
sum, which cannot block, runs inline."""

from __future__ import annotations

import asyncio
import inspect
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Any

from consumers.outbox import Outbox
from consumers.threads import Threads
from sumbatch.config import Settings
from sumbatch.model.events import (
    AnyEvent,
    TaskCompleted,
    TaskFailed,
    TaskRetried,
    TaskStarted,
    TaskSubmitted,
)
from sumbatch.model.tasks import compute, retry_backoff, should_retry
from sumbatch.store import Store

log = logging.getLogger("sumbatch.worker")

Handler = Callable[[int, int], "int | Awaitable[int]"]
# A failed run: its error, and the seconds it took.
Failure = tuple[str, float]


def describe(exc: BaseException) -> str:
    """An error as the log keeps it: any text a handler raised, lone surrogates
    included, made encodable, so that it can never keep its outcome from landing."""
    text = f"{type(exc).__name__}: {exc}"
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def is_async(handler: Handler) -> bool:
    """Whether calling ``handler`` only makes a coroutine (an ``async def``, a method
    or partial of one, an object with an ``async def __call__``)."""
    call = getattr(handler, "__call__", None)  # noqa: B004  # its __call__, not callable()
    return inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(call)


class Runs:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        handler: Handler,
        name: str,
        outbox: Outbox,
        threads: Threads,
        forgotten: Callable[[str], object] = lambda key: None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.handler = handler
        self.name = name
        self.outbox = outbox
        # A plain handler's calls go to the process's threads: one may block.
        self.threads = threads
        self.in_threads = handler is not compute and not is_async(handler)
        self.rng = random.Random()
        # Called with each entry's key once we no longer track its run (``forget``).
        self._forgotten = forgotten
        # Entry id -> its run and what it runs.
        self._running: dict[str, tuple[asyncio.Task[None], TaskSubmitted]] = {}
        # The running entries of each group, so that a cancel finds its group's runs
        # without a scan.
        self._by_group: dict[str, set[str]] = {}

    def __len__(self) -> int:
        return len(self._running)

    def __contains__(self, entry_id: object) -> bool:
        return entry_id in self._running

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._running))

    def item(self, entry_id: str) -> TaskSubmitted:
        return self._running[entry_id][1]

    def of_groups(self, group_ids: Iterable[str]) -> list[str]:
        """The running entries of those groups."""
        return [eid for gid in group_ids for eid in self._by_group.get(gid, ())]

    def start(
        self, entry_id: str, item: TaskSubmitted, attempt: int, inline: bool = True
    ) -> TaskStarted | None:
        """Run the entry's task from ``attempt`` on; returns its TaskStarted to log, or
        None when it ran at once and its outcome is already in the outbox (never when
        not ``inline``: a run in the lane is tracked until its outcome is recorded)."""
        delay = self.settings.delay.draw(self.rng)
        failure: Failure | None = None
        if inline and delay == 0 and self.handler is compute:
            failure = self._run_inline(entry_id, item, attempt)
            if failure is None:
                return None
        task = asyncio.create_task(self._run(entry_id, item, attempt, delay, failure))
        self._running[entry_id] = (task, item)
        self._by_group.setdefault(item.group_task_id, set()).add(entry_id)
        return started(item, attempt, self.name)

    def forget(self, entry_id: str) -> asyncio.Task[None] | None:
        """Stop tracking an entry's run; returns its task, if it was running."""
        run = self._running.pop(entry_id, None)
        if run is None:
            return None
        task, item = run
        entries = self._by_group[item.group_task_id]
        entries.discard(entry_id)
        if not entries:
            del self._by_group[item.group_task_id]
        self._forgotten(entry_id)
        return task

    def stop(self, entry_id: str) -> bool:
        """Abandon the entry's run, if any; returns whether there was one."""
        task = self.forget(entry_id)
        if task is not None:
            task.cancel()
        return task is not None

    async def finish(self) -> None:
        """Until every run still going has ended."""
        while pending := [task for task, _ in self._running.values() if not task.done()]:
            await asyncio.wait(pending)

    def _run_inline(self, entry_id: str, item: TaskSubmitted, attempt: int) -> Failure | None:
        """With no delay and the built-in sum, run the task here and now: no task
        object, and no TaskStarted (it starts and ends in the same instant; its
        TaskCompleted names the attempt). Returns the failure if it failed: the async
        path then logs the start and retries it."""
        began = time.perf_counter()
        try:
            result = int(self.handler(item.param_a, item.param_b))  # type: ignore[arg-type]
        except Exception as exc:
            return describe(exc), time.perf_counter() - began
        outcome = completed(item, result, False, attempt, self.name)
        self.outbox.put(entry_id, item, outcome, time.perf_counter() - began)
        return None

    async def _run(
        self,
        entry_id: str,
        item: TaskSubmitted,
        attempt: int,
        delay: float,
        failure: Failure | None,
    ) -> None:
        try:
            await self._attempts(entry_id, item, attempt, delay, failure)
        except BaseException:
            # Ended without an outcome (cancelled, or a bug): a sweep may claim it.
            self.forget(entry_id)
            raise

    async def _attempts(
        self,
        entry_id: str,
        item: TaskSubmitted,
        attempt: int,
        delay: float,
        failure: Failure | None,
    ) -> None:
        timeout = self.settings.task_timeout
        while True:
            if failure is None:
                # The simulated delay is part of the run, and of its time; waiting for
                # a free thread is not (``Threads.call`` pauses the deadline). A plain
                # handler's call cannot be interrupted: at the deadline the run fails
                # and the call is abandoned, its late result thrown away.
                deadline = asyncio.timeout(timeout)
                began = time.perf_counter()
                try:
                    async with deadline:
                        await asyncio.sleep(delay)
                        result = await self._call(item, deadline)
                    outcome = completed(item, int(result), False, attempt, self.name)
                    self.outbox.put(entry_id, item, outcome, time.perf_counter() - began)
                    return
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    ran = time.perf_counter() - began
                    if deadline.expired():
                        failure = f"TimeoutError: the run took longer than {timeout:g} s", ran
                    else:
                        failure = describe(exc), ran
            error, ran = failure
            if not should_retry(attempt, self.settings.max_attempts):
                self.outbox.put(entry_id, item, failed(item, attempt, error, self.name), ran)
                return
            wait = retry_backoff(attempt, self.settings.retry_base, self.rng)
            await self._log_quietly(retried(item, attempt, error, wait))
            await asyncio.sleep(wait)
            attempt = await self._next_attempt(item, attempt)
            delay = self.settings.delay.draw(self.rng)
            failure = None
            await self._log_quietly(started(item, attempt, self.name))

    async def _call(self, item: TaskSubmitted, deadline: asyncio.Timeout) -> Any:
        a, b = item.param_a, item.param_b
        if self.in_threads:
            result = await self.threads.call(self.handler, a, b, deadline=deadline)
        else:
            result = self.handler(a, b)
        if inspect.isawaitable(result):
            result = await result
        return result

    async def _next_attempt(self, item: TaskSubmitted, attempt: int) -> int:
        """Counted in Redis, so runs add up across workers; locally if Redis is away.
        Never less than one more than ours: a group that expired counts nothing (0)."""
        try:
            counted = await self.store.next_attempt(item.group_task_id, item.index)
            return max(counted, attempt + 1)
        except Exception as exc:
            log.warning("could not count attempt %d of %s: %s", attempt + 1, item.task_id, exc)
            return attempt + 1

    async def _log_quietly(self, event: AnyEvent) -> None:
        """Progress events (started, retried) are best-effort: losing one while Redis is
        away must not lose the task, whose outcome is what counts."""
        try:
            await self.store.append([event])
        except Exception as exc:
            log.warning("could not log %s for %s: %s", type(event).__name__, event, exc)


# What a worker reports about a task, built from the task's submission: each event
# names the task as the submission does.


def _task(item: TaskSubmitted) -> dict[str, Any]:
    return {"task_id": item.task_id, "group_task_id": item.group_task_id, "index": item.index}


def started(item: TaskSubmitted, attempt: int, worker: str) -> TaskStarted:
    return TaskStarted(**_task(item), attempt=attempt, worker=worker)


def completed(
    item: TaskSubmitted, result: int, from_cache: bool, attempt: int, worker: str
) -> TaskCompleted:
    return TaskCompleted(
        **_task(item), result=result, from_cache=from_cache, attempt=attempt, worker=worker
    )


def failed(item: TaskSubmitted, attempts: int, error: str, worker: str) -> TaskFailed:
    return TaskFailed(**_task(item), attempts=attempts, error=error, worker=worker)


def retried(item: TaskSubmitted, attempt: int, error: str, wait: float) -> TaskRetried:
    return TaskRetried(**_task(item), attempt=attempt, error=error, retry_in=round(wait, 3))
