"""The producer's scripts: submit a group, cancel one."""

from sumbatch.model.events import WORK_SLICE, TasksSubmitted
from sumbatch.model.keys import WORKER_GROUP
from sumbatch.scripts.dispatch import DISPATCH_LIB
from sumbatch.scripts.lib import LIB, lua_fields
from sumbatch.scripts.log import HSET_ARGS

# A group's events, queued work and first view, or nothing; with an Idempotency-Key,
# a repeated POST gets the first answer back instead. The work entries (a
# TasksSubmitted per WORK_SLICE tasks) wait in the group's queue, the group in its
# fairness key's ring, handed out in turn with other groups (``dispatch.py``); when no
# entry waits in the work stream, one is handed out at once, to wake a reader. The
# ledger keeps the submission time (the server's clock, ms) for the group's time to
# finished, and the group's fairness key; the partition's stats count the group and
# its tasks, once: a retry of this call counts nothing more.
# KEYS: events, work, ledger, group log, idempotency key, group view, stats, fair
#       keys, the key's groups ring, the group's queue.
# ARGV: tasksTotal, idempotency record ('' = no key), its ttl, events json, then the
#       work entries' columns: the group id, its tasks' paramsA and paramsB
#       (space-separated, as GroupSubmitted holds them), then the fairness key, the
#       groups rings' prefix, the queues' prefix, then the group view's hash fields and
#       values (chunks.py).
# Returns the earlier idempotency record if any.
SUBMIT = (
    LIB
    + HSET_ARGS
    + DISPATCH_LIB
    + f"""
local WORK_SLICE = {WORK_SLICE}
local WORKER_GROUP = '{WORKER_GROUP}'
local function work_entry(gid, first, params_a, params_b)
  return {
        lua_fields(
            TasksSubmitted,
            group_task_id="gid",
            first="tostring(first)",
            params_a="params_a",
            params_b="params_b",
        )
    }
end
"""
    + """
local earlier = ARGV[2] ~= '' and is_or_none(KEYS[5], 'string')
  and redis.call('GET', KEYS[5])
-- A client library's retry of this very call (same ids) must not append twice.
local again = redis.call('EXISTS', KEYS[3]) == 1
-- A new submission's checks, before its first write (a repeat writes nothing of it).
local params_a, params_b = {}, {}
if not earlier and not again then
  if not (is_or_none(KEYS[1], 'stream') and is_or_none(KEYS[2], 'stream')
      and is_or_none(KEYS[5], 'string') and key_type(KEYS[4]) == 'none'
      and is_or_none(KEYS[8], 'list') and is_or_none(KEYS[9], 'list')
      and key_type(KEYS[10]) == 'none') then
    return redis.error_reply('ERR a sumbatch key has the wrong type (written by hand?)')
  end
  for v in string.gmatch(ARGV[6], '%S+') do params_a[#params_a + 1] = v end
  for v in string.gmatch(ARGV[7], '%S+') do params_b[#params_b + 1] = v end
  if #params_a ~= tonumber(ARGV[1]) or #params_b ~= #params_a then
    return redis.error_reply('ERR paramsA and paramsB must hold tasksTotal values each')
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
for _, fields in ipairs(cjson.decode(ARGV[4])) do append(KEYS[1], KEYS[4], fields) end
-- The work entries, a TasksSubmitted per WORK_SLICE tasks, built here from the group's
-- columns: no entry is built or sent one by one. The params stay text, so 64-bit
-- integers pass exactly.
local slices = {}
for first = 0, #params_a - 1, WORK_SLICE do
  local last = math.min(first + WORK_SLICE, #params_a)
  slices[#slices + 1] = cjson.encode(work_entry(ARGV[5], first,
    table.concat(params_a, ' ', first + 1, last), table.concat(params_b, ' ', first + 1, last)))
end
-- RPUSH a thousand at a time: unpack has a limit.
for from = 1, #slices, 1000 do
  redis.call('RPUSH', KEYS[10], unpack(slices, from, math.min(#slices, from + 999)))
end
if redis.call('RPUSH', KEYS[9], ARGV[5]) == 1 then redis.call('RPUSH', KEYS[8], ARGV[8]) end
if not undelivered(KEYS[2], WORKER_GROUP) then
  dispatch_one(KEYS[2], KEYS[8], ARGV[9], ARGV[10])
end
redis.call('HSET', KEYS[3], 'total', ARGV[1], 'finished', 0, 'failed', 0, 'revoked', 0,
  'submitted', string.format('%d', now_ms()), 'key', ARGV[8])
-- A key left by hand under this new group's view name would fail HSET.
redis.call('DEL', KEYS[6])
hset_args(KEYS[6], 11, #ARGV)
local t = tally()
count(t, 'groupsSubmitted', 1)
count(t, 'tasksSubmitted', tonumber(ARGV[1]))
write_tally(t, KEYS[7])
return false
"""
)

# Cancel a group: append GroupCancelled and revoke every task that has not ended,
# running ones included (their late outcome meets the fence and writes nothing), then
# tell the workers on the cancellations channel, so they stop those runs. The
# partition's stats count the revoked tasks and the group's end.
# Its slices not handed out yet leave the queue, and the group its fairness ring.
# Once per call: a resend of it (same call key) gets the first reply.
# KEYS: events, ledger, ended, attempts, group log, stats, the call's key, the group's
#       queue, fair keys.
# ARGV: group id, result ttl, GroupCancelled json, task id prefix (ids.py),
#       cancellations channel, groups rings' prefix.
# Returns -1 unknown group, -2 finished without being cancelled (nothing to cancel),
# 0 cancelled before, else 1 + the number of tasks revoked.
CANCEL = (
    LIB
    + """
local replayed = tonumber(first_reply(KEYS[7]) or '')
if replayed then return replayed end
local K = {ledger = KEYS[2], ended = KEYS[3], attempts = KEYS[4], log = KEYS[5]}
local total = group_state(K)
if total == 'gone' then return -1 end
-- Read only from a ledger that is a hash: any other type is refused below.
local ring = ARGV[6] .. (total ~= 'bad' and redis.call('HGET', KEYS[2], 'key') or '')
if total == 'bad' or not (is_or_none(KEYS[1], 'stream') and is_or_none(KEYS[8], 'list')
    and is_or_none(KEYS[9], 'list') and is_or_none(ring, 'list')) then
  return redis.error_reply('ERR this group has keys sumbatch did not write')
end
if redis.call('HEXISTS', KEYS[2], 'cancelled') == 1 then return 0 end
if tonumber(redis.call('HGET', KEYS[2], 'finished')) == total then return -2 end
local ended = redis.call('GET', KEYS[3]) or ''
-- Every check done: now the writes.
redis.call('HSET', KEYS[2], 'cancelled', 1)
if redis.call('DEL', KEYS[8]) == 1 then
  redis.call('LREM', ring, 0, ARGV[1])
  if redis.call('EXISTS', ring) == 0 then
    redis.call('LREM', KEYS[9], 0, string.sub(ring, #ARGV[6] + 1))
  end
end
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
  local t = tally()
  count(t, 'tasksRevoked', revoked)
  tasks_ended(KEYS[1], K, ARGV[1], revoked, 0, revoked, ARGV[2], t)
  write_tally(t, KEYS[6])
  redis.call('PUBLISH', ARGV[5], ARGV[1])
end
keep_reply(KEYS[7], 1 + revoked)
return 1 + revoked
"""
)
