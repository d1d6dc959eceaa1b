"""The work stream's consumer group: creating it, reading and claiming its entries,
renewing or handing back a worker's claims, dead-lettering an entry no worker can run,
trimming the stream and forgetting dead workers. The steps that begin and end tasks
through the fence are ``work.py``'s."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, NamedTuple, cast

from redis.exceptions import ResponseError

from sumbatch.model.keys import WORKER_GROUP
from sumbatch.store.base import Entry, StoreBase
from sumbatch.store.entries import entry_id_of, entry_ids

# The idle time a stopping worker gives the entries it hands back (``renew``'s
# ``idle_ms``): about 31.7 years, more than any stall or step of the server's clock
# could age an entry, so a sweep can tell a hand-back (take it at once) from a stall.
HANDED_BACK_MS = 10**12
# The server's clock, read in the same transaction as the pending entries. A script
# (not TIME) so that a cluster's transaction can hold it, and so that CLIENT PAUSE
# WRITE holds the reading as it holds the owners' renewals (a script may write).
_SERVER_TIME = "return redis.call('TIME')"


class Pending(NamedTuple):
    """A pending work entry as one reading saw it. ``delivered_ms`` is the server's
    clock at its last delivery or renewal (its time then minus the idle time): a stall
    or a step of the server's clock leaves it as it is, only a renewal, a claim or a
    hand-back moves it."""

    entry_id: str
    consumer: str
    idle_ms: int
    deliveries: int
    delivered_ms: int


def _pairs(flat: list[Any]) -> dict[str, str]:
    return dict(zip(flat[::2], flat[1::2], strict=True))


class Claims(StoreBase):
    """Which worker holds which work entry, on the ``workers`` group's pending list."""

    async def ensure_worker_group(self) -> None:
        try:
            await self.redis.xgroup_create(self.keys.work, WORKER_GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def workers_ready(self) -> bool:
        """Whether the workers' consumer group exists (the server answers, too)."""
        if not await self.redis.exists(self.keys.work):
            return False
        groups = await self.redis.xinfo_groups(self.keys.work)
        return any(g["name"] == WORKER_GROUP for g in groups)

    async def read_work(self, consumer: str, count: int, block_ms: int) -> list[Entry]:
        """Up to ``count`` work entries for this consumer, handed out in turn across the
        groups with queued slices (``scripts/dispatch.py``); when none is queued, wait
        up to ``block_ms`` for one on the work stream (a submit, or a reader that left
        more queued, hands one out there to wake us), then take the rest of the count
        in turn, so that a woken reader's batch is as large as any other."""
        entries = await self._take_in_turn(consumer, count)
        if entries:
            return entries
        reply: Any = await self.redis.xreadgroup(
            WORKER_GROUP, consumer, {self.keys.work: ">"}, count=count, block=block_ms
        )
        woken = cast(list[Entry], reply[0][1]) if reply else []
        if woken and len(woken) < count:
            woken += await self._take_in_turn(consumer, count - len(woken))
        return woken

    async def _take_in_turn(self, consumer: str, count: int) -> list[Entry]:
        keys = self.keys
        args: list[str | int] = [
            WORKER_GROUP, consumer, count, keys.fair_groups_prefix, keys.queue_prefix
        ]  # fmt: skip
        taken: Any = await self._take(keys=[keys.work, keys.fair_keys], args=args)
        return [(str(eid), _pairs(flat)) for eid, flat in taken or []]

    async def autoclaim(
        self, consumer: str, min_idle_ms: int, count: int = 500, max_pages: int = 20
    ) -> list[Entry]:
        """Take over up to ``count`` entries idle longer than ``min_idle_ms`` (their
        worker is dead or stuck). Entries deleted from the stream meanwhile are
        acknowledged."""
        claimed: list[Entry] = []
        cursor = "0-0"
        for _ in range(max_pages):
            cursor, entries, deleted = await self.redis.xautoclaim(
                self.keys.work, WORKER_GROUP, consumer, min_idle_ms, cursor,
                count=count - len(claimed),
            )  # fmt: skip
            claimed += [(eid, fields) for eid, fields in entries if fields]
            if deleted:
                await self.redis.xack(self.keys.work, WORKER_GROUP, *deleted)
            if cursor == "0-0" or len(claimed) >= count:
                break
        return claimed

    async def pending_idle(
        self, min_idle_ms: int, count: int = 1000, max_pages: int = 20
    ) -> list[Pending]:
        """The pending entries idle at least ``min_idle_ms``, each page read in one
        transaction with the server's clock."""
        found: list[Pending] = []
        start = "-"
        for _ in range(max_pages):
            pipe = self.redis.pipeline(transaction=True)
            # The keyed call first: a cluster's transaction then runs the script on
            # the work stream's slot.
            pipe.xpending_range(
                self.keys.work, WORKER_GROUP, min=start, max="+", count=count, idle=min_idle_ms
            )
            pipe.eval(_SERVER_TIME, 0)
            rows, (seconds, micros) = await pipe.execute()
            now_ms = int(seconds) * 1000 + int(micros) // 1000
            found += [
                Pending(
                    str(row["message_id"]),
                    str(row["consumer"]),
                    int(row["time_since_delivered"]),
                    int(row["times_delivered"]),
                    now_ms - int(row["time_since_delivered"]),
                )
                for row in rows
            ]
            if len(rows) < count:
                break
            start = f"({rows[-1]['message_id']}"
        return found

    async def claim_idle(
        self, consumer: str, min_idle_ms: int, entry_ids: Sequence[str]
    ) -> list[Entry]:
        """Take over these entries, those still idle at least ``min_idle_ms`` (one
        renewed since it was read is left to its owner); entries deleted from the
        stream meanwhile leave the pending list (Redis 7)."""
        if not entry_ids:
            return []
        reply: Any = await self.redis.xclaim(
            self.keys.work, WORKER_GROUP, consumer, min_idle_ms, list(entry_ids)
        )
        return [(eid, fields) for eid, fields in reply if fields]

    async def dead_letter_entry(
        self,
        entry_id: str,
        fields: dict[str, str],
        kind: str = "UnreadableWorkEntry",
        reason: str = "",
    ) -> bool:
        """Move a work entry no worker can run (unreadable, or refused by the scripts:
        its task is outside its group, or its group's keys are not what sumbatch wrote)
        to the dead-letter stream, acknowledged: kept for inspection, and no longer
        pending, where it would hold back the work stream's trimming. Once: returns
        False, copying nothing, if the entry was no longer pending (a resend, or
        another worker moved it)."""
        rest = {k: v for k, v in fields.items() if k != "type"}
        why = {"reason": reason} if reason else {}
        entry = {"type": kind, "workEntryId": entry_id, **why, **rest}
        flat = json.dumps([part for pair in entry.items() for part in pair])
        keys = [self.keys.work, self.keys.dead_letters]
        return bool(await self._dead_letter(keys=keys, args=[WORKER_GROUP, entry_id, flat]))

    async def renew(self, consumer: str, keys: Sequence[str], idle_ms: int = 0) -> list[str]:
        """Keep our claim on the entries of these tasks (or, with ``idle_ms``, hand them
        back as if idle that long); returns the keys whose entry another worker took
        over."""
        entries = entry_ids(keys)
        lost: set[str] = set()
        for at in range(0, len(entries), 1000):
            chunk = entries[at : at + 1000]
            args = [WORKER_GROUP, consumer, str(idle_ms), *chunk]
            lost.update(cast(list[str], await self._renew(keys=[self.keys.work], args=args)))
        return [key for key in keys if entry_id_of(key) in lost]

    async def trim_work(self) -> int:
        return int(await self._trim_work(keys=[self.keys.work], args=[WORKER_GROUP]))

    async def forget_idle_consumers(self, idle_ms: int) -> list[str]:
        """Remove consumers (dead workers) with nothing pending, idle for ``idle_ms``."""
        gone = []
        for consumer in await self.redis.xinfo_consumers(self.keys.work, WORKER_GROUP):
            if consumer["pending"] == 0 and consumer["idle"] >= idle_ms:
                # DELCONSUMER would drop pending entries: re-checked inside the server.
                if await self._forget_consumer(
                    keys=[self.keys.work], args=[WORKER_GROUP, consumer["name"], idle_ms]
                ):
                    gone.append(str(consumer["name"]))
        return gone
