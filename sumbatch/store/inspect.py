"""What /metrics and /system read from Redis, in one place: each partition's state in
one script run (one instant per partition), and each server's memory.

The counters and histograms come from the partitions' stats hashes, which the scripts
that append events write in the same step (``scripts/stats.py``); the rest is what the
server says of its streams: XLEN, XINFO GROUPS and XINFO CONSUMERS of the work stream,
and the log entries after the projector's position.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio.cluster import RedisCluster
from redis.exceptions import NoPermissionError, ResponseError

from sumbatch.model.keys import WORKER_GROUP
from sumbatch.outage import refusal
from sumbatch.scripts.stats import COUNTERS, HISTOGRAMS, Histogram
from sumbatch.store.base import Client, StoreBase

# The projector's lag is counted entry by entry in the server (about 4 us each), up to
# this many on either side of its position (``scripts/inspect.py``): a projector more
# than this far behind, with more than this many entries before its position still
# kept, reads as this many.
LAG_CAP = 1000


@dataclass(frozen=True)
class Consumer:
    """A worker as its partition's consumer group sees it (XINFO CONSUMERS)."""

    name: str
    partition: int
    pending: int  # entries handed to it and not yet acknowledged
    idle_ms: int  # since its last read or claim


@dataclass(frozen=True)
class HistogramState:
    """A histogram as the stats hash keeps it: a count per bucket (not cumulative),
    +Inf last, and the sum of the values."""

    buckets: tuple[int, ...]
    sum: float

    @property
    def count(self) -> int:
        return sum(self.buckets)

    def cumulative(self) -> list[int]:
        """Each bucket's count with those below it: Prometheus' ``le`` buckets."""
        total, out = 0, []
        for n in self.buckets:
            total += n
            out.append(total)
        return out

    def __add__(self, other: HistogramState) -> HistogramState:
        pairs = zip(self.buckets, other.buckets, strict=True)
        return HistogramState(tuple(a + b for a, b in pairs), self.sum + other.sum)

    @classmethod
    def empty(cls, histogram: Histogram) -> HistogramState:
        return cls((0,) * (len(histogram.bounds) + 1), 0.0)


@dataclass(frozen=True)
class PartitionState:
    partition: int
    time_ms: int  # the server's clock when it was read
    work_length: int
    event_log_length: int
    dead_letters: int
    rejected: int  # log entries the projector set aside
    work_pending: int  # handed out, not yet acknowledged
    work_lag: int | None  # not yet handed out (queued, or in the stream); None: unknown
    consumers: tuple[Consumer, ...]
    projector_lag: int | None  # log entries the views do not include; None: unknown
    counters: Mapping[str, int]
    histograms: Mapping[str, HistogramState]


@dataclass(frozen=True)
class Overview:
    """Every partition's state, and the memory each server uses."""

    partitions: tuple[PartitionState, ...]
    # used_memory per server (each master on a cluster); empty when INFO is refused.
    memory: Mapping[str, int]

    @property
    def time_ms(self) -> int:
        return max(p.time_ms for p in self.partitions)

    def counter(self, name: str) -> int:
        return sum(p.counters[name] for p in self.partitions)

    def histogram(self, histogram: Histogram) -> HistogramState:
        total = HistogramState.empty(histogram)
        for p in self.partitions:
            total += p.histograms[histogram.name]
        return total

    def total(self, values: Sequence[int | None]) -> int | None:
        """A sum over partitions, None when any partition's value is unknown."""
        return None if any(v is None for v in values) else sum(v or 0 for v in values)


class Inspector(StoreBase):
    async def state(self) -> PartitionState:
        """This partition's state, read in one script run."""
        keys = self.keys
        now, lengths, group, consumers, flat, lag = await self._inspect(
            keys=[
                keys.work,
                keys.events,
                keys.dead_letters,
                keys.rejected,
                keys.stats,
                keys.projector_position,
                keys.fair_keys,
            ],
            args=[WORKER_GROUP, LAG_CAP, keys.fair_groups_prefix, keys.queue_prefix],
        )
        stats = dict(zip(flat[::2], flat[1::2], strict=True))
        work, events, dead, rejected = (int(n) for n in lengths)
        return PartitionState(
            partition=keys.partition,
            time_ms=int(now),
            work_length=work,
            event_log_length=events,
            dead_letters=dead,
            rejected=rejected,
            work_pending=int(group[0]) if group else 0,
            work_lag=int(group[1]) if group and int(group[1]) >= 0 else None,
            consumers=tuple(
                Consumer(
                    str(consumers[j]), keys.partition, int(consumers[j + 1]), int(consumers[j + 2])
                )  # fmt: skip
                for j in range(0, len(consumers), 3)
            ),
            projector_lag=None if int(lag) < 0 else int(lag),
            counters={name: _number(stats.get(name), int) for name in COUNTERS},
            histograms={h.name: _histogram(h, stats) for h in HISTOGRAMS},
        )


def _number(text: Any, kind: type[int] | type[float]) -> Any:
    """A stats field's value; 0 when absent (nothing counted yet) or not a number
    (written by hand: the scripts' pcall leaves such a field alone)."""
    try:
        return kind(text) if text is not None else kind(0)
    except ValueError:
        return kind(0)


def _histogram(histogram: Histogram, stats: Mapping[str, str]) -> HistogramState:
    buckets = tuple(_number(stats.get(field), int) for field in histogram.buckets)
    return HistogramState(buckets, _number(stats.get(histogram.sum), float))


async def memory(client: Client) -> dict[str, int]:
    """``used_memory`` of the server, or of each master of a cluster, by address; empty
    when the server refuses INFO to this user (an ACL) or does not know it."""
    try:
        if isinstance(client, RedisCluster):
            return {
                node.name: int((await client.info("memory", target_nodes=node))["used_memory"])
                for node in client.get_primaries()
            }
        info = await client.info("memory")
    except (NoPermissionError, ResponseError) as exc:
        if refusal(exc) is not None:
            raise
        return {}
    where = client.connection_pool.connection_kwargs
    address = where.get("path") or f"{where.get('host')}:{where.get('port')}"
    return {str(address): int(info["used_memory"])}
