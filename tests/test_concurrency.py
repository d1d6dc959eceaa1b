"""One API process under many requests at once, on a healthy server. Past its pool of
connections to Redis (SUMBATCH_REDIS_CONNECTIONS, 100), requests wait for one to come
free instead of answering 503 as if Redis were away; a pool that stays full answers
503 "busy", never "storage unavailable"."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx2 as httpx
import msgspec
import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import MaxConnectionsError

from sumbatch.config import Settings
from sumbatch.model.tasks import Delay
from sumbatch.outage import BUSY, PoolBusy, is_transient
from sumbatch.store.base import connect
from sumbatch.store.partitions import open_partitions
from sumbatch.testing.processes import Processes
from tests.support import answers_200, body_of, free_port, wait_until_sync

CONCURRENT = 1000


def test_busy_is_transient_and_told_apart_from_away() -> None:
    for exc in (PoolBusy("all 1 connections stayed in use"), MaxConnectionsError()):
        assert isinstance(exc, BUSY)
        assert is_transient(exc)
    assert not isinstance(RedisConnectionError("Connection refused"), BUSY)


def test_a_call_waits_for_a_free_connection_then_says_busy(settings: Settings) -> None:
    """A pool of one connection held by a blocking read: a second call waits for it,
    and is served as soon as it is free; held past the wait, the call raises PoolBusy."""

    empty = f"{{{settings.namespace}}}:nothing"

    async def holding(pool_wait: float, block: float) -> tuple[aioredis.Redis, asyncio.Future[Any]]:
        client = connect(settings.client_url, max_connections=1, pool_wait=pool_wait)
        assert isinstance(client, aioredis.Redis)
        held = asyncio.ensure_future(client.blpop([empty], block))
        await asyncio.sleep(0)  # the read takes the pool's one connection
        return client, held

    async def scenario() -> None:
        client, held = await holding(pool_wait=30, block=1)
        try:
            waiting = asyncio.ensure_future(client.ping())
            finished, _ = await asyncio.wait({waiting}, timeout=0.1)
            assert not finished  # it waits while the read holds the connection
            assert await held is None  # the read's own timeout gives it back
            assert await waiting is True
        finally:
            await client.aclose()
        client, held = await holding(pool_wait=0.2, block=3)
        try:
            with pytest.raises(PoolBusy):
                await client.ping()
            assert not held.done()  # the wait ran out while the read still held it
            await held
        finally:
            await client.aclose()

    asyncio.run(scenario())


def test_each_partition_has_room_for_its_blocked_read(settings: Settings) -> None:
    """SUMBATCH_REDIS_CONNECTIONS is for calls: a partition's blocked read (which holds
    its connection while it blocks) gets one more, so 256 partitions on one server do
    not leave a worker's pool full of its own XREADGROUPs."""
    five = msgspec.structs.replace(settings, partitions=3, redis_connections=5)

    async def scenario() -> int:
        async with await open_partitions(five) as partitions:
            assert isinstance(partitions.redis, aioredis.Redis)
            return int(partitions.redis.connection_pool.max_connections)

    assert asyncio.run(scenario()) == 5 + 3


async def _get_all(base: str, paths: list[str]) -> list[tuple[int, Any]]:
    limits = httpx.Limits(max_connections=len(paths), max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=120) as client:

        async def one(path: str) -> tuple[int, Any]:
            answer = await client.get(path)
            return answer.status_code, answer.json()

        return await asyncio.gather(*(one(path) for path in paths))


@pytest.mark.timeout(300)
def test_a_thousand_gets_and_a_thousand_long_polls_at_once_get_no_503(
    settings: Settings, procs: Processes
) -> None:
    settings = msgspec.structs.replace(settings, delay=Delay(2.0, 3.0))
    port = free_port()
    procs.start(settings, "api", "--port", str(port))
    procs.start(settings, "worker")
    procs.start(settings, "projector")
    base = f"http://127.0.0.1:{port}"
    wait_until_sync(lambda: answers_200(f"{base}/readyz"), timeout=60, what="the API")

    with httpx.Client(base_url=base, timeout=30) as api:
        done = api.post("/grouptasks", json=body_of([(1, 2), (3, 4)])).json()["groupTaskId"]
        running = api.post("/grouptasks", json=body_of([(5, 6), (7, 8)])).json()["groupTaskId"]

    async def burst() -> tuple[list[tuple[int, Any]], list[tuple[int, Any]]]:
        long_polls = asyncio.ensure_future(
            _get_all(base, [f"/grouptasks/{running}?wait=60"] * CONCURRENT)
        )
        gets = await _get_all(base, [f"/grouptasks/{done}"] * CONCURRENT)
        return gets, await long_polls

    gets, long_polls = asyncio.run(burst())
    statuses = [status for status, _ in gets + long_polls]
    refused = [body for status, body in gets + long_polls if status != 200][:5]
    assert {s: statuses.count(s) for s in set(statuses)} == {200: 2 * CONCURRENT}, refused
    # Every long-poll waited for the end (none was turned away: 1,000 is the limit).
    assert all(body["grouptaskProcessed"] for _, body in long_polls)
    assert {tuple(body["results"]) for _, body in long_polls} == {(11, 15)}
