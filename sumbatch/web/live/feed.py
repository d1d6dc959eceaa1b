"""One reader per partition follows the event log and hands each new entry to the
requests waiting on it, so a thousand waiting clients cost one blocked XREAD per
partition, not a thousand connections.

The feed starts at the log's newest entry. A request that also reads history (an
event stream, a long-poll's first look) listens first and reads the history after,
so every entry is in one or the other: one appended before the listener existed is
in the history read, one appended after is read by the feed after. Entries in both
are told apart by id.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from sumbatch.outage import Outage
from sumbatch.store import Store

log = logging.getLogger("sumbatch.api")

# Under the API's socket timeout (1 s): a blocked read must not look like a hung server.
READ_BLOCK_MS = 500
READ_COUNT = 1000
# Seconds the feed reads on after its last listener left, for the next one.
LINGER = 5.0
# Entries a listener holds for its request before it is told to catch up from the log.
LISTENER_LIMIT = 10_000


@dataclass(frozen=True, slots=True)
class FeedEntry:
    partition: int
    entry_id: str
    fields: dict[str, str]


class Interrupted(Exception):
    """The listener missed entries (its request fell behind) or the feed closed."""


class Listener:
    """The entries of one group (or of every group), for one request."""

    def __init__(self, group: str | None, limit: int = LISTENER_LIMIT) -> None:
        self.group = group
        self._queue: asyncio.Queue[FeedEntry] = asyncio.Queue(limit)
        self._wake = asyncio.Event()
        self.overflowed = False
        self.closed = False

    def offer(self, entry: FeedEntry) -> None:
        if self.overflowed or self.closed:
            return
        try:
            self._queue.put_nowait(entry)
        except asyncio.QueueFull:
            self.overflowed = True
            self._wake.set()

    def close(self) -> None:
        self.closed = True
        self._wake.set()

    async def next(self, within: float) -> FeedEntry | None:
        """The next entry, or None when ``within`` seconds pass first. Raises
        Interrupted once the feed closed, or when this listener fell behind (after the
        entries it still holds)."""
        if not self._queue.empty() and not self.closed:
            return self._queue.get_nowait()
        if self.closed or self.overflowed:
            raise Interrupted("closed" if self.closed else "fell behind")
        getter = asyncio.ensure_future(self._queue.get())
        woken = asyncio.ensure_future(self._wake.wait())
        try:
            done, _ = await asyncio.wait(
                {getter, woken}, timeout=max(within, 0), return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            woken.cancel()
            if not getter.done():
                getter.cancel()
        if getter in done and not getter.cancelled():
            return getter.result()
        if self.closed or self.overflowed:
            raise Interrupted("closed" if self.closed else "fell behind")
        return None


class Feed:
    """Follows every partition's log while anyone listens (and ``LINGER`` seconds
    after, for the next request), so an API nobody watches reads nothing."""

    def __init__(
        self, stores: list[Store], linger: float = LINGER, listener_limit: int = LISTENER_LIMIT
    ) -> None:
        self.stores = stores
        self.linger = linger
        self.listener_limit = listener_limit
        self._by_group: dict[str, set[Listener]] = {}
        self._everything: set[Listener] = set()
        self._listening = 0
        self._readers: list[asyncio.Task[None]] = []
        self._start_lock = asyncio.Lock()
        self.running = False
        self.closed = False
        # Each start's readers carry its number: a reader of an earlier start (still in
        # its last read when the feed stopped and started again) drops what it read.
        self._generation = 0

    @asynccontextmanager
    async def listen(self, group: str | None) -> AsyncIterator[Listener]:
        """A listener for one group's entries, or for every entry (``None``). Entered,
        it is registered and the feed reads: whatever the log gets from then on
        reaches it. Raises what Redis raises while it is away."""
        listener = Listener(group, self.listener_limit)
        if self.closed:
            listener.close()
        listeners = self._everything if group is None else self._by_group.setdefault(group, set())
        listeners.add(listener)
        self._listening += 1
        try:
            await self._start()
            yield listener
        finally:
            self._listening -= 1
            listeners.discard(listener)
            if group is not None and not listeners:
                self._by_group.pop(group, None)

    async def _start(self) -> None:
        """Read on from each partition's newest entry, unless already reading. Called
        after a listener is registered, so no entry after that is missed."""
        async with self._start_lock:
            if self.running or self.closed:
                return
            newest = [await store.last_event_id() for store in self.stores]
            self._generation += 1
            self._readers = [
                asyncio.create_task(
                    self._follow(p, store, after, self._generation), name=f"feed-{p}"
                )
                for p, (store, after) in enumerate(zip(self.stores, newest, strict=True))
            ]
            self.running = True

    def _dispatch(self, entry: FeedEntry) -> None:
        for listener in self._everything:
            listener.offer(entry)
        group = entry.fields.get("groupTaskId")
        if group is not None:
            for listener in self._by_group.get(group, ()):
                listener.offer(entry)

    async def _follow(self, partition: int, store: Store, after: str, generation: int) -> None:
        outage = Outage(log, f"event feed {partition}")
        loop = asyncio.get_running_loop()
        heard = loop.time()
        while generation == self._generation and self.running:
            if self._listening:
                heard = loop.time()
            elif loop.time() - heard > self.linger:
                # No await between this check and the flag: a listener registered
                # after it finds the feed stopped, and starts it again.
                self.running = False
                return
            try:
                entries = await store.read_events(after, READ_COUNT, READ_BLOCK_MS)
                outage.ok()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis away: back off and read on from `after`
                await asyncio.sleep(outage.failed(exc))
                continue
            if generation != self._generation:
                return
            for entry_id, fields in entries:
                self._dispatch(FeedEntry(partition, entry_id, fields))
                after = entry_id

    async def close(self) -> None:
        """End every listener (their requests answer or end now) and stop reading."""
        self.closed = True
        for listener in self._everything:
            listener.close()
        for listeners in self._by_group.values():
            for listener in listeners:
                listener.close()
        for reader in self._readers:
            reader.cancel()
        await asyncio.gather(*self._readers, return_exceptions=True)
        self._readers = []
