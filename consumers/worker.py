"""A worker: one consumer of the ``workers`` group, running many tasks at once.

Flow per work entry: the begin script says skip (already ended), cache hit, or run
(with the attempt number); runs sleep the simulated delay without blocking the
others; outcomes go through the completion fence in batches. While a task runs its
entry stays in our pending list and we renew our claim on it, so only a dead or stuck
worker's entries are taken over (XAUTOCLAIM after ``claim_timeout``).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import random
import socket
import time
from collections.abc import Awaitable, Callable
from importlib import import_module

import msgspec

from sumbatch.config import Settings
from sumbatch.events import (
    AnyEvent,
    TaskCompleted,
    TaskFailed,
    TaskRetried,
    TaskStarted,
    TaskSubmitted,
    from_fields,
)
from sumbatch.outage import REDIS_DOWN, Outage
from sumbatch.store import Entry, Outcome, Store
from sumbatch.tasks import compute, retry_backoff, should_retry

log = logging.getLogger("sumbatch.worker")

Handler = Callable[[int, int], "int | Awaitable[int]"]


def load_handler(spec: str) -> Handler:
    """``"package.module:function"``; empty means the sum."""
    if not spec:
        return compute
    module, _, name = spec.partition(":")
    handler: Handler = getattr(import_module(module), name)
    return handler


def consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{random.randrange(16**4):04x}"


class Worker:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        *,
        handler: Handler | None = None,
        name: str | None = None,
        read_count: int = 500,
    ) -> None:
        self.settings = settings
        self.store = store
        self.handler = handler or load_handler(settings.handler)
        self.name = name or consumer_name()
        self.read_count = read_count
        self.rng = random.Random()
        self.should_exit = False
        self.claim_ms = int(settings.claim_timeout * 1000)
        self._running: dict[str, asyncio.Task[None]] = {}  # entry id -> its task
        self._outcomes: asyncio.Queue[Outcome] = asyncio.Queue()
        self._unflushed = 0

    @property
    def busy(self) -> bool:
        return bool(self._running) or self._unflushed > 0

    async def run(self) -> None:
        """Work until ``should_exit``; then take nothing new, give in-flight tasks
        ``shutdown_grace`` seconds, and hand back the entries still running."""
        outage = Outage(log, f"worker {self.name}")
        while True:
            try:
                await self.store.ensure_worker_group()
                break
            except REDIS_DOWN as exc:
                await asyncio.sleep(outage.failed(exc))
        log.info("worker %s reading %s", self.name, self.store.keys.work)
        helpers = self._start_helpers()
        try:
            while not self.should_exit:
                try:
                    if outage.failures:
                        await self.store.ensure_worker_group()  # the stream may be new
                    await self._read(block_ms=1000)
                    outage.ok()
                except Exception as exc:
                    # Entries read but not begun stay pending: a sweep claims them.
                    await asyncio.sleep(outage.failed(exc))
            try:
                await asyncio.wait_for(self._drain(), self.settings.shutdown_grace)
            except TimeoutError:
                await self._hand_back()
        finally:
            for helper in helpers:
                helper.cancel()

    async def _hand_back(self) -> None:
        """Make our unfinished entries claimable at once by any other worker, rather
        than after the claim timeout; their runs here are abandoned."""
        entry_ids = list(self._running)
        for task in self._running.values():
            task.cancel()
        self._running.clear()
        await self.store.renew(self.name, entry_ids, idle_ms=self.claim_ms * 10)
        log.warning("handed back %d unfinished entries", len(entry_ids))

    async def run_until_idle(self) -> None:
        """Process until nothing is left to read, claim, run or flush (like arq's burst)."""
        await self.store.ensure_worker_group()
        helpers = self._start_helpers()
        try:
            while True:
                got = await self._read(block_ms=50)
                if not got and not self.busy and not await self._sweep():
                    break
            await self._drain()
        finally:
            for helper in helpers:
                helper.cancel()

    def _start_helpers(self) -> list[asyncio.Task[None]]:
        # Renewal and sweeping run beside the blocking read, so a long XREADGROUP
        # BLOCK never delays a renewal past the claim timeout.
        return [
            asyncio.create_task(self._flush_forever()),
            asyncio.create_task(self._keep_claims()),
        ]

    async def _read(self, block_ms: int) -> int:
        capacity = self.settings.worker_concurrency - len(self._running)
        if capacity <= 0:
            await asyncio.sleep(0.01)
            return 0
        entries = await self.store.read_work(self.name, min(self.read_count, capacity), block_ms)
        await self._accept(entries)
        return len(entries)

    async def _keep_claims(self) -> None:
        renew_every = self.settings.claim_timeout / 4
        # Often enough that entries handed back by a stopping worker move on quickly.
        sweep_every = max(0.2, min(2.0, self.settings.claim_timeout / 4))
        trim_every = 5.0
        last_sweep = last_trim = time.monotonic()
        outage = Outage(log, f"worker {self.name} claims")
        while True:
            await asyncio.sleep(min(renew_every, sweep_every))
            try:
                await self._renew()
                now = time.monotonic()
                if now - last_sweep >= sweep_every and not self.should_exit:
                    last_sweep = now
                    await self._sweep()
                if now - last_trim >= trim_every:
                    last_trim = now
                    await self.store.trim_work()
                    # Dead workers' names, once they hold nothing: tidy XINFO CONSUMERS.
                    await self.store.forget_idle_consumers(self.claim_ms * 10)
                outage.ok()
            except Exception as exc:  # this loop must outlive any error (OOM, BUSY, ...)
                await asyncio.sleep(outage.failed(exc))

    async def _renew(self) -> None:
        """Reset the idle time of our running entries; drop runs another worker took."""
        for entry_id in await self.store.renew(self.name, list(self._running)):
            running = self._running.pop(entry_id, None)
            if running is not None:
                log.warning("entry %s was taken over; dropping our run", entry_id)
                running.cancel()

    async def _sweep(self) -> int:
        """Take over entries that a dead or stuck worker left idle past the timeout."""
        claimed = await self.store.autoclaim(self.name, self.claim_ms)
        claimed = [(eid, fields) for eid, fields in claimed if eid not in self._running]
        if claimed:
            log.info("claimed %d entries from dead or stuck workers", len(claimed))
            await self._accept(claimed)
        return len(claimed)

    async def _accept(self, entries: list[Entry]) -> None:
        if not entries:
            return
        good: list[tuple[str, TaskSubmitted]] = []
        for entry_id, fields in entries:
            try:
                item: AnyEvent | None = from_fields(fields)
            except msgspec.ValidationError:
                item = None
            if isinstance(item, TaskSubmitted):
                good.append((entry_id, item))
            else:
                # Not a task we can run: keep it for inspection, never block the batch.
                log.error("unreadable work entry %s (%s); dead-lettered", entry_id, fields)
                await self.store.dead_letter_entry(entry_id, fields)
        if not good:
            return
        items = [item for _, item in good]
        decisions = await self.store.begin(items, [entry_id for entry_id, _ in good])
        started: list[AnyEvent] = []
        for (entry_id, item), decision in zip(good, decisions, strict=True):
            if decision[0] == 1:
                self._record(entry_id, item, self._completed(item, int(decision[1]), True, 0))
            elif decision[0] == 2 and int(decision[1]) > self.settings.max_attempts:
                # Delivered again and again, never ended: its runs keep killing workers.
                attempts = int(decision[1]) - 1
                gave_up = f"gave up after {attempts} runs that never finished (worker lost)"
                self._record(entry_id, item, self._failed(item, attempts, gave_up))
            elif decision[0] == 2:
                attempt = int(decision[1])
                delay = self.settings.delay.draw(self.rng)
                error: str | None = None
                if delay == 0 and not inspect.iscoroutinefunction(self.handler):
                    error = self._run_inline(entry_id, item, attempt)
                    if error is None:
                        continue
                started.append(self._started(item, attempt))
                self._running[entry_id] = asyncio.create_task(
                    self._run(entry_id, item, attempt, delay, error)
                )
        await self.store.append(started)

    def _run_inline(self, entry_id: str, item: TaskSubmitted, attempt: int) -> str | None:
        """With no delay and a plain function, run the task here and now: no task
        object, and no TaskStarted (it starts and ends in the same instant; its
        TaskCompleted names the attempt). Returns the error if it failed: the async
        path then logs the start and retries it."""
        try:
            result = int(self.handler(item.param_a, item.param_b))  # type: ignore[arg-type]
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"
        self._record(entry_id, item, self._completed(item, result, False, attempt))
        return None

    async def _run(
        self, entry_id: str, item: TaskSubmitted, attempt: int, delay: float, error: str | None
    ) -> None:
        try:
            await self._attempts(entry_id, item, attempt, delay, error)
        except BaseException:
            # Ended without an outcome (cancelled, or a bug): a sweep may claim it.
            self._running.pop(entry_id, None)
            raise

    async def _attempts(
        self, entry_id: str, item: TaskSubmitted, attempt: int, delay: float, error: str | None
    ) -> None:
        while True:
            if error is None:
                try:
                    await asyncio.sleep(delay)
                    result = self.handler(item.param_a, item.param_b)
                    if inspect.isawaitable(result):
                        result = await result
                    completed = self._completed(item, int(result), False, attempt)
                    self._record(entry_id, item, completed)
                    return
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    error = f"{type(exc).__name__}: {exc}"
            if not should_retry(attempt, self.settings.max_attempts):
                self._record(entry_id, item, self._failed(item, attempt, error))
                return
            wait = retry_backoff(attempt, self.settings.retry_base, self.rng)
            await self._log_quietly(self._retried(item, attempt, error, wait))
            await asyncio.sleep(wait)
            attempt = await self._next_attempt(item, attempt)
            delay = self.settings.delay.draw(self.rng)
            error = None
            await self._log_quietly(self._started(item, attempt))

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

    def _retried(self, item: TaskSubmitted, attempt: int, error: str, wait: float) -> TaskRetried:
        return TaskRetried(
            task_id=item.task_id,
            group_task_id=item.group_task_id,
            index=item.index,
            attempt=attempt,
            error=error,
            retry_in=round(wait, 3),
        )

    def _record(
        self, entry_id: str, item: TaskSubmitted, event: TaskCompleted | TaskFailed
    ) -> None:
        self._unflushed += 1
        self._outcomes.put_nowait(Outcome(entry_id, event, item.param_a, item.param_b))

    def _started(self, item: TaskSubmitted, attempt: int) -> TaskStarted:
        return TaskStarted(
            task_id=item.task_id,
            group_task_id=item.group_task_id,
            index=item.index,
            attempt=attempt,
            worker=self.name,
        )

    def _failed(self, item: TaskSubmitted, attempts: int, error: str) -> TaskFailed:
        return TaskFailed(
            task_id=item.task_id,
            group_task_id=item.group_task_id,
            index=item.index,
            attempts=attempts,
            error=error,
            worker=self.name,
        )

    def _completed(
        self, item: TaskSubmitted, result: int, from_cache: bool, attempt: int
    ) -> TaskCompleted:
        return TaskCompleted(
            task_id=item.task_id,
            group_task_id=item.group_task_id,
            index=item.index,
            result=result,
            from_cache=from_cache,
            attempt=attempt,
            worker=self.name,
        )

    async def _flush_forever(self) -> None:
        while True:
            batch = [await self._outcomes.get()]
            while len(batch) < 500 and not self._outcomes.empty():
                batch.append(self._outcomes.get_nowait())
            # Shielded: a cancelled worker must not leave a batch half-known.
            await asyncio.shield(self._flush(batch))

    async def _flush(self, batch: list[Outcome]) -> None:
        outage = Outage(log, f"worker {self.name} completions")
        while True:
            try:
                await self.store.complete(batch)  # fenced: safe to send again
                outage.ok()
                break
            except Exception as exc:  # OOM or BUSY too: keep the outcomes, try again
                await asyncio.sleep(outage.failed(exc))
        for outcome in batch:
            self._running.pop(outcome.entry_id, None)
            self._outcomes.task_done()
        self._unflushed -= len(batch)

    async def _drain(self) -> None:
        """Let in-flight tasks finish and their outcomes land."""
        while pending := [task for task in self._running.values() if not task.done()]:
            await asyncio.wait(pending)
        await self._outcomes.join()
