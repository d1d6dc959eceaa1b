"""What the scripts share: the Lua functions every script is prefixed with, and the
two events built in Lua, whose field lists are generated from ``events.py``."""

from __future__ import annotations

import msgspec

from sumbatch.config import MAX_TASKS_LIMIT
from sumbatch.model import ids
from sumbatch.model.events import GROUP_LOG_OMITS, Event, GroupFinished, TaskRevoked
from sumbatch.scripts import stats

# Seconds a state-changing script keeps its reply (or a mark) under its call's token
# (``Keys.call``): a resend of the same call (the client's retry after a socket
# timeout, or the store's own resend of a call whose outcome was unknown) within it
# changes nothing and gets the first reply. A client resends after its socket timeout
# (10 s by default) plus a reconnect; both runs then come when the server answers
# again, moments apart.
CALL_TTL = 60


def lua_fields(cls: type[Event], **values: str) -> str:
    """A Lua table of an event's stream fields in the order ``events.to_flat`` gives
    them: the names come from the event's definition, each value is a Lua expression
    giving its text, and every field must be given, so the two cannot drift apart."""
    fields = msgspec.structs.fields(cls)
    if (names := {f.name for f in fields}) != values.keys():
        raise TypeError(f"{cls.__name__}: fields {sorted(names)}, given {sorted(values)}")
    pairs = [f"'{f.encode_name}', {values[f.name]}" for f in fields]
    return "{" + ", ".join([f"'type', '{cls.__name__}'", *pairs]) + "}"


_GROUP_FINISHED = lua_fields(
    GroupFinished,
    group_task_id="gid",
    tasks_total="total",
    tasks_failed="failed",
    tasks_revoked="revoked",
    succeeded="(failed == '0' and revoked == '0') and 'true' or 'false'",
)
_TASK_REVOKED = lua_fields(
    TaskRevoked,
    task_id=f"prefix .. string.format('%0{ids.INDEX_DIGITS}x', index + 1)",
    group_task_id="gid",
    index="tostring(index)",
)

# What a script that runs once per call starts and ends with (``Keys.call``).
CALLS = (
    f"""
local CALL_TTL = {CALL_TTL}  -- seconds a call's reply is kept for a resend of it
"""
    + """
-- What a first run of this very call kept (its token's key, ``Keys.call``), as text,
-- or nil when none ran: checked before anything else, so that a resend of a call that
-- ran changes nothing and answers as the first did. A key of another type (written by
-- hand) reads as none, and is replaced.
local function first_reply(key)
  local kept = redis.pcall('GET', key)
  if type(kept) == 'string' then return kept end
  return nil
end

-- Keep a call's reply (text: a number, or what ``joined`` makes) under its token for
-- CALL_TTL s: the last write of a script, which cannot fail (SET replaces any type).
local function keep_reply(key, text)
  redis.call('SET', key, text, 'EX', CALL_TTL)
end

-- Lists of strings without spaces or '|' (task keys) as one text, and back: a C-level
-- concat, where cjson.encode of 200 items costs about 100 us of the script.
local function joined(lists)
  local parts = {}
  for n, list in ipairs(lists) do parts[n] = table.concat(list, ' ') end
  return table.concat(parts, '|')
end

local function unjoined(text)
  local lists = {}
  for part in string.gmatch(text .. '|', '([^|]*)|') do
    local list = {}
    for word in string.gmatch(part, '%S+') do list[#list + 1] = word end
    lists[#lists + 1] = list
  end
  return lists
end
"""
)

_GENERATED = f"""
local MAX_TASKS = {MAX_TASKS_LIMIT}  -- the most tasks a group can have
local GROUP_LOG_OMITS = {{{", ".join(f"['{name}'] = true" for name in GROUP_LOG_OMITS)}}}

-- The events built here. Counts are the ledger's, as text.
local function group_finished(gid, total, failed, revoked)
  return {_GROUP_FINISHED}
end

-- prefix: the group id less its last {ids.INDEX_DIGITS} hex digits, which hold index + 1.
local function task_revoked(gid, prefix, index)
  return {_TASK_REVOKED}
end
"""

