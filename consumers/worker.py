"""A worker: one consumer of the ``workers`` group, running many tasks at once.

Flow per work entry: the begin script says skip (already ended), cache hit, or run
(with the attempt number); runs sleep the simulated delay without blocking the
others; outcomes go through the completion fence in batches. While a task runs its
entry stays in our pending list and we renew our claim on it, so only a dead or stuck
worker's entries are taken over (XAUTOCLAIM after ``claim_timeout``). A run is cut off
after ``task_timeout`` (a failed attempt), so no run holds its entry forever.

Cancels: the cancel script revokes a group's unended tasks and publishes its id; we
stop our runs of that group's tasks at once. Pub/sub is best effort: a run nobody
stops finishes, meets the fence and writes nothing.

No loop spins on an error that is no outage: a batch the server rejects for another
reason is split until the outcomes or entries at fault are alone; those are logged and
left pending (the claim and attempt machinery takes them up again later), the rest go
through. Entries the scripts refuse (a task outside its group, a group whose keys were
changed by hand) can never count: they are dead-lettered.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import random
import socket
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from importlib import import_module
from typing import Any, Generic, TypeVar

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
    to_fields,
)
from sumbatch.outage import REDIS_DOWN, Outage, is_transient
from sumbatch.store import Begun, Entry, Outcome, Store
from sumbatch.tasks import compute, retry_backoff, should_retry

log = logging.getLogger("sumbatch.worker")

REFUSED_WHY = "the task is outside its group, or its group's keys are not what sumbatch wrote"

Handler = Callable[[int, int], "int | Awaitable[int]"]
T = TypeVar("T")
R = TypeVar("R")


def load_handler(spec: str) -> Handler:
    """``"package.module:function"``; empty means the sum."""
    if not spec:
        return compute
    module, _, name = spec.partition(":")
    handler: Handler = getattr(import_module(module), name)
    return handler


@dataclass
class Apart(Generic[T, R]):
    """What became of a batch split to isolate the items at fault."""

    done: list[tuple[Sequence[T], R]] = field(default_factory=list)  # parts, with results
    failed: list[T] = field(default_factory=list)  # items that failed alone
    errors: int = 0  # calls that failed with an error that is no outage


def describe(exc: BaseException) -> str:
    """An error as the log keeps it: any text a handler raised, lone surrogates
    included, made encodable, so that it can never keep its outcome from landing."""
    text = f"{type(exc).__name__}: {exc}"
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


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
        watch_cancels: bool = True,
    ) -> None:
        self.settings = settings
        self.store = store
        self.handler = handler or load_handler(settings.handler)
        self.name = name or consumer_name()
        self.read_count = read_count
        self.rng = random.Random()
        self.should_exit = False
        self.claim_ms = int(settings.claim_timeout * 1000)
        # False: rely on the fence alone, as a worker of an older version does.
        self.watch_cancels = watch_cancels
        # Entry id -> its run and what it runs.
        self._running: dict[str, tuple[asyncio.Task[None], TaskSubmitted]] = {}
        # The running entries of each group, so that a cancel finds its group's runs
        # without a scan.
        self._by_group: dict[str, set[str]] = {}
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
        for entry_id in entry_ids:
            task = self._forget(entry_id)
            if task is not None:
                task.cancel()
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
        helpers = [
            asyncio.create_task(self._flush_forever()),
            asyncio.create_task(self._keep_claims()),
        ]
        if self.watch_cancels:
            helpers.append(asyncio.create_task(self._watch_cancels()))
        return helpers

    async def _read(self, block_ms: int) -> int:
        capacity = self.settings.worker_concurrency - len(self._running)
        if capacity <= 0:
            await asyncio.sleep(0.01)
            return 0
        entries = await self.store.read_work(self.name, min(self.read_count, capacity), block_ms)
        await self._accept(entries)
        return len(entries)

    async def _keep_claims(self) -> None:
        # Often enough that entries handed back by a stopping worker move on quickly.
        sweep_every = max(0.2, min(2.0, self.settings.claim_timeout / 4))
        steps: list[tuple[str, float, Callable[[], Awaitable[object]]]] = [
            ("renewals", self.settings.claim_timeout / 4, self._renew),
            ("sweeps", sweep_every, self._sweep_unless_stopping),
            ("trims", 5.0, self._tidy),
        ]
        outages = [Outage(log, f"worker {self.name} {what}") for what, _, _ in steps]
        due = [time.monotonic() + every for _, every, _ in steps]
        while True:
            await asyncio.sleep(max(0.0, min(due) - time.monotonic()))
            for n, (_, every, step) in enumerate(steps):
                now = time.monotonic()
                if now < due[n]:
                    continue
                try:
                    await step()
                    outages[n].ok()
                    due[n] = now + every
                except Exception as exc:  # this loop must outlive any error (OOM, a bug)
                    # Each step backs off on its own: a trim that keeps failing must not
                    # hold up renewals, and no step is retried faster than its period.
                    due[n] = now + max(every, outages[n].failed(exc))

    async def _sweep_unless_stopping(self) -> None:
        if not self.should_exit:
            await self._sweep()

    async def _tidy(self) -> None:
        await self.store.trim_work()
        # Dead workers' names, once they hold nothing: tidy XINFO CONSUMERS.
        await self.store.forget_idle_consumers(self.claim_ms * 10)

    async def _renew(self) -> None:
        """Reset the idle time of our running entries; drop runs another worker took."""
        for entry_id in await self.store.renew(self.name, list(self._running)):
            running = self._forget(entry_id)
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

    async def _watch_cancels(self) -> None:
        """Stop our runs of the tasks a cancel revoked, as its message comes in."""
        outage = Outage(log, f"worker {self.name} cancels")
        while True:
            try:
                async with self.store.redis.pubsub() as pubsub:
                    await pubsub.subscribe(self.store.keys.cancellations)
                    # Cancels published while we were not subscribed are lost: ask
                    # once about everything we run.
                    await self._stop_ended(list(self._running))
                    while True:
                        # A timeout, not a read that blocks forever: a dead connection
                        # is found by the client's health check between reads.
                        message = await pubsub.get_message(
                            ignore_subscribe_messages=True, timeout=1.0
                        )
                        # Only after a read went well: a connection that fails at once
                        # each time keeps backing off longer.
                        outage.ok()
                        if message is not None and message["type"] == "message":
                            await self._stop_ended(self._entries_of([message["data"]]))
            except Exception as exc:
                await asyncio.sleep(outage.failed(exc))

    def _entries_of(self, group_ids: Iterable[str]) -> list[str]:
        return [eid for gid in group_ids for eid in self._by_group.get(gid, ())]

    async def _stop_ended(self, entry_ids: list[str]) -> None:
        """Stop the runs of those entries whose task has ended (revoked, or finished
        elsewhere): the server acknowledges exactly those, so an entry whose task goes
        on is never left running nowhere."""
        known = [(eid, self._running[eid][1]) for eid in entry_ids if eid in self._running]
        if not known:
            return
        try:
            released = await self.store.release_ended(
                [item for _, item in known], [eid for eid, _ in known]
            )
        except Exception as exc:
            if is_transient(exc):
                raise  # the listener backs off, and asks again once it is back
            # Best effort: those runs go on, and their outcomes meet the fence.
            log.error("could not stop runs of cancelled tasks", exc_info=exc)
            return
        for entry_id in released:
            task = self._forget(entry_id)
            if task is not None:
                task.cancel()
        if released:
            log.info("stopped %d runs of cancelled tasks", len(released))

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
        begun = await self._apart("begin", self._begin, good, retry_transient=False)
        refused = [entry_id for entry_id, _ in begun.failed]
        started: list[AnyEvent] = []
        decided = [
            (entry_id, item, decision)
            for part, decisions in begun.done
            for (entry_id, item), decision in zip(part, decisions, strict=True)
        ]
        out_of_reach: list[str] = []
        for entry_id, item, decision in decided:
            if decision.kind == "refused":
                out_of_reach.append(entry_id)
            elif decision.kind == "cached":
                self._record(entry_id, item, self._completed(item, decision.value, True, 0))
            elif decision.kind == "run" and decision.value > self.settings.max_attempts:
                # Delivered again and again, never ended: its runs keep killing workers.
                attempts = decision.value - 1
                gave_up = f"gave up after {attempts} runs that never finished (worker lost)"
                self._record(entry_id, item, self._failed(item, attempts, gave_up))
            elif decision.kind == "run":
                attempt = decision.value
                delay = self.settings.delay.draw(self.rng)
                error: str | None = None
                if delay == 0 and not inspect.iscoroutinefunction(self.handler):
                    error = self._run_inline(entry_id, item, attempt)
                    if error is None:
                        continue
                started.append(self._started(item, attempt))
                self._track(entry_id, item, self._run(entry_id, item, attempt, delay, error))
        if refused:
            # The server refused the step for them (an ACL, say): left pending, they are
            # claimed again after the claim timeout, when an operator may have fixed it.
            log.error(
                "%d work entries could not begin; left pending: %s",
                len(refused), ", ".join(refused[:10]),
            )  # fmt: skip
        await self.store.append(started)
        # No run can ever count for these: kept in the dead-letter stream instead of
        # pending for ever (which would also stop the work stream's trimming).
        if out_of_reach:
            fields_of = dict(entries)
            await self._dead_letter([(eid, fields_of[eid]) for eid in out_of_reach])

    async def _dead_letter(self, entries: list[tuple[str, dict[str, str]]]) -> None:
        """Dead-letter entries the scripts refused, acknowledged. Should that fail too,
        they stay pending: claimed again, refused again, dead-lettered then."""
        if not entries:
            return
        log.error(
            "%d work entries refused (%s); dead-lettered: %s",
            len(entries), REFUSED_WHY, ", ".join(eid for eid, _ in entries[:10]),
        )  # fmt: skip
        try:
            for entry_id, fields in entries:
                await self.store.dead_letter_entry(
                    entry_id, fields, "RefusedWorkEntry", REFUSED_WHY
                )
        except Exception as exc:
            log.warning("could not dead-letter refused entries (%s); left pending", exc)

    async def _begin(self, part: Sequence[tuple[str, TaskSubmitted]]) -> list[Begun]:
        return await self.store.begin([item for _, item in part], [eid for eid, _ in part])

    def _track(self, entry_id: str, item: TaskSubmitted, run: Coroutine[Any, Any, None]) -> None:
        self._running[entry_id] = (asyncio.create_task(run), item)
        self._by_group.setdefault(item.group_task_id, set()).add(entry_id)

    def _forget(self, entry_id: str) -> asyncio.Task[None] | None:
        """Stop tracking an entry's run; returns its task, if it was running."""
        run = self._running.pop(entry_id, None)
        if run is None:
            return None
        task, item = run
        entries = self._by_group[item.group_task_id]
        entries.discard(entry_id)
        if not entries:
            del self._by_group[item.group_task_id]
        return task

    def _run_inline(self, entry_id: str, item: TaskSubmitted, attempt: int) -> str | None:
        """With no delay and a plain function, run the task here and now: no task
        object, and no TaskStarted (it starts and ends in the same instant; its
        TaskCompleted names the attempt). Returns the error if it failed: the async
        path then logs the start and retries it."""
        try:
            result = int(self.handler(item.param_a, item.param_b))  # type: ignore[arg-type]
        except Exception as exc:
            return describe(exc)
        self._record(entry_id, item, self._completed(item, result, False, attempt))
        return None

    async def _run(
        self, entry_id: str, item: TaskSubmitted, attempt: int, delay: float, error: str | None
    ) -> None:
        try:
            await self._attempts(entry_id, item, attempt, delay, error)
        except BaseException:
            # Ended without an outcome (cancelled, or a bug): a sweep may claim it.
            self._forget(entry_id)
            raise

    async def _attempts(
        self, entry_id: str, item: TaskSubmitted, attempt: int, delay: float, error: str | None
    ) -> None:
        timeout = self.settings.task_timeout
        while True:
            if error is None:
                # The simulated delay is part of the run. A plain (sync) handler runs on
                # the event loop and cannot be interrupted: only its awaits can be.
                deadline = asyncio.timeout(timeout)
                try:
                    async with deadline:
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
                    if deadline.expired():
                        error = f"TimeoutError: the run took longer than {timeout:g} s"
                    else:
                        error = describe(exc)
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
        # Redis away or refusing: the same batch again (fenced: safe to send twice),
        # however long it takes, as outcomes must not be lost. Any other error: split.
        flushed = await self._apart("completions", self.store.complete, batch, retry_transient=True)
        failed = [outcome.entry_id for outcome in flushed.failed]
        if failed:
            # Not acknowledged: pending, they are claimed again after the claim timeout
            # and run as a further attempt; past max_attempts they end as FAILURE.
            log.error(
                "%d outcomes could not be recorded; their entries stay pending: %s",
                len(failed), ", ".join(failed[:10]),
            )  # fmt: skip
        # Their group went bad while they ran: no outcome can count for them.
        refused = {eid for _, completed in flushed.done for eid in completed.refused}
        await self._dead_letter(
            [(o.entry_id, to_fields(o.event)) for o in batch if o.entry_id in refused]
        )
        for outcome in batch:
            self._forget(outcome.entry_id)
            self._outcomes.task_done()
        self._unflushed -= len(batch)

    async def _apart(
        self,
        what: str,
        step: Callable[[Sequence[T]], Awaitable[R]],
        batch: Sequence[T],
        *,
        retry_transient: bool,
    ) -> Apart[T, R]:
        """Run ``step`` on ``batch``; when it fails with an error that is no outage (bad
        data, a bug), split the batch in halves, recursively, so that only the items at
        fault fail: at most 2n - 1 calls, no retry of those, so nothing spins. The first
        such error is logged with its traceback. Transient errors are retried with
        backoff (``retry_transient``) or raised to the caller's loop."""
        outage = Outage(log, f"worker {self.name} {what}")
        apart: Apart[T, R] = Apart()

        async def attempt(part: Sequence[T]) -> None:
            while True:
                try:
                    result = await step(part)
                except Exception as exc:
                    if not is_transient(exc):
                        if not apart.errors:
                            log.error(
                                "worker %s %s: rejected (%s); isolating the items at fault",
                                self.name,
                                what,
                                exc,
                                exc_info=exc,
                            )
                        apart.errors += 1
                        break
                    if not retry_transient:
                        raise
                    await asyncio.sleep(outage.failed(exc))
                    continue
                outage.ok()
                apart.done.append((part, result))
                return
            if len(part) == 1:
                apart.failed.append(part[0])
                return
            half = len(part) // 2
            await attempt(part[:half])
            await attempt(part[half:])

        await attempt(batch)
        return apart

    async def _drain(self) -> None:
        """Let in-flight tasks finish and their outcomes land."""
        while pending := [task for task, _ in self._running.values() if not task.done()]:
            await asyncio.wait(pending)
        await self._outcomes.join()
