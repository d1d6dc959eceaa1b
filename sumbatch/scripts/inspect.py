"""The overview's script: a partition's state at one instant, for /metrics and
/system. It only reads."""

# The server's clock; the lengths of the work stream, the event log, the dead letters
# and the rejected entries; the workers' consumer group (pending, lag) and each of its
# consumers (pending, idle); the stats hash; and the projector's lag: log entries after
# its position (all of them before it has one). Counting costs about 4 us per entry
# in the script, so it counts up to a cap on either side of the position: exact when
# the entries after it, or those up to it, are fewer than the cap, else the cap (a
# lower bound). Keys of the wrong type read as absent.
# The group's lag counts the slices still queued in turn (``dispatch.py``) as well as
# those waiting in the stream: the queues of up to `cap` groups are counted.
# KEYS: work, events, dead letters, rejected, stats, projector position, fair keys.
# ARGV: consumer group, lag cap, groups rings' prefix, queues' prefix.
# Returns {now ms, {work, events, dead, rejected lengths}, group, consumers, stats flat,
# projector lag}: group {pending, lag} ({} when there is none; lag -1 when the server
# cannot tell, as XINFO GROUPS says after an XDEL), consumers {name, pending, idle ms,
# ...}, projector lag -1 when the position is no entry id.
INSPECT = """
local function key_type(key)
  return redis.call('TYPE', key)['ok']
end
local function length(key)
  if key_type(key) == 'stream' then return redis.call('XLEN', key) end
  return 0
end
local function record(flat)
  local r = {}
  for j = 1, #flat, 2 do r[flat[j]] = flat[j + 1] end
  return r
end
local now = redis.call('TIME')
local lengths = {length(KEYS[1]), length(KEYS[2]), length(KEYS[3]), length(KEYS[4])}
local group, consumers = {}, {}
if key_type(KEYS[1]) == 'stream' then
  for _, g in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
    local info = record(g)
    if info['name'] == ARGV[1] then
      group = {info['pending'], type(info['lag']) == 'number' and info['lag'] or -1}
    end
  end
  if #group > 0 then
    for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
      local info = record(c)
      consumers[#consumers + 1] = info['name']
      consumers[#consumers + 1] = info['pending']
      consumers[#consumers + 1] = info['idle']
    end
  end
end
-- Slices queued in turn, in up to `cap` groups' queues.
local function queued(cap)
  local n, groups = 0, 0
  if key_type(KEYS[7]) ~= 'list' then return 0 end
  for _, key in ipairs(redis.call('LRANGE', KEYS[7], 0, cap - 1)) do
    local ring = ARGV[3] .. key
    if key_type(ring) == 'list' then
      for _, gid in ipairs(redis.call('LRANGE', ring, 0, cap - groups - 1)) do
        local queue = ARGV[4] .. gid
        if key_type(queue) == 'list' then n = n + redis.call('LLEN', queue) end
        groups = groups + 1
      end
    end
    if groups >= cap then break end
  end
  return n
end
if #group > 0 and group[2] >= 0 then group[2] = group[2] + queued(tonumber(ARGV[2])) end
local stats = {}
if key_type(KEYS[5]) == 'hash' then stats = redis.call('HGETALL', KEYS[5]) end
-- Entries of the log from start to finish (XRANGE bounds), counted up to `cap`; -1
-- when a bound is no entry id (a position written by hand).
local function count(start, finish, cap)
  local n = 0
  while n < cap do
    local page = redis.pcall('XRANGE', KEYS[2], start, finish, 'COUNT', math.min(500, cap - n))
    if page['err'] then return -1 end
    n = n + #page
    if #page < 500 then break end
    start = '(' .. page[#page][1]
  end
  return n
end
local lag = 0
if lengths[2] > 0 then
  local position = key_type(KEYS[6]) == 'string' and redis.call('GET', KEYS[6])
  if not position then
    lag = lengths[2]
  else
    -- The entries after the position; when there are too many to count, the length
    -- less those up to it, when those are few (the log is trimmed no further than
    -- the position, so a projector long stopped has little before it).
    local cap = tonumber(ARGV[2])
    lag = count('(' .. position, '+', cap)
    if lag == cap then
      local before = count('-', position, cap)
      if before >= 0 and before < cap then lag = lengths[2] - before end
    end
  end
end
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
return {ms, lengths, group, consumers, stats, lag}
"""
