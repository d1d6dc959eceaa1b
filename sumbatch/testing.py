"""Helpers for tests and benchmarks that run the service's real processes; not used by
the service itself.

Free ports for servers about to start, submitting groups, reading streams (and the
time an entry id carries), seeing groups processed and which worker holds which work,
polling a condition against a deadline (an HTTP server answering 200 among them), the
environment and the handling of real ``sumbatch`` processes, and what Linux /proc says
about a process's connections.
tests/support.py and ops/bench/ both take them from here, so each is written once.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Self, TypeVar, cast

import redis

from sumbatch.config import Settings
from sumbatch.model.events import TasksSubmitted, TaskSubmitted, from_fields, tasks_of
from sumbatch.model.ids import entry_order
from sumbatch.model.keys import WORKER_GROUP
from sumbatch.model.submission import Submission
from sumbatch.model.views import GroupView
from sumbatch.model.wire import TaskIn
from sumbatch.processes.cluster import BUS_OFFSET
from sumbatch.store import Entry, Store

T = TypeVar("T")

# The directory this sumbatch is imported from: child processes get it as their
# PYTHONPATH and cwd, so they run this very code, installed or not.
SOURCE = Path(__file__).resolve().parent.parent

_handed_out: set[int] = set()


def free_port() -> int:
    """A port free now, for a server about to be started. Taken below the kernel's
    ephemeral range, so that no outgoing connection can be given it before that server
    binds it (as a port from bind(0) can be), and never one handed out before in this
    process, so that two servers started together never get the same."""
    first_ephemeral = 32768
    with contextlib.suppress(OSError, ValueError):
        first_ephemeral = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    while True:
        port = random.randrange(20000, max(20001, first_ephemeral))
        if port in _handed_out or not _bindable(port):
            continue
        _handed_out.add(port)
        return port


def free_cluster_ports(count: int, *, consecutive: bool = False) -> list[int]:
    """Ports for the nodes of a local cluster: each one free, and its bus port (port +
    10,000) free too, none handed out before in this process; with ``consecutive``,
    ``count`` ports in a row (as `sumbatch up --cluster` takes them)."""
    ports: list[int] = []
    while len(ports) < count:
        first = random.randrange(11000, 20000 - count)
        wanted = [first + n for n in range(count if consecutive else 1)]
        taken = {*wanted, *(port + BUS_OFFSET for port in wanted)}
        if taken & _handed_out or not all(_bindable(port) for port in taken):
            continue
        _handed_out.update(taken)
        ports += wanted
    return ports


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


# -- submitting groups, reading streams, seeing groups processed ----------------------

Groups = list[tuple[str, list[str]]]
"""Submitted groups: each group's id and its task ids."""


def body_of(pairs: list[tuple[int, int]]) -> dict[str, Any]:
    """The POST /grouptasks body of these (paramA, paramB) pairs."""
    return {"tasks": [{"paramA": a, "paramB": b} for a, b in pairs]}


async def submit(store: Store, pairs: list[tuple[int, int]]) -> tuple[str, list[str]]:
    """Submit the group straight to the store (its partition), as the API does; (group
    id, task ids)."""
    sub = Submission.of([TaskIn(a, b) for a, b in pairs], store.keys.partition)
    created = sub.created
    await store.submit(sub.event, GroupView.submitted(created.group_task_id, len(pairs)))
    return created.group_task_id, created.task_ids


async def stream_entries(store: Store, key: str) -> list[Entry]:
    """The whole stream ``key``: each entry's id and fields."""
    return cast(list[Entry], await store.redis.xrange(key))


def entry_ms(entry_id: str) -> int:
    """When a stream entry was written: the ms timestamp its id starts with, by the
    server's clock (the wall clock of this host, for a server running here)."""
    return entry_order(entry_id)[0]


async def pending_by_consumer(store: Store) -> dict[str, int]:
    """How many work entries each worker holds (delivered, not acknowledged), by its
    consumer name; a worker that holds none may be missing."""
    summary: dict[str, Any] = await store.redis.xpending(store.keys.work, WORKER_GROUP)
    return {c["name"]: int(c["pending"]) for c in summary["consumers"] or []}


