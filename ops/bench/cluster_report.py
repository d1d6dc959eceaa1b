"""The report of ops/bench/cluster.py: each target's rounds summed up, the ratios between
targets and the projection to N masters, printed as tables and written as JSON (a figure
not measured is None: "missing" in the tables, null in the JSON, never 0)."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench import pct
from cluster_load import Sample
from cluster_targets import TITLES
from cpu import cores, max_known, minus, per_task_us, sum_known
from report import MISSING, RESULTS

SERVICE_ROLES = ("api", "workers", "projector")
ALL = "everything started here"

Line = tuple[str, float | None, str]  # a figure's name, its value, its unit


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


# -- figures -----------------------------------------------------------------------------


def summarize(samples: list[Sample], layout: tuple[int, str] | None) -> Summary:
    rates = [s.tasks_per_s for s in samples if s.tasks_per_s is not None]
    lat = [ms for s in samples for ms in s.latencies_ms]
    roles = list(dict.fromkeys(role for s in samples for role in s.cpu_s))
    masters = [r for r in roles if r.startswith("master")]
    cpu = {role: per_task_us(samples, role) for role in roles}
    cpu["masters (all)"] = sum_known([cpu[m] for m in masters]) if masters else None
    cpu["busiest master"] = max_known([cpu[m] for m in masters])
    cpu["service (api+workers+projector)"] = sum_known([cpu[r] for r in SERVICE_ROLES])
    cpu[ALL] = sum_known([cpu[r] for r in roles])
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


def ratio(top: float | None, bottom: float | None) -> float | None:
    return None if top is None or not bottom else top / bottom


def projection(summaries: dict[str, Summary], cpus: int) -> list[Line]:
    """Where N masters top out, from one shard's measured ceiling, and what feeding them
    takes, from the service's measured CPU per task on the cluster (P=9)."""
    shard = summaries["shard"].shard_ceiling
    feed = summaries["p9"].cpu_us_per_task.get("service (api+workers+projector)")
    rows: list[Line] = [
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
        everything = summaries[key].cpu_us_per_task.get(ALL)
        title = TITLES[key]
        rows.append((f"this machine's ceiling, {title} ({cpus} cores / CPU per task)",
                     ratio(cpus * 1e6, everything), "tasks/s"))  # fmt: skip
    return rows


def ratios(summaries: dict[str, Summary]) -> list[Line]:
    single = summaries["single"]
    rows: list[Line] = []
    for key in ("p3", "p9", "shard"):
        s = summaries[key]
        name = f"{TITLES[key]} / single P=1"
        rows.append((f"{name}: tasks/s", ratio(s.tasks_per_s, single.tasks_per_s), "x"))
        rows.append((f"{name}: latency p50", ratio(s.p50_ms, single.p50_ms), "x"))
        rows.append((f"{name}: latency p99", ratio(s.p99_ms, single.p99_ms), "x"))
        rows.append((f"{name}: CPU per task, all processes", ratio(s.cpu_us_per_task.get(ALL),
                     single.cpu_us_per_task.get(ALL)), "x"))  # fmt: skip
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
             "service (api+workers+projector)", "load generator", "other servers", ALL]  # fmt: skip
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


# -- the JSON ----------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "loadavg": os.getloadavg(),
        "python": platform.python_version(),
    }


def results(
    settings: dict[str, Any],
    machines: dict[str, dict[str, Any]],
    summaries: dict[str, Summary],
    samples: dict[str, list[Sample]],
    cpus: int,
) -> dict[str, Any]:
    """Everything the run measured: its settings, the machine at its start and end, each
    target's summary and rounds, the ratios and the projection."""
    return {
        "settings": settings,
        "machine": machines,
        "targets": {k: {"summary": asdict(summaries[k]),
                        "rounds": [asdict(s) for s in samples[k]]} for k in summaries},
        "ratios": {name: value for name, value, _ in ratios(summaries)},
        "projection": {name: value for name, value, _ in projection(summaries, cpus)},
    }  # fmt: skip


def write_json(out: dict[str, Any]) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / time.strftime("cluster-%Y%m%d-%H%M%S.json")
    path.write_text(json.dumps(out, indent=2, ensure_ascii=False))
    return path
