"""The original's Celery app: one task that sums two integers after a simulated delay,
cached in Redis under its parameters (from the original README: "the result is cached
on Redis along with the input parameters")."""

from __future__ import annotations

import os
import random
import time

import redis
from celery import Celery

REDIS_URL = os.environ["ORIGINAL_REDIS_URL"]
app = Celery("tasks", broker=REDIS_URL, backend=REDIS_URL)
app.conf.update(worker_hijack_root_logger=False, result_expires=3600)
cache = redis.Redis.from_url(REDIS_URL)


def _delay() -> float:
    low, _, high = os.environ.get("ORIGINAL_DELAY", "3-10").partition("-")
    return random.uniform(float(low), float(high or low))


@app.task
def add(param_a: int, param_b: int) -> int:
    key = f"original:cache:{param_a}:{param_b}"
    cached = cache.get(key)
    if cached is not None:
        return int(cached)
    time.sleep(_delay())
    result = param_a + param_b
    cache.set(key, result)
    return result
