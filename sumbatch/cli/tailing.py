"""Merging the partitions' logs into one, live, in entry id order. Pure.

Each read of a partition comes with the server's clock at that moment (``read_since``):
an entry the read did not return will get an id above that time. So everything held
with an id below the smallest such time over the partitions can be printed, in order,
and nothing printed later can come before it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from sumbatch.model.ids import entry_order

Entry = tuple[str, dict[str, str]]


@dataclass
class Merge:
    """Entries read and not yet released, and how far each partition is complete."""

    partitions: int
    held: list[Entry] = field(default_factory=list)
    # Per partition: every entry with an id below this (ms, seq) has been read.
    complete: list[tuple[int, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.complete = [(0, 0)] * self.partitions

    def read(self, partition: int, now_ms: int, entries: Sequence[Entry], count: int) -> None:
        """What one read of a partition returned, ``count`` at most, at ``now_ms``."""
        self.held += entries
        if len(entries) >= count:
            # More may wait past the last entry read: complete up to it only.
            ms, seq = entry_order(entries[-1][0])
            self.complete[partition] = (ms, seq + 1)
        else:
            # Entries yet to come in this millisecond get ids in it: complete below it.
            self.complete[partition] = max(self.complete[partition], (now_ms, 0))

    def release(self) -> list[Entry]:
        """The held entries every partition is complete past, in id order."""
        bound = min(self.complete)
        self.held.sort(key=lambda entry: entry_order(entry[0]))
        cut = 0
        while cut < len(self.held) and entry_order(self.held[cut][0]) < bound:
            cut += 1
        ready, self.held = self.held[:cut], self.held[cut:]
        return ready
