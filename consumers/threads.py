"""A plain (synchronous) handler's calls, run off the event loop: a bounded pool of
daemon threads, one per worker process, so that the loop (renewals, flushing,
cancels, the other runs) never waits on a handler.

A thread cannot be stopped. A call whose run gives up on it (its task timeout, a
cancel, a takeover) is abandoned: its run has already counted as failed or been
dropped, and whatever the call returns later is thrown away, never written. Its
thread stays counted (``busy``, ``overdue``) until the call really returns, so the
pool never holds more than its size. A call waits for a free thread if all are busy;
when every thread has been held by an abandoned call for ``patience`` seconds, the
calls still waiting fail with ``NoThread`` rather than wait for ever.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

# Threads one worker process runs plain handlers on, at most: SUMBATCH_WORKER_CONCURRENCY,
# capped at 32 (concurrent.futures' own ceiling). A plain handler holds the GIL while
# it computes, so more threads make no CPU-bound handler faster and take the GIL from
# the event loop (renewals, flushing) more often; 32 still overlap 32 blocking calls
# (sleeps, sockets). More concurrency than that wants an ``async def`` handler.
THREADS_CAP = 32


def pool_size(concurrency: int) -> int:
    return max(1, min(concurrency, THREADS_CAP))


class NoThread(Exception):
    """Every thread has been held by an abandoned call for longer than the patience."""


class _Call:
    __slots__ = ("abandoned", "args", "fn", "future", "loop", "returned")

    def __init__(
        self, fn: Callable[..., Any], args: tuple[Any, ...], loop: asyncio.AbstractEventLoop
    ) -> None:
        self.fn = fn
        self.args = args
        self.loop = loop
        self.future: asyncio.Future[Any] = loop.create_future()
        self.returned = False  # set on the loop once the function has returned
        self.abandoned = False  # set on the loop once its run gave up on it


class Threads:
    def __init__(self, size: int, patience: float) -> None:
        self.size = size
        self.patience = patience
        # Calls handed to a thread whose function has not returned yet, and of those
        # the abandoned ones (past their timeout, cancelled, taken over).
        self.busy = 0
        self.overdue = 0
        # Calls waiting for a free thread, first come first served (a waiter that left
        # stays in the deque, done, and is skipped), and how many are still waiting.
        self._waiting: deque[asyncio.Future[None]] = deque()
        self._queued = 0
        self._jobs: queue.SimpleQueue[_Call] = queue.SimpleQueue()
        self._threads = 0
        self._wedged: asyncio.TimerHandle | None = None

    @property
    def waiting(self) -> int:
        """Calls waiting for a free thread."""
        return self._queued

    async def call(
        self, fn: Callable[..., Any], *args: Any, deadline: asyncio.Timeout | None = None
    ) -> Any:
        """``fn(*args)`` on a thread of the pool; ``deadline`` (the run's timeout) is
        paused while the call waits for a free thread: waiting is not running."""
        loop = asyncio.get_running_loop()
        await self._slot(loop, deadline)
        call = _Call(fn, args, loop)
        if self._threads < self.busy:  # never more threads than calls at once
            self._threads += 1
            name = f"sumbatch-handler-{self._threads}"
            threading.Thread(target=self._serve, name=name, daemon=True).start()
        self._jobs.put(call)
        try:
            return await call.future
        except asyncio.CancelledError:
            if not call.returned:
                call.abandoned = True
                self.overdue += 1
                if self.overdue >= self.size and self._wedged is None:
                    self._wedged = loop.call_later(self.patience, self._give_up_waiting)
            raise

    async def _slot(
        self, loop: asyncio.AbstractEventLoop, deadline: asyncio.Timeout | None
    ) -> None:
        if self.busy < self.size and not self.waiting:
            self.busy += 1
            return
        if self._wedged is not None and self._wedged.when() <= loop.time():
            raise self._no_thread()
        waiter: asyncio.Future[None] = loop.create_future()
        self._waiting.append(waiter)
        self._queued += 1
        when = deadline.when() if deadline is not None else None
        paused = loop.time()
        if deadline is not None and when is not None:
            deadline.reschedule(None)
        try:
            await waiter  # a thread handed over by ``_release``: ``busy`` counts it
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self._release()  # handed over as we were cancelled: pass it on
            raise
        finally:
            self._queued -= 1
            if deadline is not None and when is not None:
                deadline.reschedule(when + (loop.time() - paused))

    def _serve(self) -> None:
        """A thread of the pool: runs calls until the process ends (a daemon, so a
        call that never returns cannot keep the process from exiting)."""
        while True:
            call = self._jobs.get()
            ok, value = False, None
            if not call.abandoned:  # cancelled before it began: not run at all
                try:
                    ok, value = True, call.fn(*call.args)
                except BaseException as exc:  # handed to the run, which decides
                    value = exc
            try:
                call.loop.call_soon_threadsafe(self._returned, call, ok, value)
            except RuntimeError:  # the loop is closed: the process is ending
                pass
            del call, value

    def _returned(self, call: _Call, ok: bool, value: Any) -> None:
        call.returned = True
        if call.abandoned:
            # Its run has ended without it: a late result is thrown away here.
            self.overdue -= 1
            if self._wedged is not None and self.overdue < self.size:
                self._wedged.cancel()
                self._wedged = None
        elif not call.future.done():
            if ok:
                call.future.set_result(value)
            else:
                call.future.set_exception(value)
        self._release()

    def _release(self) -> None:
        """A thread came free: to the first call waiting, else back to the pool."""
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.busy -= 1

    def _give_up_waiting(self) -> None:
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.done():
                waiter.set_exception(self._no_thread())

    def _no_thread(self) -> NoThread:
        return NoThread(
            f"no handler thread came free in {self.patience:g} s: all {self.size} are "
            "held by calls past their timeout"
        )
