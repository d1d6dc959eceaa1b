"""The store's connection on the event loop the service runs (uvloop): a connection the
server reset is an outage, never a bug. CI once saw a worker take a good batch of
outcomes for a bad one when Redis was killed while a connection sat in its accept
queue: uvloop raised RuntimeError where asyncio's loop raises OSError."""

from __future__ import annotations

import asyncio

import pytest
import uvloop
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from sumbatch.config import Settings
from sumbatch.outage import is_transient
from sumbatch.store import open_store


def _reset(connection: object) -> None:
    # What the kernel does when the server dies: the socket is reset under the client.
    # uvloop then closes the transport, and the next write finds it closed.
    connection._writer.transport.abort()  # type: ignore[attr-defined]


def test_a_reset_connection_is_a_connection_error_and_the_next_command_reconnects(
    settings: Settings,
) -> None:
    async def scenario() -> None:
        async with open_store(settings) as store:
            assert isinstance(store.redis, Redis)  # one server, not a cluster
            pool = store.redis.connection_pool
            connection = await pool.get_connection()  # type: ignore[no-untyped-call]
            try:
                await connection.send_command("PING")
                assert await connection.read_response() == "PONG"
                _reset(connection)
                await asyncio.sleep(0)  # let the loop see the transport close
                with pytest.raises(RedisConnectionError) as caught:
                    await connection.send_command("PING")
                assert is_transient(caught.value)
            finally:
                await pool.release(connection)
            # The pool's next command reconnects on its own.
            assert await store.redis.ping() is True

    uvloop.run(scenario())


def test_a_reset_pooled_connection_is_retried_by_a_command(settings: Settings) -> None:
    async def scenario() -> None:
        async with open_store(settings) as store:
            assert await store.redis.set("reset-probe", "1") is True
            assert isinstance(store.redis, Redis)  # one server, not a cluster
            pool = store.redis.connection_pool
            connection = await pool.get_connection()  # type: ignore[no-untyped-call]
            await pool.release(connection)
            _reset(connection)
            await asyncio.sleep(0)
            # The same pooled connection is handed out again, finds its socket reset,
            # and the client's one retry runs the command on a new one.
            assert await store.redis.get("reset-probe") == "1"

    uvloop.run(scenario())