async def tasks_held_by(store: Store, consumer: str) -> list[str]:
    """The ids of the tasks ``consumer`` holds and that have not ended: the tasks of
    the work entries it holds (delivered, not acknowledged) whose fence bit is not set
    (an entry waits for the last of its tasks; the others may have ended)."""
    pending: list[dict[str, Any]] = await store.redis.xpending_range(
        store.keys.work, WORKER_GROUP, min="-", max="+", count=10_000, consumername=consumer
    )
    held = []
    for entry in pending:
        entry_id = entry["message_id"]
        found = cast(list[Entry], await store.redis.xrange(store.keys.work, entry_id, entry_id))
        for _, fields in found:
            work = from_fields(fields)
            tasks = tasks_of(work) if isinstance(work, TasksSubmitted) else [work]
            held += [cast(TaskSubmitted, task).task_id for task in tasks]
    return [tid for tid in held if not await store.task_ended(tid)]


async def all_processed(store: Store, groups: Groups) -> bool:
    """Whether every one of ``groups`` has a view that says processed."""
    for gid, _ in groups:
        view = await store.group_view(gid)
        if view is None or not view.processed:
            return False
    return True


# -- waiting on a condition, with a deadline -----------------------------------------


async def eventually(
    predicate: Callable[[], Awaitable[T | None]], within: float, interval: float = 0.05
) -> T | None:
    """``predicate``'s first truthy value, polled every ``interval`` s; None when it
    has given none after ``within`` s. For a benchmark, where a timeout is an outcome
    to report rather than a failure."""
    deadline = time.monotonic() + within
    while True:
        value = await predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            return None
        await asyncio.sleep(interval)


async def wait_until(
    predicate: Callable[[], Awaitable[T | None]], within: float = 30.0, what: str = "condition"
) -> T:
    """``predicate``'s first truthy value (never None, so a predicate that answers
    ``X | None`` gives an ``X``); AssertionError after ``within`` s."""
    value = await eventually(predicate, within)
    if value is None:
        raise AssertionError(f"timed out after {within}s waiting for {what}")
    return value


def wait_until_sync(
    predicate: Callable[[], T | None], timeout: float = 30.0, what: str = "condition"
) -> T:
    """``predicate``'s first truthy value (never None, so a predicate that answers
    ``X | None`` gives an ``X``); AssertionError after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def answers_200(url: str, timeout: float = 1.0) -> bool:
    """Whether a GET of ``url`` answers 200 within ``timeout`` s; False for any other
    answer and for none (refused, reset, timed out): a predicate for waiting on a
    server that is starting or stopping."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as answer:
            return bool(answer.status == 200)
    except urllib.error.HTTPError as other:  # an answer, not 2xx
        other.close()
        return False
    except (OSError, http.client.HTTPException):
        return False


# -- real sumbatch processes ---------------------------------------------------------


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


class Monitor:
    """The commands clients send a server, from its MONITOR feed, followed in a thread
    while the ``with`` block runs: each as redis-py reads it (``time``, ``client_port``,
    ``command``...). Commands that scripts run (client type ``lua``) are left out."""

    def __init__(self, url: str) -> None:
        self.client = redis.Redis.from_url(url, decode_responses=True)
        self.seen: list[dict[str, Any]] = []
        self._ready = threading.Event()
        self._started = False
        self._thread = threading.Thread(target=self._follow, daemon=True)

    def _follow(self) -> None:
        try:
            with self.client.monitor() as feed:  # type: ignore[no-untyped-call]
                self._started = True
                self._ready.set()
                for command in feed.listen():
                    if command.get("client_type") != "lua":
                        self.seen.append(command)
        except (redis.ConnectionError, ValueError, AttributeError):
            return  # the connection was closed: the watch is over
        finally:
            self._ready.set()  # started or not: nobody need wait

    def __enter__(self) -> Self:
        self._thread.start()
        if not (self._ready.wait(10) and self._started):
            raise RuntimeError("MONITOR did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.connection_pool.disconnect()
        self.client.close()
        self._thread.join(10)
        if self._thread.is_alive():
            raise RuntimeError("the monitor did not stop")

    def commands(self) -> list[str]:
        return [str(command["command"]) for command in list(self.seen)]

    def settle(self) -> None:
        """Until the monitor has seen every command sent before this call."""
        mark = f"sumbatch-monitor-mark:{time.monotonic_ns()}"
        self.client.exists(mark)
        wait_until_sync(lambda: f"EXISTS {mark}" in self.commands(), what="the monitor")
