"""What every role of the store shares: the connection, the key names, the
registered scripts, the retention, and closing."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Self

import msgspec
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import (
    AbstractConnection,
    Connection,
    ConnectionPool,
    SSLConnection,
    UnixDomainSocketConnection,
)
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import MaxConnectionsError

from sumbatch import scripts
from sumbatch.model.keys import Keys
from sumbatch.outage import PoolBusy

Redis = aioredis.Redis
# A single server's client, or a cluster's: the store speaks to either.
Client = aioredis.Redis | RedisCluster
log = logging.getLogger("sumbatch.store")
Entry = tuple[str, dict[str, str]]

_json = msgspec.json.Encoder()
# How durable mode confirms a write (``Producer.check_durable``).
# "replica": on a cluster, a write is confirmed once a replica has it (WAIT 1).
DurableMode = Literal["waitaof", "always", "replica"]
# Seconds a call waits for a connection of its process's pool when all are in use,
# before PoolBusy: a burst (1,000 requests at once on one API process) queues for a
# moment instead of failing, while a pool held by a hung server still answers soon.
POOL_WAIT = 10.0
# Connections a process opens to each server at most, unless its settings say
# (SUMBATCH_REDIS_CONNECTIONS); redis-py's own default.
MAX_CONNECTIONS = 100
# Calls whose outcome is unknown (they raised) whose token a store keeps for the
# caller's resend of them (``StoreBase._once``), at most: the latest ones.
UNSETTLED_KEPT = 64


class WaitingPool(ConnectionPool):
    """redis-py's pool, whose callers wait for a free connection once all are in use
    (for up to ``timeout`` s), instead of failing at once with MaxConnectionsError;
    past the wait, PoolBusy. Taking a connection costs what it does in redis-py's pool:
    only a caller that finds none waits (redis-py's blocking pool takes a condition and
    a lock on every call, about 20% more client time per PING in a burst)."""

    def __init__(self, *args: Any, timeout: float = POOL_WAIT, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.timeout = timeout
        self._waiters: deque[asyncio.Future[None]] = deque()

    async def get_connection(self, *args: Any, **kwargs: Any) -> AbstractConnection:
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                connection: AbstractConnection = await super().get_connection(*args, **kwargs)  # type: ignore[no-untyped-call]
                return connection
            except MaxConnectionsError:
                pass
            # Nothing ran between the refusal and here (it raises without yielding),
            # so no connection was freed unseen: wait for the next one freed.
            remaining = deadline - time.monotonic()
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await asyncio.wait_for(waiter, max(remaining, 0))
            except TimeoutError:
                raise PoolBusy(
                    f"all {self.max_connections} connections stayed in use for {self.timeout} s"
                ) from None
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._wake_one()  # woken, then cancelled: pass the turn on
                raise

    async def release(self, connection: AbstractConnection) -> None:
        await super().release(connection)
        if self._waiters:
            self._wake_one()

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return


def connect(url: str, *, cluster: bool = False, **options: Any) -> Client:
    """Bounded timeouts and one quick retry on a lost connection; callers own any
    longer backoff. A retried call runs twice on the server when the first run's reply
    was lost: SUBMIT sees its own first run (its group's ledger), RELEASE_ENDED only
    acknowledges what has ended, and every other state-changing script finds its
    first run's reply under the call's token (``StoreBase._once``) and changes nothing
    more (a dead-letter copy is made only by the call whose XACK took its entry).

    At most ``max_connections`` connections to each server; past them a call waits up
    to ``pool_wait`` s for one (a cluster's node pools do not wait: they raise
    MaxConnectionsError at once)."""
    max_connections = options.pop("max_connections", MAX_CONNECTIONS)
    pool_wait = options.pop("pool_wait", POOL_WAIT)
    options.setdefault("decode_responses", True)
    # Bytes that are not UTF-8 (an entry written by hand) read as escapes such as
    # "\\xff", so they reach the checks that set them aside instead of failing the
    # whole read that holds them.
    options.setdefault("encoding_errors", "backslashreplace")
    options.setdefault("health_check_interval", 15)
    options.setdefault("socket_connect_timeout", 2)
    options.setdefault("socket_timeout", 10)
    options.setdefault("retry", Retry(NoBackoff(), 1))
    if cluster:
        # A MOVED reply updates that slot's owner only: by default every 5th one would
        # also close every connection of the process, those in use by other tasks (a
        # blocked read, the cancel listener) included, which resharding makes many of.
        options.setdefault("reinitialize_steps", 0)
        nodes = RedisCluster.from_url(url, max_connections=max_connections, **options)
        # Every node's connections, those of nodes found later too, come from here.
        shared = nodes.connection_kwargs
        shared["connection_class"] = _RESET_AWARE.get(
            shared["connection_class"], shared["connection_class"]
        )
        for node in nodes.startup_nodes:
            node.connection_class = shared["connection_class"]
        return nodes
    pool = WaitingPool.from_url(url, max_connections=max_connections, timeout=pool_wait, **options)
    client: Redis = aioredis.Redis.from_pool(pool)
    pool.connection_class = _RESET_AWARE.get(pool.connection_class, pool.connection_class)
    return client


async def is_cluster(url: str, **options: Any) -> bool:
    """Whether the server at ``url`` is a node of a Redis Cluster (any node will do:
    the cluster client finds the others)."""
    probe = connect(url, **options)
    try:
        info = await probe.info("cluster")
    finally:
        await probe.aclose()
    return bool(info.get("cluster_enabled"))


class _ResetAware(AbstractConnection):
    """A connection the server reset reads as a ConnectionError on every event loop.

    On uvloop, writing to a socket the server has already reset (a server killed while
    the connection sat in its accept queue, or a restart) raises RuntimeError("...the
    handler is closed"), where asyncio's own loop raises OSError, which redis-py turns
    into ConnectionError. Left as it is, an outage looks like a bug: the API answers 500
    instead of 503, and a worker takes a good entry for a bad one."""

    async def send_packed_command(
        self, command: bytes | str | Iterable[bytes], check_health: bool = True
    ) -> None:
        try:
            await super().send_packed_command(command, check_health)
        except RuntimeError as exc:  # redis-py has already dropped the connection
            raise RedisConnectionError(f"connection reset by the server ({exc})") from exc
        except AttributeError as exc:
            # Its writer was gone: another task of this process disconnected it while
            # it was in use, here mid-handshake (the cluster client disconnects every
            # node's connections on CLUSTERDOWN and on every few MOVED replies).
            raise RedisConnectionError(f"connection closed while in use ({exc})") from exc


class _TCP(_ResetAware, Connection):
    pass


class _TLS(_ResetAware, SSLConnection):
    pass


class _Unix(_ResetAware, UnixDomainSocketConnection):
    pass


# The class redis-py picks for a URL's scheme, and ours in its place.
_RESET_AWARE: dict[type[AbstractConnection], type[AbstractConnection]] = {
    Connection: _TCP,
    SSLConnection: _TLS,
    UnixDomainSocketConnection: _Unix,
}


@dataclass(frozen=True)
class Retention:
    """Seconds each kind of key lives after the thing it describes has ended."""

    results: int = 86_400
    cache: int = 86_400
    log: int = 86_400


class OwnsClient:
    """Holds a client (its connection pool) and closes it: ``aclose()``, or ``async
    with``."""

    redis: Client

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self.redis.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


class StoreBase(OwnsClient):
    """One namespace on one connection pool; each role below adds its steps."""

    def __init__(self, redis: Client, keys: Keys, retention: Retention | None = None) -> None:
        self.redis = redis
        # How durable mode confirms a write; None until check_durable() ran.
        self.durable: DurableMode | None = None
        self.keys = keys
        self.retention = retention or Retention()
        self._submit = redis.register_script(scripts.SUBMIT)
        self._begin = redis.register_script(scripts.BEGIN)
        self._append = redis.register_script(scripts.APPEND)
        self._complete = redis.register_script(scripts.COMPLETE)
        self._cancel = redis.register_script(scripts.CANCEL)
        self._release_ended = redis.register_script(scripts.RELEASE_ENDED)
        self._renew = redis.register_script(scripts.RENEW)
        self._commit = redis.register_script(scripts.COMMIT)
        self._read_since = redis.register_script(scripts.READ_SINCE)
        self._trim_work = redis.register_script(scripts.TRIM_WORK)
        self._take = redis.register_script(scripts.TAKE)
        self._next_attempt = redis.register_script(scripts.NEXT_ATTEMPT)
        self._forget_consumer = redis.register_script(scripts.FORGET_CONSUMER)
        self._dead_letter = redis.register_script(scripts.DEAD_LETTER)
        self._inspect = redis.register_script(scripts.INSPECT)
        # Call tokens: this store's own prefix, a counter, and the tokens of calls that
        # raised, by what they sent, for the caller's resend of them.
        self._token_prefix = secrets.token_hex(8)
        self._calls = itertools.count(1)
        self._unsettled: OrderedDict[bytes, str] = OrderedDict()

    async def _once(
        self,
        script: AsyncScript,
        before: Sequence[str],
        after: Sequence[str],
        args: Sequence[str | int | float | bytes],
        *,
        resent: bool = True,
    ) -> object:
        """Run a state-changing script once per call: the key of a token of this call
        (``Keys.call``) goes between the keys ``before`` and ``after``, and the script
        keeps its reply there for a while, so that a resend of the call (redis-py's
        retry after a socket timeout, with the same arguments) changes nothing more
        and gets the first reply. When the call raises, its outcome unknown, its token
        is kept (``resent``): the caller's next call with the same keys and arguments is
        its resend (after a backoff) and uses the same token. Not for a call whose
        arguments may well repeat as a new call (the next attempt of a task)."""
        what = self._what(before, after, args) if resent and self._unsettled else None
        token = self._unsettled.pop(what, None) if what is not None else None
        token = token or f"{self._token_prefix}-{next(self._calls)}"
        try:
            return await script(keys=[*before, self.keys.call(token), *after], args=args)
        except BaseException:
            if resent:
                self._unsettled[self._what(before, after, args)] = token
                while len(self._unsettled) > UNSETTLED_KEPT:
                    self._unsettled.popitem(last=False)
            raise

    @staticmethod
    def _what(before: Sequence[str], after: Sequence[str], args: Sequence[object]) -> bytes:
        """A digest of what a call sends (its keys but the token's, its arguments)."""
        return hashlib.blake2b(repr((before, after, args)).encode(), digest_size=16).digest()

    def _declare(self, group_ids: Iterable[str]) -> tuple[list[str], bytes]:
        """The write-side keys of some groups, four each, and their ids in the same
        order: what a script that works on several groups declares (``declared`` in
        scripts/lib.py)."""
        gids = list(dict.fromkeys(group_ids))
        return [key for gid in gids for key in self.keys.of_group(gid)], _json.encode(gids)
