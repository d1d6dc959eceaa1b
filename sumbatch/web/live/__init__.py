"""The API's live endpoints: long-poll (``?wait=``) and server-sent event streams, all
fed by one reader of the event log per partition (``feed``). Part of ``web``: may import
what ``web`` may, and ``web``'s ``state`` and ``responses``."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

from sumbatch.config import Settings
from sumbatch.store import Store
from sumbatch.web.live.feed import Feed

V = TypeVar("V")


class Slots:
    """A cap on requests holding something at once (waiting, streaming)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def take(self) -> bool:
        if self.used >= self.limit:
            return False
        self.used += 1
        return True

    def give(self) -> None:
        self.used -= 1


class Live:
    """What the live endpoints of one API process share."""

    def __init__(self, settings: Settings) -> None:
        self._feed: Feed | None = None
        self.waiters = Slots(settings.max_waiters)
        self.streams = Slots(settings.max_streams)
        self.heartbeat = settings.heartbeat
        self.closing = False

    def feed(self, stores: list[Store]) -> Feed:
        """The feed of these partitions' logs (made on first use: the partitions are
        known once Redis has answered)."""
        if self._feed is None:
            self._feed = Feed(stores)
            self._feed.closed = self.closing
        return self._feed

    async def waited(
        self, stores: list[Store], current: V, waiting: Callable[[Feed], Awaitable[V]]
    ) -> V:
        """What ``waiting`` answers, holding one of the waiters' places; ``current`` at
        once when none is left or the server is stopping."""
        if self.closing or not self.waiters.take():
            return current
        try:
            return await waiting(self.feed(stores))
        finally:
            self.waiters.give()

    async def close(self) -> None:
        """The server is stopping: waiting requests answer now, streams end."""
        self.closing = True
        if self._feed is not None:
            await self._feed.close()
