"""``sumbatch tail`` across Redis restarts, and at the head of a pipe."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import msgspec
import pytest
import redis

from sumbatch.config import Settings
from sumbatch.model.keys import Keys
from sumbatch.processes.embedded import EmbeddedServer
from tests.support import ROOT, entries, env_for, own_server, wait_until_sync


@pytest.fixture
def server(tmp_path: Path) -> Iterator[EmbeddedServer]:
    """A server of this test's own, which it may kill and start again."""
    with own_server(tmp_path / "data", appendfsync="always") as server:
        yield server


def append(client: redis.Redis, key: str, first: int, count: int) -> None:
    for n in range(first, first + count):
        client.xadd(key, {"type": "Probe", "n": str(n)})


def printed_ids(out: Path) -> list[str]:
    return [line.split()[0] for line in out.read_text().splitlines() if line.strip()]


def said_back(err: Path, times: int) -> Callable[[], bool]:
    return lambda: err.read_text().count("redis is back") == times


def printed_at_least(out: Path, count: int) -> Callable[[], bool]:
    return lambda: len(printed_ids(out)) >= count


def test_tail_goes_on_across_redis_restarts_missing_and_doubling_nothing(
    settings: Settings, server: EmbeddedServer, tmp_path: Path
) -> None:
    settings = msgspec.structs.replace(settings, redis_url=server.url)
    key = Keys(settings.namespace).events
    out, err = tmp_path / "tail.out", tmp_path / "tail.err"
    with out.open("wb") as stdout, err.open("wb") as stderr:
        tail = subprocess.Popen(
            [sys.executable, "-m", "sumbatch", "tail", "--from-start"],
            env=env_for(settings), stdout=stdout, stderr=stderr, cwd=ROOT,
        )  # fmt: skip
    try:
        client = redis.Redis.from_url(server.url, decode_responses=True)
        append(client, key, 0, 5)
        wait_until_sync(lambda: len(printed_ids(out)) == 5, timeout=20, what="5 lines")
        for n, stop in enumerate((server.kill, server.stop)):
            stop()  # a crash, then a clean shutdown
            client.close()
            server.start()
            client = redis.Redis.from_url(server.url, decode_responses=True)
            # Appended while tail is still backing off, then once it is back.
            append(client, key, 100 * (n + 1), 5)
            wait_until_sync(said_back(err, times=n + 1), timeout=30, what="tail to reconnect")
            append(client, key, 100 * (n + 1) + 50, 5)
            expected = [entry_id for entry_id, _ in entries(client, key)]
            wait_until_sync(printed_at_least(out, len(expected)), timeout=30, what="tail")
            assert printed_ids(out) == expected
        client.close()
        assert tail.poll() is None
    finally:
        tail.kill()
        tail.wait(10)
    said = err.read_text()
    assert "Traceback" not in said, said
    # Each outage is said once, however many tries it took.
    assert said.count("redis unavailable") == 2, said
    assert len(printed_ids(out)) == 25


def test_tail_into_head_ends_quietly(settings: Settings, raw: redis.Redis) -> None:
    key = Keys(settings.namespace).events
    append(raw, key, 0, 2)
    pipeline = subprocess.Popen(
        ["bash", "-c", 'set -o pipefail; "$@" | head -n 3', "tail-into-head",
         sys.executable, "-m", "sumbatch", "tail", "--from-start"],
        env=env_for(settings), stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
    )  # fmt: skip
    try:

        def ended() -> bool:
            # tail learns that head left only when it writes again.
            append(raw, key, 100, 1)
            return pipeline.poll() is not None

        wait_until_sync(ended, timeout=30, what="the pipeline to end")
        stdout, stderr = pipeline.communicate(timeout=10)
    finally:
        if pipeline.poll() is None:
            pipeline.kill()
            pipeline.wait(10)
    assert pipeline.returncode in (0, 141), stderr
    assert len(stdout.decode().splitlines()) == 3
    assert b"Traceback" not in stderr and b"BrokenPipe" not in stderr, stderr
