"""The work stream's claim scripts: renew or hand back a worker's entries, trim the
stream, forget a dead worker. Each changes nothing more when it runs twice."""

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

# Move a work entry no worker can run to the dead-letter stream: acknowledge it, and
# copy it only if that acknowledgement was ours, so a resend of the call (its first
# run's reply lost) or a second worker refusing the same entry makes no second copy.
# KEYS: work, dead letters. ARGV: group, entry id, the copy's fields (a flat JSON
# array). Returns 1 if copied, 0 if the entry was no longer pending.
DEAD_LETTER = """
local kind = redis.call('TYPE', KEYS[2])['ok']
if kind ~= 'none' and kind ~= 'stream' then
  return redis.error_reply('ERR the dead-letter key is not a stream (written by hand?)')
end
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
redis.call('XADD', KEYS[2], '*', unpack(cjson.decode(ARGV[3])))
return 1
"""
