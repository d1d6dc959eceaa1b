"""The API's live endpoints: long-poll (``?wait=``) and server-sent event streams, all
fed by one reader of the event log per partition (``feed``)."""

from __future__ import annotations

from sumbatch.config import Settings
from sumbatch.live.feed import Feed
from sumbatch.store import Store


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
        self.feed = Feed()
        self.waiters = Slots(settings.max_waiters)
        self.streams = Slots(settings.max_streams)
        self.heartbeat = settings.heartbeat

    @property
    def closing(self) -> bool:
        return self.feed.closed

    async def ready(self, stores: list[Store]) -> Feed:
        """The feed, following every partition (started on first use: Redis may have
        been away when the API started)."""
        await self.feed.start(stores)
        return self.feed

    async def close(self) -> None:
        """The server is stopping: waiting requests answer now, streams end."""
        await self.feed.close()
