"""sumbatch beside the original Celery + Flask design, on the same server, driven by
the same HTTP client in the same run.

    .venv/bin/python ops/bench/versus_celery.py          # about 2 minutes
    .venv/bin/python ops/bench/versus_celery.py --quick

The original (``ops/bench/original/``, reconstructed from its README) runs from a venv
of its own, ``.venv-celery``, made on first use with Celery and Flask from PyPI; sumbatch
never depends on them. Both run without the simulated delay, each with its defaults
for one machine: sumbatch's API, one worker process and the projector; Flask's threaded
server and a Celery worker with one prefork process per core. Each figure of sumbatch
is printed as a ratio to the original's, with the goals of issue 11: a 4-task group's
latency at most 0.1 of the original's.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bench import latencies, pct, throughput
from common import service, wait_ready
from report import Goal, Row, report

from sumbatch.processes.embedded import EmbeddedServer
from sumbatch.testing.ports import free_port

HERE = Path(__file__).resolve().parent
ORIGINAL = HERE / "original"
VENV = HERE.parent.parent / ".venv-celery"
REQUIREMENTS = ["celery[redis]>=5.3,<6", "flask>=3,<4"]


def celery_python() -> Path:
    """The Python of the original's venv, made (with Celery and Flask) if missing."""
    python = VENV / "bin" / "python"
    if not python.exists():
        print(f"making {VENV} for the original (Celery, Flask) ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *REQUIREMENTS], check=True)
    return python


@contextmanager
def original(url: str, python: Path) -> Iterator[str]:
    """The original's API and Celery worker on ``url``; yields the API's base URL."""
    port = free_port()
    env = {**os.environ, "ORIGINAL_REDIS_URL": url, "ORIGINAL_DELAY": "0"}
    worker = [str(python), "-m", "celery", "-A", "tasks", "worker", "--loglevel=WARNING",
              "--concurrency", str(os.cpu_count() or 1), "--without-gossip",
              "--without-mingle", "--without-heartbeat"]  # fmt: skip
    children = [
        subprocess.Popen(worker, cwd=ORIGINAL, env=env),
        subprocess.Popen(
            [str(python), "api.py", str(port)], cwd=ORIGINAL, env=env, stderr=subprocess.DEVNULL
        ),  # fmt: skip
    ]
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base)
        yield base
    finally:
        for child in children:
            child.send_signal(signal.SIGTERM)
        for child in children:
            child.wait(30)


def measure(base: str, reps: int, groups: int) -> tuple[float, float]:
    """(p50 ms of a 4-task group, POST until a GET shows it processed; tasks/s of
    1,000-task groups, one client, polling every 50 ms); every sum checked."""
    asyncio.run(latencies(base, 5, 4, poll=0))  # warm up
    lat = asyncio.run(latencies(base, reps, 4, poll=0))
    p50 = pct([total for _, total in lat], 0.5) * 1000
    return p50, asyncio.run(throughput(base, groups, 1000, clients=1, poll=0.05))


def main() -> None:
    parser = argparse.ArgumentParser(description="sumbatch beside the original Celery design")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    reps, groups = (50, 2) if args.quick else (200, 5)
    python = celery_python()
    server = EmbeddedServer(Path(tempfile.mkdtemp(prefix="sumbatch-vs-")), free_port())
    server.start()
    try:
        print("the original (Celery + Flask) ...", flush=True)
        with original(server.url.rsplit("/", 1)[0] + "/1", python) as base:
            theirs = measure(base, reps, groups)
        print("sumbatch ...", flush=True)
        with service(server.url, "versus", "0", 1) as (base, _):
            ours = measure(base, reps, groups)
    finally:
        server.stop()
    rows = [
        Row("original: 4-task group, POST until processed, p50", theirs[0], "ms"),
        Row("original: groups of 1,000, one client", theirs[1], "tasks/s"),
        Row(
            "sumbatch: 4-task group, POST until processed, p50",
            ours[0],
            "ms",
            theirs[0],
            "original",
            Goal("ratio", "<=", 0.1),
        ),  # fmt: skip
        Row(
            "sumbatch: groups of 1,000, one client", ours[1], "tasks/s", theirs[1], "original"
        ),  # fmt: skip
    ]
    report(rows, args)


if __name__ == "__main__":
    main()
