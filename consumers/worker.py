"""A worker: one consumer of the ``workers`` group, running many tasks at once.

Flow per work entry: the begin script says skip (already ended), cache hit, or run
(with the attempt number); runs (``runs.py``) sleep the simulated delay without
blocking the others; outcomes go through the completion fence in batches
(``outbox.py``). While a task runs its entry stays in our pending list and we renew
our claim on it, so only a dead or stuck worker's entries are taken over (XAUTOCLAIM
after ``claim_timeout``). A run is cut off after ``task_timeout`` (a failed attempt),
so no run holds its entry forever.

Cancels (``cancels.py``): the cancel script revokes a group's unended tasks and
publishes its id; we stop our runs of that group's tasks at once.

No loop spins on an error that is no outage: a batch the server rejects for another
reason is split until the outcomes or entries at fault are alone (``isolate.py``);
those are logged and left pending (the claim and attempt machinery takes them up
again later), the rest go through. Entries the scripts refuse (a task outside its
group, a group whose keys were changed by hand) can never count: they are
dead-lettered.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import time
from collections.abc import Awaitable, Callable, Sequence

import msgspec

from consumers.cancels import Cancels
from consumers.isolate import isolate
from consumers.outbox import Outbox
from consumers.runs import Handler, Runs, completed, failed
from sumbatch import ids
from sumbatch.config import Settings, resolve_handler
from sumbatch.events import AnyEvent, TaskSubmitted, from_fields
from sumbatch.outage import REDIS_DOWN, Outage
from sumbatch.store import Begun, Entry, Store
from sumbatch.tasks import compute

log = logging.getLogger("sumbatch.worker")

__all__ = ["READ_BLOCK_MS", "TRIM_EVERY", "Handler", "Load", "Worker", "consumer_name"]

# Entries one read takes at most: the batch the begin script handles at once, which
# holds Redis that long (the outbox's BATCH says why it is not larger).
READ_COUNT = 200
# How long one read of the work stream blocks when nothing comes: a worker told to stop
# issues no other read, so it takes nothing new after at most this long.
READ_BLOCK_MS = 1000
# The period, in seconds, of a worker's trim of the work stream (the entries every
# worker has acknowledged): what the stream holds beyond its pending entries is about
# this long of throughput, 129 B an entry. One trim of half a second's entries costs
# Redis well under a millisecond.
TRIM_EVERY = 0.5
# The period of forgetting dead workers' names (XINFO CONSUMERS), once they hold nothing.
FORGET_EVERY = 5.0
# Seconds a stopping worker gives its helper loops (renewals, cancels, flushing) to end.
HELPERS_STOP = 1.0


WRONG_TASK_ID = "its taskId is not the one its groupTaskId and index name"


def _names_itself(item: TaskSubmitted) -> bool:
    """Whether a work entry's task id is its group's id with its index (ids.py)."""
    return item.task_id == ids.task_id(item.group_task_id, item.index)


def consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{random.randrange(16**4):04x}"


class Load:
    """The runs of a process's workers (one per partition it consumes) against the
    process's one concurrency limit."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.workers: list[Worker] = []

    def room(self) -> int:
        return self.limit - sum(len(worker.runs) for worker in self.workers)


