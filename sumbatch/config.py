"""One settings object, read from the environment once and passed down."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import TypeVar

import msgspec

from sumbatch.tasks import Delay, parse_delay

T = TypeVar("T")

EMBEDDED_PORT_DEFAULT = 6399


class ConfigError(ValueError):
    """A setting is malformed; the message names the variable."""


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    # None means: `sumbatch up` starts an embedded server; other commands connect to it.
    redis_url: str | None = None
    namespace: str = "sumbatch"
    delay: Delay = Delay(3.0, 10.0)
    host: str = "127.0.0.1"
    port: int = 5000
    workers: int = 2
    worker_concurrency: int = 10_000
    # Entries idle this long in a consumer's pending list are taken over by another worker.
    claim_timeout: float = 30.0
    max_attempts: int = 3
    retry_base: float = 1.0
    max_tasks_per_group: int = 10_000
    max_body_bytes: int = 2_000_000
    data_dir: str = ".sumbatch-data"
    embedded_port: int = EMBEDDED_PORT_DEFAULT
    # "module:function" of an async (paramA, paramB) -> int task handler; empty = the sum.
    handler: str = ""
    # Like Celery's result_expires: ended tasks and groups, then their cache and log.
    result_ttl: int = 86_400
    cache_ttl: int = 86_400
    log_retention: int = 86_400
    # Seconds a stopping worker lets in-flight tasks run before handing them back.
    shutdown_grace: float = 30.0
    # Seconds one run of a task may take; past it the run is cancelled and counts as a
    # failed attempt (a hung handler must not hold its entry forever).
    task_timeout: float = 300.0
    # When set, POST and DELETE need "Authorization: Bearer <token>".
    api_token: str = ""
    # Answer a POST only once its events are fsynced (WAITAOF, or appendfsync always).
    durable: bool = False
    fsync: str = "everysec"

    @property
    def client_url(self) -> str:
        return self.redis_url or f"redis://127.0.0.1:{self.embedded_port}/0"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        read = _Reader(env)
        return cls(
            redis_url=env.get("REDIS_URL") or None,
            namespace=read("SUMBATCH_NAMESPACE", str, "sumbatch"),
            delay=read("SUMBATCH_DELAY", parse_delay, Delay(3.0, 10.0)),
            host=read("SUMBATCH_HOST", str, "127.0.0.1"),
            port=read("SUMBATCH_PORT", int, 5000),
            workers=read("SUMBATCH_WORKERS", _at_least(0), 2),
            worker_concurrency=read("SUMBATCH_WORKER_CONCURRENCY", _at_least(1), 10_000),
            claim_timeout=read("SUMBATCH_CLAIM_TIMEOUT", _positive_float, 30.0),
            # Attempts are counted in one byte per task (saturating at 255).
            max_attempts=read("SUMBATCH_MAX_ATTEMPTS", _between(1, 254), 3),
            retry_base=read("SUMBATCH_RETRY_BASE", float, 1.0),
            max_tasks_per_group=read("SUMBATCH_MAX_TASKS", _at_least(1), 10_000),
            max_body_bytes=read("SUMBATCH_MAX_BODY_BYTES", _at_least(1), 2_000_000),
            data_dir=read("SUMBATCH_DATA_DIR", str, ".sumbatch-data"),
            embedded_port=read("SUMBATCH_EMBEDDED_PORT", int, EMBEDDED_PORT_DEFAULT),
            handler=read("SUMBATCH_HANDLER", str, ""),
            result_ttl=read("SUMBATCH_RESULT_TTL", _positive_int, 86_400),
            cache_ttl=read("SUMBATCH_CACHE_TTL", _positive_int, 86_400),
            log_retention=read("SUMBATCH_LOG_RETENTION", _positive_int, 86_400),
            shutdown_grace=read("SUMBATCH_SHUTDOWN_GRACE", float, 30.0),
            task_timeout=read("SUMBATCH_TASK_TIMEOUT", _positive_float, 300.0),
            api_token=read("SUMBATCH_API_TOKEN", str, ""),
            durable=read("SUMBATCH_DURABLE", _bool, False),
            fsync=read("SUMBATCH_FSYNC", _fsync, "everysec"),
        )


def _between(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text)
        if not low <= value <= high:
            raise ValueError(f"expected {low} to {high}")
        return value

    return parse


def _at_least(low: int) -> Callable[[str], int]:
    return _between(low, 2**63)


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise ValueError("expected a positive number")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise ValueError("expected a positive number of seconds")
    return value


def _bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false")


def _fsync(text: str) -> str:
    if text not in ("always", "everysec", "no"):
        raise ValueError("expected always, everysec or no")
    return text


class _Reader:
    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env

    def __call__(self, name: str, cast: Callable[[str], T], default: T) -> T:
        raw = self.env.get(name)
        if raw is None or raw == "":
            return default
        try:
            return cast(raw)
        except ValueError as exc:
            raise ConfigError(f"{name}={raw!r} is not valid: {exc}") from exc
