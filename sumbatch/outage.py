"""What counts as Redis being away or refusing for a while, and how consumers live
through it: back off, say so once, say when it's back. The classification and the
delay policy are pure functions."""

from __future__ import annotations

import logging
import random

from redis.exceptions import (
    AskError,
    BusyLoadingError,
    ClusterError,
    MaxConnectionsError,
    OutOfMemoryError,
    ReadOnlyError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

# The server cannot be reached, or did not answer in time.
REDIS_DOWN = (RedisConnectionError, RedisTimeoutError)


class PoolBusy(RedisConnectionError):
    """Every connection this process may open to the server stayed in use for as long
    as a call may wait for one: this process is busy, the server is not away."""


# This process's own connections are all in use: its pool's wait ran out (PoolBusy), or
# a cluster node's pool, which has no wait, was full (MaxConnectionsError). Both are
# ConnectionErrors to redis-py, and so REDIS_DOWN too: callers that retry treat them
# alike; the API says which it was.
BUSY = (PoolBusy, MaxConnectionsError)

# The server answered, but refuses writes for now: out of memory, loading its data,
# a replica (READONLY, MASTERDOWN), a cluster slot moving or uncovered (TRYAGAIN,
# CLUSTERDOWN). redis-py maps these prefixes to classes and strips them from the text.
# While a slot moves between masters (resharding), the cluster client gives up after
# 16 redirections or TRYAGAIN replies in a row with ClusterError("TTL exhausted.")
# (ClusterDownError is one too), and a MULTI/EXEC raises the ASK or MOVED it met
# (AskError; MovedError is one too): the slot settles once the move ends.
REFUSED = (OutOfMemoryError, BusyLoadingError, ReadOnlyError, TryAgainError, ClusterError, AskError)
# Refusals redis-py leaves as a plain ResponseError, prefix kept: a script past
# busy-reply-threshold, min-replicas-to-write unmet; a blocked XREADGROUP/XREAD whose
# stream was deleted under it (UNBLOCKED: MIGRATE moved it to another master).
_REFUSED_PREFIXES = ("BUSY ", "NOREPLICAS ", "MASTERDOWN ", "LOADING ", "TRYAGAIN ", "UNBLOCKED ")


def refusal(exc: BaseException) -> str | None:
    """The server's word for a transient refusal (``OOM``, ``READONLY``...), or None
    when ``exc`` is not one."""
    if isinstance(exc, REFUSED):
        code = getattr(exc, "status_code", None)
        return str(code) if code else type(exc).__name__
    if isinstance(exc, ResponseError):
        text = str(exc)
        if text.startswith(_REFUSED_PREFIXES):
            return text.split(" ", 1)[0]
    return None


def is_transient(exc: BaseException) -> bool:
    """Redis away or refusing for now: worth retrying later with the same request."""
    return isinstance(exc, REDIS_DOWN) or refusal(exc) is not None


def reconnect_delay(
    failures: int, rng: random.Random, base: float = 0.1, cap: float = 5.0
) -> float:
    """Exponential backoff with full jitter, from ``base`` up to ``cap`` seconds."""
    return rng.uniform(0.0, min(cap, base * 2 ** max(0, failures - 1)))


class Outage:
    """A loop's run of failed tries. Redis away or refusing is logged once as such;
    anything else is a bug or bad data, logged once with its traceback. Both back off,
    so no loop spins."""

    def __init__(self, log: logging.Logger, what: str) -> None:
        self.log = log
        self.what = what
        self.failures = 0
        self.rng = random.Random()

    def failed(self, exc: BaseException) -> float:
        """Record a failure; returns how long to wait before trying again."""
        self.failures += 1
        if self.failures == 1:
            if is_transient(exc):
                self.log.warning(
                    "%s: redis unavailable (%s: %s); retrying with backoff",
                    self.what, refusal(exc) or type(exc).__name__, exc,
                )  # fmt: skip
            else:
                self.log.error(
                    "%s: unexpected error; retrying with backoff", self.what, exc_info=exc
                )
        return reconnect_delay(self.failures, self.rng)

    def ok(self) -> None:
        if self.failures:
            self.log.warning("%s: redis is back after %d failed tries", self.what, self.failures)
            self.failures = 0
