"""The bodies of the event streams: history from the log, then live entries from the
feed. A stream that falls behind the feed catches up from the log again, so a slow
client gets every entry, later."""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator

from sumbatch import ids
from sumbatch.live import sse
from sumbatch.live.feed import Feed, Interrupted
from sumbatch.store import Store
from sumbatch.store.base import Entry

HISTORY_CHUNK = 1000


async def group_events(
    store: Store, feed: Feed, gid: str, after: str | None, heartbeat: float
) -> AsyncGenerator[bytes, None]:
    """One group's events after ``after`` (all when None); ends after GroupFinished."""
    yield sse.opening()
    while True:
        async with feed.listen(gid) as listener:
            # History, including whatever came before the listener existed.
            while True:
                chunk = await store.group_history(gid, after, HISTORY_CHUNK)
                for entry_id, fields in chunk:
                    yield sse.message(entry_id, fields)
                    after = entry_id
                    if fields.get("type") == "GroupFinished":
                        return
                if len(chunk) < HISTORY_CHUNK:
                    break
            try:
                while True:
                    entry = await listener.next(heartbeat)
                    if entry is None:
                        yield sse.HEARTBEAT
                        continue
                    if after is not None and ids.entry_order(entry.entry_id) <= ids.entry_order(
                        after
                    ):
                        continue
                    yield sse.message(entry.entry_id, entry.fields)
                    after = entry.entry_id
                    if entry.fields.get("type") == "GroupFinished":
                        return
            except Interrupted:
                if listener.closed:
                    return
                # Fell behind: read on from the group's log.


async def log_events(
    stores: list[Store], feed: Feed, after: str | None, heartbeat: float
) -> AsyncGenerator[bytes, None]:
    """Every partition's events after ``after`` (only new ones when None), history in
    id order across partitions, then live as they come; never ends by itself."""
    yield sse.opening()
    positions: list[str] = (
        [await store.last_event_id() for store in stores]
        if after is None
        else [after] * len(stores)
    )
    while True:
        async with feed.listen(None) as listener:
            async for partition, entry_id, fields in _merged_history(stores, positions):
                yield sse.message(entry_id, fields)
                positions[partition] = entry_id
            try:
                while True:
                    entry = await listener.next(heartbeat)
                    if entry is None:
                        yield sse.HEARTBEAT
                        continue
                    seen = positions[entry.partition]
                    if ids.entry_order(entry.entry_id) <= ids.entry_order(seen):
                        continue
                    yield sse.message(entry.entry_id, entry.fields)
                    positions[entry.partition] = entry.entry_id
            except Interrupted:
                if listener.closed:
                    return


async def _merged_history(
    stores: list[Store], positions: list[str]
) -> AsyncIterator[tuple[int, str, dict[str, str]]]:
    """Each partition's entries after its position, merged in id order."""
    cursors = [_Cursor(store, position) for store, position in zip(stores, positions, strict=True)]
    heap: list[tuple[tuple[int, int], int]] = []
    for p, cursor in enumerate(cursors):
        if await cursor.fill():
            heapq.heappush(heap, (cursor.head(), p))
    while heap:
        _, p = heapq.heappop(heap)
        entry_id, fields = cursors[p].pop()
        yield p, entry_id, fields
        if await cursors[p].fill():
            heapq.heappush(heap, (cursors[p].head(), p))


class _Cursor:
    """One partition's log, read a chunk at a time. The next chunk is read only once
    the held one is used up, so every entry still to come sorts after what was held."""

    def __init__(self, store: Store, after: str) -> None:
        self.store = store
        self.after = after
        self.held: deque[Entry] = deque()
        self.exhausted = False

    async def fill(self) -> bool:
        """Whether an entry is held, reading the next chunk when none is."""
        if not self.held and not self.exhausted:
            chunk = await self.store.events_after(self.after, HISTORY_CHUNK)
            self.exhausted = len(chunk) < HISTORY_CHUNK
            self.held.extend(chunk)
        return bool(self.held)

    def head(self) -> tuple[int, int]:
        return ids.entry_order(self.held[0][0])

    def pop(self) -> Entry:
        entry = self.held.popleft()
        self.after = entry[0]
        return entry
