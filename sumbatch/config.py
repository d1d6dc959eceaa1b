"""One settings object, read from the environment once and passed down."""

from __future__ import annotations

import importlib
import os
import re
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import msgspec

from sumbatch.model.ids import MAX_PARTITIONS
from sumbatch.model.ranges import (
    IntRange,
    SecondsRange,
    Text,
    boolean,
    choice,
    delay_within,
    redis_url,
)
from sumbatch.model.tasks import Delay

T = TypeVar("T")

EMBEDDED_PORT_DEFAULT = 6399
# Tasks per group at most: a task's attempts byte must stay within one Redis string
# (2^32 bits). The scripts refuse a group above it (MAX_TASKS in scripts/lib.py).
MAX_TASKS_LIMIT = 2**29
# Tasks per group a setting may allow: the submit script costs about 1.3 us a task
# (ops/bench/submit_time.py: 100,000 tasks 0.13-0.14 s of wall time on Redis 7.0 and
# Valkey, 1,000,000 past 2 s), and it holds the server while it runs, so the largest
# group stays well within one API call's 1 s and stalls other clients for little.
MAX_TASKS_SETTING = 100_000
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


def _parse(name: str, raw: str, parse: Callable[[str], T]) -> T:
    try:
        return parse(raw)
    except ValueError as exc:
        # REDIS_URL may hold a password: its value is never shown. A long value is
        # shown by its start and its length, not in full.
        cut = f"{raw!r}" if len(raw) <= SHOWN else f"{raw[:SHOWN]!r}... ({len(raw)} characters)"
        shown = name if name == "REDIS_URL" else f"{name}={cut}"
        raise ConfigError(f"{shown} is not valid: {exc}") from exc


# What a refused value's message shows of it at most.
SHOWN = 60

# The range of each setting, and why it ends where it does. Every later use of a value
# inside its range is safe: no ms arithmetic or EXPIRE overflows, no script fails
# after its first write, no loop goes on for ever. docs/configuration.md says each.
parse_port = IntRange(1, 65535)
# Worker processes of `up`: each is a whole Python process (tens of MB, its own
# connections) running SUMBATCH_WORKER_CONCURRENCY tasks at once, so more of them
# than cores buys nothing; 256 covers the largest machines' cores and keeps `up`'s
# start (one process after the other) short. 0: the workers run elsewhere.
parse_workers = IntRange(0, 256)
# Tasks one worker holds at once, each a coroutine and its bookkeeping (a few KB): a
# million is some GB in one process, which is as far as one event loop goes.
WORKER_CONCURRENCY = IntRange(1, 1_000_000)
# Seconds: renewed every quarter of it, so at least 0.1 (25 ms renewals, which the
# server's ms idle times still tell apart); at most a day, past which a dead worker's
# entries would wait longer than any user waits for them.
CLAIM_TIMEOUT = SecondsRange(0.1, 86_400)
# Attempts are counted in one byte per task (saturating at 255).
MAX_ATTEMPTS = IntRange(1, 254)
# The backoff is capped at 60 s (model/tasks.retry_backoff): a larger base waits no
# longer, so 60 is the last value that means something.
RETRY_BASE = SecondsRange(0, 60)
# A body within it is held whole in memory to be parsed: 1 GiB at most.
MAX_BODY_BYTES = IntRange(1, 2**30)
# Seconds ended groups, cached sums and log entries are kept: up to ten years. The
# scripts EXPIRE with them and the log's cut-offs are entry ids of now minus them in
# ms: ten years keeps those ids above zero (the epoch is over fifty years back) and
# EXPIRE's ms arithmetic nowhere near overflow, on every server line.
KEPT = IntRange(1, 10 * 365 * 86_400)
# Seconds a stopping worker lets its tasks run, and a run may take: up to a day, as
# long as a run holds its claim and its worker's room; `up` waits 10 s past the grace.
GRACE = SecondsRange(0, 86_400)
TASK_TIMEOUT = SecondsRange(0.1, 86_400)
# The simulated task time: up to an hour, well inside the task timeout's range.
parse_delay_setting = delay_within(3_600)
# Seconds an HTTP client may take over its request's head or pause in its body, and
# between a stream's keepalives: from 0.1 s (below it a client on a slow network
# cannot make it) to an hour (a proxy drops an idle connection long before).
HTTP_SECONDS = SecondsRange(0.1, 3_600)
# Requests waiting or streaming at once in one API process: each holds a connection,
# a file descriptor, and a process gets at most 1,048,576 of those (Linux's nr_open).
HELD_AT_ONCE = IntRange(0, 100_000)
# Connections to each server per process, beside its blocked reads: the server's
# default maxclients is 10,000.
REDIS_CONNECTIONS = IntRange(1, 10_000)
# The key prefix and hash tag `{namespace}`: letters, digits, _ . - only. A brace would
# make another tag (every partition's keys in one slot, partition_tag never done), a
# colon could collide with another namespace's partition tags (`{a:0}`), glob
# characters would break the namespace's key pattern. 64 keeps key names readable.
NAMESPACE = Text(re.compile(r"[A-Za-z0-9_.-]+"), 64, "letters, digits, _ . or - (no braces)")
# Where the API listens: a host name (253 characters at most, as in DNS) or an address.
HOST = Text(re.compile(r"[A-Za-z0-9._:%-]+"), 253, "a host name or an address")
# The embedded server's directory: no control characters (they would break its
# config); 1,024 characters leave room for its files' names within PATH_MAX (4,096).
DATA_DIR = Text(re.compile(r"[^\x00-\x1f\x7f]+"), 1024, "a path without control characters")
HANDLER = Text(
    re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*"), 256, "module:function, e.g. mypackage.tasks:add"
)
# Sent in a header as `Bearer <token>`: visible ASCII (other bytes do not survive a
# header's decoding), spaces only inside (the header's value is stripped), and 1,024
# characters, far inside the 64 KiB a request's head may take.
API_TOKEN = Text(
    re.compile(r"[\x21-\x7e]([\x20-\x7e]*[\x21-\x7e])?"),
    1024,
    "visible ASCII characters, spaces only between them",
)

