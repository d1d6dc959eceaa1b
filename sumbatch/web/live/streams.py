"""The bodies of the event streams: history from the log, then live entries from the
feed. A stream that falls behind the feed catches up from the log again, so a slow
client gets every entry, later."""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Callable

from sumbatch.model import ids
from sumbatch.store import Store
from sumbatch.store.base import Entry
from sumbatch.web.live import sse
from sumbatch.web.live.feed import Feed, Interrupted

HISTORY_CHUNK = 1000


async def group_events(
    store: Store, feed: Feed, gid: str, after: str | None, heartbeat: float
) -> AsyncGenerator[bytes, None]:
    """One group's events after ``after`` (all when None); ends after GroupFinished."""

    async def history(positions: dict[int, str]) -> AsyncIterator[Entered]:
        p = store.keys.partition
        while True:
            chunk = await store.group_history(gid, positions[p], HISTORY_CHUNK)
            for entry_id, fields in chunk:
                yield p, entry_id, fields
            if len(chunk) < HISTORY_CHUNK:
                return

    positions = {store.keys.partition: after or "0-0"}
    async for chunk in _events(feed, gid, positions, history, heartbeat, ends=_finished):
        yield chunk


async def log_events(
    stores: list[Store], feed: Feed, after: str | None, heartbeat: float
) -> AsyncGenerator[bytes, None]:
    """Every partition's events after ``after`` (only new ones when None), history in
    id order across partitions, then live as they come; never ends by itself."""
    starts = [after] * len(stores) if after else [await s.last_event_id() for s in stores]
    positions = dict(enumerate(starts))

    def history(positions: dict[int, str]) -> AsyncIterator[Entered]:
        return _merged_history(stores, positions)

    async for chunk in _events(feed, None, positions, history, heartbeat, ends=_never):
        yield chunk


# (partition, entry id, fields)
Entered = tuple[int, str, dict[str, str]]


def _finished(fields: dict[str, str]) -> bool:
    return fields.get("type") == "GroupFinished"


def _never(fields: dict[str, str]) -> bool:
    return False


async def _events(
    feed: Feed,
    group: str | None,
    positions: dict[int, str],
    history: Callable[[dict[int, str]], AsyncIterator[Entered]],
    heartbeat: float,
    ends: Callable[[dict[str, str]], bool],
) -> AsyncGenerator[bytes, None]:
    """A stream's body: listen, send the history after each partition's position (what
    came before the listener existed included), then live entries past those positions,
    until an entry ``ends`` it, the feed closes, or the client leaves. A listener that
    falls behind is dropped and the history read again from where the stream is."""
    yield sse.opening()
    while True:
        async with feed.listen(group) as listener:
            async for partition, entry_id, fields in history(positions):
                yield sse.message(entry_id, fields)
                positions[partition] = entry_id
                if ends(fields):
                    return
            try:
                while True:
                    entry = await listener.next(heartbeat)
                    if entry is None:
                        yield sse.HEARTBEAT
                        continue
                    seen = positions[entry.partition]
                    if ids.entry_order(entry.entry_id) <= ids.entry_order(seen):
                        if ends(entry.fields):
                            return  # the end came before the position the stream began at
                        continue
                    yield sse.message(entry.entry_id, entry.fields)
                    positions[entry.partition] = entry.entry_id
                    if ends(entry.fields):
                        return
            except Interrupted:
                if listener.closed:
                    return


async def _merged_history(stores: list[Store], positions: dict[int, str]) -> AsyncIterator[Entered]:
    """Each partition's entries after its position, merged in id order."""
    cursors = [_Cursor(store, positions[p]) for p, store in enumerate(stores)]
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
