"""Running a long-lived process: on uvloop where it is installed, its consumers side
by side (one per partition), until SIGTERM or SIGINT asks them to stop."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, Protocol, TypeVar

from sumbatch.outage import Outage, is_transient

T = TypeVar("T")
log = logging.getLogger("sumbatch")


class Consumer(Protocol):
    """A consumer of the log: it finishes its in-flight work once ``should_exit``."""

    should_exit: bool

    async def run(self) -> None: ...


class Together:
    """Consumers that run side by side in one process and stop together."""

    def __init__(self, consumers: Sequence[Consumer]) -> None:
        self.consumers = list(consumers)

    @property
    def should_exit(self) -> bool:
        return all(consumer.should_exit for consumer in self.consumers)

    @should_exit.setter
    def should_exit(self, value: bool) -> None:
        for consumer in self.consumers:
            consumer.should_exit = value

    async def run(self) -> None:
        await asyncio.gather(*(consumer.run() for consumer in self.consumers))


def run_async(main: Coroutine[Any, Any, T]) -> T:
    """asyncio.run, on uvloop where it is installed (it is, except on Windows)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


async def when_reachable(what: str, open_: Callable[[], Awaitable[T]]) -> T:
    """``open_()``, tried again with backoff for as long as Redis is away or refusing:
    a consumer started before its server waits for it rather than crash-loop."""
    outage = Outage(log, what)
    while True:
        try:
            opened = await open_()
        except Exception as exc:
            if not is_transient(exc):
                raise
            await asyncio.sleep(outage.failed(exc))
            continue
        outage.ok()
        return opened


def run_until_signal(
    start: Callable[[], Awaitable[Consumer]], close: Callable[[], Awaitable[None]]
) -> None:
    """Run the consumer ``start`` gives; the first SIGTERM/SIGINT asks it to stop after
    its in-flight work, the second stops at once (as does the first, before it has
    started). ``close`` runs last, whatever happened."""

    async def runner() -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        started: list[Consumer] = []

        def on_signal() -> None:
            if not started or started[0].should_exit:
                task.cancel()
            else:
                started[0].should_exit = True

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal)
        try:
            started.append(await start())
            await started[0].run()
        finally:
            await close()

    try:
        run_async(runner())
    except asyncio.CancelledError:
        pass
