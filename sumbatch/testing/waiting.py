"""Waiting on a condition, with a deadline: polled async or sync, and the
condition that an HTTP server answers 200."""

from __future__ import annotations

import asyncio
import http.client
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


async def eventually(
    predicate: Callable[[], Awaitable[T | None]], within: float, interval: float = 0.05
) -> T | None:
    """``predicate``'s first truthy value, polled every ``interval`` s; None when it
    has given none after ``within`` s. For a benchmark, where a timeout is an outcome
    to report rather than a failure."""
    deadline = time.monotonic() + within
    while True:
        value = await predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            return None
        await asyncio.sleep(interval)


async def wait_until(
    predicate: Callable[[], Awaitable[T | None]], within: float = 30.0, what: str = "condition"
) -> T:
    """``predicate``'s first truthy value (never None, so a predicate that answers
    ``X | None`` gives an ``X``); AssertionError after ``within`` s."""
    value = await eventually(predicate, within)
    if value is None:
        raise AssertionError(f"timed out after {within}s waiting for {what}")
    return value


def wait_until_sync(
    predicate: Callable[[], T | None], timeout: float = 30.0, what: str = "condition"
) -> T:
    """``predicate``'s first truthy value (never None, so a predicate that answers
    ``X | None`` gives an ``X``); AssertionError after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def answers_200(url: str, timeout: float = 1.0) -> bool:
    """Whether a GET of ``url`` answers 200 within ``timeout`` s; False for any other
    answer and for none (refused, reset, timed out): a predicate for waiting on a
    server that is starting or stopping."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as answer:
            return bool(answer.status == 200)
    except urllib.error.HTTPError as other:  # an answer, not 2xx
        other.close()
        return False
    except (OSError, http.client.HTTPException):
        return False
