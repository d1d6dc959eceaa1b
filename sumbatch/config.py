"""One settings object, read from the environment once and passed down."""

from __future__ import annotations

import importlib
import math
import os
import re
from collections.abc import Callable, Mapping
from typing import Any, TypeVar
from urllib.parse import urlsplit

import msgspec

from sumbatch.model.ids import MAX_PARTITIONS
from sumbatch.model.tasks import Delay, parse_delay

T = TypeVar("T")

EMBEDDED_PORT_DEFAULT = 6399
# Tasks per group at most: a task's attempts byte must stay within one Redis string
# (2^32 bits). The scripts refuse a group above it (MAX_TASKS in scripts/lib.py).
MAX_TASKS_LIMIT = 2**29
# Set by `sumbatch up` for its children: its pid; they stop when it is gone.
PARENT_PID_ENV = "SUMBATCH_PARENT_PID"


class ConfigError(ValueError):
    """A setting is malformed; the message names the variable."""


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    # None means: `sumbatch up` starts an embedded server; other commands connect to it.
    redis_url: str | None = None
    namespace: str = "sumbatch"
    # None: what the namespace was created with, or for a new one 1 on a single server
    # and several per master on a cluster (``store.partitions``).
    partitions: int | None = None
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
    log_level: str = "INFO"
    # Seconds a request's head may take to arrive, and a body may pause (then 408).
    header_timeout: float = 10.0
    body_timeout: float = 10.0
    # Requests waiting at once on ?wait= (past it, the current status at once), event
    # streams open at once (past it, 503), and seconds between a stream's heartbeats.
    max_waiters: int = 1000
    max_streams: int = 100
    heartbeat: float = 15.0
    # Connections one process opens to each server (each master of a cluster) at most;
    # past them a call waits for one to come free (``store.base.POOL_WAIT``).
    redis_connections: int = 100

    @property
    def client_url(self) -> str:
        return self.redis_url or f"redis://127.0.0.1:{self.embedded_port}/0"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Each setting from its variable (``VARIABLES``); unset or empty, the field's
        default above, so each default is written once."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for field, (name, parse) in VARIABLES.items():
            raw = env.get(name)
            if raw:
                values[field] = _parse(name, raw, parse)
        settings = cls(**values)
        _check_timeout_covers_delay(settings)
        return settings


def _between(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text)
        if not low <= value <= high:
            raise ValueError(f"expected {low} to {high}")
        return value

    return parse


def _at_least(low: int) -> Callable[[str], int]:
    return _between(low, 2**63 - 1)


parse_port = _between(1, 65535)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("expected a finite number")
    return value


def _positive_float(text: str) -> float:
    value = _finite_float(text)
    if not value > 0:
        raise ValueError("expected a positive number")
    return value


def _non_negative_float(text: str) -> float:
    value = _finite_float(text)
    if value < 0:
        raise ValueError("expected a number of seconds, 0 or more")
    return value


REDIS_SCHEMES = ("redis", "rediss", "unix")


def _redis_url(text: str) -> str:
    # The URL may hold a password: the message names the scheme only.
    scheme = urlsplit(text).scheme
    if scheme not in REDIS_SCHEMES:
        raise ValueError(f"scheme {scheme or '(none)'!r}; expected redis://, rediss:// or unix://")
    return text


HANDLER_SPEC = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")


def _handler_spec(text: str) -> str:
    if not HANDLER_SPEC.fullmatch(text):
        raise ValueError("expected module:function, e.g. mypackage.tasks:add")
    return text


def _log_level(text: str) -> str:
    level = text.strip().upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ValueError("expected DEBUG, INFO, WARNING, ERROR or CRITICAL")
    return level


def _check_timeout_covers_delay(settings: Settings) -> None:
    """A timeout at or below the longest simulated delay would fail every slow task."""
    if settings.task_timeout <= settings.delay.high:
        raise ConfigError(
            f"SUMBATCH_TASK_TIMEOUT={settings.task_timeout:g} is not valid: it must be "
            f"greater than the longest SUMBATCH_DELAY ({settings.delay.high:g} s)"
        )


