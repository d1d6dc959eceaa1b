"""A worker: one consumer of the ``workers`` group, running many tasks at once.

A work entry holds a slice of a group's tasks (``events.TasksSubmitted``; or one task,
``TaskSubmitted``, as older versions wrote). Each task is named by its key
(``store.task_key``) and goes its own way. Flow per task: the begin script says skip
(already ended), cache hit, or run (with the attempt number); runs (``runs.py``)
sleep the simulated delay without blocking the others; outcomes go through the
completion fence in batches (``outbox.py``), which acknowledges an entry once every
task in it has ended. Tasks taken beyond the worker's room wait in its backlog, begun
as runs end. While a task of an entry runs or waits, the entry stays in our pending
list and we renew our claim on it, so only a dead or stuck worker's entries are taken
over (XAUTOCLAIM after ``claim_timeout``); the taker runs only the tasks that have not
ended. A run is cut off after ``task_timeout`` (a failed attempt), so no run holds its
entry forever.

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
import contextlib
import logging
import os
import random
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable, Container, Sequence
from typing import NamedTuple

import msgspec

from consumers.cancels import Cancels
from consumers.isolate import isolate
from consumers.outbox import Outbox
from consumers.runs import Handler, Runs, completed, failed
from sumbatch.config import Settings, resolve_handler
from sumbatch.model import ids
from sumbatch.model.events import (
    WORK_SLICE,
    AnyEvent,
    TasksSubmitted,
    TaskSubmitted,
    from_fields,
    tasks_of,
    to_fields,
)
from sumbatch.model.tasks import compute
from sumbatch.outage import REDIS_DOWN, Outage
from sumbatch.store import Begun, Entry, Store, entry_id_of, task_key

log = logging.getLogger("sumbatch.worker")

__all__ = ["READ_BLOCK_MS", "TRIM_EVERY", "Handler", "Load", "Worker", "consumer_name"]

# Tasks one read takes at most (in whole slices): the batch the begin script handles
# at once, which holds Redis that long (the outbox's BATCH says why it is not larger).
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
NOT_A_SLICE = "not a slice of a group's tasks as SUBMIT writes them"

# A task taken from a work entry: its key (``store.task_key``) and what it runs.
Task = tuple[str, TaskSubmitted]


class Refusal(NamedTuple):
    """Why no worker can run a work entry: the dead letter's kind and reason."""

    kind: str
    why: str


def _names_itself(item: TaskSubmitted) -> bool:
    """Whether a work entry's task id is its group's id with its index (ids.py)."""
    return item.task_id == ids.task_id(item.group_task_id, item.index)


