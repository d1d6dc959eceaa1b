"""Helpers the tests share: namespaces and servers of a test's own, running the
``sumbatch`` command, posting groups, reading what was written, running the consumers
in-process. Submitting groups, waiting on conditions and running our real processes
come from sumbatch.testing, which the benchmarks share; they are named here too, so a
test takes all its helpers from one place."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast
from urllib.parse import quote, urlsplit

import httpx2 as httpx
import pytest
import redis
from starlette.testclient import TestClient

from consumers.projector import Projector
from consumers.worker import Handler, Worker
from sumbatch.config import Settings
from sumbatch.model.events import (
    AnyEvent,
    GroupFinished,
    TaskCompleted,
    TasksSubmitted,
    TaskStarted,
    from_fields,
    from_group_log,
    tasks_of,
)
from sumbatch.model.keys import WORKER_GROUP, Keys
from sumbatch.processes.embedded import EmbeddedServer
from sumbatch.replay import differences
from sumbatch.store import Store, open_store
from sumbatch.store.partitions import open_partitions
from sumbatch.testing.groups import Groups as Groups
from sumbatch.testing.groups import all_processed as all_processed
from sumbatch.testing.groups import body_of as body_of
from sumbatch.testing.groups import entry_ms as entry_ms
from sumbatch.testing.groups import pending_by_consumer as pending_by_consumer
from sumbatch.testing.groups import stream_entries as stream_entries
from sumbatch.testing.groups import submit as submit
from sumbatch.testing.groups import tasks_held_by as tasks_held_by
from sumbatch.testing.ports import free_port as free_port
from sumbatch.testing.processes import Processes as Processes
from sumbatch.testing.processes import blocked_in_xreadgroup as blocked_in_xreadgroup
from sumbatch.testing.processes import env_for as env_for
from sumbatch.testing.processes import processes as processes
from sumbatch.testing.waiting import answers_200 as answers_200
from sumbatch.testing.waiting import wait_until as wait_until
from sumbatch.testing.waiting import wait_until_sync as wait_until_sync

ROOT = Path(__file__).resolve().parent.parent


# -- namespaces and servers of a test's own -----------------------------------------


def fresh_namespace(prefix: str = "t") -> str:
    """A namespace no other test uses: ``prefix`` and 12 random hex digits."""
    return f"{prefix}{uuid.uuid4().hex[:12]}"


def drop_namespace(url: str, namespace: str, partitions: int = 1) -> None:
    """Delete every key of ``namespace`` (with that many partitions) on the server at
    ``url``."""
    client = redis.Redis.from_url(url)
    try:
        pattern = Keys(namespace, 0, partitions).pattern
        keys = list(client.scan_iter(match=pattern, count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


def with_credentials(url: str, user: str, password: str) -> str:
    """``url`` logging in as ``user`` with ``password`` (in place of any credentials
    it has); an empty ``user`` is the default user, as ``redis://:password@``."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{host}"
    return parts._replace(netloc=netloc).geturl()


@contextmanager
def own_server(directory: Path, **options: Any) -> Iterator[EmbeddedServer]:
    """A throwaway server of the test's own on a free port, its data in ``directory``,
    started (``options`` as EmbeddedServer takes them) and stopped at the end, also
    when it failed to start. Never the session's server: a test may break this one.
    A test may also ``kill()`` or ``stop()`` it and ``start()`` it again: a new process
    on the same port and directory, which loads the AOF (and takes a changed
    ``appendfsync``)."""
    server = EmbeddedServer(directory, free_port(), **options)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@contextmanager
def debug_server(directory: Path) -> Iterator[EmbeddedServer]:
    """``own_server`` that takes DEBUG (SLEEP, to stall it), which Redis 7 and Valkey
    refuse unless started with it."""
    with own_server(directory, extra_args=("--enable-debug-command", "yes")) as server:
        yield server


def stalled(server: EmbeddedServer) -> bool:
    """Whether the server fails to answer a PING within 0.2 s: asleep or paused."""
    probe = redis.Redis.from_url(server.url, socket_timeout=0.2)
    try:
        probe.ping()
    except redis.TimeoutError:
        return True
    finally:
        probe.close()
    return False


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, made with the openssl CLI (a skip
    where there is none)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("no openssl CLI to make a certificate with")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return cert, key


def listening(port: int) -> bool:
    """Whether something accepts connections on ``port`` on this host."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def has_waitaof(url: str) -> bool:
    """Whether the server knows WAITAOF (Redis 7.2+, Valkey): durable mode's check."""
    client = redis.Redis.from_url(url)
    try:
        client.execute_command("WAITAOF", 0, 0, 1)  # type: ignore[no-untyped-call]
    except redis.ResponseError as exc:
        return "unknown command" not in str(exc)
    finally:
        client.close()
    return True


# -- the sumbatch command -----------------------------------------------------------


