"""A namespace's partitions: a store per partition on one client, which partition a
group lives in, and how many there are (fixed when the namespace is created)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator, Sequence
from typing import Any

from redis.asyncio.cluster import RedisCluster

from sumbatch.config import ConfigError, Settings
from sumbatch.model import ids
from sumbatch.model.keys import Keys
from sumbatch.store import Retention, Store
from sumbatch.store.base import Client, OwnsClient, connect, is_cluster
from sumbatch.store.inspect import Overview, memory

# On a cluster, a new namespace gets this many partitions per master: several, so that
# load spreads over the masters' cores and a master added later can take some.
PER_MASTER = 3


class Partitions(OwnsClient):
    """One store per partition, all on one client (a cluster client on a cluster)."""

    def __init__(
        self,
        redis: Client,
        namespace: str,
        count: int,
        retention: Retention | None = None,
    ) -> None:
        self.redis = redis
        self.count = count
        self.stores = [
            Store(redis, Keys(namespace, partition, count), retention) for partition in range(count)
        ]

    async def overview(self) -> Overview:
        """Every partition's state and the servers' memory, read concurrently."""
        states, used = await asyncio.gather(
            asyncio.gather(*(store.state() for store in self)), memory(self.redis)
        )
        return Overview(tuple(states), used)

    def __iter__(self) -> Iterator[Store]:
        return iter(self.stores)

    def __len__(self) -> int:
        return self.count

    def of(self, group_or_task_id: str) -> Store:
        """The store of the partition a group, or one of its tasks, lives in."""
        return self.stores[ids.partition_of(group_or_task_id, self.count)]

    def for_new_group(self, idempotency_hash: str | None = None) -> int:
        """The partition of a new group: from its Idempotency-Key's hash (hex), so a
        repeated POST meets the first one's record in the same script; else any."""
        if idempotency_hash is not None:
            return int(idempotency_hash[:8], 16) % self.count
        return random.randrange(self.count)

    def only(self, partitions: Sequence[int] | None) -> list[Store]:
        """The stores of some partitions (all when None); a partition out of range is a
        ConfigError."""
        if partitions is None:
            return list(self.stores)
        wrong = [p for p in partitions if not 0 <= p < self.count]
        if wrong:
            raise ConfigError(
                f"--partitions {','.join(map(str, wrong))}: this namespace has partitions "
                f"0 to {self.count - 1}"
            )
        return [self.stores[p] for p in dict.fromkeys(partitions)]


async def open_partitions(settings: Settings, **options: Any) -> Partitions:
    """The namespace's partitions on a client of their own: a cluster client when the
    server is a cluster node. The first process to open a namespace fixes its number of
    partitions; a setting that disagrees with it later is a ConfigError."""
    url = settings.client_url
    options.setdefault("max_connections", settings.redis_connections)
    cluster = await is_cluster(url, **options)
    client = connect(url, cluster=cluster, **options)
    try:
        count = await partition_count(client, settings)
    except BaseException:
        await client.aclose()
        raise
    if not isinstance(client, RedisCluster):
        # A partition's blocked read (a worker's XREADGROUP, the API's feed) holds a
        # connection for as long as it blocks: room for one each beside the calls.
        client.connection_pool.max_connections += count
    retention = Retention(
        results=settings.result_ttl, cache=settings.cache_ttl, log=settings.log_retention
    )
    return Partitions(client, settings.namespace, count, retention)


async def partition_count(client: Client, settings: Settings) -> int:
    key = Keys.partitions_key(settings.namespace)
    stored = await client.get(key)
    if stored is None:
        if settings.partitions is not None:
            wanted = settings.partitions
        elif isinstance(client, RedisCluster):
            wanted = PER_MASTER * len(client.get_primaries())
        else:
            wanted = 1
        # NX: of two processes that start together, the first one decides.
        await client.set(key, wanted, nx=True)
        stored = await client.get(key)
    text = str(stored)
    if not (text.isdigit() and 1 <= int(text) <= ids.MAX_PARTITIONS):
        raise ConfigError(f"{key} holds {text!r}, not a number of partitions (written by hand?)")
    count = int(text)
    if settings.partitions is not None and settings.partitions != count:
        raise ConfigError(
            f"SUMBATCH_PARTITIONS={settings.partitions} is not valid: namespace "
            f"{settings.namespace!r} was created with {count} partitions, and every "
            "group's id names its partition; see docs/partitions.md on changing it"
        )
    return count


class LazyPartitions:
    """Partitions opened on first use, and again on the next use when that failed: a
    process that must start while Redis is away (the API, which answers 503 then)."""

    def __init__(self, settings: Settings, **options: Any) -> None:
        self.settings = settings
        self.options = options
        self._opened: Partitions | None = None
        self._lock = asyncio.Lock()

    async def get(self) -> Partitions:
        if self._opened is None:
            async with self._lock:
                if self._opened is None:
                    opened = await open_partitions(self.settings, **self.options)
                    try:
                        for store in opened:
                            await store.ensure_worker_group()
                    except BaseException:
                        await opened.aclose()
                        raise
                    self._opened = opened
        return self._opened

    async def aclose(self) -> None:
        if self._opened is not None:
            await self._opened.aclose()
