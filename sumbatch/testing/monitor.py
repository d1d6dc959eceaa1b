"""Following the commands clients send a server, from its MONITOR feed: what a test
or a benchmark reads to see which commands the service sends."""

from __future__ import annotations

import threading
import time
from typing import Any, Self

import redis

from sumbatch.testing.waiting import wait_until_sync


class Monitor:
    """The commands clients send a server, from its MONITOR feed, followed in a thread
    while the ``with`` block runs: each as redis-py reads it (``time``, ``client_port``,
    ``command``...). Commands that scripts run (client type ``lua``) are left out."""

    def __init__(self, url: str) -> None:
        self.client = redis.Redis.from_url(url, decode_responses=True)
        self.seen: list[dict[str, Any]] = []
        self._ready = threading.Event()
        self._started = False
        self._thread = threading.Thread(target=self._follow, daemon=True)

    def _follow(self) -> None:
        try:
            with self.client.monitor() as feed:  # type: ignore[no-untyped-call]
                self._started = True
                self._ready.set()
                for command in feed.listen():
                    if command.get("client_type") != "lua":
                        self.seen.append(command)
        except (redis.ConnectionError, ValueError, AttributeError):
            return  # the connection was closed: the watch is over
        finally:
            self._ready.set()  # started or not: nobody need wait

    def __enter__(self) -> Self:
        self._thread.start()
        if not (self._ready.wait(10) and self._started):
            raise RuntimeError("MONITOR did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.connection_pool.disconnect()
        self.client.close()
        self._thread.join(10)
        if self._thread.is_alive():
            raise RuntimeError("the monitor did not stop")

    def commands(self) -> list[str]:
        return [str(command["command"]) for command in list(self.seen)]

    def settle(self) -> None:
        """Until the monitor has seen every command sent before this call."""
        mark = f"sumbatch-monitor-mark:{time.monotonic_ns()}"
        self.client.exists(mark)
        wait_until_sync(lambda: f"EXISTS {mark}" in self.commands(), what="the monitor")