def run_sumbatch(
    *args: str, env: Mapping[str, str] | None, cwd: Path = ROOT, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """``python -m sumbatch *args`` to its end, its output captured as text; ``env``
    None inherits this process's environment."""
    return subprocess.run(
        [sys.executable, "-m", "sumbatch", *args],
        env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def up_env(data_dir: Path, redis_port: int, **extra: str) -> dict[str, str]:
    """A user's environment for `sumbatch up`, without REDIS_URL: its embedded server
    keeps its data in ``data_dir`` and listens on ``redis_port``. SUMBATCH_REDIS_SERVER
    is kept, so the suite runs `up` on the server line it was asked for."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k != "REDIS_URL" and (not k.startswith("SUMBATCH_") or k == "SUMBATCH_REDIS_SERVER")
    }
    env.update(
        SUMBATCH_DATA_DIR=str(data_dir),
        SUMBATCH_EMBEDDED_PORT=str(redis_port),
        SUMBATCH_DELAY="0",
        PYTHONPATH=str(ROOT),
    )
    env.update(extra)
    return env


# -- submitting, and asking after a group -------------------------------------------


def post_group(client: TestClient, pairs: list[tuple[int, int]]) -> dict[str, Any]:
    """POST the group over the API; its answer (group id and task ids)."""
    response = client.post("/grouptasks", json=body_of(pairs))
    assert response.status_code == 200, response.text
    created: dict[str, Any] = response.json()
    return created


def group_processed(client: httpx.Client, gid: str) -> bool:
    """Whether GET /grouptasks/{gid} says processed, asked of the in-process app (a
    TestClient) or of a served API (an httpx.Client with its base URL). No answer, or
    a 503 (its Redis unavailable), says "not yet"; any other answer but 200 fails."""
    try:
        answer = client.get(f"/grouptasks/{gid}")
    except httpx.HTTPError:
        return False
    if answer.status_code == 503:
        return False
    assert answer.status_code == 200, answer.text
    return bool(answer.json()["grouptaskProcessed"])


# -- reading what was written, over a plain client ----------------------------------


def entries(raw: redis.Redis, key: str) -> list[tuple[str, dict[str, str]]]:
    return cast(list[tuple[str, dict[str, str]]], raw.xrange(key))


def work_entries(raw: redis.Redis, keys: Keys) -> list[dict[str, str]]:
    """Every work entry written: those in the work stream, then those still queued to
    be handed out (each group's queue in order)."""
    written = [fields for _, fields in entries(raw, keys.work)]
    for queue in sorted(cast(list[str], list(raw.scan_iter(match=keys.queue_prefix + "*")))):
        for element in cast(list[str], raw.lrange(queue, 0, -1)):
            flat = json.loads(element)
            written.append(dict(zip(flat[::2], flat[1::2], strict=True)))
    return written


def events(raw: redis.Redis, settings: Settings, gid: str | None = None) -> list[AnyEvent]:
    """The log, or with ``gid`` that group's own log."""
    keys = Keys(settings.namespace)
    if gid is None:
        return [from_fields(f) for _, f in entries(raw, keys.events)]
    return [from_fields(from_group_log(gid, f)) for _, f in entries(raw, keys.group_log(gid))]


def kinds(raw: redis.Redis, settings: Settings) -> Counter[str]:
    return Counter(type(e).__name__ for e in events(raw, settings))


def appended(raw: redis.Redis, settings: Settings) -> tuple[int, int]:
    """How many entries the log holds, and how many tasks the work entries (handed out
    or queued)."""
    keys = Keys(settings.namespace)
    tasks = 0
    for fields in work_entries(raw, keys):
        work = from_fields(fields)
        tasks += len(tasks_of(work)) if isinstance(work, TasksSubmitted) else 1
    return int(raw.xlen(keys.events)), tasks


def work_pending_sync(raw: redis.Redis, settings: Settings) -> int:
    """How many work entries are handed out and not yet acknowledged."""
    summary = raw.xpending(Keys(settings.namespace).work, WORKER_GROUP)
    return int(summary["pending"])


# -- reading what was written, through a store --------------------------------------


async def log_events(store: Store) -> list[AnyEvent]:
    return [from_fields(fields) for _, fields in await stream_entries(store, store.keys.events)]


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


def projector_moved(store: Store, before: str | None) -> Callable[[], Awaitable[bool]]:
    """A predicate for ``wait_until``: the projector's position is no longer ``before``
    (what ``store.position()`` said earlier)."""

    async def moved() -> bool:
        return await store.position() != before

    return moved


def worker_idle(store: Store, worker: Worker) -> Callable[[], Awaitable[bool]]:
    """A predicate for ``wait_until``: ``worker`` runs nothing and no entry is pending."""

    async def idle() -> bool:
        return not worker.busy and await work_pending(store) == 0

    return idle


async def group_finished(store: Store, gid: str) -> bool:
    events = await log_events(store)
    return any(isinstance(e, GroupFinished) and e.group_task_id == gid for e in events)


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


async def hang_forever(a: int, b: int) -> int:
    """A handler whose run never returns; a worker process takes it as
    SUMBATCH_HANDLER=tests.support:hang_forever."""
    await asyncio.Event().wait()
    raise AssertionError("unreachable")


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


async def outcomes(settings: Settings) -> tuple[Counter[str], Counter[str]]:
    """How many times each task completed, and each group finished, in the event logs
    of every partition."""
    async with await open_partitions(settings) as partitions:
        completed: Counter[str] = Counter()
        finished: Counter[str] = Counter()
        for store in partitions:
            for _, fields in await stream_entries(store, store.keys.events):
                event = from_fields(fields)
                if isinstance(event, TaskCompleted):
                    completed[event.task_id] += 1
                elif isinstance(event, GroupFinished):
                    finished[event.group_task_id] += 1
        return completed, finished


async def hang_on_odd(a: int, b: int) -> int:
    """Sums at once when ``a`` is even; never returns when it is odd. A worker process
    takes it as SUMBATCH_HANDLER=tests.support:hang_on_odd."""
    if a % 2:
        await asyncio.Event().wait()
    return a + b
