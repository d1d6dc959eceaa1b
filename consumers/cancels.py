"""A worker's ear for cancels: the cancel script revokes a group's unended tasks and
publishes its id; the runs of those tasks here are stopped at once. Pub/sub is best
effort: a run nobody stops finishes, meets the fence and writes nothing."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from consumers.runs import Runs
from sumbatch.outage import Outage, is_transient
from sumbatch.store import Store

log = logging.getLogger("sumbatch.worker")


class Cancels:
    def __init__(self, store: Store, runs: Runs, name: str) -> None:
        self.store = store
        self.runs = runs
        self.name = name

    async def watch(self, closing: Callable[[], bool]) -> None:
        """Stop our runs of the tasks a cancel revoked, as its message comes in; until
        ``closing()``."""
        outage = Outage(log, f"worker {self.name} cancels")
        while not closing():
            try:
                async with self.store.redis.pubsub() as pubsub:
                    await pubsub.subscribe(self.store.keys.cancellations)
                    # Cancels published while we were not subscribed are lost: ask
                    # once about everything we run.
                    await self.stop_ended(list(self.runs))
                    while not closing():
                        # A timeout, not a read that blocks forever: a dead connection
                        # is found by the client's health check between reads.
                        message = await pubsub.get_message(
                            ignore_subscribe_messages=True, timeout=1.0
                        )
                        # Only after a read went well: a connection that fails at once
                        # each time keeps backing off longer.
                        outage.ok()
                        if message is not None and message["type"] == "message":
                            await self.stop_ended(self.runs.of_groups([message["data"]]))
            except Exception as exc:
                await asyncio.sleep(outage.failed(exc))

    async def stop_ended(self, keys: list[str]) -> None:
        """Stop the runs of those tasks (by key) that have ended (revoked, or finished
        elsewhere): the server says exactly which, and acknowledges an entry only once
        every task in it has ended, so a task that goes on is never left running
        nowhere."""
        known = [(key, self.runs.item(key)) for key in keys if key in self.runs]
        if not known:
            return
        try:
            released = await self.store.release_ended(
                [item for _, item in known], [eid for eid, _ in known]
            )
        except Exception as exc:
            if is_transient(exc):
                raise  # the listener backs off, and asks again once it is back
            # Best effort: those runs go on, and their outcomes meet the fence.
            log.error("could not stop runs of cancelled tasks", exc_info=exc)
            return
        for entry_id in released:
            self.runs.stop(entry_id)
        if released:
            log.info("stopped %d runs of cancelled tasks", len(released))
