"""Helpers the tests share: waiting on conditions, running our real processes."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, TypeVar

import redis

from sumbatch.config import Settings
from sumbatch.events import AnyEvent, from_fields
from sumbatch.store import Store, open_store

T = TypeVar("T")
ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
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


def make_store(settings: Settings) -> Store:
    return open_store(settings)


async def log_events(store: Store) -> list[AnyEvent]:
    return [from_fields(fields) for _, fields in await store.redis.xrange(store.keys.events)]


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
