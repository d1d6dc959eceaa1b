"""The workers' scripts: begin a task, count and log its attempts, record its outcome
through the completion fence, and keep the work stream's claims and length in hand."""

from sumbatch.scripts.lib import LIB

# What a worker does with each handed-out entry. With one partition the cache keys
# share its hash tag, and are read here; with several, each is in a slot of its own and
# read before (a sum is deterministic: reading it outside the step is safe).
# Items are tasks; a work entry may hold several (``events.TasksSubmitted``), and is
# acknowledged once every task it can hold has ended, or its group is gone.
# KEYS: work, then four per group (``Keys.of_group``), then (one partition) each item's
# cache key. ARGV: group, group ids json, items json: [entry id, group id, index,
# cached sum or '', entry's first index, how many it can hold] per item, the KEYS index
# of the first cache key (0: none, the sums read before are in the items).  Returns per
# item: {0} ended already or expired, {1, result} cache hit, {2, attempt} run it
# (attempts counted across every worker), or {3} refused: its group's keys are not what
# sumbatch wrote, or its index is outside the group (left pending, untouched).
BEGIN = (
    LIB
    + """
local G = declared(2, cjson.decode(ARGV[2]))
local items = cjson.decode(ARGV[3])
local first_cache = tonumber(ARGV[4]) or 0
local sums = {}
if first_cache > 0 then
  -- MGET, not a GET each: one command per thousand (a Lua call costs about a
  -- microsecond; unpack has a limit). A key of another type (made by hand) is a miss.
  for from = first_cache, #KEYS, 1000 do
    local got = redis.call('MGET', unpack(KEYS, from, math.min(#KEYS, from + 999)))
    for _, sum in ipairs(got) do
      -- A value that is no integer (written by hand) is a miss too.
      sums[#sums + 1] = (sum and string.match(sum, '^%-?%d+$')) and sum or ''
    end
  end
end
local out = {}
local seen = {}
for n, item in ipairs(items) do
  local g, index = group_of(G, seen, item[2]), item[3]
  if g.state == 'gone' then
    out[n] = {0}
  elseif g.state == 'bad' or not index_ok(index, g.state) then
    out[n] = {3}
  elseif bit_set(g.ended, index) then
    out[n] = {0}
  else
    local sum = first_cache > 0 and sums[n] or item[4]
    out[n] = sum ~= '' and {1, sum} or {2}
  end
end
-- Every check done: now the writes.
local acked = {}
for n, item in ipairs(items) do
  if out[n][1] == 0 then
    local g = seen[item[2]]
    decide_ack(acked, item[1], g.state, g.ended, item[5], item[6])
  elseif out[n][1] == 2 then
    out[n][2] = redis.call('BITFIELD', seen[item[2]].keys.attempts,
      'OVERFLOW', 'SAT', 'INCRBY', 'u8', '#' .. item[3], 1)[1]
  end
end
ack_entries(KEYS[1], ARGV[1], acked)
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
# KEYS: events, then four per group. ARGV: group ids json, items json: [group id,
# event fields] per event.
APPEND = (
    LIB
    + """
local G = declared(2, cjson.decode(ARGV[1]))
if not is_or_none(KEYS[1], 'stream') then
  return redis.error_reply('ERR the event log key is not a stream (written by hand?)')
end
local items = cjson.decode(ARGV[2])
local seen = {}
local appended = 0
for _, item in ipairs(items) do
  local g = group_of(G, seen, item[1])
  if type(g.state) == 'number' then
    append(KEYS[1], g.keys.log, item[2])
    appended = appended + 1
  end
end
return appended
"""
)

# The completion fence. Per item, atomically: if the task has not ended yet, mark it
# ended, append its outcome (and a dead-letter note), copy a failure to the
# dead-letter stream, and cache a computed sum (one partition: see BEGIN; with
# several, the worker caches them after, outside); then count the ended tasks per
# group, ending the groups whose last task this was; and acknowledge every work entry.
# Items whose group's keys are not what sumbatch wrote, or whose index is outside the
# group, are refused: left pending, untouched. The partition's stats count each
# recorded outcome (and its run's seconds, when it ran) and each group ended, in the
# same step: an outcome sent twice counts once.
# A work entry is acknowledged once every task it can hold has ended (see BEGIN).
# KEYS: events, work, dead letters, stats, then four per group, then cache keys.
# ARGV: group, result ttl, group ids json, items json, cache ttl. Per item: [task key,
#   index, group id, state, outcome, after, seconds, cache key's KEYS index (0: none),
#   sum, entry id, entry's first index, how many it can hold], state SUCCESS
#   (computed), CACHED or FAILURE, outcome one event, after a list of events, seconds
#   the run's time (-1: none, nothing ran).
# Returns {{task keys whose outcome was recorded}, {refused task keys}}.
COMPLETE = (
    LIB
    + """
local G = declared(5, cjson.decode(ARGV[3]))
if not (is_or_none(KEYS[1], 'stream') and is_or_none(KEYS[2], 'stream')
    and is_or_none(KEYS[3], 'stream')) then
  return redis.error_reply('ERR a sumbatch stream key is not a stream (written by hand?)')
end
local items = cjson.decode(ARGV[4])
local seen = {}
local refused = {}
local todo = {}
for _, item in ipairs(items) do
  local key, index = item[1], item[2]
  local total = group_of(G, seen, item[3]).state
  if total == 'bad' or (total ~= 'gone' and not index_ok(index, total)) then
    refused[#refused + 1] = key
  else
    todo[#todo + 1] = item
  end
end
-- Every check done: now the writes.
local recorded = {}
local cache = {}  -- {key, sum} of the sums computed here, written last
local groups, counts = {}, {}  -- groups in first-seen order; per group {ended, failed}
local t = tally()
for _, item in ipairs(todo) do
  local key, index, gid, state_, outcome, after, seconds, cache_at, sum = unpack(item)
  local g = seen[gid]
  if g.state ~= 'gone' and redis.call('SETBIT', g.keys.ended, index, 1) == 0 then
    recorded[#recorded + 1] = key
    if cache_at > 0 then cache[#cache + 1] = {KEYS[cache_at], sum} end
    local log = g.keys.log
    local id = append(KEYS[1], log, outcome)
    if state_ == 'FAILURE' then
      -- Its own ids ('*'): other writers add to this stream too.
      local copy = {unpack(outcome)}
      copy[#copy + 1] = 'eventId'
      copy[#copy + 1] = id
      redis.call('XADD', KEYS[3], '*', unpack(copy))
    end
    for _, fields in ipairs(after) do append(KEYS[1], log, fields) end
    if not counts[gid] then
      counts[gid] = {0, 0}
      groups[#groups + 1] = gid
    end
    counts[gid][1] = counts[gid][1] + 1
    seconds = tonumber(seconds) or -1
    if state_ == 'FAILURE' then
      counts[gid][2] = counts[gid][2] + 1
      count(t, 'tasksFailed', 1)
      if seconds >= 0 then observe(t, RUN_FAILED, seconds) end
    else
      count(t, 'tasksCompleted', 1)
      if state_ == 'CACHED' then
        count(t, 'tasksCached', 1)
      elseif seconds >= 0 then
        observe(t, RUN_COMPLETED, seconds)
      end
    end
  end
end
for _, gid in ipairs(groups) do
  tasks_ended(KEYS[1], seen[gid].keys, gid, counts[gid][1], counts[gid][2], 0, ARGV[2], t)
end
write_tally(t, KEYS[4])
-- The entries whose every task has ended now: by the fence as these writes left it.
local acked, fences = {}, {}
for _, item in ipairs(todo) do
  local gid = item[3]
  local g = seen[gid]
  if g.state ~= 'gone' and not fences[gid] then
    fences[gid] = redis.call('GET', g.keys.ended) or ''
  end
  decide_ack(acked, item[10], g.state, fences[gid], item[11], item[12])
end
ack_entries(KEYS[2], ARGV[1], acked)
-- Last, and never fatal: a failed cache write (a TTL the server refuses, say) costs a
-- cache miss, where an error would stop the script after the fence bits were set.
for _, kv in ipairs(cache) do redis.pcall('SET', kv[1], kv[2], 'EX', ARGV[5]) end
return {recorded, refused}
"""
)

# Which tasks have ended (revoked by a cancel, or finished elsewhere) or have their
# group gone: their runs can stop. Acknowledges the work entries whose every task has
# ended (see BEGIN); the others stay pending.
# KEYS: work, then four per group. ARGV: group, group ids json, items json: [task key,
# group id, index, entry id, entry's first index, how many it can hold].
# Returns the keys of the tasks that ended.
RELEASE_ENDED = (
    LIB
    + """
local G = declared(2, cjson.decode(ARGV[2]))
local released, acked = {}, {}
local seen = {}
for _, item in ipairs(cjson.decode(ARGV[3])) do
  local index = item[3]
  local g = group_of(G, seen, item[2])
  if g.state == 'gone' or (type(g.state) == 'number' and index_ok(index, g.state)
      and bit_set(g.ended, index)) then
    released[#released + 1] = item[1]
    decide_ack(acked, item[4], g.state, g.ended, item[5], item[6])
  end
end
ack_entries(KEYS[1], ARGV[1], acked)
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
