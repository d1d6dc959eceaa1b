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
            workers=read("SUMBATCH_WORKERS", int, 2),
            worker_concurrency=read("SUMBATCH_WORKER_CONCURRENCY", int, 10_000),
            claim_timeout=read("SUMBATCH_CLAIM_TIMEOUT", float, 30.0),
            max_attempts=read("SUMBATCH_MAX_ATTEMPTS", int, 3),
            retry_base=read("SUMBATCH_RETRY_BASE", float, 1.0),
            max_tasks_per_group=read("SUMBATCH_MAX_TASKS", int, 10_000),
            max_body_bytes=read("SUMBATCH_MAX_BODY_BYTES", int, 2_000_000),
            data_dir=read("SUMBATCH_DATA_DIR", str, ".sumbatch-data"),
            embedded_port=read("SUMBATCH_EMBEDDED_PORT", int, EMBEDDED_PORT_DEFAULT),
            handler=read("SUMBATCH_HANDLER", str, ""),
        )


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
