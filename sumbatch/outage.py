"""How consumers live through Redis being away: back off, say so once, say when it's
back. The delay policy is a pure function."""

from __future__ import annotations

import logging
import random

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

REDIS_DOWN = (RedisConnectionError, RedisTimeoutError)


def reconnect_delay(
    failures: int, rng: random.Random, base: float = 0.1, cap: float = 5.0
) -> float:
    """Exponential backoff with full jitter, from ``base`` up to ``cap`` seconds."""
    return rng.uniform(0.0, min(cap, base * 2 ** max(0, failures - 1)))


class Outage:
    def __init__(self, log: logging.Logger, what: str) -> None:
        self.log = log
        self.what = what
        self.failures = 0
        self.rng = random.Random()

    def failed(self, exc: BaseException) -> float:
        """Record a failure; returns how long to wait before trying again."""
        self.failures += 1
        if self.failures == 1:
            self.log.warning("%s: redis unavailable (%s); retrying with backoff", self.what, exc)
        return reconnect_delay(self.failures, self.rng)

    def ok(self) -> None:
        if self.failures:
            self.log.warning("%s: redis is back after %d failed tries", self.what, self.failures)
            self.failures = 0
