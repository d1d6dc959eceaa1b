"""The views the projector folds the log into, and its position in the log: loading
them to fold on, committing them (compare-and-set on the position), replay's snapshot,
and the API's reads of a group, its summary or one task. Views stored by older
versions (one JSON string each) read as they are."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TypeVar, cast

import msgspec
from redis.exceptions import ResponseError

from sumbatch.model import chunks, ids
from sumbatch.model.projection import SetAside, Views
from sumbatch.model.views import GroupSummary, GroupView, TaskView, chunk_of, task_view
from sumbatch.store.base import StoreBase, _json

log = logging.getLogger("sumbatch.store")

# Entries kept in the rejected stream (about: trimmed with MAXLEN ~).
REJECTED_KEPT = 10_000

# A view as versions before views were hashes stored it: one JSON string.
_old_layout = msgspec.json.Decoder(GroupView)


class _WrongType:
    """A view key that is not a hash: a view of the old layout, or one made by hand."""


WRONG_TYPE = _WrongType()


class StoredViews(StoreBase):
    """The views and the projector's position: what GETs read and the projector writes."""

    async def position(self) -> str | None:
        return cast(str | None, await self.redis.get(self.keys.projector_position))

    async def load_views(self, group_ids: Iterable[str]) -> Views:
        """Whole views (every chunk), as ``sumbatch replay`` folds on them."""
        gids = list(group_ids)
        if not gids:
            return Views()
        # One HGETALL per view, in one step (a cluster client refuses multi-key
        # commands in a pipeline, even on one slot).
        pipe = self.redis.pipeline(transaction=True)
        for gid in gids:
            pipe.hgetall(self.keys.group_view(gid))
        return await self._whole_views(gids, await pipe.execute(raise_on_error=False))

    async def load_touched(
        self, touched: Mapping[str, Iterable[int]], submitted: Iterable[str] = ()
    ) -> Views:
        """The views of some groups, each with only its summary and the chunks given
        (``projection.chunks_touched``), and where the logs of the groups ``submitted``
        begin (``Views.origins``): what the projector folds a batch into, read in one
        step."""
        wanted = {gid: sorted(set(ks)) for gid, ks in touched.items()}
        first = sorted(set(submitted))
        if not wanted and not first:
            return Views()
        pipe = self.redis.pipeline(transaction=True)
        for gid, ks in wanted.items():
            pipe.hmget(self.keys.group_view(gid), [chunks.SUMMARY, *map(chunks.field_name, ks)])
        for gid in first:
            pipe.xrange(self.keys.group_log(gid), count=1)
        views = Views()
        replies = await pipe.execute(raise_on_error=False)
        views.origins = dict(zip(first, map(_first_id, replies[len(wanted) :]), strict=True))
        old: list[str] = []
        for (gid, ks), reply in zip(wanted.items(), replies[: len(wanted)], strict=True):
            fields = _reply(gid, reply)
            if isinstance(fields, _WrongType):
                old.append(gid)
                continue
            if fields[0] is None:
                continue
            try:
                view = chunks.decode_view(gid, fields[0], dict(zip(ks, fields[1:], strict=True)))
            except chunks.NotAView as exc:
                _absent(gid, exc)
                continue
            views.groups[gid] = view
            views.partial[gid] = frozenset(k for k in ks if chunks.span(k, view.tasks_total))
        # Loaded whole: their commit writes them whole, as hashes.
        views.groups.update(await self._old_views(old))
        return views

    async def group_origins(self, group_ids: Iterable[str]) -> dict[str, str | None]:
        """Where each group's log begins: its GroupSubmitted's entry id, None when the
        log is absent (expired, or the group never submitted)."""
        gids = sorted(set(group_ids))
        if not gids:
            return {}
        pipe = self.redis.pipeline(transaction=True)
        for gid in gids:
            pipe.xrange(self.keys.group_log(gid), count=1)
        replies = await pipe.execute(raise_on_error=False)
        return dict(zip(gids, map(_first_id, replies), strict=True))

    async def commit_views(
        self,
        expected: str | None,
        position: str,
        views: Views,
        set_aside: Sequence[SetAside] = (),
    ) -> bool:
        """Write views and the position they include, compare-and-set on ``expected``,
        and copy the entries the fold set aside to the rejected stream, all in one
        step. A view loaded in part gets its summary and the chunks loaded; any other
        is written whole, replacing what was there. Processed groups start to expire;
        the rest live on."""
        ttl = str(self.retention.results)
        keys = [self.keys.projector_position, self.keys.rejected]
        rejected = [
            ["entryId", s.entry_id, "reason", s.reason, *itertools.chain(*s.fields.items())]
            for s in set_aside
        ]
        args: list[str | int | bytes] = [
            expected or "",
            position,
            _json.encode(rejected),
            REJECTED_KEPT,
        ]
        for gid, group in views.groups.items():
            loaded = views.partial.get(gid)
            fields = chunks.flat_fields(group, loaded)
            keys.append(self.keys.group_view(gid))
            args += (ttl if group.processed else "0", "1" if loaded is None else "0", len(fields))
            args += fields
        # Once per call: a resend of a commit that ran answers 1, as the first did.
        return bool(await self._once(self._commit, keys[:2], keys[2:], args))

    async def snapshot(self, group_ids: Sequence[str]) -> tuple[str | None, Views, dict[str, bool]]:
        """In one step: the projector's position, these groups' whole views, and
        whether each group's ledger still exists (it has not expired)."""
        # One command per key, not MGET: a cluster client refuses multi-key commands
        # in a pipeline, even on one slot.
        pipe = self.redis.pipeline(transaction=True)
        pipe.get(self.keys.projector_position)
        for gid in group_ids:
            pipe.hgetall(self.keys.group_view(gid))
        for gid in group_ids:
            pipe.exists(self.keys.ledger(gid))
        position, *replies = await pipe.execute(raise_on_error=False)
        if isinstance(position, Exception):
            raise position
        stored, exists = replies[: len(group_ids)], replies[len(group_ids) :]
        live = {gid: bool(n) for gid, n in zip(group_ids, exists, strict=True)}
        return position, await self._whole_views(group_ids, stored), live

    async def forget_position(self) -> None:
        """Make the projector fold the log again from its start (``sumbatch replay``).
        Safe while it runs: its next commit fails the compare-and-set and it reloads.
        The fold is idempotent for events already in a view, and GroupSubmitted starts
        a view afresh (written whole, its old fields dropped), so the views converge to
        the fold of the log."""
        await self.redis.delete(self.keys.projector_position)

    async def _view_fields(self, group_task_id: str) -> Mapping[str, chunks.Blob] | None:
        """A group's whole stored view, as fields; an id that cannot be a group's never
        reaches Redis."""
        if not ids.is_group_id(group_task_id):
            return None
        try:
            fields = await self.redis.hgetall(self.keys.group_view(group_task_id))
        except ResponseError as exc:
            _reply(group_task_id, exc)
            old = await self._old_views([group_task_id])
            return chunks.to_fields(old[group_task_id]) if group_task_id in old else None
        return cast(dict[str, str], fields) or None

    async def group_view(self, group_task_id: str) -> GroupView | None:
        fields = await self._view_fields(group_task_id)
        return None if fields is None else _decoded(group_task_id, chunks.decode_whole, fields)

    async def group_summary(self, group_task_id: str) -> GroupSummary | None:
        """The group's counts and results: every chunk read, only the results decoded."""
        fields = await self._view_fields(group_task_id)
        return None if fields is None else _decoded(group_task_id, chunks.decode_summary, fields)

    async def task_view(self, task_id: str) -> TaskView | None:
        """One task's view: the group's summary and the one chunk that holds it."""
        where = ids.split_task_id(task_id)
        if where is None:
            return None
        gid, index = where
        key = self.keys.group_view(gid)
        try:
            summary, chunk = await self.redis.hmget(
                key, [chunks.SUMMARY, chunks.field_name(chunk_of(index))]
            )
        except ResponseError as exc:
            _reply(gid, exc)
            old = await self._old_views([gid])
            return task_view(old[gid], task_id, index) if gid in old else None
        if summary is None:
            return None
        try:
            return chunks.decode_task(task_id, gid, index, summary, chunk)
        except chunks.NotAView as exc:
            _absent(gid, exc)
            return None

    async def _whole_views(self, group_ids: Sequence[str], replies: Sequence[object]) -> Views:
        views = Views()
        old: list[str] = []
        for gid, reply in zip(group_ids, replies, strict=True):
            fields = _reply(gid, reply)
            if isinstance(fields, _WrongType):
                old.append(gid)
            elif fields and (
                view := _decoded(gid, chunks.decode_whole, cast(dict[str, str], fields))
            ):
                views.groups[gid] = view
        views.groups.update(await self._old_views(old))
        return views

    async def _old_views(self, group_ids: Sequence[str]) -> dict[str, GroupView]:
        """Views stored by a version before views were hashes (one JSON string each),
        read as they are: the projector's next commit of such a group writes its view
        whole, as a hash, so an upgrade needs no step of its own. A key of another type,
        or a string that is no view of the fold's shape (by hand), counts as absent."""
        if not group_ids:
            return {}
        pipe = self.redis.pipeline(transaction=False)
        for gid in group_ids:
            pipe.get(self.keys.group_view(gid))
        found = {}
        for gid, blob in zip(group_ids, await pipe.execute(raise_on_error=False), strict=True):
            try:
                view = _old_layout.decode(blob) if isinstance(blob, str) else None
            except msgspec.DecodeError:
                view = None
            if view is not None and view.group_task_id == gid and view.well_formed():
                found[gid] = view
            else:
                _absent(gid, ValueError("its key is no hash, nor a view of the old layout"))
        return found


