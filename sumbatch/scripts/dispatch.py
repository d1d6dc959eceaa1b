"""Handing out work in turn: which group's slice goes to the work stream next.

A group's slices wait in its queue (``Keys.queue``, a list) instead of the work stream;
the groups with queued slices wait in rings, one per fairness key
(``Keys.fair_groups``), and the keys in one more ring (``Keys.fair_keys``). Each slice
handed out comes from the head key's head group; the group then goes to the back of
its key's ring, and the key to the back of the keys' ring. So a group's wait for its
next slice depends on how many groups (and keys) are ahead of it, never on how many
tasks they hold: O(1) Redis work per slice. A slice is handed out by adding it to the
work stream, where everything else goes on as before: the ``workers`` consumer group
reads it, keeps it pending, lets another worker claim it, acknowledges it.

Invariant: a key is in the keys' ring exactly while its groups' ring is not empty, and
a group is in its key's ring while its queue is not empty (or until the next turn
finds it gone: a cancel deletes the queue and takes the group out at once).
"""

# DISPATCH_LIB: dispatch_one(work, keys ring, groups ring prefix, queue prefix) moves
# the next slice in turn to the work stream; false when nothing is queued.
# undelivered(work, group): whether the work stream holds an entry the consumer group
# has not handed out yet (a slice waiting for a reader).
DISPATCH_LIB = """
-- A queued slice as the fields of a work entry; one that is not (written by hand)
-- goes as an entry no worker can read, which the worker dead-letters.
local function slice_fields(slice)
  local ok, fields = pcall(cjson.decode, slice)
  if ok and type(fields) == 'table' and #fields > 0 and #fields % 2 == 0 then
    local plain = true
    for _, v in ipairs(fields) do plain = plain and type(v) == 'string' end
    if plain then return fields end
  end
  return {'type', 'UnreadableQueuedSlice', 'slice', tostring(slice)}
end
-- Every key it touches is checked first: one of another type (written by hand) is
-- dropped from the turn, never a failed command half-way through a script.
local function dispatch_one(work, fair_keys, groups_prefix, queue_prefix)
  while true do
    local key = redis.call('LINDEX', fair_keys, 0)
    if not key then return false end
    local ring = groups_prefix .. key
    local gid = redis.call('TYPE', ring)['ok'] == 'list' and redis.call('LPOP', ring)
    if gid then
      local queue = queue_prefix .. gid
      local slice = redis.call('TYPE', queue)['ok'] == 'list' and redis.call('LPOP', queue)
      if slice and redis.call('EXISTS', queue) == 1 then redis.call('RPUSH', ring, gid) end
      if redis.call('EXISTS', ring) == 1 then
        redis.call('LMOVE', fair_keys, fair_keys, 'LEFT', 'RIGHT')
      else
        redis.call('LPOP', fair_keys)
      end
      if slice then
        redis.call('XADD', work, '*', unpack(slice_fields(slice)))
        return true
      end
      -- A group whose queue is gone (cancelled): out of the ring; the next one.
    else
      redis.call('LPOP', fair_keys)  -- no group left, or a ring written by hand
    end
  end
end
local function undelivered(work, group)
  if redis.call('TYPE', work)['ok'] ~= 'stream' then return false end
  local last
  for _, g in ipairs(redis.call('XINFO', 'GROUPS', work)) do
    local info = {}
    for j = 1, #g, 2 do info[g[j]] = g[j + 1] end
    if info['name'] == group then last = info['last-delivered-id'] end
  end
  if not last then return redis.call('XLEN', work) > 0 end
  return #redis.call('XRANGE', work, '(' .. last, '+', 'COUNT', 1) > 0
end
"""

# What a worker reads: up to ``count`` entries for this consumer. First the entries the
# stream holds and nobody has read (a slice handed out to wake a reader, an entry an
# older version wrote), then as many slices in turn as make up the count, each handed
# out and read at once, so none waits in the stream where readers would take them
# first come, first served. Should queued slices remain and no entry wait in the
# stream, one more is handed out: it wakes an idle worker blocked on the stream, which
# in turn wakes the next. Entries are returned as XREADGROUP returns them.
# KEYS: work, fair keys. ARGV: consumer group, consumer, count, groups ring prefix,
# queue prefix.
TAKE = (
    DISPATCH_LIB
    + """
local function read(count)
  local got = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', count,
    'STREAMS', KEYS[1], '>')
  return got and got[1][2] or {}
end
local ring_type = redis.call('TYPE', KEYS[2])['ok']
if not (ring_type == 'list' or ring_type == 'none') then
  return redis.error_reply('ERR the fairness ring is not a list (written by hand?)')
end
local count = tonumber(ARGV[3])
local entries = {}
if redis.call('TYPE', KEYS[1])['ok'] == 'stream' then entries = read(count) end
local handed = 0
while #entries + handed < count and dispatch_one(KEYS[1], KEYS[2], ARGV[4], ARGV[5]) do
  handed = handed + 1
end
if handed > 0 then
  for _, entry in ipairs(read(handed)) do entries[#entries + 1] = entry end
end
if redis.call('EXISTS', KEYS[2]) == 1 and not undelivered(KEYS[1], ARGV[1]) then
  dispatch_one(KEYS[1], KEYS[2], ARGV[4], ARGV[5])
end
return entries
"""
)
