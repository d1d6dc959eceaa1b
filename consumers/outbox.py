"""A worker's outcomes on their way to the completion fence: queued as runs end,
flushed in batches. Outcomes the fence refuses, and work entries no run can ever
count for, are dead-lettered."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from consumers.isolate import isolate
from sumbatch.model.events import TaskCompleted, TaskFailed, TaskSubmitted, to_fields
from sumbatch.store import Outcome, Store, entry_id_of

log = logging.getLogger("sumbatch.worker")

REFUSED_WHY = "the task is outside its group, or its group's keys are not what sumbatch wrote"

# Outcomes flushed in one script call, at most. Redis runs one script at a time and
# nothing beside it: 500 outcomes held it for about 22 ms, and every GET and POST that
# came meanwhile waited; 200 keep that under 10 ms for about 4 % of the throughput.
BATCH = 200


class Outbox:
    def __init__(self, store: Store, name: str, flushed: Callable[[str], object]) -> None:
        self.store = store
        self.name = name
        # Called with each task's key once its outcome is recorded (or can never be).
        self._flushed = flushed
        self._queue: asyncio.Queue[Outcome] = asyncio.Queue()
        self.unflushed = 0

    def put(
        self,
        key: str,
        item: TaskSubmitted,
        event: TaskCompleted | TaskFailed,
        seconds: float | None = None,
    ) -> None:
        """Queue a task's outcome, by its key (``Outcome.key``); ``seconds``: how long
        its run took (None: nothing ran)."""
        self.unflushed += 1
        self._queue.put_nowait(Outcome(key, event, item.param_a, item.param_b, seconds))

    async def join(self) -> None:
        """Until every outcome put so far is flushed."""
        await self._queue.join()

    async def flush_forever(self, closing: Callable[[], bool]) -> None:
        """Flush outcomes as they come, until ``closing()``."""
        while not closing():
            try:
                # Bounded, so that the loop sees ``closing`` even if a cancel is lost.
                async with asyncio.timeout(1.0):
                    first = await self._queue.get()
            except TimeoutError:
                continue
            batch = [first]
            while len(batch) < BATCH and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            # Shielded: a cancelled worker must not leave a batch half-known.
            await asyncio.shield(self._flush(batch))

    async def _flush(self, batch: list[Outcome]) -> None:
        # Redis away or refusing: the same batch again (fenced: safe to send twice),
        # however long it takes, as outcomes must not be lost. Any other error: split.
        flushed = await isolate(
            f"worker {self.name} completions", self.store.complete, batch, retry_transient=True
        )
        failed = [outcome.key for outcome in flushed.failed]
        if failed:
            # Not acknowledged: pending, they are claimed again after the claim timeout
            # and run as a further attempt; past max_attempts they end as FAILURE.
            log.error(
                "%d outcomes could not be recorded; their entries stay pending: %s",
                len(failed), ", ".join(failed[:10]),
            )  # fmt: skip
        # Their group went bad while they ran: no outcome can count for them.
        refused = {eid for _, completed in flushed.done for eid in completed.refused}
        await self.dead_letter([(o.key, to_fields(o.event)) for o in batch if o.key in refused])
        for outcome in batch:
            self._flushed(outcome.key)
            self._queue.task_done()
        self.unflushed -= len(batch)

    async def dead_letter(self, refused: list[tuple[str, dict[str, str]]]) -> None:
        """Dead-letter the work entries of tasks the scripts refused (by their keys),
        acknowledged: each entry once, with the fields of its first refused task.
        Should that fail too, they stay pending: claimed again, refused again,
        dead-lettered then."""
        if not refused:
            return
        entries: dict[str, dict[str, str]] = {}
        for key, fields in refused:
            entries.setdefault(entry_id_of(key), fields)
        log.error(
            "dead-lettered the work entries of %d refused tasks (%s): %s",
            len(refused), REFUSED_WHY, ", ".join(list(entries)[:10]),
        )  # fmt: skip
        try:
            for entry_id, fields in entries.items():
                await self.store.dead_letter_entry(
                    entry_id, fields, "RefusedWorkEntry", REFUSED_WHY
                )
        except Exception as exc:
            log.warning("could not dead-letter refused entries (%s); left pending", exc)
