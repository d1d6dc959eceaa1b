"""The Lua scripts behind every atomic step. Only ``store.py`` runs them.

Every key has the namespace's hash tag, so all of them live in one cluster slot. The
scripts that run per task (begin, append, complete) name a group's keys themselves from
prefixes that ``events.Keys`` sends, instead of passing five keys per task: on a cluster
that is fine, as every key they touch is in the slot of their declared keys.

Events are built in Python (``events.to_flat``) and come in as one JSON argument
(decoded with the server's cjson, all values strings); the only events built here are
GroupFinished and TaskRevoked, whose field lists are generated below from their
definitions in ``events.py`` and the task-id layout in ``ids.py``.

Per group, the write side is three keys: the ledger hash (counters), the ``ended``
bitmap (the completion fence: one bit per task) and the ``attempts`` string (one byte
per task, BITFIELD u8).
"""

from __future__ import annotations

import msgspec

from sumbatch import ids
from sumbatch.config import MAX_TASKS_LIMIT
from sumbatch.events import Event, GroupFinished, TaskRevoked


def _lua_fields(cls: type[Event], **values: str) -> str:
    """A Lua table of an event's stream fields in the order ``events.to_flat`` gives
    them: the names come from the event's definition, each value is a Lua expression
    giving its text, and every field must be given, so the two cannot drift apart."""
    fields = msgspec.structs.fields(cls)
    if (names := {f.name for f in fields}) != values.keys():
        raise TypeError(f"{cls.__name__}: fields {sorted(names)}, given {sorted(values)}")
    pairs = [f"'{f.encode_name}', {values[f.name]}" for f in fields]
    return "{" + ", ".join([f"'type', '{cls.__name__}'", *pairs]) + "}"


_GROUP_FINISHED = _lua_fields(
    GroupFinished,
    group_task_id="gid",
    tasks_total="total",
    tasks_failed="failed",
    tasks_revoked="revoked",
    succeeded="(failed == '0' and revoked == '0') and 'true' or 'false'",
)
_TASK_REVOKED = _lua_fields(
    TaskRevoked,
    task_id=f"prefix .. string.format('%0{ids.INDEX_DIGITS}x', index + 1)",
    group_task_id="gid",
    index="tostring(index)",
)

_GENERATED = f"""
local MAX_TASKS = {MAX_TASKS_LIMIT}  -- the most tasks a group can have

-- The events built here. Counts are the ledger's, as text.
local function group_finished(gid, total, failed, revoked)
  return {_GROUP_FINISHED}
end

-- prefix: the group id less its last {ids.INDEX_DIGITS} hex digits, which hold index + 1.
local function task_revoked(gid, prefix, index)
  return {_TASK_REVOKED}
end
"""