T = TypeVar("T")


def _absent(group_task_id: str, why: Exception) -> None:
    """A stored view that is no view of the fold's shape (written by hand) counts as
    absent, so its group's events are set aside rather than stall the projector, and
    a read of it is a 404 rather than a 500."""
    log.error("the stored view of group %s is no view (%s); ignored", group_task_id, why)


def _first_id(reply: object) -> str | None:
    """The id of the entry an XRANGE COUNT 1 read, None for none or a key of another
    type (written by hand)."""
    if isinstance(reply, list) and reply:
        return str(reply[0][0])
    return None


def _reply(group_task_id: str, reply: T | Exception) -> T | _WrongType:
    """A reply about a view key; WRONG_TYPE for a key that is no hash (a view of the
    old layout, or one made by hand: ``_old_views`` tells). Other errors are raised."""
    if isinstance(reply, ResponseError) and str(reply).startswith("WRONGTYPE"):
        return WRONG_TYPE
    if isinstance(reply, Exception):
        raise reply
    return reply


def _decoded(
    group_task_id: str,
    decode: Callable[[str, Mapping[str, chunks.Blob]], T],
    fields: Mapping[str, chunks.Blob],
) -> T | None:
    try:
        return decode(group_task_id, fields)
    except chunks.NotAView as exc:
        _absent(group_task_id, exc)
        return None
