"""Helpers the tests share: submitting groups, reading what was written, running the
consumers in-process, waiting on conditions, running our real processes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, TypeVar, cast

import redis
from starlette.testclient import TestClient

from consumers.projector import Projector
from consumers.worker import Handler, Worker
from sumbatch.config import Settings
from sumbatch.events import (
    WORKER_GROUP,
    AnyEvent,
    GroupFinished,
    Keys,
    TaskCompleted,
    TaskStarted,
    from_fields,
)
from sumbatch.projection import GroupView
from sumbatch.replay import differences
from sumbatch.store import Store, open_store
from sumbatch.submission import Submission
from sumbatch.wire import TaskIn

T = TypeVar("T")
ROOT = Path(__file__).resolve().parent.parent


_handed_out: set[int] = set()


def free_port() -> int:
    """A port free now, for a server a test is about to start. Taken below the kernel's
    ephemeral range, so that no outgoing connection can be given it before that server
    binds it (as a port from bind(0) can be), and never one handed out before in this
    run, so that two servers of one test never get the same."""
    first_ephemeral = 32768
    with contextlib.suppress(OSError, ValueError):
        first_ephemeral = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    while True:
        port = random.randrange(20000, max(20001, first_ephemeral))
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port


async def wait_until(
    predicate: Callable[[], Awaitable[T]], within: float = 30.0, what: str = "condition"
) -> T:
    """Poll ``predicate`` until it returns something truthy; fail after ``within`` s."""
    deadline = time.monotonic() + within
    while True:
        value = await predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.05)


def wait_until_sync(
    predicate: Callable[[], T], timeout: float = 30.0, what: str = "condition"
) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def has_waitaof(url: str) -> bool:
    """Whether the server knows WAITAOF (Redis 7.2+, Valkey): durable mode's check."""
    client = redis.Redis.from_url(url)
    try:
        client.execute_command("WAITAOF", 0, 0, 1)
    except redis.ResponseError as exc:
        return "unknown command" not in str(exc)
    finally:
        client.close()
    return True


Groups = list[tuple[str, list[str]]]
"""Submitted groups: each group's id and its task ids."""


# -- submitting ---------------------------------------------------------------------


def body_of(pairs: list[tuple[int, int]]) -> dict[str, Any]:
    return {"tasks": [{"paramA": a, "paramB": b} for a, b in pairs]}


def post_group(client: TestClient, pairs: list[tuple[int, int]]) -> dict[str, Any]:
    """POST the group over the API; its answer (group id and task ids)."""
    response = client.post("/grouptasks", json=body_of(pairs))
    assert response.status_code == 200, response.text
    created: dict[str, Any] = response.json()
    return created


async def submit(store: Store, pairs: list[tuple[int, int]]) -> tuple[str, list[str]]:
    """Submit the group straight to the store, as the API does; (group id, task ids)."""
    sub = Submission.of([TaskIn(a, b) for a, b in pairs])
    created = sub.created
    await store.submit(
        [sub.event], sub.work, GroupView.submitted(created.group_task_id, len(pairs))
    )
    return created.group_task_id, created.task_ids


# -- reading what was written, over a plain client ----------------------------------


def entries(raw: redis.Redis, key: str) -> list[tuple[str, dict[str, str]]]:
    return cast(list[tuple[str, dict[str, str]]], raw.xrange(key))


def events(raw: redis.Redis, settings: Settings, gid: str | None = None) -> list[AnyEvent]:
    """The log, or with ``gid`` that group's own log."""
    keys = Keys(settings.namespace)
    key = keys.events if gid is None else keys.group_log(gid)
    return [from_fields(f) for _, f in entries(raw, key)]


def kinds(raw: redis.Redis, settings: Settings) -> Counter[str]:
    return Counter(type(e).__name__ for e in events(raw, settings))


def appended(raw: redis.Redis, settings: Settings) -> tuple[int, int]:
    """How long the log and the work stream are."""
    keys = Keys(settings.namespace)
    return int(raw.xlen(keys.events)), int(raw.xlen(keys.work))


# -- reading what was written, through a store --------------------------------------


async def log_events(store: Store) -> list[AnyEvent]:
    return [from_fields(fields) for _, fields in await store.redis.xrange(store.keys.events)]


async def log_of(settings: Settings) -> list[AnyEvent]:
    """The whole log, read with a store of its own."""
    async with open_store(settings) as store:
        return await log_events(store)


async def work_pending(store: Store) -> int:
    """How many work entries are handed out and not yet acknowledged."""
    summary = await store.redis.xpending(store.keys.work, WORKER_GROUP)
    return int(summary["pending"])


