"""The only module that talks to Redis about the log. Every step that must be atomic
(submission, start, completion, projection commit) is one Lua script here, so the
rules that keep work from being lost or doubled live in one file.

Streams, in brief: the event log is append-only; the work stream is read by the
``workers`` consumer group, whose pending-entries list (PEL) holds what was handed out
and not yet acknowledged. An entry leaves the PEL only inside the completion script,
together with the result event, so a crash at any point leaves it pending for
XAUTOCLAIM, never lost.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import msgspec
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from sumbatch.events import (
    WORKER_GROUP,
    AnyEvent,
    Keys,
    TaskCompleted,
    TaskFailed,
    TaskSubmitted,
    cache_field,
    from_fields,
    to_fields,
)
from sumbatch.projection import GroupView, TaskView, Views

Redis = aioredis.Redis
Entry = tuple[str, dict[str, str]]

_group_view_decoder = msgspec.json.Decoder(GroupView)
_task_view_decoder = msgspec.json.Decoder(TaskView)
_json = msgspec.json.Encoder()


def connect(url: str, **options: Any) -> Redis:
    options.setdefault("decode_responses", True)
    options.setdefault("health_check_interval", 15)
    options.setdefault("socket_connect_timeout", 5)
    client: Redis = aioredis.Redis.from_url(url, **options)
    return client


def _flatten(fields: dict[str, str]) -> list[str]:
    flat = [str(len(fields) * 2)]
    for name, value in fields.items():
        flat += (name, value)
    return flat


# Shared Lua helper: read one "n, f1, v1, ..." run of ARGV starting at i.
_READ_FIELDS = """
local function read_fields(i)
  local n = tonumber(ARGV[i])
  local t = {}
  for j = 1, n do t[j] = ARGV[i + j] end
  return t, i + n + 1
end
"""

# KEYS: events, work, ledger, group log, group view, task views...
# ARGV: tasksTotal, group view json, n events, events..., task view jsons...
_SUBMIT = (
    _READ_FIELDS
    + """
local i = 4
for _ = 1, tonumber(ARGV[3]) do
  local fields
  fields, i = read_fields(i)
  local id = redis.call('XADD', KEYS[1], '*', unpack(fields))
  redis.call('XADD', KEYS[4], id, unpack(fields))
  if fields[2] == 'TaskSubmitted' then
    redis.call('XADD', KEYS[2], '*', unpack(fields))
  end
end
redis.call('HSET', KEYS[3], 'total', ARGV[1], 'finished', 0, 'failed', 0)
redis.call('SET', KEYS[5], ARGV[2])
for k = 6, #KEYS do
  redis.call('SET', KEYS[k], ARGV[i])
  i = i + 1
