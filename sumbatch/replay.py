"""Replay: fold the log from the start with the projector's own code and compare the
result with the stored views (``sumbatch replay --check``)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import msgspec

from sumbatch.model.projection import SetAside, Views, fold_entries, group_ids
from sumbatch.store import Store


@dataclass
class Check:
    """What ``differences`` found."""

    events: int = 0  # log entries folded
    differences: list[str] = field(default_factory=list)
    set_aside: list[SetAside] = field(default_factory=list)


async def fold_range(
    store: Store, views: Views, start: str, end: str, check: Check, page: int = 5000
) -> None:
    """Fold log entries from ``start`` to ``end`` (XRANGE syntax) into ``views``."""
    while True:
        entries = await store.event_range(start, end, page)
        # A group folded from the log's start is in ``views`` once its submission
        # was; one submitted before the log's oldest entry (trimmed) is read from its
        # stored view, as the projector did.
        submitted_here = {f["groupTaskId"] for _, f in entries if f.get("type") == "GroupSubmitted"}
        missing = group_ids(entries) - views.groups.keys() - submitted_here
        views.groups.update((await store.load_views(missing)).groups)
        views.origins.update(await store.group_origins(submitted_here))
        check.set_aside += fold_entries(entries, views, store.expired_before(time.time()))
        check.events += len(entries)
        if len(entries) < page:
            return
        start = "(" + entries[-1][0]


async def differences(store: Store, chunk: int = 500) -> Check:
    """Fold the log up to the projector's position and list every view that differs,
    and every entry the fold sets aside.

    Views are compared a chunk at a time, each chunk read in one step with the position
    it includes; the fold is moved forward to that position first, so a projector that
    keeps working meanwhile causes no false differences. A finished group whose view
    and ledger have both expired is not a difference."""
    check = Check()
    position = await store.position()
    if position is None:
        return check
    views = Views()
    await fold_range(store, views, "-", position, check)
    group_ids_ = list(views.groups)
    for at in range(0, len(group_ids_), chunk):
        ids = group_ids_[at : at + chunk]
        now, stored, live = await store.snapshot(ids)
        if now is not None and now != position:
            await fold_range(store, views, "(" + position, now, check)
            position = now
        for gid in ids:
            replayed, kept = views.groups[gid], stored.groups.get(gid)
            if kept is None and not live[gid]:
                continue  # expired, as designed
            if kept != replayed:
                check.differences.append(
                    f"group {gid}: stored {_show(kept)} replayed {_show(replayed)}"
                )
    return check


def _show(view: object) -> str:
    return "absent" if view is None else msgspec.json.encode(view).decode()