# The variable each setting is read from, and the parser of its text.
VARIABLES: dict[str, tuple[str, Callable[[str], Any]]] = {
    # A URL, not a document: 4,096 characters at most.
    "redis_url": ("REDIS_URL", redis_url(4096)),
    "namespace": ("SUMBATCH_NAMESPACE", NAMESPACE),
    "partitions": ("SUMBATCH_PARTITIONS", IntRange(1, MAX_PARTITIONS)),
    "delay": ("SUMBATCH_DELAY", parse_delay_setting),
    "host": ("SUMBATCH_HOST", HOST),
    "port": ("SUMBATCH_PORT", parse_port),
    "workers": ("SUMBATCH_WORKERS", parse_workers),
    "worker_concurrency": ("SUMBATCH_WORKER_CONCURRENCY", WORKER_CONCURRENCY),
    "claim_timeout": ("SUMBATCH_CLAIM_TIMEOUT", CLAIM_TIMEOUT),
    "max_attempts": ("SUMBATCH_MAX_ATTEMPTS", MAX_ATTEMPTS),
    "retry_base": ("SUMBATCH_RETRY_BASE", RETRY_BASE),
    "max_tasks_per_group": ("SUMBATCH_MAX_TASKS", IntRange(1, MAX_TASKS_SETTING)),
    "max_body_bytes": ("SUMBATCH_MAX_BODY_BYTES", MAX_BODY_BYTES),
    "data_dir": ("SUMBATCH_DATA_DIR", DATA_DIR),
    "embedded_port": ("SUMBATCH_EMBEDDED_PORT", parse_port),
    "handler": ("SUMBATCH_HANDLER", HANDLER),
    "result_ttl": ("SUMBATCH_RESULT_TTL", KEPT),
    "cache_ttl": ("SUMBATCH_CACHE_TTL", KEPT),
    "log_retention": ("SUMBATCH_LOG_RETENTION", KEPT),
    "shutdown_grace": ("SUMBATCH_SHUTDOWN_GRACE", GRACE),
    "task_timeout": ("SUMBATCH_TASK_TIMEOUT", TASK_TIMEOUT),
    "api_token": ("SUMBATCH_API_TOKEN", API_TOKEN),
    "durable": ("SUMBATCH_DURABLE", boolean),
    "fsync": ("SUMBATCH_FSYNC", choice("always", "everysec", "no")),
    "log_level": (
        "SUMBATCH_LOG_LEVEL",
        choice("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL", fold=True),
    ),
    "header_timeout": ("SUMBATCH_HEADER_TIMEOUT", HTTP_SECONDS),
    "body_timeout": ("SUMBATCH_BODY_TIMEOUT", HTTP_SECONDS),
    "max_waiters": ("SUMBATCH_MAX_WAITERS", HELD_AT_ONCE),
    "max_streams": ("SUMBATCH_MAX_STREAMS", HELD_AT_ONCE),
    "heartbeat": ("SUMBATCH_SSE_HEARTBEAT", HTTP_SECONDS),
    "redis_connections": ("SUMBATCH_REDIS_CONNECTIONS", REDIS_CONNECTIONS),
}
