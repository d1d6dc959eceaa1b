"""The projector: folds the event log into group and task views.

Its position (the last event id the views include) is written in the same atomic
step as the views, compare-and-set on the position it started from. A crash at any
point leaves views and position consistent: the next run re-reads from the stored
position, so nothing is lost or counted twice, and a second projector running beside
it only wastes work.

An entry the fold cannot apply (written by hand, or by another version) is set
aside: logged with its id and the reason, copied to the rejected stream in the same
commit, and the position moves past it.
"""

from __future__ import annotations

import asyncio
import logging
import time

from sumbatch.model.projection import chunks_touched, fold_entries, submitted_groups
from sumbatch.outage import Outage
from sumbatch.store import Store
from sumbatch.store.base import Entry

log = logging.getLogger("sumbatch.projector")

# How long one read of the log blocks when nothing comes: the trim period is checked
# after each read, so a trim can come this much later than its period.
READ_BLOCK_MS = 1000
# How long a batch that holds no outcome waits for more before it is folded: about the
# time a worker takes to run a small group with no delay.
LINGER_MS = 5
# Entries whose fold no reader waits for: a group's first view is written with its
# submission, and a start only turns PENDING into STARTED.
_UNAWAITED = frozenset({"GroupSubmitted", "TaskStarted"})


def awaited(entries: list[Entry]) -> bool:
    """Whether some entry changes what a reader waits for (an outcome, a group's end)."""
    return any(fields.get("type") not in _UNAWAITED for _, fields in entries)


class Projector:
    def __init__(self, store: Store, batch: int = 1000) -> None:
        self.store = store
        self.batch = batch
        self.should_exit = False
        self.position: str | None = None
        self.set_aside = 0  # entries set aside by this process
        self._loaded = False

    async def step(self, block_ms: int | None) -> int:
        """Fold the next batch of log entries; returns how many the views now include
        (applied or set aside), 0 when there were none or another projector moved the
        position first."""
        if not self._loaded:
            self.position = await self.store.position()
            self._loaded = True
        entries = await self.store.read_events(self.position or "0-0", self.batch, block_ms)
        if not entries:
            return 0
        if block_ms and len(entries) < self.batch and not awaited(entries):
            # Nothing a reader waits for (the first view is the submission's own): give
            # the outcomes a moment to come, and fold both in one step instead of two.
            more = self.batch - len(entries)
            entries += await self.store.read_events(entries[-1][0], more, LINGER_MS)
        views = await self.store.load_touched(chunks_touched(entries), submitted_groups(entries))
        set_aside = fold_entries(entries, views, self.store.expired_before(time.time()))
        new_position = entries[-1][0]
        if not await self.store.commit_views(self.position, new_position, views, set_aside):
            log.warning("position moved under us (another projector?); reloading")
            self._loaded = False
            return 0
        for entry in set_aside:
            log.error("set aside log entry %s: %s (%s)", entry.entry_id, entry.reason, entry.fields)
        self.set_aside += len(set_aside)
        self.position = new_position
        return len(entries)

    async def run(self, trim_every: float = 1.0) -> None:
        log.info("projector reading %s", self.store.keys.events)
        outage = Outage(log, "projector")
        last_trim = time.monotonic()
        while not self.should_exit:
            try:
                await self.step(block_ms=READ_BLOCK_MS)
                if time.monotonic() - last_trim >= trim_every and self.position is not None:
                    last_trim = time.monotonic()
                    await self.store.trim_events(self.position, int(time.time() * 1000))
                outage.ok()
            except Exception as exc:  # Redis away or refusing, or a bug: back off, retry
                self._loaded = False
                await asyncio.sleep(outage.failed(exc))

    async def run_until_idle(self) -> None:
        while await self.step(block_ms=None) or not self._loaded:
            pass
