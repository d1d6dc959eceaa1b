"""When a sweep may take over another worker's entry: only once its owner has missed
its renewals for the claim timeout as this worker observes them, on its own monotonic
clock, over several readings; never on one reading of the entry's idle time.

Idle time is the server's wall clock since the entry's last delivery or renewal: a
stall of the server (``DEBUG SLEEP``, ``CLIENT PAUSE``, a fork, a slow disk) or a
forward step of its clock ages every entry at once, and at wake-up the sweeps would
race the owners' queued renewals. So a sweep reads the entries idle at least
``watch_from`` (``Claims.pending_idle``), each with the server's time of its last
delivery or renewal (``Pending.delivered_ms``, which a stall or a clock step leaves as
it is). An entry may be taken once this worker has seen it, with the same owner,
delivery count and ``delivered_ms``, for ``claim_timeout`` of its own clock: from the
reply of the first reading that showed it so to the sending of the current one. A
renewal, a claim or a hand-back changes what it saw and starts the watch again; an
entry missing from a reading (renewed, so idle less than ``watch_from``, or ended) is
forgotten.

Between two readings that follow each other, from the sending of the one to the reply
of the next, at most ``gap`` may pass (about two sweep periods); a longer gap means the
server, or this worker, stalled, and nothing seen before it counts. The readings run in
a transaction with a script, which ``CLIENT PAUSE WRITE`` holds as it holds the owners'
renewals. So across a watch the server served writes at least every ``gap``: a live
owner, renewing every quarter of the claim timeout, is seen renewing before the watch
ends, whatever the server's clock did. An entry handed back by a stopping worker (idle
``HANDED_BACK_MS``) may be taken at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from sumbatch.store import HANDED_BACK_MS, Pending

# Milliseconds two readings' ``delivered_ms`` of an unrenewed entry may differ by: the
# server's clock read by the script and the idle time of XPENDING, one transaction
# apart, round to milliseconds. A renewal moves it by the idle time the entry had,
# 25 ms at least (renewals come every quarter of a claim timeout of 0.1 s or more).
SAME_MS = 5


class _Seen(NamedTuple):
    consumer: str
    deliveries: int
    delivered_ms: int
    since: float  # our monotonic clock at the reply of the first reading showing it so


def watch_from(claim_timeout: float, sweep_every: float) -> float:
    """Seconds of idle time from which an entry is watched: one renewal period (a
    quarter of the claim timeout), or a sweep period if shorter. A live owner's entries
    show up only when a renewal is due."""
    return min(claim_timeout / 4, sweep_every)


def longest_gap(claim_timeout: float, sweep_every: float) -> float:
    """Seconds that may pass from one reading's sending to the next one's reply."""
    return max(claim_timeout / 2, 2 * sweep_every)


class Watch:
    """What one worker's sweeps have seen of the entries idle past ``watch_from``."""

    def __init__(self, claim_timeout: float, gap: float) -> None:
        self.claim_timeout = claim_timeout
        self.gap = gap
        self.seen: dict[str, _Seen] = {}
        self.last_sent: float | None = None
        # Entries idle at least the claim timeout on the server's clock, in the last
        # reading: a worker run until idle waits for them.
        self.overdue = 0

    def observe(self, pending: Sequence[Pending], sent: float, received: float) -> list[Pending]:
        """Record one reading, ``sent`` and ``received`` on our monotonic clock around
        it; returns the entries that may be taken over now, handed back ones first."""
        if self.last_sent is None or received - self.last_sent > self.gap:
            self.seen = {}  # a stall (the server's or ours): start watching again
        self.last_sent = sent
        seen: dict[str, _Seen] = {}
        handed_back: list[Pending] = []
        ready: list[Pending] = []
        claim_ms = self.claim_timeout * 1000
        self.overdue = 0
        for entry in pending:
            before = self.seen.get(entry.entry_id)
            if (
                before is None
                or before.consumer != entry.consumer
                or before.deliveries != entry.deliveries
                or abs(before.delivered_ms - entry.delivered_ms) > SAME_MS
            ):
                before = _Seen(entry.consumer, entry.deliveries, entry.delivered_ms, received)
            seen[entry.entry_id] = before
            if entry.idle_ms >= claim_ms:
                self.overdue += 1
            if entry.idle_ms >= HANDED_BACK_MS:
                handed_back.append(entry)
            elif sent - before.since >= self.claim_timeout:
                ready.append(entry)
        self.seen = seen
        return handed_back + ready
