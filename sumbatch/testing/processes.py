"""Real ``sumbatch`` processes: the environment they get, starting them with a log
each and killing them all at the end, and what Linux /proc says about a process's
connections (whether a worker waits for work)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from sumbatch.config import Settings
from sumbatch.store import Store

# The directory this sumbatch is imported from: child processes get it as their
# PYTHONPATH and cwd, so they run this very code, installed or not.
SOURCE = Path(__file__).resolve().parent.parent.parent


def clean_env(**values: str) -> dict[str, str]:
    """This process's environment with ``values``, but no SUMBATCH_ variable of its
    own: a setting left in the shell must not change what a child runs."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SUMBATCH_")}
    env.update(values)
    return env


def env_for(settings: Settings) -> dict[str, str]:
    """The environment that configures a sumbatch process like ``settings``."""
    return clean_env(
        REDIS_URL=settings.client_url,
        SUMBATCH_NAMESPACE=settings.namespace,
        SUMBATCH_DELAY=f"{settings.delay.low}-{settings.delay.high}",
        SUMBATCH_CLAIM_TIMEOUT=str(settings.claim_timeout),
        SUMBATCH_MAX_ATTEMPTS=str(settings.max_attempts),
        SUMBATCH_RETRY_BASE=str(settings.retry_base),
        SUMBATCH_HANDLER=settings.handler,
        SUMBATCH_PARTITIONS=str(settings.partitions or ""),
        SUMBATCH_LOG_LEVEL="WARNING",
        PYTHONPATH=str(SOURCE),
    )


class Processes:
    """Real sumbatch processes, each logging to a file in ``logs`` (``log_of`` names
    it); all killed at ``cleanup``."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.started: list[subprocess.Popen[bytes]] = []
        self.files: list[IO[bytes]] = []
        self.log_paths: dict[int, Path] = {}

    def start(
        self, settings: Settings, *args: str, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        path = self.logs / f"{args[0]}-{len(self.started)}.log"
        log = path.open("wb")
        self.files.append(log)
        process = subprocess.Popen(
            [sys.executable, "-m", "sumbatch", *args],
            env=env or env_for(settings),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=SOURCE,
        )
        self.started.append(process)
        self.log_paths[process.pid] = path
        return process

    def log_of(self, process: subprocess.Popen[bytes]) -> Path:
        """The file ``process`` (started here) logs to."""
        return self.log_paths[process.pid]

    @staticmethod
    def kill9(process: subprocess.Popen[bytes]) -> None:
        process.send_signal(signal.SIGKILL)
        process.wait(10)

    def cleanup(self) -> None:
        for process in self.started:
            if process.poll() is None:
                process.kill()
                process.wait(10)
        for log in self.files:
            log.close()


@contextmanager
def processes(logs: Path) -> Iterator[Processes]:
    procs = Processes(logs)
    try:
        yield procs
    finally:
        procs.cleanup()


# -- what Linux /proc says about a process's connections ---------------------------


def local_ports(pid: int) -> set[int]:
    """The local ports of the TCP sockets process ``pid`` holds."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:  # closed meanwhile
            continue
        if target.startswith("socket:["):
            inodes.add(target.removeprefix("socket:[").removesuffix("]"))
    ports = set()
    for table in ("tcp", "tcp6"):
        path = Path(f"/proc/{pid}/net/{table}")
        for line in path.read_text().splitlines()[1:] if path.exists() else []:
            columns = line.split()
            if columns[9] in inodes:
                ports.add(int(columns[1].rsplit(":", 1)[1], 16))
    return ports


async def blocked_in_xreadgroup(store: Store, workers: list[subprocess.Popen[bytes]]) -> bool:
    """Whether every one of ``workers`` has a connection blocked in XREADGROUP, that
    is, waits for work. Not XINFO CONSUMERS: before Redis 7.2 it lists a consumer only
    once it has been served an entry, so it never lists a worker that waits for its
    first. Raises RuntimeError when one of them has exited: it never will."""
    for worker in workers:
        if worker.poll() is not None:
            raise RuntimeError(f"worker {worker.pid} exited with {worker.returncode}")
    blocked = {
        int(c["addr"].rsplit(":", 1)[1])
        for c in await store.redis.client_list()
        if c["cmd"] == "xreadgroup" and "b" in c["flags"]
    }
    return all(local_ports(worker.pid) & blocked for worker in workers)
