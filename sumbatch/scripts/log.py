"""The projector's script: commit views with the position they include."""

from sumbatch.scripts.lib import CALLS

# HSET of many fields, some thousands at a time: unpack of a whole big group's fields
# could overflow Lua's stack. ARGV[first..last]: field, value pairs.
HSET_ARGS = """
local function hset_args(key, first, last)
  for at = first, last, 2000 do
    redis.call('HSET', key, unpack(ARGV, at, math.min(at + 1999, last)))
  end
end
"""

# Write views and the position they include, only if nobody moved the position since
# they were read (compare-and-set), so two projectors never both apply an event; and
# copy the log entries the fold set aside to the rejected stream, in the same step, so
# each is copied once per fold of the log (a replay from the start folds it again).
# A view (a hash, chunks.py) is written whole (the key dropped first, so no field of an
# earlier fold stays) or in part: its summary and some chunks, only onto the hash they
# were read from; a key of another type or gone since (by hand) is left alone. Every
# key's type is checked before the first write: Lua does not roll back.
# Once per call: a resend of it (same call key) gets the first reply, where the
# compare-and-set alone would answer 0 (the position moved: by itself).
# KEYS: position, rejected stream, the call's key, view keys... ARGV: expected position ('' = none),
# new position, rejected entries json (flat fields each), max rejected kept, then per
# view: ttl seconds (0 = none), whole ('1') or in part ('0'), the number of arguments
# that follow for it, then its fields and values.
COMMIT = (
    CALLS
    + HSET_ARGS
    + """
if first_reply(KEYS[3]) then return 1 end
if (redis.call('GET', KEYS[1]) or '') ~= ARGV[1] then return 0 end
local rejected = cjson.decode(ARGV[3])
local t = redis.call('TYPE', KEYS[2])['ok']
local copy = #rejected > 0 and (t == 'stream' or t == 'none')
local writes, at = {}, 5
for k = 4, #KEYS do
  local ttl, whole, n = ARGV[at], ARGV[at + 1] == '1', tonumber(ARGV[at + 2])
  local first = at + 3
  at = first + n
  if whole or redis.call('TYPE', KEYS[k])['ok'] == 'hash' then
    writes[#writes + 1] = {KEYS[k], ttl, whole, first, at - 1}
  end
end
for _, w in ipairs(writes) do
  local key, ttl, whole = w[1], w[2], w[3]
  if whole then redis.call('DEL', key) end
  hset_args(key, w[4], w[5])
  if ttl == '0' then
    redis.call('PERSIST', key)
  else
    redis.call('EXPIRE', key, ttl)
  end
end
if copy then
  for _, fields in ipairs(rejected) do
    redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', unpack(fields))
  end
end
redis.call('SET', KEYS[1], ARGV[2])
keep_reply(KEYS[3], '1')
return 1
"""
)

# The log's entries after an id, and the server's clock read in the same step: no entry
# the read missed can get an id at or below that time, so readers of several partitions
# know how far each one is complete (``sumbatch tail``).
# KEYS: events. ARGV: after (exclusive), count. Returns {now ms, entries}.
READ_SINCE = """
local now = redis.call('TIME')
local entries = redis.call('XRANGE', KEYS[1], '(' .. ARGV[1], '+', 'COUNT', ARGV[2])
return {tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000), entries}
"""