_LIB = (
    _GENERATED
    + """
-- A key's type, 'none' when it does not exist.
local function key_type(key)
  return redis.call('TYPE', key)['ok']
end

-- Whether a key is of type t or absent. Checked before a script's first write: a key
-- of another type (written by hand) would fail a command half-way through a script,
-- and Lua does not roll back what was already written.
local function is_or_none(key, t)
  local found = key_type(key)
  return found == t or found == 'none'
end

-- A group's write side, checked before any write: 'gone' (its ledger expired or never
-- was), 'bad' (a key of the wrong type or a ledger that is not counters), or the
-- ledger's total as a number.
local function group_state(P, gid)
  local ledger = P.ledger .. gid
  local t = key_type(ledger)
  if t == 'none' then return 'gone' end
  if t ~= 'hash' then return 'bad' end
  local c = redis.call('HMGET', ledger, 'total', 'finished', 'failed', 'revoked')
  for k = 1, 4 do
    -- What HINCRBY takes: plain integers (tonumber would also pass '1e3' or '0x10').
    if not (c[k] and string.match(c[k], '^%-?%d+$') and #c[k] <= 15) then return 'bad' end
  end
  -- A task's attempts byte must stay within a string's 2^32 bits (BITFIELD u8).
  if tonumber(c[1]) > MAX_TASKS then return 'bad' end
  if not (is_or_none(P.ended .. gid, 'string') and is_or_none(P.attempts .. gid, 'string')
      and is_or_none(P.log .. gid, 'stream')) then
    return 'bad'
  end
  return tonumber(c[1])
end

-- A group an item names, checked once per script run: its group_state, and its
-- fence bitmap when it is live. `seen` caches them by group id.
local function group_of(P, seen, gid)
  local g = seen[gid]
  if g == nil then
    g = {state = group_state(P, gid)}
    if type(g.state) == 'number' then g.ended = redis.call('GET', P.ended .. gid) or '' end
    seen[gid] = g
  end
  return g
end

-- Whether a task index is a number within a group of `total` tasks.
local function index_ok(index, total)
  return type(index) == 'number' and index >= 0 and index < total and index % 1 == 0
end

-- Append to the log and to the group's audit stream, with the same entry id. The
-- audit stream only ever gets ids from the log, so they go up; should someone have
-- written it ahead by hand, the copy is skipped (pcall) rather than fail the step
-- after its first write.
local function append(events, log, fields)
  local id = redis.call('XADD', events, '*', unpack(fields))
  redis.pcall('XADD', log, id, unpack(fields))
  return id
end

-- Count tasks that just ended in one group; if that was its last, append
-- GroupFinished and start the clock on the group's write-side keys.
local function tasks_ended(events, P, gid, ended, failed, revoked, ttl)
  local ledger = P.ledger .. gid
  if failed > 0 then redis.call('HINCRBY', ledger, 'failed', failed) end
  if revoked > 0 then redis.call('HINCRBY', ledger, 'revoked', revoked) end
  local finished = redis.call('HINCRBY', ledger, 'finished', ended)
  local c = redis.call('HMGET', ledger, 'total', 'failed', 'revoked')
  if finished ~= tonumber(c[1]) then return end
  local log = P.log .. gid
  append(events, log, group_finished(gid, c[1], c[2], c[3]))
  for _, key in ipairs({ledger, P.ended .. gid, P.attempts .. gid, log}) do
    redis.call('EXPIRE', key, ttl)
  end
end

-- Whether bit i (from 0) is set in a bitmap read with GET.
local function bit_set(bitmap, i)
  local byte = string.byte(bitmap, math.floor(i / 8) + 1) or 0
  return math.floor(byte / 2 ^ (7 - i % 8)) % 2 == 1
end
"""
)

# Every script checks all it can before its first write, and nothing after that can
# fail: a script that errors half-way keeps what it wrote (no rollback), which could
# log an outcome without counting it. Shared streams are checked with is_or_none,
# group keys with group_state; items that fail a check are refused, not half-done.

# A group's events, work entries and first view, or nothing; with an Idempotency-Key,
# a repeated POST gets the first answer back instead.
# KEYS: events, work, ledger, group log, idempotency key, group view.
# ARGV: tasksTotal, idempotency record ('' = no key), its ttl, group view json,
#       events json, work entries json.  Returns the earlier idempotency record if any.
SUBMIT = (
    _LIB
    + """
local earlier = ARGV[2] ~= '' and is_or_none(KEYS[5], 'string')
  and redis.call('GET', KEYS[5])
-- A client library's retry of this very call (same ids) must not append twice.
local again = redis.call('EXISTS', KEYS[3]) == 1
if not earlier and not again then
  if not (is_or_none(KEYS[1], 'stream') and is_or_none(KEYS[2], 'stream')
      and is_or_none(KEYS[5], 'string') and key_type(KEYS[4]) == 'none') then
    return redis.error_reply('ERR a sumbatch key has the wrong type (written by hand?)')
  end
end
if earlier then
  -- A write, so that a WAITAOF on this connection covers the first submission too
  -- (the AOF is fsynced in order).
  redis.call('EXPIRE', KEYS[5], ARGV[3])
  return earlier
end
if ARGV[2] ~= '' then redis.call('SET', KEYS[5], ARGV[2], 'EX', ARGV[3]) end
if again then
  -- A write that changes nothing, so that a WAITAOF after this retry waits for the
  -- first submission's fsync too, not for nothing.
  redis.call('HINCRBY', KEYS[3], 'total', 0)
  return false
end
for _, fields in ipairs(cjson.decode(ARGV[5])) do append(KEYS[1], KEYS[4], fields) end
for _, fields in ipairs(cjson.decode(ARGV[6])) do
  redis.call('XADD', KEYS[2], '*', unpack(fields))
end
redis.call('HSET', KEYS[3], 'total', ARGV[1], 'finished', 0, 'failed', 0, 'revoked', 0)
redis.call('SET', KEYS[6], ARGV[4])
return false
"""
)

