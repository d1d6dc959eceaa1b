"""Running a long-lived process's main coroutine: on uvloop where it is installed,
until SIGTERM or SIGINT asks it to stop."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Protocol, TypeVar

from sumbatch.store import Store

T = TypeVar("T")


class Stoppable(Protocol):
    """A consumer of the log: it finishes its in-flight work once ``should_exit``."""

    should_exit: bool
    store: Store


def run_async(main: Coroutine[Any, Any, T]) -> T:
    """asyncio.run, on uvloop where it is installed (it is, except on Windows)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


def run_until_signal(consumer: Stoppable, main: Callable[[], Awaitable[None]]) -> None:
    """Run ``main``; the first SIGTERM/SIGINT asks ``consumer`` to stop after its
    in-flight work, the second stops at once. The consumer's store is closed after."""

    async def runner() -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None

        def on_signal() -> None:
            if consumer.should_exit:
                task.cancel()
            consumer.should_exit = True

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal)
        try:
            await main()
        finally:
            await consumer.store.aclose()

    try:
        run_async(runner())
    except asyncio.CancelledError:
        pass
