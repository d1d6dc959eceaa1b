"""What a worker takes from the work stream and holds until its tasks run: reading new
entries, the sweep that claims a dead or stuck worker's, the backlog of tasks beyond
its room and their beginning, renewing its claims and handing them back on stop.

A read takes whole slices (``events.WORK_SLICE`` tasks an entry), so a worker with room
for fewer tasks keeps the rest in its backlog, their entries pending on it, and begins
them as runs end. Entries no worker can run are dead-lettered as they are read.
Entries that keep losing their worker have their tasks run one at a time, in the
process's lane (``lane.py``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Container, Sequence

from consumers.isolate import isolate
from consumers.lane import Lane, runs_alone
from consumers.outbox import Outbox
from consumers.runs import Runs, completed, failed
from consumers.slices import Refusal, Task, tasks_in
from consumers.takeover import Watch, longest_gap, watch_from
from sumbatch.config import Settings
from sumbatch.model.events import WORK_SLICE, AnyEvent, to_fields
from sumbatch.store import HANDED_BACK_MS, Begun, Entry, Pending, Store, entry_id_of

log = logging.getLogger("sumbatch.worker")

# Tasks one read takes at most (in whole slices): the batch the begin script handles
# at once, which holds Redis that long (the outbox's BATCH says why it is not larger).
READ_COUNT = 200


def sweep_period(claim_timeout: float) -> float:
    """Seconds between a worker's sweeps: a quarter of the claim timeout, within 0.2 to
    2 s (often enough that handed-back entries move on quickly)."""
    return max(0.2, min(2.0, claim_timeout / 4))


class Intake:
    """The entries one consumer of the ``workers`` group holds, and the tasks in them
    not yet begun; ``room`` says how many more tasks may run now (the process's limit,
    shared by its workers)."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        name: str,
        runs: Runs,
        outbox: Outbox,
        room: Callable[[], int],
        lane: Lane,
        read_count: int = READ_COUNT,
    ) -> None:
        self.settings = settings
        self.store = store
        self.name = name
        self.runs = runs
        self.outbox = outbox
        self.room = room
        self.read_count = read_count
        self.claim_ms = int(settings.claim_timeout * 1000)
        # Sweeps come this often (``worker.py``'s loop), and take over only what they
        # have watched idle for the claim timeout (``takeover.py``).
        self.sweep_every = sweep_period(settings.claim_timeout)
        self.watch_from_ms = int(watch_from(settings.claim_timeout, self.sweep_every) * 1000)
        self.watch = Watch(
            settings.claim_timeout, longest_gap(settings.claim_timeout, self.sweep_every)
        )
        self._sweeping = asyncio.Lock()
        # Tasks taken (their entries pending on us) and not begun: a read takes whole
        # slices, and a worker begins no more tasks than it has room for.
        self.backlog: deque[Task] = deque()
        # Tasks of entries that keep losing their worker, not begun: they wait for the
        # process's lane, and meanwhile we take nothing new.
        self.alone: deque[Task] = deque()
        self.lane = lane

    def _held(self) -> list[str]:
        """The keys of the tasks we hold: running, or waiting to begin."""
        waiting = (key for key, _ in (*self.backlog, *self.alone))
        return [*self.runs, *waiting]

    async def _read(self, block_ms: int) -> int:
        """Begin the tasks the backlog holds, as many as there is room for; or, when it
        is empty, read new entries. Returns how many tasks were begun."""
        capacity = self.room()
        if capacity <= 0:
            await asyncio.sleep(0.01)
            return 0
        if self.alone:
            return await self._begin_backlog() + await self._begin_alone(block_ms)
        if not self.backlog:
            entries = await self.store.read_work(self.name, self._entries_for(capacity), block_ms)
            await self._take(entries)
        return await self._begin_backlog()

    def _entries_for(self, room: int) -> int:
        """How many work entries to take with room for ``room`` more tasks: as many
        whole slices as fit, at least one (a worker with room for one task more takes
        up to WORK_SLICE - 1 more into its backlog), at most ``read_count`` entries
        (small groups' entries hold fewer tasks; the backlog is begun ``read_count``
        tasks at a time)."""
        return max(1, min(self.read_count, room // WORK_SLICE))

    async def _sweep(self) -> int:
        """Watch the entries whose owner is late renewing them, and take over those it
        has missed its renewals for the claim timeout on our clock (a dead or stuck
        worker's: ``takeover.py``), as many as there is room for: a worker with a
        backlog takes none, so that idle workers can. Returns how many were taken."""
        async with self._sweeping:
            sent = time.monotonic()
            pending = await self.store.pending_idle(self.watch_from_ms)
            ready = self.watch.observe(pending, sent, time.monotonic())
            room = self.room()
            if self.backlog or self.alone or room <= 0 or not ready:
                return 0
            chosen = ready[: self._entries_for(room)]
            claimed = await self._claim(chosen)
        if claimed:
            log.info("claimed %d entries from dead or stuck workers", len(claimed))
            # XCLAIM counted one delivery more.
            max_attempts = self.settings.max_attempts
            alone = {p.entry_id for p in chosen if runs_alone(p.deliveries + 1, max_attempts)}
            if alone:
                log.warning(
                    "running the tasks of %d entries one at a time: they keep losing "
                    "their worker (%s)", len(alone), ", ".join(sorted(alone)[:10]),
                )  # fmt: skip
            # Its backlog is empty here; an entry of ours may still have runs going.
            await self._take(claimed, held=self.runs, alone=alone)
        return len(claimed)

    async def _claim(self, ready: list[Pending]) -> list[Entry]:
        """XCLAIM, each entry only if still idle as long as when it was read (less the
        claim timeout at most): one renewed since then stays its owner's."""
        handed = [p.entry_id for p in ready if p.idle_ms >= HANDED_BACK_MS]
        late = [p for p in ready if p.idle_ms < HANDED_BACK_MS]
        claimed = await self.store.claim_idle(self.name, HANDED_BACK_MS, handed)
        if late:
            min_idle = min(self.claim_ms, *(p.idle_ms for p in late))
            claimed += await self.store.claim_idle(self.name, min_idle, [p.entry_id for p in late])
        return claimed

    async def _take(
        self, entries: list[Entry], held: Container[str] = (), alone: Container[str] = ()
    ) -> None:
        """Put the tasks of work entries in the backlog (those of entries in ``alone``
        to wait for the lane), those in ``held`` aside; entries no worker can run are
        dead-lettered."""
        for entry_id, fields in entries:
            tasks = tasks_in(entry_id, fields)
            if isinstance(tasks, Refusal):
                why = tasks.why or f"unreadable ({fields})"
                log.error("work entry %s: %s; dead-lettered", entry_id, why)
                await self.store.dead_letter_entry(entry_id, fields, tasks.kind, tasks.why)
            else:
                into = self.alone if entry_id in alone else self.backlog
                into.extend(task for task in tasks if task[0] not in held)

    async def _renew(self) -> None:
        """Reset the idle time of the entries of the tasks we hold; drop the runs and
        the backlog of entries another worker took."""
        lost = set(await self.store.renew(self.name, self._held()))
        if not lost:
            return
        self.backlog = deque(task for task in self.backlog if task[0] not in lost)
        self.alone = deque(task for task in self.alone if task[0] not in lost)
        for key in lost:
            if self.runs.stop(key):
                log.warning("task %s was taken over; dropping our run", key)

    async def _hand_back(self) -> None:
        """Make the entries of our unfinished tasks (running or not begun) claimable at
        once by any other worker, rather than after the claim timeout; their runs here
        are abandoned. The taker runs only the tasks that have not ended."""
        keys = self._held()
        self.backlog.clear()
        self.alone.clear()
        for key in keys:
            self.runs.stop(key)
        await self.store.renew(self.name, keys, idle_ms=HANDED_BACK_MS)
        log.warning("handed back %d unfinished tasks", len(keys))

    async def _begin_backlog(self) -> int:
        """Begin as many backlog tasks as there is room for, in one step; returns how
        many were begun."""
        room = min(self.room(), self.read_count)
        batch = [self.backlog.popleft() for _ in range(min(room, len(self.backlog)))]
        if not batch:
            return 0
        await self._begin_tasks(batch, self.backlog)
        return len(batch)

    async def _begin_alone(self, block_ms: int) -> int:
        """Begin the next task waiting for the lane once the lane is free (the last
        one's outcome recorded): it runs alone, so should it kill the process, the
        death is charged to it. Returns how many were begun (0 or 1)."""
        if self.lane.busy:
            await self.lane.wait(block_ms / 1000)
            return 0
        key = self.alone[0][0]
        self.lane.take(self, key)
        try:
            await self._begin_tasks([self.alone.popleft()], self.alone, inline=False)
        finally:
            if key not in self.runs:  # it ended at once (or could not begin)
                self.lane.release(self, key)
        return 1

    async def _begin_tasks(
        self, batch: list[Task], taken_from: deque[Task], inline: bool = True
    ) -> None:
        """Begin these tasks in one step (put back in ``taken_from`` should Redis be
        away); ``inline``: may run at once (``Runs.start``)."""
        what = f"worker {self.name} begin"
        try:
            begun = await isolate(what, self._begin, batch, retry_transient=False)
        except BaseException:
            # Redis away (the read loop backs off): begun again once it is back. A begin
            # that did happen counted one attempt more; the fence keeps the rest exact.
            taken_from.extendleft(reversed(batch))
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
                start = self.runs.start(key, item, decision.value, inline)
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
            for waiting in (self.backlog, self.alone):
                kept = [t for t in waiting if entry_id_of(t[0]) not in out_of_reach]
                waiting.clear()
                waiting.extend(kept)
            await self.outbox.dead_letter(list(out_of_reach.items()))

    async def _begin(self, part: Sequence[Task]) -> list[Begun]:
        return await self.store.begin([item for _, item in part], [key for key, _ in part])
