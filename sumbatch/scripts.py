"""The Lua scripts behind every atomic step. Only ``store.py`` runs them.

Every key has the namespace's hash tag, so all of them live in one cluster slot. The
scripts that run per task (begin, append, complete) name a group's keys themselves from
prefixes that ``events.Keys`` sends, instead of passing five keys per task: on a cluster
that is fine, as every key they touch is in the slot of their declared keys.

Events are built in Python (``events.to_flat``) and come in as one JSON argument
(decoded with the server's cjson, all values strings); the only events built here are
GroupFinished and TaskRevoked, whose fields mirror ``events.py`` and ``ids.py`` (tests
decode them with ``events.from_fields``).

Per group, the write side is three keys: the ledger hash (counters), the ``ended``
bitmap (the completion fence: one bit per task) and the ``attempts`` string (one byte
per task, BITFIELD u8).
"""

from __future__ import annotations

_LIB = """
-- Append to the log and to the group's audit stream, with the same entry id.
local function append(events, log, fields)
  local id = redis.call('XADD', events, '*', unpack(fields))
  redis.call('XADD', log, id, unpack(fields))
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
  append(events, log, {'type', 'GroupFinished', 'groupTaskId', gid,
    'tasksTotal', c[1], 'tasksFailed', c[2], 'tasksRevoked', c[3],
    'succeeded', (c[2] == '0' and c[3] == '0') and 'true' or 'false'})
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

# A group's events, work entries and first view, or nothing; with an Idempotency-Key,
# a repeated POST gets the first answer back instead.
# KEYS: events, work, ledger, group log, idempotency key, group view.
# ARGV: tasksTotal, idempotency record ('' = no key), its ttl, group view json,
#       events json, work entries json.  Returns the earlier idempotency record if any.
SUBMIT = (
    _LIB
    + """
if ARGV[2] ~= '' then
  local earlier = redis.call('GET', KEYS[5])
  if earlier then
    -- A write, so that a WAITAOF on this connection covers the first submission too
    -- (the AOF is fsynced in order).
    redis.call('EXPIRE', KEYS[5], ARGV[3])
    return earlier
  end
  redis.call('SET', KEYS[5], ARGV[2], 'EX', ARGV[3])
