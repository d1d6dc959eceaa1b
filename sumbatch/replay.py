"""Replay: fold the log from the start with the projector's own code and compare the
result with the stored views (``sumbatch replay --check``)."""

from __future__ import annotations

import msgspec

from sumbatch.projection import Views, fold
from sumbatch.store import Store, decode_entries


async def fold_range(store: Store, views: Views, start: str, end: str, page: int = 5000) -> int:
    """Fold log entries from ``start`` to ``end`` (XRANGE syntax) into ``views``."""
    count = 0
    while True:
        entries = await store.event_range(start, end, page)
        fold((event for _, event in decode_entries(entries)), views)
        count += len(entries)
        if len(entries) < page:
            return count
        start = "(" + entries[-1][0]


async def differences(store: Store, chunk: int = 500) -> tuple[int, list[str]]:
    """Fold the log up to the projector's position and list every view that differs.

    Views are compared a chunk at a time, each chunk read in one step with the position
    it includes; the fold is moved forward to that position first, so a projector that
    keeps working meanwhile causes no false differences. A finished group whose view
    and ledger have both expired is not a difference."""
    position = await store.position()
    if position is None:
        return 0, []
    views = Views()
    count = await fold_range(store, views, "-", position)
    diffs = []
    group_ids = list(views.groups)
    for at in range(0, len(group_ids), chunk):
        ids = group_ids[at : at + chunk]
        now, stored, live = await store.snapshot(ids)
        if now is not None and now != position:
            count += await fold_range(store, views, "(" + position, now)
            position = now
        for gid in ids:
            replayed, kept = views.groups[gid], stored.groups.get(gid)
            if kept is None and not live[gid]:
                continue  # expired, as designed
            if kept != replayed:
                diffs.append(f"group {gid}: stored {_show(kept)} replayed {_show(replayed)}")
    return count, diffs


def _show(view: object) -> str:
    return "absent" if view is None else msgspec.json.encode(view).decode()