def runs_started(store: Store, count: int) -> Callable[[], Awaitable[bool]]:
    """A predicate for ``wait_until``: exactly ``count`` runs have started."""

    async def started() -> bool:
        return sum(isinstance(e, TaskStarted) for e in await log_events(store)) == count

    return started


def worker_idle(store: Store, worker: Worker) -> Callable[[], Awaitable[bool]]:
    """A predicate for ``wait_until``: ``worker`` runs nothing and no entry is pending."""

    async def idle() -> bool:
        return not worker.busy and await work_pending(store) == 0

    return idle


async def group_finished(store: Store, gid: str) -> bool:
    events = await log_events(store)
    return any(isinstance(e, GroupFinished) and e.group_task_id == gid for e in events)


async def all_processed(store: Store, groups: Groups) -> bool:
    for gid, _ in groups:
        view = await store.group_view(gid)
        if view is None or not view.processed:
            return False
    return True


async def assert_exactly_once(store: Store, groups: Groups) -> None:
    """Every task completed once with the right sum, every group finished once, no
    entry left pending, and the views equal a replay of the log."""
    events = await log_events(store)
    completed = Counter(e.task_id for e in events if isinstance(e, TaskCompleted))
    finished = Counter(e.group_task_id for e in events if isinstance(e, GroupFinished))
    all_tasks = [tid for _, tids in groups for tid in tids]
    assert completed == Counter(all_tasks)
    assert finished == Counter(gid for gid, _ in groups)
    assert await work_pending(store) == 0
    diffs = (await differences(store)).differences
    assert diffs == []


# -- running the consumers in-process -----------------------------------------------


def run_with_store(settings: Settings, scenario: Callable[[Store], Awaitable[None]]) -> None:
    """Run ``scenario`` with a store of its own, in a fresh event loop."""

    async def main() -> None:
        async with open_store(settings) as store:
            await scenario(store)

    asyncio.run(main())


def work(settings: Settings, handler: Handler | None = None) -> None:
    """One worker, until no work is left."""

    async def scenario(store: Store) -> None:
        await Worker(settings, store, handler=handler).run_until_idle()

    run_with_store(settings, scenario)


def project(settings: Settings) -> int:
    """The projector, until it has folded the whole log; returns how many entries it
    set aside."""
    projector: list[Projector] = []

    async def scenario(store: Store) -> None:
        projector.append(Projector(store))
        await projector[0].run_until_idle()

    run_with_store(settings, scenario)
    return projector[0].set_aside


def work_and_project(settings: Settings) -> None:
    """One worker until no work is left, then the projector, on one store."""

    async def scenario(store: Store) -> None:
        await Worker(settings, store).run_until_idle()
        await Projector(store).run_until_idle()

    run_with_store(settings, scenario)


class Gate:
    """``handler`` sums, but holds every run until ``open()``: runs stay in flight as
    long as a test needs. ``calls`` has every run's parameters as it began,
    ``returned`` every sum it gave back. (A method, not ``__call__``: the worker tells
    an async handler by ``inspect.iscoroutinefunction``.)"""

    def __init__(self) -> None:
        self.opened = asyncio.Event()
        self.calls: list[tuple[int, int]] = []
        self.returned: list[int] = []

    async def handler(self, a: int, b: int) -> int:
        self.calls.append((a, b))
        await self.opened.wait()
        self.returned.append(a + b)
        return a + b

    def open(self) -> None:
        self.opened.set()


def env_for(settings: Settings) -> dict[str, str]:
    """The environment that configures a sumbatch process like ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SUMBATCH_")}
    env.update(
        REDIS_URL=settings.client_url,
        SUMBATCH_NAMESPACE=settings.namespace,
        SUMBATCH_DELAY=f"{settings.delay.low}-{settings.delay.high}",
        SUMBATCH_CLAIM_TIMEOUT=str(settings.claim_timeout),
        SUMBATCH_MAX_ATTEMPTS=str(settings.max_attempts),
        SUMBATCH_RETRY_BASE=str(settings.retry_base),
        SUMBATCH_HANDLER=settings.handler,
        SUMBATCH_LOG_LEVEL="WARNING",
        PYTHONPATH=str(ROOT),
    )
    return env


class Processes:
    """Real sumbatch processes started by a test; all killed at teardown."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.started: list[subprocess.Popen[bytes]] = []
        self.files: list[IO[bytes]] = []

    def start(
        self, settings: Settings, *args: str, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        log = (self.logs / f"{args[0]}-{len(self.started)}.log").open("wb")
        self.files.append(log)
        process = subprocess.Popen(
            [sys.executable, "-m", "sumbatch", *args],
            env=env or env_for(settings),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
        self.started.append(process)
        return process

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
