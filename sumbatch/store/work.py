"""The workers' steps on their tasks: begin (the attempt counted, the cache read), log
progress, find the tasks that ended elsewhere, and record outcomes through the
completion fence, which acknowledges a work entry once every task in it has ended.
Reading and claiming the entries is ``claims.py``'s."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

from redis.asyncio.cluster import RedisCluster

from sumbatch.model.events import (
    AnyEvent,
    TaskCompleted,
    TaskDeadLettered,
    TaskFailed,
    TaskSubmitted,
    to_flat,
)
from sumbatch.model.keys import WORKER_GROUP
from sumbatch.store.base import StoreBase, _json
from sumbatch.store.entries import entry_of


@dataclass(frozen=True)
class Outcome:
    """One ended task, ready for the completion fence."""

    # The task's key: its work entry's id, or ``task_key`` for a task of a slice.
    key: str
    event: TaskCompleted | TaskFailed
    param_a: int
    param_b: int
    # How long the run that produced it took, its simulated delay included; None when
    # nothing ran (a cache hit, or a task given up on).
    seconds: float | None = None


@dataclass(frozen=True)
class Begun:
    """What the begin script decided for one task."""

    # ended: already ended, or its group is gone (its entry acknowledged once every
    # task in it has ended); cached: answered from
    # the cache (``value`` is the sum); run: run it (``value`` is the attempt number,
    # counted across workers); refused: its task is outside its group, or its group's
    # keys are not what sumbatch wrote (left pending, untouched).
    kind: Literal["ended", "cached", "run", "refused"]
    value: int = 0


_BEGUN_KINDS: tuple[Literal["ended", "cached", "run", "refused"], ...] = (
    "ended", "cached", "run", "refused"
)  # fmt: skip


@dataclass(frozen=True)
class Completed:
    recorded: int  # outcomes that ended their task (the others had ended before)
    # Entries refused and left pending: their group's keys are not what sumbatch
    # wrote (a hand-made key), or their index is outside the group.
    refused: list[str]


class TaskSteps(StoreBase):
    """Begin, progress and completion of tasks: each step one script."""

    @property
    def cache_in_scripts(self) -> bool:
        """Whether the cache keys share the partition's hash tag (one partition), so
        that the begin and completion scripts read and write the cache themselves: two
        round trips per batch fewer. With several partitions each sum's key is in a
        slot of its own, read and written beside them."""
        return self.keys.partitions == 1

    async def begin(self, items: Sequence[TaskSubmitted], keys: Sequence[str]) -> list[Begun]:
        """Begin tasks, each named by its key (``task_key``, or a one-task entry's id)."""
        group_keys, gids = self._declare(item.group_task_id for item in items)
        params = [(item.param_a, item.param_b) for item in items]
        cache_keys: list[str] = []
        if self.cache_in_scripts:
            cached: list[str | None] = [None] * len(items)
            cache_keys = [self.keys.cache(a, b) for a, b in params]
        else:
            cached = await self._cached(params)
        payload = [
            (entry_id, item.group_task_id, item.index, sum_ or "", first, count)
            for key, item, sum_ in zip(keys, items, cached, strict=True)
            for entry_id, first, count in [entry_of(key, item.index)]
        ]
        first_cache = 3 + len(group_keys) if cache_keys else 0
        args: list[str | int | bytes] = [WORKER_GROUP, gids, _json.encode(payload), first_cache]
        # Once per call: a resend of a begin that ran counts no attempt more.
        decisions: Any = await self._once(
            self._begin, [self.keys.work], [*group_keys, *cache_keys], args
        )
        return [Begun(_BEGUN_KINDS[int(d[0])], int(d[1]) if len(d) > 1 else 0) for d in decisions]

    async def release_ended(self, items: Sequence[TaskSubmitted], keys: Sequence[str]) -> list[str]:
        """The keys of the tasks that have ended (a cancel revoked them, or they finished
        elsewhere) or whose group is gone: their runs can stop. Their entries are
        acknowledged once every task in them has ended. The others' runs go on."""
        payload = [
            (key, item.group_task_id, item.index, *entry_of(key, item.index))
            for key, item in zip(keys, items, strict=True)
        ]
        group_keys, gids = self._declare(item.group_task_id for item in items)
        args: list[str | bytes] = [WORKER_GROUP, gids, _json.encode(payload)]
        declared = [self.keys.work, *group_keys]
        return cast(list[str], await self._release_ended(keys=declared, args=args))

    async def next_attempt(self, group_task_id: str, index: int) -> int:
        """The next attempt number of a task, counted in Redis (0 if its group is gone)."""
        keys = [self.keys.attempts(group_task_id), self.keys.ledger(group_task_id)]
        # Not resent with the same token by a later call: the same arguments again are
        # the task's next attempt.
        counted: Any = await self._once(self._next_attempt, keys, [], [index], resent=False)
        return int(counted)

    async def append(self, events: Sequence[AnyEvent]) -> None:
        if events:
            flat = to_flat(list(events))
            payload = [(e.group_task_id, f) for e, f in zip(events, flat, strict=True)]
            group_keys, gids = self._declare(e.group_task_id for e in events)
            await self._once(
                self._append, [self.keys.events], group_keys, [gids, _json.encode(payload)]
            )

    async def complete(self, outcomes: Sequence[Outcome]) -> Completed:
        group_keys, gids = self._declare(outcome.event.group_task_id for outcome in outcomes)
        in_scripts = self.cache_in_scripts
        cache_keys: list[str] = []
        items = []
        sums: list[tuple[str, tuple[int, int], int]] = []
        for outcome in outcomes:
            event = outcome.event
            gid = event.group_task_id
            after: list[AnyEvent] = []
            cache_at, sum_ = 0, ""
            if isinstance(event, TaskCompleted):
                state = "CACHED" if event.from_cache else "SUCCESS"
                if not event.from_cache and in_scripts:
                    cache_keys.append(self.keys.cache(outcome.param_a, outcome.param_b))
                    cache_at, sum_ = 5 + len(group_keys) + len(cache_keys), str(event.result)
                elif not event.from_cache:
                    params = (outcome.param_a, outcome.param_b)
                    sums.append((outcome.key, params, event.result))
            else:
                state = "FAILURE"
                after.append(
                    TaskDeadLettered(
                        task_id=event.task_id,
                        group_task_id=gid,
                        index=event.index,
                        param_a=outcome.param_a,
                        param_b=outcome.param_b,
                        error=event.error,
                    )
                )
            flat = to_flat([event, *after])
            seconds = -1.0 if outcome.seconds is None else max(0.0, outcome.seconds)
            items.append(
                (
                    outcome.key, event.index, gid, state, flat[0], flat[1:], seconds,
                    cache_at, sum_, *entry_of(outcome.key, event.index),
                )
            )  # fmt: skip
        keys = [self.keys.events, self.keys.work, self.keys.dead_letters, self.keys.stats]
        args: list[str | int | bytes] = [
            WORKER_GROUP,
            self.retention.results,
            gids,
            _json.encode(items),
            self.retention.cache,
        ]
        reply: Any = await self._once(self._complete, keys, [*group_keys, *cache_keys], args)
        recorded, refused = reply
        # Several partitions: after the fence, not in it. A sum is the same whoever
        # computes it, so losing this write (a crash just now) costs a cache miss,
        # nothing more. Only sums of outcomes the fence let through: a revoked run
        # leaves nothing behind.
        through = set(recorded)
        await self._cache(
            {params: result for entry_id, params, result in sums if entry_id in through}
        )
        return Completed(len(recorded), [str(entry_id) for entry_id in refused])

    async def _cached(self, params: Sequence[tuple[int, int]]) -> list[str | None]:
        """The cached sum of each pair of parameters, or None."""
        keys = [self.keys.cache(a, b) for a, b in params]
        if isinstance(self.redis, RedisCluster):
            # Keys in many slots: one MGET per slot, sent node by node.
            return cast(list[str | None], await self.redis.mget_nonatomic(keys))
        return cast(list[str | None], await self.redis.mget(keys))

    async def _cache(self, sums: dict[tuple[int, int], int]) -> None:
        if not sums:
            return
        # Cache keys in slots of their own: not one script's keys.
        pipe = self.redis.pipeline(transaction=False)
        for (a, b), result in sums.items():
            pipe.set(self.keys.cache(a, b), result, ex=self.retention.cache)
        await pipe.execute()
