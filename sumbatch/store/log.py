"""Reads of the event log and of each group's own log (the projector, replay, the live
feeds), the log's trimming once the views include it, and whether a task or group has
ended as logged, before the projector folds that in. The views the projector folds the
log into are ``views.py``'s."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

from sumbatch.model import ids
from sumbatch.model.events import from_group_log
from sumbatch.store.base import Entry, StoreBase


class EventLog(StoreBase):
    """The append-only log, as the scripts wrote it: read and trimmed, never changed."""

    def expired_before(self, now: float) -> str:
        """The log entry id before which a group that is gone has expired (ended at
        least a result TTL ago), rather than never been."""
        return f"{int(now * 1000) - self.retention.results * 1000}-0"

    async def trim_events(self, position: str, now_ms: int) -> int:
        """Drop log entries older than the log retention that the views already include,
        and dead letters older than the retention."""
        cutoff = f"{now_ms - self.retention.log * 1000}-0"
        minid = min(cutoff, position, key=ids.entry_order)
        # limit=0: no cap on entries per call (the default stops at 10,000).
        pipe = self.redis.pipeline(transaction=False)
        pipe.xtrim(self.keys.events, minid=minid, approximate=True, limit=0)
        pipe.xtrim(self.keys.dead_letters, minid=cutoff, approximate=True, limit=0)
        trimmed, _ = await pipe.execute()
        return int(trimmed)

    async def read_events(self, after: str, count: int, block_ms: int | None) -> list[Entry]:
        reply: Any = await self.redis.xread({self.keys.events: after}, count=count, block=block_ms)
        return cast(list[Entry], reply[0][1]) if reply else []

    async def event_range(self, start: str = "-", end: str = "+", count: int = 1000) -> list[Entry]:
        return cast(list[Entry], await self.redis.xrange(self.keys.events, start, end, count))

    async def read_since(self, after: str, count: int) -> tuple[int, list[Entry]]:
        """The log's entries after ``after``, and the server's clock (ms) when they were
        read: any entry not among them will have an id above that time."""
        now, entries = await self._read_since(keys=[self.keys.events], args=[after, count])
        return int(now), [(str(eid), _pairs(fields)) for eid, fields in entries]

    async def last_event_id(self) -> str:
        """The id of the log's newest entry ("0-0" when empty): a real id to read on
        from, unlike "$", so a reader that reconnects misses nothing."""
        last = cast(list[Entry], await self.redis.xrevrange(self.keys.events, count=1))
        return last[0][0] if last else "0-0"

    async def group_history(
        self, group_task_id: str, after: str | None = None, count: int | None = None
    ) -> list[Entry]:
        """A group's own log, from its start or after an entry id (exclusive), each entry
        with the fields the group's log leaves out put back: as in the event log."""
        start = "-" if after is None else f"({after}"
        key = self.keys.group_log(group_task_id)
        logged = cast(list[Entry], await self.redis.xrange(key, start, "+", count))
        return [(entry_id, from_group_log(group_task_id, fields)) for entry_id, fields in logged]

    async def events_after(self, after: str, count: int) -> list[Entry]:
        """The log's entries after an entry id (exclusive), oldest first."""
        return cast(list[Entry], await self.redis.xrange(self.keys.events, f"({after}", "+", count))

    async def group_finished_logged(self, group_task_id: str) -> bool:
        """Whether the group's log ends with GroupFinished: its last task has ended,
        whether or not the projector has folded that in yet."""
        return await self.group_finished_id(group_task_id) is not None

    async def group_finished_id(self, group_task_id: str) -> str | None:
        """The entry id of the group's GroupFinished when its log ends with one."""
        last = cast(
            list[Entry], await self.redis.xrevrange(self.keys.group_log(group_task_id), count=1)
        )
        return last[0][0] if last and last[0][1].get("type") == "GroupFinished" else None

    async def task_ended(self, task_id: str) -> bool:
        """Whether the task's bit in the completion fence is set: it has ended, whether
        or not the projector has folded that in yet."""
        where = ids.split_task_id(task_id)
        if where is None:
            return False
        return bool(await self.redis.getbit(self.keys.ended(where[0]), where[1]))


def _pairs(flat: Sequence[str]) -> dict[str, str]:
    """A stream entry's fields as a script returns them (flat), as a dict."""
    return dict(zip(flat[::2], flat[1::2], strict=True))
