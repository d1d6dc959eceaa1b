"""The lane: where a process runs the tasks of entries that keep losing their worker,
one at a time.

A worker runs a slice's tasks side by side, so when its process dies nobody can say
which task killed it: each task that was running is charged the attempt it began.
Taken over, the same tasks would run side by side again, and one task that kills its
process would use up the attempts of its whole slice. So an entry taken over
``max_attempts - 1`` times (its ``max_attempts``-th delivery; the second, whatever
the setting, at least) has its unended tasks run in the lane: one at a time per
process, each outcome recorded before the next begins. From then on a death is
charged to the one task in the lane (and to fresh work running beside it, which
has attempts to spare): the killer uses up its attempts and fails alone, the others
of its slice succeed. The first takeover still runs side by side, so recovering
from an ordinary crash (an OOM kill, a lost machine) stays quick.

Imports nothing of sumbatch: the worker's intake owns a lane's use.
"""

from __future__ import annotations

import asyncio
import contextlib


def runs_alone(deliveries: int, max_attempts: int) -> bool:
    """Whether an entry on its ``deliveries``-th delivery has its tasks run in the
    lane: once the attempts left to a task that began in every delivery are no more
    than a death or two."""
    return deliveries >= max(2, max_attempts)


class Lane:
    """One process's lane: which task holds it (its worker and task key), if any."""

    def __init__(self) -> None:
        self.holder: tuple[object, str] | None = None
        self._free = asyncio.Event()
        self._free.set()

    @property
    def busy(self) -> bool:
        return self.holder is not None

    def take(self, owner: object, key: str) -> None:
        self.holder = (owner, key)
        self._free.clear()

    def release(self, owner: object, key: str) -> None:
        """Free the lane if this task holds it (its outcome is recorded, or its run
        ended without one: cancelled, taken over, handed back)."""
        if self.holder is not None and self.holder[0] is owner and self.holder[1] == key:
            self.holder = None
            self._free.set()

    async def wait(self, within: float) -> None:
        """Until the lane is free, or ``within`` seconds."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._free.wait(), within)
