"""Partitions and Redis Cluster: the service's throughput and latency on one server and
on a local cluster, and one shard's ceiling, all measured in one run on this machine.

    .venv/bin/python ops/bench/cluster.py            # 5 rounds of 200 groups (~6 min)
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
shard and every process of the service share the same cores. CPU per task also holds
up when others load the machine, which tasks/s does not: the table shows the cores
busy during the run, and how many of them were not ours.

Prints a table (a figure not measured prints as "missing", never 0) and writes JSON to
ops/bench/results/cluster-<time>.json. The processes log (at WARNING) to a folder kept
after the run and printed; any line in those logs, a group not processed within 60 s
or a wrong sum is reported as a problem. Every server and process started here is
stopped at the end, also on Ctrl-C or an error.

This file runs the rounds; the rest lives beside it: cluster_targets.py (the servers and
the four targets), cluster_load.py (the load, one round's figures), cpu.py (CPU time
from /proc) and cluster_report.py (the summaries, the tables, the JSON).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import subprocess
import tempfile
from contextlib import ExitStack
from pathlib import Path
from types import FrameType
from typing import Any

from bench import WINDOW
from cluster_load import CLIENTS, GROUP_SIZE, LATENCY_SIZE, POLL, Sample, drive
from cluster_report import (
    fmt,
    machine,
    print_problems,
    print_tables,
    results,
    summarize,
    write_json,
)
from cluster_targets import Target, partition_layout, pick_server, start_targets
from common import service
from cpu import roles_of

from sumbatch.processes.embedded import EmbeddedServer, server_version, version_text

# -- a round ---------------------------------------------------------------------------


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
    first = len(started)
    sample: Sample | None = None
    try:
        with service(target.url, target.namespace, "0", args.workers, env=env, logs=logs) as (
            base,
            children,
        ):
            started += children
            roles = roles_of(target.masters, others, children)
            sample = asyncio.run(drive(base, roles, args.groups, args.reps))
    except subprocess.TimeoutExpired:  # a process did not stop: a problem, not the end
        if sample is None:
            raise
        sample.problems += stuck(started[first:], logs)
    except Exception as exc:  # the API never ready, say: this round's figures are missing
        sample = Sample(None, 0, 0.0, {}, None, [], [f"round failed: {type(exc).__name__}: {exc}"])
    sample.problems += log_lines(logs)
    return sample


def stuck(children: list[subprocess.Popen[bytes]], logs: Path) -> list[str]:
    """The children still running after common.service gave them 60 s from SIGTERM,
    each with where it is stuck (py-spy's dump, where installed), then killed."""
    problems = []
    for child in children:
        if child.poll() is None:
            command = " ".join(map(str, child.args[2:])) if isinstance(child.args, list) else ""
            where = dump_stack(child.pid, logs / f"stuck-{child.pid}.txt")
            problems.append(f"`{command}` (pid {child.pid}) still running 60 s after SIGTERM; "
                            f"{where}")  # fmt: skip
            child.kill()
            child.wait(10)
    return problems


def dump_stack(pid: int, out: Path) -> str:
    """Write the Python stacks of a live process to ``out`` with py-spy, when it is on
    PATH; else say what the kernel says it waits in."""
    spy = shutil.which("py-spy")
    if spy is None:
        wchan = Path(f"/proc/{pid}/wchan").read_text(errors="replace")
        return f"waiting in {wchan or 'nothing'} (no py-spy on PATH for its Python stacks)"
    done = subprocess.run([spy, "dump", "--locals", "--pid", str(pid)], capture_output=True,
                          text=True, timeout=60, check=False)  # fmt: skip
    out.write_text(done.stdout + done.stderr)
    return f"its stacks in {out}"


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
    parser.add_argument("--rounds", type=int, default=None, help="rounds (default 5; quick 1)")
    parser.add_argument("--groups", type=int, default=None, help="groups of 100 per round")
    parser.add_argument("--reps", type=int, default=None, help="4-task groups per round")
    parser.add_argument("--workers", type=int, default=2, help="worker processes")
    parser.add_argument("--server", default=None, help="server binary (default packaged Valkey)")
    args = parser.parse_args()
    args.rounds = args.rounds or (1 if args.quick else 5)
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
    settings = {**vars(args), "server": binary,
                "server_version": version_text(server_version(binary))}  # fmt: skip
    machines = {"start": started_with, "end": finished_with}
    print(f"written to {write_json(results(settings, machines, summaries, samples, cpus))}")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        raise SystemExit("interrupted: every server and process started here is stopped") from None
