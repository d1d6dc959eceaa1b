"""The projector's script: commit views with the position they include."""

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

# The log's entries after an id, and the server's clock read in the same step: no entry
# the read missed can get an id at or below that time, so readers of several partitions
# know how far each one is complete (``sumbatch tail``).
# KEYS: events. ARGV: after (exclusive), count. Returns {now ms, entries}.
READ_SINCE = """
local now = redis.call('TIME')
local entries = redis.call('XRANGE', KEYS[1], '(' .. ARGV[1], '+', 'COUNT', ARGV[2])
return {tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000), entries}
"""
