"""Replay: fold the log from the start with the projector's own code, and compare
with (or rebuild) the stored views."""

from __future__ import annotations

from dataclasses import dataclass

import msgspec

from sumbatch.projection import Views, fold
from sumbatch.store import Store, decode_entries


@dataclass
class Replayed:
    position: str | None
    views: Views
    events: int


async def replay(store: Store, until: str = "+", page: int = 5000) -> Replayed:
    views = Views()
    last: str | None = None
    count = 0
    start = "-"
    while True:
        entries = await store.event_range(start, until, page)
        if not entries:
            break
        fold((event for _, event in decode_entries(entries)), views)
        count += len(entries)
        last = entries[-1][0]
        if len(entries) < page:
            break
        start = "(" + last
    return Replayed(last, views, count)


async def differences(store: Store, attempts: int = 20) -> tuple[int, list[str]]:
    """Fold the log up to the projector's position and list every view that differs.
    Retries while the projector moves, so a healthy, busy system reports none."""
    for _ in range(attempts):
        position = await store.position()
        if position is None:
            return 0, []
        replayed = await replay(store, until=position)
        stored = await store.load_views(replayed.views.groups)
        if await store.position() != position:
            continue
        diffs = [
            f"group {gid}: stored {_show(stored.groups.get(gid))} replayed {_show(view)}"
            for gid, view in replayed.views.groups.items()
            if stored.groups.get(gid) != view
        ]
        return replayed.events, diffs
    raise RuntimeError("the projector kept moving; try again when the system is quieter")


async def rebuild(store: Store) -> int:
    """Rewrite every view from the log and set the position to its end."""
    while True:
        expected = await store.position()
        replayed = await replay(store)
        if replayed.position is None:
            return 0
        if await store.commit_views(expected, replayed.position, replayed.views):
            return replayed.events


def _show(view: object) -> str:
    return "absent" if view is None else msgspec.json.encode(view).decode()
