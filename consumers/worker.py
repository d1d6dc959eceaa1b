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
entry forever. Reading, claiming, the backlog and handing back are ``intake.py``'s;
this module is the run loop and the helper loops beside it.

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
from collections.abc import Awaitable, Callable

from consumers.cancels import Cancels
from consumers.intake import READ_COUNT, Intake
from consumers.lane import Lane
from consumers.outbox import Outbox
from consumers.runs import Handler, Runs
from consumers.threads import Threads, pool_size
from sumbatch.config import Settings, resolve_handler
from sumbatch.model.tasks import compute
from sumbatch.outage import REDIS_DOWN, Outage
from sumbatch.store import Store

log = logging.getLogger("sumbatch.worker")

__all__ = ["READ_BLOCK_MS", "TRIM_EVERY", "Handler", "Load", "Worker", "consumer_name"]

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


def consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{random.randrange(16**4):04x}"


class Load:
    """The runs of a process's workers (one per partition it consumes) against the
    process's one concurrency limit."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.workers: list[Worker] = []
        self._threads: Threads | None = None
        # Where tasks of entries that keep losing their worker run, one at a time.
        self.lane = Lane()

    def threads(self, patience: float) -> Threads:
        """The process's one pool for plain handlers' calls (``threads.THREADS_CAP``
        says its size), shared by its workers as the limit is."""
        if self._threads is None:
            self._threads = Threads(pool_size(self.limit), patience)
        return self._threads

    def room(self) -> int:
        return self.limit - sum(len(worker.runs) for worker in self.workers)


class Worker(Intake):
    """A consumer of the ``workers`` group: its run loop and the helper loops beside it
    (flushing, claims, cancels) on top of what it takes from the stream (``Intake``)."""

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
        name = name or consumer_name()
        # A run's entry is forgotten once its outcome is flushed: until then we
        # renew our claim on it.
        outbox = Outbox(store, name, flushed=self._flushed)
        handler = handler or resolve_handler(settings.handler) or compute
        self.load = load or Load(settings.worker_concurrency)
        threads = self.load.threads(settings.task_timeout)
        runs = Runs(
            settings, store, handler, name, outbox, threads,
            forgotten=lambda key: self.load.lane.release(self, key),
        )  # fmt: skip
        super().__init__(
            settings, store, name, runs, outbox, self.load.room, self.load.lane, read_count
        )
        self.load.workers.append(self)
        self.should_exit = False
        # Set once the worker is stopping: its helper loops end.
        self.closing = False
        # False: rely on the fence alone, as a worker of an older version does.
        self.watch_cancels = watch_cancels

    @property
    def busy(self) -> bool:
        waiting = bool(self.backlog) or bool(self.alone)
        return bool(self.runs) or waiting or self.outbox.unflushed > 0

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
            # Runs the grace did not see end, or tasks not begun.
            if self.runs or self.backlog or self.alone:
                await self._hand_back()
        finally:
            await self._stop_helpers(helpers)

    async def run_until_idle(self) -> None:
        """Process until nothing is left to read, claim, run or flush (like arq's burst)."""
        await self.store.ensure_worker_group()
        helpers = self._start_helpers()
        try:
            while True:
                got = await self._read(block_ms=50)
                if got or self.busy or await self._sweep():
                    continue
                if not self.watch.overdue:
                    break
                # Entries idle past the claim timeout: watched that long before taking.
                await asyncio.sleep(0.05)
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

    async def _keep_claims(self) -> None:
        steps: list[tuple[str, float, Callable[[], Awaitable[object]]]] = [
            ("renewals", self.settings.claim_timeout / 4, self._renew),
            ("sweeps", self.sweep_every, self._sweep_unless_stopping),
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

    async def _drain(self) -> None:
        """Let in-flight tasks finish and their outcomes land."""
        await self.runs.finish()
        await self.outbox.join()