end
return 1
"""
)

# Decide, per handed-out work entry, what a worker does with it.
# KEYS: work, cache, then one ledger per item.  ARGV: group, then per item: entry id,
# task id, cache field.  Returns per item {0} ended already (acked here), {1, result}
# cache hit, or {2, attempt} run it (attempt counted across every worker).
_BEGIN = """
local out = {}
local a = 2
for k = 3, #KEYS do
  local entry, tid, field = ARGV[a], ARGV[a + 1], ARGV[a + 2]
  a = a + 3
  if redis.call('HEXISTS', KEYS[k], 't:' .. tid) == 1 then
    redis.call('XACK', KEYS[1], ARGV[1], entry)
    out[#out + 1] = {0}
  else
    local cached = redis.call('HGET', KEYS[2], field)
    if cached then
      out[#out + 1] = {1, cached}
    else
      out[#out + 1] = {2, redis.call('HINCRBY', KEYS[k], 'a:' .. tid, 1)}
    end
  end
end
return out
"""

# Append events to the log and to their group's audit stream with the same id.
# KEYS: events, then one group log per event. ARGV: the events' fields.
_APPEND = (
    _READ_FIELDS
    + """
local i = 1
for k = 2, #KEYS do
  local fields
  fields, i = read_fields(i)
  local id = redis.call('XADD', KEYS[1], '*', unpack(fields))
  redis.call('XADD', KEYS[k], id, unpack(fields))
end
return #KEYS - 1
"""
)

# The completion fence. Per item, atomically: if the task has no outcome yet, record
# it, append the outcome event, cache a computed sum and, when it was the group's last
# task, append GroupFinished; in every case acknowledge the work entry.
# KEYS: events, work, cache, then per item: ledger, group log.
# ARGV: group, then per item: entry id, task id, group id, state, cache field ('' for
# none), result, event fields.  Returns the number of outcomes recorded.
_COMPLETE = (
    _READ_FIELDS
    + """
local recorded = 0
local i = 2
for k = 4, #KEYS, 2 do
  local ledger, log = KEYS[k], KEYS[k + 1]
  local entry, tid, gid, state, field, result = unpack(ARGV, i, i + 5)
  local fields
  fields, i = read_fields(i + 6)
  if redis.call('HSETNX', ledger, 't:' .. tid, state) == 1 then
    recorded = recorded + 1
    local id = redis.call('XADD', KEYS[1], '*', unpack(fields))
    redis.call('XADD', log, id, unpack(fields))
    if field ~= '' then redis.call('HSET', KEYS[3], field, result) end
    local failed = tonumber(redis.call('HGET', ledger, 'failed') or '0')
    if state == 'FAILURE' then failed = redis.call('HINCRBY', ledger, 'failed', 1) end
    local finished = redis.call('HINCRBY', ledger, 'finished', 1)
    local total = tonumber(redis.call('HGET', ledger, 'total') or '-1')
    if finished == total then
      -- Mirrors events.GroupFinished; tests decode it with events.from_fields.
      local done = {'type', 'GroupFinished', 'groupTaskId', gid,
                    'tasksTotal', tostring(total), 'tasksFailed', tostring(failed),
                    'succeeded', failed == 0 and 'true' or 'false'}
      id = redis.call('XADD', KEYS[1], '*', unpack(done))
      redis.call('XADD', log, id, unpack(done))
    end
  end
  redis.call('XACK', KEYS[2], ARGV[1], entry)
end
return recorded
"""
)

# Reset the idle time of entries this consumer still owns, so that a live worker keeps
# its long tasks. KEYS: work. ARGV: group, consumer, ids... Returns the ids another
# consumer took over (ids no longer pending were acknowledged: nothing to renew).
_RENEW = """
local lost = {}
for a = 3, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[a], ARGV[a], 1)
  if p[1] then
    if p[1][2] == ARGV[2] then
      redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[a], 'JUSTID')
    else
      lost[#lost + 1] = ARGV[a]
    end
  end
end
return lost
"""

# Write views and the position they include, only if nobody moved the position since
# they were read (compare-and-set), so two projectors can never both apply an event.
# KEYS: position, view keys... ARGV: expected position ('' = none), new position,
# view jsons...
_COMMIT = """
local current = redis.call('GET', KEYS[1]) or ''
if current ~= ARGV[1] then return 0 end
for k = 2, #KEYS do redis.call('SET', KEYS[k], ARGV[k + 1]) end
redis.call('SET', KEYS[1], ARGV[2])
return 1
"""


@dataclass(frozen=True)
class Outcome:
    """One ended task, ready for the completion fence."""

    entry_id: str
    event: TaskCompleted | TaskFailed
    param_a: int
    param_b: int


class Store:
    """Log, work and view I/O for one namespace."""

    def __init__(self, redis: Redis, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys
        self._submit = redis.register_script(_SUBMIT)
        self._begin = redis.register_script(_BEGIN)
        self._append = redis.register_script(_APPEND)
        self._complete = redis.register_script(_COMPLETE)
        self._renew = redis.register_script(_RENEW)
        self._commit = redis.register_script(_COMMIT)

    # -- producer -------------------------------------------------------------

    async def submit(self, events: Sequence[AnyEvent], views: Views) -> None:
        """Append a group's events and work entries, and its initial views, or nothing."""
        (group,) = views.groups.values()
        gid = group.group_task_id
        args: list[str | int] = [group.tasks_total, _json.encode(group).decode(), len(events)]
        for event in events:
            args += _flatten(to_fields(event))
        keys = [
            self.keys.events,
            self.keys.work,
            self.keys.ledger(gid),
            self.keys.group_log(gid),
            self.keys.group_view(gid),
        ]
        for task in views.tasks.values():
            keys.append(self.keys.task_view(task.task_id))
            args.append(_json.encode(task).decode())
        await self._submit(keys=keys, args=args)

    # -- consumer group (workers) ---------------------------------------------

    async def ensure_worker_group(self) -> None:
        try:
            await self.redis.xgroup_create(self.keys.work, WORKER_GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def read_work(self, consumer: str, count: int, block_ms: int) -> list[Entry]:
        reply: Any = await self.redis.xreadgroup(
            WORKER_GROUP, consumer, {self.keys.work: ">"}, count=count, block=block_ms
        )
        return cast(list[Entry], reply[0][1]) if reply else []

    async def autoclaim(
        self, consumer: str, min_idle_ms: int, count: int = 500, max_pages: int = 20
    ) -> list[Entry]:
        """Take over entries idle longer than ``min_idle_ms`` (their worker is dead or
        stuck). Entries deleted from the stream meanwhile are acknowledged."""
        claimed: list[Entry] = []
        cursor = "0-0"
        for _ in range(max_pages):
            cursor, entries, deleted = await self.redis.xautoclaim(
                self.keys.work, WORKER_GROUP, consumer, min_idle_ms, cursor, count=count
            )
            claimed += [(eid, fields) for eid, fields in entries if fields]
            if deleted:
                await self.redis.xack(self.keys.work, WORKER_GROUP, *deleted)
            if cursor == "0-0":
                break
        return claimed

    async def begin(self, items: Sequence[TaskSubmitted], entry_ids: Sequence[str]) -> list[Any]:
        keys = [self.keys.work, self.keys.cache]
        args: list[str] = [WORKER_GROUP]
        for entry_id, item in zip(entry_ids, items, strict=True):
            keys.append(self.keys.ledger(item.group_task_id))
            args += (entry_id, item.task_id, cache_field(item.param_a, item.param_b))
        return cast(list[Any], await self._begin(keys=keys, args=args))

    async def append(self, events: Iterable[AnyEvent]) -> None:
        keys = [self.keys.events]
        args: list[str] = []
        for event in events:
            keys.append(self.keys.group_log(event.group_task_id))
            args += _flatten(to_fields(event))
        if len(keys) > 1:
            await self._append(keys=keys, args=args)

    async def complete(self, outcomes: Sequence[Outcome]) -> int:
        keys = [self.keys.events, self.keys.work, self.keys.cache]
        args: list[str] = [WORKER_GROUP]
        for outcome in outcomes:
            event = outcome.event
            gid = event.group_task_id
            keys += (self.keys.ledger(gid), self.keys.group_log(gid))
            if isinstance(event, TaskCompleted):
                state = "SUCCESS"
                field = "" if event.from_cache else cache_field(outcome.param_a, outcome.param_b)
                result = str(event.result)
            else:
                state, field, result = "FAILURE", "", ""
            args += (outcome.entry_id, event.task_id, gid, state, field, result)
            args += _flatten(to_fields(event))
        return int(await self._complete(keys=keys, args=args))

    async def renew(self, consumer: str, entry_ids: Sequence[str]) -> list[str]:
        """Keep our claim on ``entry_ids``; returns those another worker took over."""
        if not entry_ids:
            return []
        lost = await self._renew(keys=[self.keys.work], args=[WORKER_GROUP, consumer, *entry_ids])
        return cast(list[str], lost)

    # -- event log: projector, replay, audit ----------------------------------

    async def read_events(self, after: str, count: int, block_ms: int | None) -> list[Entry]:
        reply: Any = await self.redis.xread({self.keys.events: after}, count=count, block=block_ms)
        return cast(list[Entry], reply[0][1]) if reply else []

    async def event_range(self, start: str = "-", end: str = "+", count: int = 1000) -> list[Entry]:
        return cast(list[Entry], await self.redis.xrange(self.keys.events, start, end, count))

    async def group_history(self, group_task_id: str) -> list[Entry]:
        return cast(list[Entry], await self.redis.xrange(self.keys.group_log(group_task_id)))

    async def position(self) -> str | None:
        return cast(str | None, await self.redis.get(self.keys.projector_position))

    async def load_views(self, group_ids: Iterable[str], task_ids: Iterable[str]) -> Views:
        gids, tids = list(group_ids), list(task_ids)
        keys = [self.keys.group_view(g) for g in gids] + [self.keys.task_view(t) for t in tids]
        views = Views()
        if not keys:
            return views
        raw = await self.redis.mget(keys)
        for gid, blob in zip(gids, raw[: len(gids)], strict=True):
            if blob is not None:
                views.groups[gid] = _group_view_decoder.decode(blob)
        for tid, blob in zip(tids, raw[len(gids) :], strict=True):
            if blob is not None:
                views.tasks[tid] = _task_view_decoder.decode(blob)
        return views

    async def commit_views(self, expected: str | None, position: str, views: Views) -> bool:
        keys = [self.keys.projector_position]
        args: list[str] = [expected or "", position]
        for gid, group in views.groups.items():
            keys.append(self.keys.group_view(gid))
            args.append(_json.encode(group).decode())
        for tid, task in views.tasks.items():
            keys.append(self.keys.task_view(tid))
            args.append(_json.encode(task).decode())
        return bool(await self._commit(keys=keys, args=args))

    async def group_view(self, group_task_id: str) -> GroupView | None:
        blob = await self.redis.get(self.keys.group_view(group_task_id))
        return None if blob is None else _group_view_decoder.decode(blob)

    async def task_view(self, task_id: str) -> TaskView | None:
        blob = await self.redis.get(self.keys.task_view(task_id))
        return None if blob is None else _task_view_decoder.decode(blob)


def decode_entries(entries: Iterable[Entry]) -> list[tuple[str, AnyEvent]]:
    return [(entry_id, from_fields(fields)) for entry_id, fields in entries]