def _tasks_in(entry_id: str, fields: dict[str, str]) -> list[Task] | Refusal:
    """The tasks a work entry holds, each with its key; or why none can run."""
    try:
        item: AnyEvent | None = from_fields(fields)
    except msgspec.ValidationError:
        item = None
    if isinstance(item, TasksSubmitted):
        try:
            return [(task_key(entry_id, task.index), task) for task in tasks_of(item)]
        except ValueError:
            return Refusal("RefusedWorkEntry", NOT_A_SLICE)
    if isinstance(item, TaskSubmitted) and not _names_itself(item):
        # Its outcome would be logged for another task than its fence bit's: refused,
        # as the scripts refuse an index outside the group.
        return Refusal("RefusedWorkEntry", WRONG_TASK_ID)
    if isinstance(item, TaskSubmitted):
        return [(entry_id, item)]
    # Not a task we can run: kept for inspection, never blocking the batch.
    return Refusal("UnreadableWorkEntry", "")


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
        # Tasks taken (their entries pending on us) and not begun: a read takes whole
        # slices, and a worker begins no more tasks than it has room for.
        self.backlog: deque[Task] = deque()

    @property
    def busy(self) -> bool:
        return bool(self.runs) or bool(self.backlog) or self.outbox.unflushed > 0

    def _held(self) -> list[str]:
        """The keys of the tasks we hold: running, or waiting in the backlog."""
        return [*self.runs, *(key for key, _ in self.backlog)]

    def _flushed(self, key: str) -> None:
        self.runs.forget(key)

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
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drain(), self.settings.shutdown_grace)
            if self.runs or self.backlog:  # runs the grace did not see end, or not begun
                await self._hand_back()
        finally:
            await self._stop_helpers(helpers)

    async def _hand_back(self) -> None:
        """Make the entries of our unfinished tasks (running or not begun) claimable at
        once by any other worker, rather than after the claim timeout; their runs here
        are abandoned. The taker runs only the tasks that have not ended."""
        keys = self._held()
        self.backlog.clear()
        for key in keys:
            self.runs.stop(key)
        await self.store.renew(self.name, keys, idle_ms=self.claim_ms * 10)
        log.warning("handed back %d unfinished tasks", len(keys))

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
        """Begin the tasks the backlog holds, as many as there is room for; or, when it
        is empty, read new entries. Returns how many tasks were begun."""
        capacity = self.load.room()
        if capacity <= 0:
            await asyncio.sleep(0.01)
            return 0
        if not self.backlog:
            entries = await self.store.read_work(self.name, self._entries_for(capacity), block_ms)
            await self._take(entries)
        return await self._begin_backlog()

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
        """Reset the idle time of the entries of the tasks we hold; drop the runs and
        the backlog of entries another worker took."""
        lost = set(await self.store.renew(self.name, self._held()))
        if not lost:
            return
        self.backlog = deque(task for task in self.backlog if task[0] not in lost)
        for key in lost:
            if self.runs.stop(key):
                log.warning("task %s was taken over; dropping our run", key)

    def _entries_for(self, room: int) -> int:
        """How many work entries to take with room for ``room`` more tasks: as many
        whole slices as fit, at least one (a worker with room for one task more takes
        up to WORK_SLICE - 1 more into its backlog), at most ``read_count`` entries
        (small groups' entries hold fewer tasks; the backlog is begun ``read_count``
        tasks at a time)."""
        return max(1, min(self.read_count, room // WORK_SLICE))

    async def _sweep(self) -> int:
        """Take over entries that a dead or stuck worker left idle past the timeout, as
        many as there is room for: a worker with a backlog takes none, so that idle
        workers can."""
        room = self.load.room()
        if self.backlog or room <= 0:
            return 0
        claimed = await self.store.autoclaim(self.name, self.claim_ms, self._entries_for(room))
        if claimed:
            log.info("claimed %d entries from dead or stuck workers", len(claimed))
            # Its backlog is empty here; an entry of ours may still have runs going.
            await self._take(claimed, held=self.runs)
        return len(claimed)

    async def _take(self, entries: list[Entry], held: Container[str] = ()) -> None:
        """Put the tasks of work entries in the backlog, those in ``held`` aside;
        entries no worker can run are dead-lettered."""
        for entry_id, fields in entries:
            tasks = _tasks_in(entry_id, fields)
            if isinstance(tasks, Refusal):
                why = tasks.why or f"unreadable ({fields})"
                log.error("work entry %s: %s; dead-lettered", entry_id, why)
                await self.store.dead_letter_entry(entry_id, fields, tasks.kind, tasks.why)
            else:
                self.backlog.extend(task for task in tasks if task[0] not in held)

    async def _begin_backlog(self) -> int:
        """Begin as many backlog tasks as there is room for, in one step; returns how
        many were begun."""
        room = min(self.load.room(), self.read_count)
        batch = [self.backlog.popleft() for _ in range(min(room, len(self.backlog)))]
        if not batch:
            return 0
        what = f"worker {self.name} begin"
        try:
            begun = await isolate(what, self._begin, batch, retry_transient=False)
        except BaseException:
            # Redis away (the read loop backs off): begun again once it is back. A begin
            # that did happen counted one attempt more; the fence keeps the rest exact.
            self.backlog.extendleft(reversed(batch))
            raise
        refused = [key for key, _ in begun.failed]
        decided = [
            (key, item, decision)
            for part, decisions in begun.done
            for (key, item), decision in zip(part, decisions, strict=True)
        ]
        # An entry with a task outside its group (made by hand): no run of it counts. It
        # is dead-lettered with that task's fields.
        out_of_reach = {
            entry_id_of(key): to_fields(item)
            for key, item, decision in decided
            if decision.kind == "refused"
        }
        started: list[AnyEvent] = []
        for key, item, decision in decided:
            if entry_id_of(key) in out_of_reach:
                continue
            if decision.kind == "cached":
                cached = completed(item, decision.value, True, 0, self.name)
                self.outbox.put(key, item, cached)
            elif decision.kind == "run" and decision.value > self.settings.max_attempts:
                # Delivered again and again, never ended: its runs keep killing workers.
                attempts = decision.value - 1
                gave_up = f"gave up after {attempts} runs that never finished (worker lost)"
                self.outbox.put(key, item, failed(item, attempts, gave_up, self.name))
            elif decision.kind == "run":
                start = self.runs.start(key, item, decision.value)
                if start is not None:
                    started.append(start)
        if refused:
            # The server refused the step for them (an ACL, say): left pending, they are
            # claimed again after the claim timeout, when an operator may have fixed it.
            log.error(
                "%d tasks could not begin; their entries are left pending: %s",
                len(refused), ", ".join(refused[:10]),
            )  # fmt: skip
        await self.store.append(started)
        # No run can ever count for these: kept in the dead-letter stream instead of
        # pending for ever (which would also stop the work stream's trimming).
        if out_of_reach:
            self.backlog = deque(t for t in self.backlog if entry_id_of(t[0]) not in out_of_reach)
            await self.outbox.dead_letter(list(out_of_reach.items()))
        return len(batch)

    async def _begin(self, part: Sequence[Task]) -> list[Begun]:
        return await self.store.begin([item for _, item in part], [key for key, _ in part])

    async def _drain(self) -> None:
        """Let in-flight tasks finish and their outcomes land."""
        await self.runs.finish()
        await self.outbox.join()