class Worker:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        *,
        handler: Handler | None = None,
        name: str | None = None,
        read_count: int = READ_COUNT,
        watch_cancels: bool = True,
        load: Load | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.name = name or consumer_name()
        self.read_count = read_count
        self.should_exit = False
        # Set once the worker is stopping: its helper loops end.
        self.closing = False
        self.claim_ms = int(settings.claim_timeout * 1000)
        # False: rely on the fence alone, as a worker of an older version does.
        self.watch_cancels = watch_cancels
        # A run's entry is forgotten once its outcome is flushed: until then we
        # renew our claim on it.
        self.outbox = Outbox(store, self.name, flushed=self._flushed)
        handler = handler or resolve_handler(settings.handler) or compute
        self.runs = Runs(settings, store, handler, self.name, self.outbox)
        self.load = load or Load(settings.worker_concurrency)
        self.load.workers.append(self)

    @property
    def busy(self) -> bool:
        return bool(self.runs) or self.outbox.unflushed > 0

    def _flushed(self, entry_id: str) -> None:
        self.runs.forget(entry_id)

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
                    await self._read(block_ms=READ_BLOCK_MS)
                    outage.ok()
                except Exception as exc:
                    # Entries read but not begun stay pending: a sweep claims them.
                    await asyncio.sleep(outage.failed(exc))
            try:
                await asyncio.wait_for(self._drain(), self.settings.shutdown_grace)
            except TimeoutError:
                await self._hand_back()
        finally:
            await self._stop_helpers(helpers)

    async def _hand_back(self) -> None:
        """Make our unfinished entries claimable at once by any other worker, rather
        than after the claim timeout; their runs here are abandoned."""
        entry_ids = list(self.runs)
        for entry_id in entry_ids:
            self.runs.stop(entry_id)
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
            await self._stop_helpers(helpers)

    async def _stop_helpers(self, helpers: list[asyncio.Task[None]]) -> None:
        """Stop the helper loops. Each also ends on its own once ``closing`` is set: on
        Python 3.11 a cancellation can be lost inside a redis-py call (its wait_for,
        CPython gh-86296), and the task then ignores every later cancel, which left a
        worker that never exited after SIGTERM (asyncio.run waits for every task)."""
        self.closing = True
        for helper in helpers:
            helper.cancel()
        await asyncio.wait(helpers, timeout=HELPERS_STOP)

    def _start_helpers(self) -> list[asyncio.Task[None]]:
        # Renewal and sweeping run beside the blocking read, so a long XREADGROUP
        # BLOCK never delays a renewal past the claim timeout.
        helpers = [
            asyncio.create_task(self.outbox.flush_forever(lambda: self.closing)),
            asyncio.create_task(self._keep_claims()),
        ]
        if self.watch_cancels:
            cancels = Cancels(self.store, self.runs, self.name)
            helpers.append(asyncio.create_task(cancels.watch(lambda: self.closing)))
        return helpers

    async def _read(self, block_ms: int) -> int:
        capacity = self.load.room()
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
            ("trims", TRIM_EVERY, self.store.trim_work),
            ("forgetting", FORGET_EVERY, self._forget_dead),
        ]
        outages = [Outage(log, f"worker {self.name} {what}") for what, _, _ in steps]
        due = [time.monotonic() + every for _, every, _ in steps]
        while not self.closing:
            # Never long: the loop must see ``closing`` even if a cancel is lost.
            await asyncio.sleep(min(HELPERS_STOP, max(0.0, min(due) - time.monotonic())))
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

    async def _forget_dead(self) -> None:
        # Dead workers' names, once they hold nothing: tidy XINFO CONSUMERS.
        await self.store.forget_idle_consumers(self.claim_ms * 10)

    async def _renew(self) -> None:
        """Reset the idle time of our running entries; drop runs another worker took."""
        for entry_id in await self.store.renew(self.name, list(self.runs)):
            if self.runs.stop(entry_id):
                log.warning("entry %s was taken over; dropping our run", entry_id)

    async def _sweep(self) -> int:
        """Take over entries that a dead or stuck worker left idle past the timeout."""
        claimed = await self.store.autoclaim(self.name, self.claim_ms)
        claimed = [(eid, fields) for eid, fields in claimed if eid not in self.runs]
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
            if isinstance(item, TaskSubmitted) and not _names_itself(item):
                # Its outcome would be logged for another task than its fence bit's:
                # refused, as the scripts refuse an index outside the group.
                log.error("work entry %s: %s; dead-lettered", entry_id, WRONG_TASK_ID)
                await self.store.dead_letter_entry(
                    entry_id, fields, "RefusedWorkEntry", WRONG_TASK_ID
                )
            elif isinstance(item, TaskSubmitted):
                good.append((entry_id, item))
            else:
                # Not a task we can run: keep it for inspection, never block the batch.
                log.error("unreadable work entry %s (%s); dead-lettered", entry_id, fields)
                await self.store.dead_letter_entry(entry_id, fields)
        if not good:
            return
        begun = await isolate(f"worker {self.name} begin", self._begin, good, retry_transient=False)
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
                cached = completed(item, decision.value, True, 0, self.name)
                self.outbox.put(entry_id, item, cached)
            elif decision.kind == "run" and decision.value > self.settings.max_attempts:
                # Delivered again and again, never ended: its runs keep killing workers.
                attempts = decision.value - 1
                gave_up = f"gave up after {attempts} runs that never finished (worker lost)"
                self.outbox.put(entry_id, item, failed(item, attempts, gave_up, self.name))
            elif decision.kind == "run":
                start = self.runs.start(entry_id, item, decision.value)
                if start is not None:
                    started.append(start)
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
            await self.outbox.dead_letter([(eid, fields_of[eid]) for eid in out_of_reach])

    async def _begin(self, part: Sequence[tuple[str, TaskSubmitted]]) -> list[Begun]:
        return await self.store.begin([item for _, item in part], [eid for eid, _ in part])

    async def _drain(self) -> None:
        """Let in-flight tasks finish and their outcomes land."""
        await self.runs.finish()
        await self.outbox.join()
