"""The workers' scripts: begin a task, count and log its attempts, record its outcome
through the completion fence, and keep the work stream's claims and length in hand."""

from sumbatch.scripts.lib import CALLS, LIB

# What a worker does with each handed-out entry. With one partition the cache keys
# share its hash tag, and are read here; with several, each is in a slot of its own and
# read before (a sum is deterministic: reading it outside the step is safe).
# Items are tasks; a work entry may hold several (``events.TasksSubmitted``), and is
# acknowledged once every task it can hold has ended, or its group is gone.
# Once per call: the first run keeps a mark under the call's key; a resend of it finds
# the mark and counts no attempt more: a task to run gets the attempt its byte holds
# (the first run's count). Only a byte still 0 (the first run did not count it: it was
# a cache hit then, say) is counted now (a run another worker counted in between would
# show in the byte too). Replies are not kept: encoding 200 of them with cjson cost a
# tenth of the script.
# KEYS: work, the call's key (``Keys.call``), then four per group (``Keys.of_group``),
# then (one partition) each item's cache key. ARGV: group, group ids json, items json:
# [entry id, group id, index, cached sum or '', entry's first index, how many it can
# hold] per item, the KEYS index of the first cache key (0: none, the sums read before
# are in the items). Returns per item: {0} ended already or expired, {1, result} cache
# hit, {2, attempt} run it (attempts counted across every worker), or {3} refused: its
# group's keys are not what sumbatch wrote, or its index is outside the group (left
# pending, untouched).
BEGIN = (
    LIB
    + """
local again = first_reply(KEYS[2]) ~= nil
-- On a resend: the attempt the first run counted for a task, or nil if it counted none.
local function counted_before(attempts, index)
  local counted = redis.call('BITFIELD', attempts, 'GET', 'u8', '#' .. index)[1]
  return counted > 0 and counted or nil
end
local G = declared(3, cjson.decode(ARGV[2]))
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
    local attempts = seen[item[2]].keys.attempts
    out[n][2] = again and counted_before(attempts, item[3])
      or redis.call('BITFIELD', attempts, 'OVERFLOW', 'SAT', 'INCRBY', 'u8', '#' .. item[3], 1)[1]
  end
end
ack_entries(KEYS[1], ARGV[1], acked)
if not again then keep_reply(KEYS[2], '1') end
return out
"""
)

# Count one more run of a task (a retry in the same worker), unless its group is gone
# (expired: a late run must not bring its keys back). Once per call, as BEGIN.
# KEYS: attempts, ledger, the call's key. ARGV: index. Returns the attempt number, or 0.
NEXT_ATTEMPT = (
    CALLS
    + """
local replayed = tonumber(first_reply(KEYS[3]) or '')
if replayed then return replayed end
if redis.call('EXISTS', KEYS[2]) == 0 then return 0 end
local counted = redis.call('BITFIELD', KEYS[1], 'OVERFLOW', 'SAT', 'INCRBY', 'u8',
  '#' .. ARGV[1], 1)[1]
keep_reply(KEYS[3], counted)
return counted
"""
)

# Append progress events (started, retried) to the log and their group's audit
# stream, unless the group is gone (expired: a late run must not bring its keys back)
# or its keys are not what sumbatch wrote. Once per call, as BEGIN.
# KEYS: events, the call's key, then four per group. ARGV: group ids json, items json: [group id,
# event fields] per event.
APPEND = (
    LIB
    + """
local replayed = tonumber(first_reply(KEYS[2]) or '')
if replayed then return replayed end
local G = declared(3, cjson.decode(ARGV[1]))
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
keep_reply(KEYS[2], appended)
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
# same step: an outcome sent twice counts once. Once per call, as BEGIN: a resend of
# the same call gets the first reply (the fence alone would answer "nothing recorded").
# A work entry is acknowledged once every task it can hold has ended (see BEGIN).
# KEYS: events, work, dead letters, stats, the call's key, then four per group, then
# cache keys.
# ARGV: group, result ttl, group ids json, items json, cache ttl. Per item: [task key,
#   index, group id, state, outcome, after, seconds, cache key's KEYS index (0: none),
#   sum, entry id, entry's first index, how many it can hold], state SUCCESS
#   (computed), CACHED or FAILURE, outcome one event, after a list of events, seconds
#   the run's time (-1: none, nothing ran).
# Returns {{task keys whose outcome was recorded}, {refused task keys}}.
COMPLETE = (
    LIB
    + """
local replayed = first_reply(KEYS[5])
if replayed then return unjoined(replayed) end
local G = declared(6, cjson.decode(ARGV[3]))
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
keep_reply(KEYS[5], joined({recorded, refused}))
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