# What a worker does with each handed-out entry. Per-group keys are named here from
# the prefixes ``Keys.prefixes()`` sends (all share the hash tag of KEYS).
# KEYS: work. ARGV: group, prefixes json, items json: [entry id, group id, index,
# cache suffix] per item.  Returns per item: {0} ended already or expired
# (acknowledged here), {1, result} cache hit, {2, attempt} run it (attempts counted
# across every worker), or {3} refused: its group's keys are not what sumbatch wrote,
# or its index is outside the group (left pending, untouched).
BEGIN = (
    _LIB
    + """
local P = cjson.decode(ARGV[2])
local items = cjson.decode(ARGV[3])
local out = {}
local seen = {}
for n, item in ipairs(items) do
  local g, index = group_of(P, seen, item[2]), item[3]
  if g.state == 'gone' then
    out[n] = {0}
  elseif g.state == 'bad' or not index_ok(index, g.state) then
    out[n] = {3}
  elseif bit_set(g.ended, index) then
    out[n] = {0}
  else
    local cached = redis.call('GET', P.cache .. item[4])
    out[n] = cached and {1, cached} or {2}
  end
end
-- Every check done: now the writes.
for n, item in ipairs(items) do
  if out[n][1] == 0 then
    redis.call('XACK', KEYS[1], ARGV[1], item[1])
  elseif out[n][1] == 2 then
    out[n][2] = redis.call('BITFIELD', P.attempts .. item[2],
      'OVERFLOW', 'SAT', 'INCRBY', 'u8', '#' .. item[3], 1)[1]
  end
end
return out
"""
)

# Count one more run of a task (a retry in the same worker), unless its group is gone
# (expired: a late run must not bring its keys back). KEYS: attempts, ledger.
# ARGV: index. Returns the attempt number, or 0.
NEXT_ATTEMPT = """
if redis.call('EXISTS', KEYS[2]) == 0 then return 0 end
return redis.call('BITFIELD', KEYS[1], 'OVERFLOW', 'SAT', 'INCRBY', 'u8', '#' .. ARGV[1], 1)[1]
"""

# Append progress events (started, retried) to the log and their group's audit
# stream, unless the group is gone (expired: a late run must not bring its keys back)
# or its keys are not what sumbatch wrote.
# KEYS: events. ARGV: prefixes json, items json: [group id, event fields] per event.
APPEND = (
    _LIB
    + """
local P = cjson.decode(ARGV[1])
if not is_or_none(KEYS[1], 'stream') then
  return redis.error_reply('ERR the event log key is not a stream (written by hand?)')
end
local items = cjson.decode(ARGV[2])
local live = {}
for _, item in ipairs(items) do
  if live[item[1]] == nil then live[item[1]] = type(group_state(P, item[1])) == 'number' end
end
local appended = 0
for _, item in ipairs(items) do
  if live[item[1]] then
    append(KEYS[1], P.log .. item[1], item[2])
    appended = appended + 1
  end
end
return appended
"""
)