LIB = (
    _GENERATED
    + CALLS
    + stats.LUA
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

-- The write-side keys of the groups a script works on, declared in KEYS: four per
-- group from KEYS[first] on, in the order of `gids` (``Keys.of_group``).
local function declared(first, gids)
  local G = {}
  for n, gid in ipairs(gids) do
    local k = first + 4 * (n - 1)
    G[gid] = {ledger = KEYS[k], ended = KEYS[k + 1], attempts = KEYS[k + 2], log = KEYS[k + 3]}
  end
  return G
end

-- A group's write side, checked before any write: 'gone' (its ledger expired or never
-- was), 'bad' (a key of the wrong type or a ledger that is not counters), or the
-- ledger's total as a number. K: the group's keys.
local function group_state(K)
  local ledger = K.ledger
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
  if not (is_or_none(K.ended, 'string') and is_or_none(K.attempts, 'string')
      and is_or_none(K.log, 'stream')) then
    return 'bad'
  end
  return tonumber(c[1])
end

-- A group an item names, checked once per script run: its keys (from `declared`), its
-- group_state, and its fence bitmap when it is live. `seen` caches them by group id. A
-- group whose keys were not declared is 'bad': refused, never touched.
local function group_of(G, seen, gid)
  local g = seen[gid]
  if g == nil then
    local K = G[gid]
    g = {keys = K, state = K and group_state(K) or 'bad'}
    if type(g.state) == 'number' then g.ended = redis.call('GET', K.ended) or '' end
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
-- after its first write. The copy leaves out the fields its key and the index say
-- (events.GROUP_LOG_OMITS; readers put them back with events.from_group_log).
local function append(events, log, fields)
  local id = redis.call('XADD', events, '*', unpack(fields))
  local copy = {}
  for i = 1, #fields, 2 do
    local name = fields[i]
    if not GROUP_LOG_OMITS[name] then
      copy[#copy + 1] = name
      copy[#copy + 1] = fields[i + 1]
    end
  end
  redis.pcall('XADD', log, id, unpack(copy))
  return id
end

-- Count tasks that just ended in one group; if that was its last, append
-- GroupFinished, count it in the tally `t` with its time since the submission (a
-- ledger written before that time was kept has none), and start the clock on the
-- group's write-side keys. K: its keys.
local function tasks_ended(events, K, gid, ended, failed, revoked, ttl, t)
  local ledger = K.ledger
  if failed > 0 then redis.call('HINCRBY', ledger, 'failed', failed) end
  if revoked > 0 then redis.call('HINCRBY', ledger, 'revoked', revoked) end
  local finished = redis.call('HINCRBY', ledger, 'finished', ended)
  local c = redis.call('HMGET', ledger, 'total', 'failed', 'revoked', 'submitted')
  if finished ~= tonumber(c[1]) then return end
  local log = K.log
  append(events, log, group_finished(gid, c[1], c[2], c[3]))
  count(t, 'groupsFinished', 1)
  local submitted = tonumber(c[4])
  if submitted then observe(t, GROUP_SECONDS, math.max(0, now_ms() - submitted) / 1000) end
  for _, key in ipairs({ledger, K.ended, K.attempts, log}) do
    redis.call('EXPIRE', key, ttl)
  end
end

-- Whether bit i (from 0) is set in a bitmap read with GET.
local function bit_set(bitmap, i)
  local byte = string.byte(bitmap, math.floor(i / 8) + 1) or 0
  return math.floor(byte / 2 ^ (7 - i % 8)) % 2 == 1
end

-- Decide, once per script run, whether to acknowledge a work entry: its group is gone
-- (state 'gone'), or every task it can hold has ended by the group's fence bitmap (the
-- `count` indexes from `first` within the group's `total` tasks, its state: a group's
-- last slice is shorter). `acked` maps entry ids to the decision.
local function decide_ack(acked, entry, state, bitmap, first, count)
  if acked[entry] ~= nil then return end
  if state == 'gone' then
    acked[entry] = true
    return
  end
  for i = first, math.min(first + count, state) - 1 do
    if not bit_set(bitmap, i) then
      acked[entry] = false
      return
    end
  end
  acked[entry] = true
end

-- Acknowledge the work entries `decide_ack` said yes to, a thousand per XACK (unpack
-- has a limit).
local function ack_entries(work, group, acked)
  local ids = {}
  for entry, yes in pairs(acked) do
    if yes then ids[#ids + 1] = entry end
  end
  for from = 1, #ids, 1000 do
    redis.call('XACK', work, group, unpack(ids, from, math.min(#ids, from + 999)))
  end
end
"""
)
