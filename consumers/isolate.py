"""Running a step on a batch so that a bad item fails alone: the batch is split in
halves, recursively, until the items at fault are isolated."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from sumbatch.outage import Outage, is_transient

log = logging.getLogger("sumbatch.worker")

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class Apart(Generic[T, R]):
    """What became of a batch split to isolate the items at fault."""

    done: list[tuple[Sequence[T], R]] = field(default_factory=list)  # parts, with results
    failed: list[T] = field(default_factory=list)  # items that failed alone
    errors: int = 0  # calls that failed with an error that is no outage


async def isolate(
    what: str,
    step: Callable[[Sequence[T]], Awaitable[R]],
    batch: Sequence[T],
    *,
    retry_transient: bool,
) -> Apart[T, R]:
    """Run ``step`` on ``batch``; when it fails with an error that is no outage (bad
    data, a bug), split the batch in halves, recursively, so that only the items at
    fault fail: at most 2n - 1 calls, no retry of those, so nothing spins. The first
    such error is logged with its traceback. Transient errors are retried with
    backoff (``retry_transient``) or raised to the caller's loop."""
    outage = Outage(log, what)
    apart: Apart[T, R] = Apart()

    async def attempt(part: Sequence[T]) -> None:
        while True:
            try:
                result = await step(part)
            except Exception as exc:
                if not is_transient(exc):
                    if not apart.errors:
                        log.error(
                            "%s: rejected (%s); isolating the items at fault",
                            what, exc, exc_info=exc,
                        )  # fmt: skip
                    apart.errors += 1
                    break
                if not retry_transient:
                    raise
                await asyncio.sleep(outage.failed(exc))
                continue
            outage.ok()
            apart.done.append((part, result))
            return
        if len(part) == 1:
            apart.failed.append(part[0])
            return
        half = len(part) // 2
        await attempt(part[:half])
        await attempt(part[half:])

    await attempt(batch)
    return apart
