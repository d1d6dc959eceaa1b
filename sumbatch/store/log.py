"""The event log and the views: the projector's reads and its commit, replay's
snapshot, audit, and the API's status reads."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable, Sequence
from typing import Any, cast

import msgspec

from sumbatch import ids
from sumbatch.events import from_group_log
from sumbatch.projection import GroupSummary, GroupView, SetAside, TaskView, Views, task_view
from sumbatch.store.base import Entry, StoreBase, _json

log = logging.getLogger("sumbatch.store")

_group_view_decoder = msgspec.json.Decoder(GroupView)
_group_summary_decoder = msgspec.json.Decoder(GroupSummary)
# Entries kept in the rejected stream (about: trimmed with MAXLEN ~).
REJECTED_KEPT = 10_000


class EventLog(StoreBase):
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
        last = cast(
            list[Entry], await self.redis.xrevrange(self.keys.group_log(group_task_id), count=1)
        )
        return bool(last) and last[0][1].get("type") == "GroupFinished"

    async def task_ended(self, task_id: str) -> bool:
        """Whether the task's bit in the completion fence is set: it has ended, whether
        or not the projector has folded that in yet."""
        where = ids.split_task_id(task_id)
        if where is None:
            return False
        return bool(await self.redis.getbit(self.keys.ended(where[0]), where[1]))

    async def position(self) -> str | None:
        return cast(str | None, await self.redis.get(self.keys.projector_position))

    async def load_views(self, group_ids: Iterable[str]) -> Views:
        gids = list(group_ids)
        if not gids:
            return Views()
        return _views(gids, await self.redis.mget([self.keys.group_view(g) for g in gids]))

    async def commit_views(
        self,
        expected: str | None,
        position: str,
        views: Views,
        set_aside: Sequence[SetAside] = (),
    ) -> bool:
        """Write views and the position they include, compare-and-set on ``expected``,
        and copy the entries the fold set aside to the rejected stream, all in one
        step. Processed groups start to expire; the rest live on."""
        ttl = str(self.retention.results)
        keys = [self.keys.projector_position, self.keys.rejected]
        rejected = [
            ["entryId", s.entry_id, "reason", s.reason, *itertools.chain(*s.fields.items())]
            for s in set_aside
        ]
        args: list[str | int | bytes] = [
            expected or "",
            position,
            _json.encode(rejected),
            REJECTED_KEPT,
        ]
        for gid, group in views.groups.items():
            keys.append(self.keys.group_view(gid))
            args += (ttl if group.processed else "0", _json.encode(group))
        return bool(await self._commit(keys=keys, args=args))

    async def snapshot(self, group_ids: Sequence[str]) -> tuple[str | None, Views, dict[str, bool]]:
        """In one step: the projector's position, these groups' views, and whether
        each group's ledger still exists (it has not expired)."""
        # One GET per view, not MGET: a cluster client refuses multi-key commands in
        # a pipeline, even on one slot.
        pipe = self.redis.pipeline(transaction=True)
        pipe.get(self.keys.projector_position)
        for gid in group_ids:
            pipe.get(self.keys.group_view(gid))
        for gid in group_ids:
            pipe.exists(self.keys.ledger(gid))
        position, *replies = await pipe.execute()
        blobs, exists = replies[: len(group_ids)], replies[len(group_ids) :]
        live = {gid: bool(n) for gid, n in zip(group_ids, exists, strict=True)}
        return position, _views(group_ids, blobs), live

    async def forget_position(self) -> None:
        """Make the projector fold the log again from its start (``sumbatch replay``).
        Safe while it runs: its next commit fails the compare-and-set and it reloads.
        The fold is idempotent for events already in a view, and GroupSubmitted starts
        a view afresh, so the views converge to the fold of the log."""
        await self.redis.delete(self.keys.projector_position)

    async def _view_blob(self, group_task_id: str) -> str | None:
        """A group's stored view; an id that cannot be a group's never reaches Redis."""
        if not ids.is_group_id(group_task_id):
            return None
        return cast(str | None, await self.redis.get(self.keys.group_view(group_task_id)))

    async def group_view(self, group_task_id: str) -> GroupView | None:
        blob = await self._view_blob(group_task_id)
        return None if blob is None else _view(group_task_id, blob)

    async def group_summary(self, group_task_id: str) -> GroupSummary | None:
        blob = await self._view_blob(group_task_id)
        return None if blob is None else _group_summary_decoder.decode(blob)

    async def task_view(self, task_id: str) -> TaskView | None:
        where = ids.split_task_id(task_id)
        if where is None:
            return None
        group = await self.group_view(where[0])
        return None if group is None else task_view(group, task_id, where[1])


def _view(group_task_id: str, blob: str | bytes) -> GroupView | None:
    """A stored view; one that is no view of the fold's shape (written by hand) counts
    as absent, so its group's events are set aside rather than stall the projector,
    and a read of it is a 404 rather than a 500."""
    try:
        view = _group_view_decoder.decode(blob)
    except msgspec.DecodeError as exc:
        log.error("the stored view of group %s is no view (%s); ignored", group_task_id, exc)
        return None
    if view.group_task_id != group_task_id or not view.well_formed():
        log.error("the stored view of group %s is not a view's shape; ignored", group_task_id)
        return None
    return view


def _views(group_ids: Sequence[str], blobs: Sequence[str | bytes | None]) -> Views:
    views = Views()
    for gid, blob in zip(group_ids, blobs, strict=True):
        if blob is not None and (view := _view(gid, blob)) is not None:
            views.groups[gid] = view
    return views


def _pairs(flat: Sequence[str]) -> dict[str, str]:
    """A stream entry's fields as a script returns them (flat), as a dict."""
    return dict(zip(flat[::2], flat[1::2], strict=True))