# The completion fence. Per item, atomically: if the task has not ended yet, mark it
# ended, append its outcome (and a dead-letter note), cache a computed sum, copy a
# failure to the dead-letter stream; then count the ended tasks per group, ending the
# groups whose last task this was; and acknowledge every work entry. Items whose
# group's keys are not what sumbatch wrote, or whose index is outside the group, are
# refused: left pending, untouched.
# KEYS: events, work, dead letters.
# ARGV: group, result ttl, cache ttl, prefixes json, items json: per item
#   [entry id, index, group id, state, cache it (1/0), result, cache suffix,
#    outcome, after], outcome one event and after a list of events.
# Returns {outcomes recorded, {refused entry ids}}.
COMPLETE = (
    _LIB
    + """
local P = cjson.decode(ARGV[4])
if not (is_or_none(KEYS[1], 'stream') and is_or_none(KEYS[2], 'stream')
    and is_or_none(KEYS[3], 'stream')) then
  return redis.error_reply('ERR a sumbatch stream key is not a stream (written by hand?)')
end
local items = cjson.decode(ARGV[5])
local seen = {}
local refused = {}
local todo = {}
for _, item in ipairs(items) do
  local entry, index = item[1], item[2]
  local total = group_of(P, seen, item[3]).state
  if total == 'bad' or (total ~= 'gone' and not index_ok(index, total)) then
    refused[#refused + 1] = entry
  else
    todo[#todo + 1] = item
  end
end
-- Every check done: now the writes.
local recorded = 0
local groups, counts = {}, {}  -- groups in first-seen order; per group {ended, failed}
local acks = {}
for _, item in ipairs(todo) do
  local entry, index, gid, state_, cache_it, result, cache, outcome, after = unpack(item)
  if seen[gid].state ~= 'gone' and redis.call('SETBIT', P.ended .. gid, index, 1) == 0 then
    recorded = recorded + 1
    local log = P.log .. gid
    local id = append(KEYS[1], log, outcome)
    if state_ == 'FAILURE' then
      -- Its own ids ('*'): other writers add to this stream too.
      local copy = {unpack(outcome)}
      copy[#copy + 1] = 'eventId'
      copy[#copy + 1] = id
      redis.call('XADD', KEYS[3], '*', unpack(copy))
    end
    for _, fields in ipairs(after) do append(KEYS[1], log, fields) end
    if cache_it == '1' then redis.call('SET', P.cache .. cache, result, 'EX', ARGV[3]) end
    if not counts[gid] then
      counts[gid] = {0, 0}
      groups[#groups + 1] = gid
    end
    counts[gid][1] = counts[gid][1] + 1
    if state_ == 'FAILURE' then counts[gid][2] = counts[gid][2] + 1 end
  end
  acks[#acks + 1] = entry
end
for _, gid in ipairs(groups) do
  tasks_ended(KEYS[1], P, gid, counts[gid][1], counts[gid][2], 0, ARGV[2])
end
if #acks > 0 then redis.call('XACK', KEYS[2], ARGV[1], unpack(acks)) end
return {recorded, refused}
"""
)

# Cancel a group: append GroupCancelled and revoke every task that has not ended,
# running ones included (their late outcome meets the fence and writes nothing), then
# tell the workers on the cancellations channel, so they stop those runs.
# KEYS: events, ledger, ended, attempts, group log.
# ARGV: group id, result ttl, GroupCancelled json, task id prefix (ids.py), prefixes,
#       cancellations channel.
# Returns -1 unknown group, -2 finished without being cancelled (nothing to cancel),
# 0 cancelled before, else 1 + the number of tasks revoked.
CANCEL = (
    _LIB
    + """
local P = cjson.decode(ARGV[5])
local total = group_state(P, ARGV[1])
if total == 'gone' then return -1 end
if total == 'bad' or not is_or_none(KEYS[1], 'stream') then
  return redis.error_reply('ERR this group has keys sumbatch did not write')
end
if redis.call('HEXISTS', KEYS[2], 'cancelled') == 1 then return 0 end
if tonumber(redis.call('HGET', KEYS[2], 'finished')) == total then return -2 end
local ended = redis.call('GET', KEYS[3]) or ''
-- Every check done: now the writes.
redis.call('HSET', KEYS[2], 'cancelled', 1)
append(KEYS[1], KEYS[5], cjson.decode(ARGV[3]))
local revoked = 0
for index = 0, total - 1 do
  if not bit_set(ended, index) then
    redis.call('SETBIT', KEYS[3], index, 1)
    revoked = revoked + 1
    append(KEYS[1], KEYS[5], task_revoked(ARGV[1], ARGV[4], index))
  end
end
if revoked > 0 then
  tasks_ended(KEYS[1], P, ARGV[1], revoked, 0, revoked, ARGV[2])
  redis.call('PUBLISH', ARGV[6], ARGV[1])
end
return 1 + revoked
"""
)