end
-- A client library's retry of this very call (same ids) must not append twice.
if redis.call('EXISTS', KEYS[3]) == 1 then return false end
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
# (acknowledged here), {1, result} cache hit, or {2, attempt} run it (attempts
# counted across every worker).
BEGIN = (
    _LIB
    + """
local P = cjson.decode(ARGV[2])
local out = {}
local ended = {}  -- per group id: its fence bitmap, or false if the group is gone
for n, item in ipairs(cjson.decode(ARGV[3])) do
  local entry, gid, index, cache = item[1], item[2], item[3], item[4]
  if ended[gid] == nil then
    ended[gid] = redis.call('EXISTS', P.ledger .. gid) == 1
      and (redis.call('GET', P.ended .. gid) or '')
  end
  if not ended[gid] or bit_set(ended[gid], index) then
    redis.call('XACK', KEYS[1], ARGV[1], entry)
    out[n] = {0}
  else
    local cached = redis.call('GET', P.cache .. cache)
    if cached then
      out[n] = {1, cached}
    else
      out[n] = {2, redis.call('BITFIELD', P.attempts .. gid,
        'OVERFLOW', 'SAT', 'INCRBY', 'u8', '#' .. index, 1)[1]}
    end
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
# stream, unless the group is gone (expired): a late run must not bring its keys back.
# KEYS: events. ARGV: prefixes json, items json: [group id, event fields] per event.
APPEND = (
    _LIB
    + """
local P = cjson.decode(ARGV[1])
local appended = 0
for _, item in ipairs(cjson.decode(ARGV[2])) do
  if redis.call('EXISTS', P.ledger .. item[1]) == 1 then
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
# groups whose last task this was; and acknowledge every work entry.
# KEYS: events, work, dead letters.
# ARGV: group, result ttl, cache ttl, prefixes json, items json: per item
#   [entry id, index, group id, state, cache it (1/0), result, cache suffix,
#    outcome, after], outcome one event and after a list of events.
# Returns the number of outcomes recorded.
COMPLETE = (
    _LIB
    + """
local P = cjson.decode(ARGV[4])
local recorded = 0
local live = {}  -- per group id: whether its ledger exists, asked once per call
local groups, counts = {}, {}  -- groups in first-seen order; per group {ended, failed}
local acks = {}
for _, item in ipairs(cjson.decode(ARGV[5])) do
  local entry, index, gid, state, cache_it, result, cache, outcome, after = unpack(item)
  if live[gid] == nil then live[gid] = redis.call('EXISTS', P.ledger .. gid) == 1 end
  if live[gid] and redis.call('SETBIT', P.ended .. gid, index, 1) == 0 then
    recorded = recorded + 1
    local log = P.log .. gid
    local id = append(KEYS[1], log, outcome)
    if state == 'FAILURE' then redis.call('XADD', KEYS[3], id, unpack(outcome)) end
    for _, fields in ipairs(after) do append(KEYS[1], log, fields) end
    if cache_it == '1' then redis.call('SET', P.cache .. cache, result, 'EX', ARGV[3]) end
    if not counts[gid] then
      counts[gid] = {0, 0}
      groups[#groups + 1] = gid
    end
    counts[gid][1] = counts[gid][1] + 1
    if state == 'FAILURE' then counts[gid][2] = counts[gid][2] + 1 end
  end
  acks[#acks + 1] = entry
end
for _, gid in ipairs(groups) do
  tasks_ended(KEYS[1], P, gid, counts[gid][1], counts[gid][2], 0, ARGV[2])
end
redis.call('XACK', KEYS[2], ARGV[1], unpack(acks))
return recorded
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
if redis.call('EXISTS', KEYS[2]) == 0 then return -1 end
if redis.call('HEXISTS', KEYS[2], 'cancelled') == 1 then return 0 end
local progress = redis.call('HMGET', KEYS[2], 'finished', 'total')
if progress[1] == progress[2] then return -2 end
local total = tonumber(progress[2])
local ended = redis.call('GET', KEYS[3]) or ''
redis.call('HSET', KEYS[2], 'cancelled', 1)
append(KEYS[1], KEYS[5], cjson.decode(ARGV[3]))
local revoked = 0
for index = 0, total - 1 do
  if not bit_set(ended, index) then
    redis.call('SETBIT', KEYS[3], index, 1)
    revoked = revoked + 1
    append(KEYS[1], KEYS[5], {'type', 'TaskRevoked',
      'taskId', ARGV[4] .. string.format('%08x', index + 1),
      'groupTaskId', ARGV[1], 'index', tostring(index)})
  end
end
if revoked > 0 then
  tasks_ended(KEYS[1], cjson.decode(ARGV[5]), ARGV[1], revoked, 0, revoked, ARGV[2])
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
local ended = {}  -- per group id: its fence bitmap, or false if the group is gone
for _, item in ipairs(cjson.decode(ARGV[3])) do
  local entry, gid, index = item[1], item[2], item[3]
  if ended[gid] == nil then
    ended[gid] = redis.call('EXISTS', P.ledger .. gid) == 1
      and (redis.call('GET', P.ended .. gid) or '')
  end
  if not ended[gid] or bit_set(ended[gid], index) then
    redis.call('XACK', KEYS[1], ARGV[1], entry)
    released[#released + 1] = entry
  end
end
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
# they were read (compare-and-set), so two projectors never both apply an event.
# KEYS: position, view keys... ARGV: expected position ('' = none), new position, then
# per view: ttl seconds (0 = none), json.
COMMIT = """
if (redis.call('GET', KEYS[1]) or '') ~= ARGV[1] then return 0 end
for k = 2, #KEYS do
  local ttl, value = ARGV[2 * k - 1], ARGV[2 * k]
  if ttl == '0' then
    redis.call('SET', KEYS[k], value)
  else
    redis.call('SET', KEYS[k], value, 'EX', ttl)
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
