"""CPU time from /proc, for ops/bench/cluster.py: per process, per role and the whole
machine's, and the arithmetic that turns it into CPU µs per task and cores busy.

A figure that could not be read (a process gone, no /proc) is None, and so is any sum
or quotient that needs it: never 0 standing in for it.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol

from sumbatch.processes.embedded import EmbeddedServer

CLK_TCK = os.sysconf("SC_CLK_TCK")


class Measured(Protocol):
    """What the arithmetic needs of a round (cluster_load.Sample): its tasks and seconds
    of the throughput phase, and the CPU seconds spent meanwhile."""

    tasks_per_s: float | None
    tasks: int
    seconds: float
    cpu_s: dict[str, float | None]
    machine_busy_s: float | None


# -- reading /proc -----------------------------------------------------------------------


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a live process, all its threads; None once gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # from field 3 (state) on
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def machine_busy_seconds() -> float | None:
    """CPU seconds all cores have spent busy since boot (not idle, not waiting on I/O)."""
    try:
        first = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = map(int, first[1:9])
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def cpu_by_role(roles: Mapping[str, list[int]]) -> dict[str, float | None]:
    """Each role's CPU seconds now, summed over its processes; None if one is gone."""
    out: dict[str, float | None] = {}
    for role, pids in roles.items():
        each = [cpu_seconds(pid) for pid in pids]
        out[role] = None if None in each else sum(s for s in each if s is not None)
    return out


# -- whose processes ---------------------------------------------------------------------


def roles_of(
    masters: list[EmbeddedServer],
    others: list[EmbeddedServer],
    children: list[subprocess.Popen[bytes]],
) -> dict[str, list[int]]:
    """Every process this run started, by role: the target's masters one by one, the
    idle servers of the other targets, the service (API, workers, projector, in the
    order common.service starts them) and this process, which generates the load."""
    roles = {f"master :{m.port}": [pid_of(m)] for m in masters}
    roles["other servers"] = [pid_of(s) for s in others]
    roles["api"] = [children[0].pid]
    roles["workers"] = [child.pid for child in children[1:-1]]
    roles["projector"] = [children[-1].pid]
    roles["load generator"] = [os.getpid()]
    return roles


def pid_of(server: EmbeddedServer) -> int:
    assert server.process is not None, "a server that was never started"
    return server.process.pid


# -- arithmetic --------------------------------------------------------------------------


def minus(after: float | None, before: float | None) -> float | None:
    return None if after is None or before is None else after - before


def sum_known(values: list[float | None]) -> float | None:
    return None if None in values else sum(v for v in values if v is not None)


def max_known(values: list[float | None]) -> float | None:
    return None if not values or None in values else max(v for v in values if v is not None)


def per_task_us(samples: Sequence[Measured], role: str) -> float | None:
    """A role's CPU µs per task over the rounds that measured it."""
    usable = [s for s in samples if s.tasks_per_s is not None and s.cpu_s.get(role) is not None]
    if not usable:
        return None
    return sum(s.cpu_s[role] or 0.0 for s in usable) / sum(s.tasks for s in usable) * 1e6


def cores(samples: Sequence[Measured], of: list[str] | None) -> float | None:
    """Cores busy during the throughput phases: the whole machine's (``of`` None), or
    those of the roles named."""
    usable = [s for s in samples if s.tasks_per_s is not None]
    if not usable:
        return None
    total = 0.0
    for s in usable:
        busy = s.machine_busy_s if of is None else sum_known([s.cpu_s.get(r) for r in of])
        if busy is None:
            return None
        total += busy
    return total / sum(s.seconds for s in usable)