# Acknowledge work entries whose task has ended (revoked by a cancel, or finished
# elsewhere) or whose group is gone; leave the others pending.
# KEYS: work. ARGV: group, prefixes json, items json: [entry id, group id, index].
# Returns the entry ids acknowledged.
RELEASE_ENDED = (
    _LIB
    + """
local P = cjson.decode(ARGV[2])
local released = {}
local seen = {}
for _, item in ipairs(cjson.decode(ARGV[3])) do
  local entry, index = item[1], item[3]
  local g = group_of(P, seen, item[2])
  if g.state == 'gone' or (type(g.state) == 'number' and index_ok(index, g.state)
      and bit_set(g.ended, index)) then
    released[#released + 1] = entry
  end
end
if #released > 0 then redis.call('XACK', KEYS[1], ARGV[1], unpack(released)) end
return released
"""
)

# Reset the idle time of entries this consumer still owns, so a live worker keeps its
# long tasks; or, with a non-zero idle, hand them back (make them claimable at once).
# KEYS: work. ARGV: group, consumer, idle ms, ids... Returns the ids another consumer
# took over (ids no longer pending were acknowledged: nothing to do).
RENEW = """
local lost = {}
for a = 4, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[a], ARGV[a], 1)
  if p[1] then
    if p[1][2] == ARGV[2] then
      redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[a], 'IDLE', ARGV[3], 'JUSTID')
    else
      lost[#lost + 1] = ARGV[a]
    end
  end
end
return lost
"""

# Write views and the position they include, only if nobody moved the position since
# they were read (compare-and-set), so two projectors never both apply an event; and
# copy the log entries the fold set aside to the rejected stream, in the same step, so
# each is copied once per fold of the log (a replay from the start folds it again).
# KEYS: position, rejected stream, view keys... ARGV: expected position ('' = none),
# new position, rejected entries json (flat fields each), max rejected kept, then per
# view: ttl seconds (0 = none), json.
COMMIT = """
if (redis.call('GET', KEYS[1]) or '') ~= ARGV[1] then return 0 end
local rejected = cjson.decode(ARGV[3])
local t = redis.call('TYPE', KEYS[2])['ok']
local copy = #rejected > 0 and (t == 'stream' or t == 'none')
for k = 3, #KEYS do
  local ttl, value = ARGV[2 * k - 1], ARGV[2 * k]
  if ttl == '0' then
    redis.call('SET', KEYS[k], value)
  else
    redis.call('SET', KEYS[k], value, 'EX', ttl)
  end
end
if copy then
  for _, fields in ipairs(rejected) do
    redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', unpack(fields))
  end
end
redis.call('SET', KEYS[1], ARGV[2])
return 1
"""

# Drop work entries every consumer is done with: those below the oldest pending entry,
# or below the last one handed out when none is pending. KEYS: work. ARGV: group.
TRIM_WORK = """
local last
for _, g in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  local info = {}
  for j = 1, #g, 2 do info[g[j]] = g[j + 1] end
  if info['name'] == ARGV[1] then last = info['last-delivered-id'] end
end
if not last then return 0 end
local summary = redis.call('XPENDING', KEYS[1], ARGV[1])
local minid = last
if tonumber(summary[1]) > 0 then minid = summary[2] end
return redis.call('XTRIM', KEYS[1], 'MINID', minid)
"""

# Remove a consumer only if it still has nothing pending and is still idle: XGROUP
# DELCONSUMER drops a consumer's pending entries, which would lose tasks.
# KEYS: work. ARGV: group, consumer, min idle ms. Returns 1 if removed.
FORGET_CONSUMER = """
for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local info = {}
  for j = 1, #c, 2 do info[c[j]] = c[j + 1] end
  if info['name'] == ARGV[2] then
    if info['pending'] == 0 and info['idle'] >= tonumber(ARGV[3]) then
      redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
      return 1
    end
    return 0
  end
end
return 0
"""
