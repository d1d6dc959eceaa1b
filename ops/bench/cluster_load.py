"""The load ops/bench/cluster.py puts on a target, over HTTP as ops/bench/bench.py does:
groups of 100 for tasks/s (CPU time read around that phase), then 4-task groups one at a
time for latency, every sum checked; one round's figures as a Sample."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from dataclasses import dataclass

import httpx2 as httpx
from bench import WINDOW
from common import tasks_for
from cpu import cpu_by_role, machine_busy_seconds, minus

CLIENTS = 8
GROUP_SIZE = 100
POLL = 0.05  # s between GETs of a group, throughput phase
LATENCY_SIZE = 4
GROUP_DEADLINE = 60.0  # s after its POST a group counts as lost


@dataclass
class Sample:
    """One round on one target. CPU seconds are per role, over the throughput phase."""

    tasks_per_s: float | None
    tasks: int
    seconds: float
    cpu_s: dict[str, float | None]
    machine_busy_s: float | None
    latencies_ms: list[float]
    problems: list[str]


class GroupProblem(Exception):
    """A group that was refused, not processed in time, or came back with wrong sums."""


async def run_group(client: httpx.AsyncClient, size: int, poll: float) -> float:
    """POST a group, GET it until processed, check its sums: seconds from the POST."""
    body, expected = tasks_for(size)
    start = time.perf_counter()
    posted = await client.post("/grouptasks", json=body)
    if posted.status_code not in (200, 201):
        raise GroupProblem(f"POST answered {posted.status_code}: {posted.text[:200]}")
    gid = posted.json()["groupTaskId"]
    while True:
        answer = await client.get(f"/grouptasks/{gid}")
        if answer.status_code != 200:
            raise GroupProblem(f"group {gid}: GET answered {answer.status_code}: {answer.text}")
        group = answer.json()
        if group["grouptaskProcessed"]:
            break
        if time.perf_counter() - start > GROUP_DEADLINE:
            raise GroupProblem(
                f"group {gid}: lost, not processed {GROUP_DEADLINE:g} s after its POST "
                f"({group['tasksCompleted']}/{size} tasks completed)"
            )
        if poll:
            await asyncio.sleep(poll)
    if group["results"] != expected:
        raise GroupProblem(f"group {gid}: wrong results")
    return time.perf_counter() - start


async def checked(run: Awaitable[float], problems: list[str]) -> float | None:
    """A group's seconds; None, and the problem noted, when it went wrong."""
    try:
        seconds: float = await run
        return seconds
    except (GroupProblem, httpx.HTTPError) as exc:
        problems.append(f"{type(exc).__name__}: {exc}")
        return None


async def throughput(base: str, groups: int, problems: list[str]) -> float | None:
    """tasks/s of ``groups`` groups of 100, CLIENTS clients with WINDOW groups in flight
    each; None when any group went wrong."""
    todo = [groups]

    async def group_loop(client: httpx.AsyncClient) -> None:
        while todo[0] > 0:
            todo[0] -= 1
            await checked(run_group(client, GROUP_SIZE, POLL), problems)

    async def one_client() -> None:
        async with httpx.AsyncClient(base_url=base, timeout=GROUP_DEADLINE) as client:
            await asyncio.gather(*(group_loop(client) for _ in range(WINDOW)))

    failed = len(problems)
    start = time.perf_counter()
    await asyncio.gather(*(one_client() for _ in range(CLIENTS)))
    elapsed = time.perf_counter() - start
    return None if len(problems) > failed else groups * GROUP_SIZE / elapsed


async def latencies(base: str, reps: int, problems: list[str]) -> list[float]:
    """ms from POST until processed of ``reps`` 4-task groups, one at a time."""
    async with httpx.AsyncClient(base_url=base, timeout=GROUP_DEADLINE) as client:
        await checked(run_group(client, LATENCY_SIZE, 0), problems)  # warm up
        out = []
        for _ in range(reps):
            seconds = await checked(run_group(client, LATENCY_SIZE, 0), problems)
            if seconds is not None:
                out.append(seconds * 1000)
        return out


async def drive(base: str, roles: dict[str, list[int]], groups: int, reps: int) -> Sample:
    """Warm up, then the throughput phase (CPU read around it), then latency."""
    problems: list[str] = []
    await throughput(base, CLIENTS * WINDOW, problems)
    cpu_before, busy_before = cpu_by_role(roles), machine_busy_seconds()
    start = time.perf_counter()
    tps = await throughput(base, groups, problems)
    seconds = time.perf_counter() - start
    cpu_after, busy_after = cpu_by_role(roles), machine_busy_seconds()
    cpu = {role: minus(cpu_after[role], cpu_before[role]) for role in roles}
    lat = await latencies(base, reps, problems)
    return Sample(tps, groups * GROUP_SIZE, seconds, cpu, minus(busy_after, busy_before), lat,
                  problems)  # fmt: skip
