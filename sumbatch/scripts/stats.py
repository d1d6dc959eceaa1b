"""The stats hash of a partition (``Keys.stats``): monotonic counters and histograms
kept in Redis, written by the scripts that append the events they count, in the same
atomic step, so a retried or replayed step can never count twice and a crash never
loses a count. ``sumbatch replay`` refolds the views, never these.

Field names read well in ``redis-cli HGETALL``: the counters by name
(``tasksCompleted``), a histogram's buckets as ``<name>:<upper bound>`` (each bucket
counts the values above the bound before it: not cumulative, unlike Prometheus'
``le``, which /metrics adds up) and its sum as ``<name>:sum``. Every write goes
through ``redis.pcall``: a stats hash broken by hand loses counts, never an outcome.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

# Monotonic totals since the namespace was created, in the order /system lists them.
COUNTERS: Final = (
    "groupsSubmitted",
    "groupsFinished",
    "tasksSubmitted",
    "tasksCompleted",
    "tasksCached",
    "tasksFailed",
    "tasksRevoked",
)


@dataclass(frozen=True)
class Histogram:
    """One histogram's fields in the stats hash: a bucket per upper bound, +Inf last,
    and the sum of the values observed."""

    name: str
    bounds: tuple[float, ...]

    def bucket(self, index: int) -> str:
        """The field of bucket ``index``; ``len(bounds)`` is +Inf."""
        bound = "+Inf" if index == len(self.bounds) else f"{self.bounds[index]:g}"
        return f"{self.name}:{bound}"

    @property
    def buckets(self) -> list[str]:
        return [self.bucket(i) for i in range(len(self.bounds) + 1)]

    @property
    def sum(self) -> str:
        return f"{self.name}:sum"


# Seconds a task's run took, from its start (the simulated delay included) to its
# outcome: the run that produced each recorded outcome, by the outcome. Cache hits ran
# nothing; a run the fence turned away (revoked, or raced) is not counted.
_RUN_BOUNDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 7.5, 10, 15, 30, 60, 120, 300)
TASK_RUN: Final = {
    "completed": Histogram("taskRunSeconds:completed", _RUN_BOUNDS),
    "failed": Histogram("taskRunSeconds:failed", _RUN_BOUNDS),
}
# Seconds from a group's submission to its GroupFinished (both by the server's clock).
GROUP: Final = Histogram(
    "groupSeconds",
    (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 15, 30, 60, 120, 300, 600, 1800, 3600),
)
HISTOGRAMS: Final = (*TASK_RUN.values(), GROUP)


def _lua_histogram(histogram: Histogram) -> str:
    bounds = ", ".join(repr(float(b)) for b in histogram.bounds)
    fields = ", ".join(f"'{field}'" for field in histogram.buckets)
    return f"{{bounds = {{{bounds}}}, fields = {{{fields}}}, sum = '{histogram.sum}'}}"


# Prefixed to the scripts that count (lib.LIB): a tally collects one step's counts
# and observations, and is written once at its end.
LUA = f"""
local RUN_COMPLETED = {_lua_histogram(TASK_RUN["completed"])}
local RUN_FAILED = {_lua_histogram(TASK_RUN["failed"])}
local GROUP_SECONDS = {_lua_histogram(GROUP)}

local function tally()
  return {{counts = {{}}, sums = {{}}}}
end

local function count(t, field, n)
  t.counts[field] = (t.counts[field] or 0) + n
end

-- One value into a histogram (a table above): its bucket and its sum.
local function observe(t, h, value)
  local i = #h.bounds + 1
  for k, bound in ipairs(h.bounds) do
    if value <= bound then i = k break end
  end
  count(t, h.fields[i], 1)
  t.sums[h.sum] = (t.sums[h.sum] or 0) + value
end

-- pcall: a stats hash broken by hand must not fail the step half-way.
local function write_tally(t, key)
  for field, n in pairs(t.counts) do
    if n ~= 0 then redis.pcall('HINCRBY', key, field, n) end
  end
  for field, value in pairs(t.sums) do
    redis.pcall('HINCRBYFLOAT', key, field, string.format('%.17g', value))
  end
end

-- The server's clock in ms.
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
"""