def resolve_handler(spec: str) -> Callable[..., Any] | None:
    """Import SUMBATCH_HANDLER's function, or None for the built-in sum; a spec that
    cannot be imported or is not callable is a ConfigError, so it stops a process at
    its start rather than in every task."""
    if not spec:
        return None
    module_name, _, name = spec.partition(":")
    try:
        found = getattr(importlib.import_module(module_name), name)
    except Exception as exc:  # anything at import time: the module is unusable
        raise ConfigError(
            f"SUMBATCH_HANDLER={spec!r} is not valid: {type(exc).__name__}: {exc}"
        ) from exc
    if not callable(found):
        raise ConfigError(f"SUMBATCH_HANDLER={spec!r} is not valid: {name} is not callable")
    handler: Callable[..., Any] = found
    return handler


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


def _parse(name: str, raw: str, parse: Callable[[str], T]) -> T:
    try:
        return parse(raw)
    except ValueError as exc:
        # REDIS_URL may hold a password: its value is never shown.
        shown = name if name == "REDIS_URL" else f"{name}={raw!r}"
        raise ConfigError(f"{shown} is not valid: {exc}") from exc


# The variable each setting is read from, and the parser of its text.
VARIABLES: dict[str, tuple[str, Callable[[str], Any]]] = {
    "redis_url": ("REDIS_URL", _redis_url),
    "namespace": ("SUMBATCH_NAMESPACE", str),
    "partitions": ("SUMBATCH_PARTITIONS", _between(1, MAX_PARTITIONS)),
    "delay": ("SUMBATCH_DELAY", parse_delay),
    "host": ("SUMBATCH_HOST", str),
    "port": ("SUMBATCH_PORT", parse_port),
    "workers": ("SUMBATCH_WORKERS", _at_least(0)),
    "worker_concurrency": ("SUMBATCH_WORKER_CONCURRENCY", _at_least(1)),
    "claim_timeout": ("SUMBATCH_CLAIM_TIMEOUT", _positive_float),
    # Attempts are counted in one byte per task (saturating at 255).
    "max_attempts": ("SUMBATCH_MAX_ATTEMPTS", _between(1, 254)),
    "retry_base": ("SUMBATCH_RETRY_BASE", _non_negative_float),
    "max_tasks_per_group": ("SUMBATCH_MAX_TASKS", _between(1, MAX_TASKS_LIMIT)),
    "max_body_bytes": ("SUMBATCH_MAX_BODY_BYTES", _at_least(1)),
    "data_dir": ("SUMBATCH_DATA_DIR", str),
    "embedded_port": ("SUMBATCH_EMBEDDED_PORT", parse_port),
    "handler": ("SUMBATCH_HANDLER", _handler_spec),
    "result_ttl": ("SUMBATCH_RESULT_TTL", _positive_int),
    "cache_ttl": ("SUMBATCH_CACHE_TTL", _positive_int),
    "log_retention": ("SUMBATCH_LOG_RETENTION", _positive_int),
    "shutdown_grace": ("SUMBATCH_SHUTDOWN_GRACE", _non_negative_float),
    "task_timeout": ("SUMBATCH_TASK_TIMEOUT", _positive_float),
    "api_token": ("SUMBATCH_API_TOKEN", str),
    "durable": ("SUMBATCH_DURABLE", _bool),
    "fsync": ("SUMBATCH_FSYNC", _fsync),
    "log_level": ("SUMBATCH_LOG_LEVEL", _log_level),
    "header_timeout": ("SUMBATCH_HEADER_TIMEOUT", _positive_float),
    "body_timeout": ("SUMBATCH_BODY_TIMEOUT", _positive_float),
    "max_waiters": ("SUMBATCH_MAX_WAITERS", _at_least(0)),
    "max_streams": ("SUMBATCH_MAX_STREAMS", _at_least(0)),
    "heartbeat": ("SUMBATCH_SSE_HEARTBEAT", _positive_float),
    "redis_connections": ("SUMBATCH_REDIS_CONNECTIONS", _between(1, 10_000)),
}
