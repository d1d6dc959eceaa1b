"""The only module that talks to Redis about the log. Every step that must be atomic
(submission, start, completion, cancellation, projection commit) is one Lua script
from ``scripts.py``, run from here, so the rules that keep work from being lost or
doubled live in two files.

Streams, in brief: the event log is append-only; the work stream is read by the
``workers`` consumer group, whose pending-entries list (PEL) holds what was handed out
and not yet acknowledged. An entry leaves the PEL inside the completion script,
together with the result event (or in the begin script when its task has already
ended), so a crash at any point leaves it pending for XAUTOCLAIM, never lost.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

import msgspec
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoPermissionError, ResponseError

from sumbatch import ids, scripts
from sumbatch.config import Settings
from sumbatch.events import (
    WORKER_GROUP,
    AnyEvent,
    GroupCancelled,
    Keys,
    TaskCompleted,
    TaskDeadLettered,
    TaskFailed,
    TaskSubmitted,
    to_flat,
)
from sumbatch.outage import refusal
from sumbatch.projection import GroupSummary, GroupView, SetAside, TaskView, Views, task_view

Redis = aioredis.Redis
log = logging.getLogger("sumbatch.store")
Entry = tuple[str, dict[str, str]]

_group_view_decoder = msgspec.json.Decoder(GroupView)
_group_summary_decoder = msgspec.json.Decoder(GroupSummary)
_json = msgspec.json.Encoder()
# Entries kept in the rejected stream (about: trimmed with MAXLEN ~).
REJECTED_KEPT = 10_000


def connect(url: str, **options: Any) -> Redis:
    """Bounded timeouts and one quick retry: callers own their backoff, and a script
    that a retry could apply twice is fenced or guarded."""
    options.setdefault("decode_responses", True)
    # Bytes that are not UTF-8 (an entry written by hand) read as escapes such as
    # "\\xff", so they reach the checks that set them aside instead of failing the
    # whole read that holds them.
    options.setdefault("encoding_errors", "backslashreplace")
    options.setdefault("health_check_interval", 15)
    options.setdefault("socket_connect_timeout", 2)
    options.setdefault("socket_timeout", 10)
    options.setdefault("retry", Retry(NoBackoff(), 1))
    client: Redis = aioredis.Redis.from_url(url, **options)
    return client


@dataclass(frozen=True)
class Outcome:
    """One ended task, ready for the completion fence."""

    entry_id: str
    event: TaskCompleted | TaskFailed
    param_a: int
    param_b: int


@dataclass(frozen=True)
class Begun:
    """What the begin script decided for one work entry."""

    # ended: already ended, or its group is gone (acknowledged); cached: answered from
    # the cache (``value`` is the sum); run: run it (``value`` is the attempt number,
    # counted across workers); refused: its task is outside its group, or its group's
    # keys are not what sumbatch wrote (left pending, untouched).
    kind: Literal["ended", "cached", "run", "refused"]
    value: int = 0


_BEGUN_KINDS: tuple[Literal["ended", "cached", "run", "refused"], ...] = (
    "ended", "cached", "run", "refused"
)  # fmt: skip


@dataclass(frozen=True)
class CancelOutcome:
    """What a DELETE did: ``unknown`` group, ``finished`` without a cancel (nothing to
    do), cancelled ``before``, or ``cancelled`` now, revoking ``revoked`` tasks."""

    status: Literal["unknown", "finished", "before", "cancelled"]
    revoked: int = 0


@dataclass(frozen=True)
class Completed:
    recorded: int  # outcomes that ended their task (the others had ended before)
    # Entries refused and left pending: their group's keys are not what sumbatch
    # wrote (a hand-made key), or their index is outside the group.
    refused: list[str]


@dataclass(frozen=True)
class Submitted:
    earlier: str | None  # the first answer to this Idempotency-Key, if it was used before
    fsynced: bool | None  # None: not asked


@dataclass(frozen=True)
class Retention:
    """Seconds each kind of key lives after the thing it describes has ended."""

    results: int = 86_400
    cache: int = 86_400
    log: int = 86_400


class NotDurable(Exception):
    """The server cannot confirm writes on disk as durable mode needs; the message
    names the setting to change."""


DurableMode = Literal["waitaof", "always"]


def _durable_mode(has_waitaof: bool, aof_off: bool, config: dict[str, str] | None) -> DurableMode:
    """Pure: what the server's answers say durable mode can rely on."""
    if aof_off or (config is not None and config.get("appendonly") == "no"):
        raise NotDurable("durable mode needs the server's AOF: set appendonly yes")
    fsync = None if config is None else config.get("appendfsync")
    if fsync == "no":
        raise NotDurable(
            "durable mode needs a server that fsyncs: appendfsync is no; set appendfsync "
            "everysec or always (SUMBATCH_FSYNC for the embedded server)"
        )
    if has_waitaof:
        return "waitaof"
    if fsync == "always":
        return "always"
    if config is None:
        raise NotDurable(
            "durable mode: the server has no WAITAOF (before Redis 7.2) and CONFIG is not "
            "allowed, so appendfsync always cannot be checked; use Redis 7.2+ or Valkey"
        )
    raise NotDurable(
        f"durable mode: the server has no WAITAOF (before Redis 7.2) and runs appendfsync "
        f"{fsync}; set appendfsync always (SUMBATCH_FSYNC=always for the embedded server), "
        "or use Redis 7.2+ or Valkey"
    )


class Store:
    """Log, work and view I/O for one namespace."""

    def __init__(self, redis: Redis, keys: Keys, retention: Retention | None = None) -> None:
        self.redis = redis
        # How durable mode confirms a write; None until check_durable() ran.
        self.durable: DurableMode | None = None
        self.keys = keys
        self.retention = retention or Retention()
        self._submit = redis.register_script(scripts.SUBMIT)
        self._begin = redis.register_script(scripts.BEGIN)
        self._append = redis.register_script(scripts.APPEND)
        self._complete = redis.register_script(scripts.COMPLETE)
        self._cancel = redis.register_script(scripts.CANCEL)
        self._release_ended = redis.register_script(scripts.RELEASE_ENDED)
        self._renew = redis.register_script(scripts.RENEW)
        self._commit = redis.register_script(scripts.COMMIT)
        self._trim_work = redis.register_script(scripts.TRIM_WORK)
        self._next_attempt = redis.register_script(scripts.NEXT_ATTEMPT)
        self._forget_consumer = redis.register_script(scripts.FORGET_CONSUMER)
        self._prefixes = _json.encode(keys.prefixes())

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self.redis.aclose()

    async def __aenter__(self) -> Store:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # -- producer -------------------------------------------------------------

    async def submit(
        self,
        events: Sequence[AnyEvent],
        work: Sequence[TaskSubmitted],
        group: GroupView,
        idempotency: tuple[str, str] | None = None,
        fsync_timeout_ms: int | None = None,
    ) -> Submitted:
        """Append a group's events and its work entries, and write its first view; or
        nothing.

        ``idempotency`` is (key, record): when the key was used before, nothing is
        appended and the earlier record is returned instead. With
        ``fsync_timeout_ms``, also wait (WAITAOF, on the same connection) until the
        write is fsynced to the server's AOF."""
        gid = group.group_task_id
        idem_key, record = idempotency or ("", "")
        keys = [
            self.keys.events,
            self.keys.work,
            self.keys.ledger(gid),
            self.keys.group_log(gid),
            self.keys.idempotency(idem_key),
            self.keys.group_view(gid),
        ]
        args: list[str | int | bytes] = [
            group.tasks_total,
            record,
            self.retention.results,
            _json.encode(group),
            _json.encode(to_flat(list(events))),
            _json.encode(to_flat(list(work))),
        ]
        if fsync_timeout_ms is None or self.durable == "always":
            # appendfsync always: the server fsyncs before it answers.
            earlier = await self._submit(keys=keys, args=args)
            return Submitted(
                None if earlier is None else str(earlier),
                fsynced=None if fsync_timeout_ms is None else True,
            )
        pipe = self.redis.pipeline(transaction=False)
        await self._submit(keys=keys, args=args, client=pipe)
        pipe.execute_command("WAITAOF", 1, 0, fsync_timeout_ms)
        earlier, waited = await pipe.execute(raise_on_error=False)
        if isinstance(earlier, Exception):
            raise earlier
        # An error from WAITAOF (AOF switched off since the start) confirms nothing.
        fsynced = not isinstance(waited, Exception) and int(waited[0]) >= 1
        return Submitted(None if earlier is None else str(earlier), fsynced=fsynced)

    async def check_durable(self) -> DurableMode:
        """How this server can confirm that a write is on disk, as durable mode needs:
        WAITAOF (Redis 7.2+, Valkey), or ``appendfsync always`` before that. Raises
        NotDurable, naming the setting to change, when it can't; the answer is kept
        in ``self.durable``."""
        try:
            await self.redis.execute_command("WAITAOF", 1, 0, 1)  # type: ignore[no-untyped-call]
            has_waitaof, aof_off = True, False
        except ResponseError as exc:
            if refusal(exc):  # busy, loading, a replica...: not an answer; ask later
                raise
            if isinstance(exc, NoPermissionError):
                raise NotDurable(f"durable mode: this user may not run WAITAOF ({exc})") from None
            has_waitaof, aof_off = False, "appendonly" in str(exc)
        config: dict[str, str] | None
        try:
            config = {str(k): str(v) for k, v in (await self.redis.config_get("append*")).items()}
        except ResponseError as exc:  # CONFIG refused or renamed (managed Redis)
            if refusal(exc):
                raise
            config = None
        self.durable = _durable_mode(has_waitaof, aof_off, config)
        return self.durable

    async def cancel(self, group_task_id: str) -> CancelOutcome:
        """Cancel a group: revoke every task of it that has not ended."""
        event = GroupCancelled(group_task_id=group_task_id)
        keys = [
            self.keys.events,
            self.keys.ledger(group_task_id),
            self.keys.ended(group_task_id),
            self.keys.attempts(group_task_id),
            self.keys.group_log(group_task_id),
        ]
        (fields,) = to_flat([event])
        args: list[str | int | bytes] = [
            group_task_id,
            self.retention.results,
            _json.encode(fields),
            group_task_id[:-8],
            self._prefixes,
            self.keys.cancellations,
        ]
        code = int(await self._cancel(keys=keys, args=args))
        if code == -1:
            return CancelOutcome("unknown")
        if code == -2:
            return CancelOutcome("finished")
        return CancelOutcome("before") if code == 0 else CancelOutcome("cancelled", code - 1)

    # -- consumer group (workers) ---------------------------------------------

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
        reply: Any = await self.redis.xreadgroup(
            WORKER_GROUP, consumer, {self.keys.work: ">"}, count=count, block=block_ms
        )
        return cast(list[Entry], reply[0][1]) if reply else []

    async def autoclaim(
        self, consumer: str, min_idle_ms: int, count: int = 500, max_pages: int = 20
    ) -> list[Entry]:
        """Take over entries idle longer than ``min_idle_ms`` (their worker is dead or
        stuck). Entries deleted from the stream meanwhile are acknowledged."""
        claimed: list[Entry] = []
        cursor = "0-0"
        for _ in range(max_pages):
            cursor, entries, deleted = await self.redis.xautoclaim(
                self.keys.work, WORKER_GROUP, consumer, min_idle_ms, cursor, count=count
            )
            claimed += [(eid, fields) for eid, fields in entries if fields]
            if deleted:
                await self.redis.xack(self.keys.work, WORKER_GROUP, *deleted)
            if cursor == "0-0":
                break
        return claimed

    async def begin(self, items: Sequence[TaskSubmitted], entry_ids: Sequence[str]) -> list[Begun]:
        payload = [
            (entry_id, item.group_task_id, item.index, f"{item.param_a}:{item.param_b}")
            for entry_id, item in zip(entry_ids, items, strict=True)
        ]
        args: list[str | bytes] = [WORKER_GROUP, self._prefixes, _json.encode(payload)]
        decisions = await self._begin(keys=[self.keys.work], args=args)
        return [Begun(_BEGUN_KINDS[int(d[0])], int(d[1]) if len(d) > 1 else 0) for d in decisions]

    async def release_ended(
        self, items: Sequence[TaskSubmitted], entry_ids: Sequence[str]
    ) -> list[str]:
        """Acknowledge the entries whose task has ended (a cancel revoked it, or it
        finished elsewhere) or whose group is gone; returns those entry ids. The others
        stay pending: their run goes on."""
        payload = [
            (entry_id, item.group_task_id, item.index)
            for entry_id, item in zip(entry_ids, items, strict=True)
        ]
        args: list[str | bytes] = [WORKER_GROUP, self._prefixes, _json.encode(payload)]
        return cast(list[str], await self._release_ended(keys=[self.keys.work], args=args))

    async def dead_letter_entry(
        self,
        entry_id: str,
        fields: dict[str, str],
        kind: str = "UnreadableWorkEntry",
        reason: str = "",
    ) -> None:
        """Move a work entry no worker can run (unreadable, or refused by the scripts:
        its task is outside its group, or its group's keys are not what sumbatch wrote)
        to the dead-letter stream, acknowledged: kept for inspection, and no longer
        pending, where it would hold back the work stream's trimming."""
        pipe = self.redis.pipeline(transaction=True)
        rest = {k: v for k, v in fields.items() if k != "type"}
        why = {"reason": reason} if reason else {}
        entry: dict[Any, Any] = {"type": kind, "workEntryId": entry_id, **why, **rest}
        pipe.xadd(self.keys.dead_letters, entry)
        pipe.xack(self.keys.work, WORKER_GROUP, entry_id)
        await pipe.execute()

    async def next_attempt(self, group_task_id: str, index: int) -> int:
        """The next attempt number of a task, counted in Redis (0 if its group is gone)."""
        keys = [self.keys.attempts(group_task_id), self.keys.ledger(group_task_id)]
        return int(await self._next_attempt(keys=keys, args=[index]))

    async def append(self, events: Sequence[AnyEvent]) -> None:
        if events:
            flat = to_flat(list(events))
            payload = [(e.group_task_id, f) for e, f in zip(events, flat, strict=True)]
            await self._append(
                keys=[self.keys.events], args=[self._prefixes, _json.encode(payload)]
            )

    async def complete(self, outcomes: Sequence[Outcome]) -> Completed:
        items = []
        for outcome in outcomes:
            event = outcome.event
            gid = event.group_task_id
            after: list[AnyEvent] = []
            if isinstance(event, TaskCompleted):
                state, cache_it, result = "SUCCESS", not event.from_cache, str(event.result)
            else:
                state, cache_it, result = "FAILURE", False, ""
                after.append(
                    TaskDeadLettered(
                        task_id=event.task_id,
                        group_task_id=gid,
                        index=event.index,
                        param_a=outcome.param_a,
                        param_b=outcome.param_b,
                        error=event.error,
                    )
                )
            flat = to_flat([event, *after])
            items.append(
                (
                    outcome.entry_id,
                    event.index,
                    gid,
                    state,
                    "1" if cache_it else "0",
                    result,
                    f"{outcome.param_a}:{outcome.param_b}",
                    flat[0],
                    flat[1:],
                )
            )
        keys = [self.keys.events, self.keys.work, self.keys.dead_letters]
        args: list[str | int | bytes] = [
            WORKER_GROUP,
            self.retention.results,
            self.retention.cache,
            self._prefixes,
            _json.encode(items),
        ]
        recorded, refused = await self._complete(keys=keys, args=args)
        return Completed(int(recorded), [str(entry_id) for entry_id in refused])

    async def renew(self, consumer: str, entry_ids: Sequence[str], idle_ms: int = 0) -> list[str]:
        """Keep our claim on ``entry_ids`` (or, with ``idle_ms``, hand them back as if
        idle that long); returns those another worker took over."""
        lost: list[str] = []
        for at in range(0, len(entry_ids), 1000):
            chunk = entry_ids[at : at + 1000]
            args = [WORKER_GROUP, consumer, str(idle_ms), *chunk]
            lost += cast(list[str], await self._renew(keys=[self.keys.work], args=args))
        return lost

    async def trim_work(self) -> int:
        return int(await self._trim_work(keys=[self.keys.work], args=[WORKER_GROUP]))

    def expired_before(self, now: float) -> str:
        """The log entry id before which a group that is gone has expired (ended at
        least a result TTL ago), rather than never been."""
        return f"{int(now * 1000) - self.retention.results * 1000}-0"

    async def trim_events(self, position: str, now_ms: int) -> int:
        """Drop log entries older than the log retention that the views already include,
        and dead letters older than the retention."""
        cutoff = f"{now_ms - self.retention.log * 1000}-0"
        minid = min(cutoff, position, key=_id_key)
        # limit=0: no cap on entries per call (the default stops at 10,000).
        pipe = self.redis.pipeline(transaction=False)
        pipe.xtrim(self.keys.events, minid=minid, approximate=True, limit=0)
        pipe.xtrim(self.keys.dead_letters, minid=cutoff, approximate=True, limit=0)
        trimmed, _ = await pipe.execute()
        return int(trimmed)

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

    # -- event log: projector, replay, audit ----------------------------------

    async def read_events(self, after: str, count: int, block_ms: int | None) -> list[Entry]:
        reply: Any = await self.redis.xread({self.keys.events: after}, count=count, block=block_ms)
        return cast(list[Entry], reply[0][1]) if reply else []

    async def event_range(self, start: str = "-", end: str = "+", count: int = 1000) -> list[Entry]:
        return cast(list[Entry], await self.redis.xrange(self.keys.events, start, end, count))

    async def group_history(self, group_task_id: str) -> list[Entry]:
        return cast(list[Entry], await self.redis.xrange(self.keys.group_log(group_task_id)))

    async def position(self) -> str | None:
        return cast(str | None, await self.redis.get(self.keys.projector_position))

    async def load_views(self, group_ids: Iterable[str]) -> Views:
        gids = list(group_ids)
        if not gids:
            return Views()
        return _views(gids, await self.redis.mget([self.keys.group_view(g) for g in gids]))

    async def commit_views(
        self,
        expected: str | None,
        position: str,
        views: Views,
        set_aside: Sequence[SetAside] = (),
    ) -> bool:
        """Write views and the position they include, compare-and-set on ``expected``,
        and copy the entries the fold set aside to the rejected stream, all in one
        step. Processed groups start to expire; the rest live on."""
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
            keys.append(self.keys.group_view(gid))
            args += (ttl if group.processed else "0", _json.encode(group))
        return bool(await self._commit(keys=keys, args=args))

    async def snapshot(self, group_ids: Sequence[str]) -> tuple[str | None, Views, dict[str, bool]]:
        """In one step: the projector's position, these groups' views, and whether
        each group's ledger still exists (it has not expired)."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.get(self.keys.projector_position)
        pipe.mget([self.keys.group_view(g) for g in group_ids])
        for gid in group_ids:
            pipe.exists(self.keys.ledger(gid))
        position, blobs, *exists = await pipe.execute()
        live = {gid: bool(n) for gid, n in zip(group_ids, exists, strict=True)}
        return position, _views(group_ids, blobs), live

    async def forget_position(self) -> None:
        """Make the projector fold the log again from its start (``sumbatch replay``).
        Safe while it runs: its next commit fails the compare-and-set and it reloads.
        The fold is idempotent for events already in a view, and GroupSubmitted starts
        a view afresh, so the views converge to the fold of the log."""
        await self.redis.delete(self.keys.projector_position)

    async def _view_blob(self, group_task_id: str) -> str | None:
        """A group's stored view; an id that cannot be a group's never reaches Redis."""
        if not ids.is_group_id(group_task_id):
            return None
        return cast(str | None, await self.redis.get(self.keys.group_view(group_task_id)))

    async def group_view(self, group_task_id: str) -> GroupView | None:
        blob = await self._view_blob(group_task_id)
        return None if blob is None else _view(group_task_id, blob)

    async def group_summary(self, group_task_id: str) -> GroupSummary | None:
        blob = await self._view_blob(group_task_id)
        return None if blob is None else _group_summary_decoder.decode(blob)

    async def task_view(self, task_id: str) -> TaskView | None:
        where = ids.split_task_id(task_id)
        if where is None:
            return None
        group = await self.group_view(where[0])
        return None if group is None else task_view(group, task_id, where[1])


def _view(group_task_id: str, blob: str | bytes) -> GroupView | None:
    """A stored view; one that is no view of the fold's shape (written by hand) counts
    as absent, so its group's events are set aside rather than stall the projector,
    and a read of it is a 404 rather than a 500."""
    try:
        view = _group_view_decoder.decode(blob)
    except msgspec.DecodeError as exc:
        log.error("the stored view of group %s is no view (%s); ignored", group_task_id, exc)
        return None
    if view.group_task_id != group_task_id or not view.well_formed():
        log.error("the stored view of group %s is not a view's shape; ignored", group_task_id)
        return None
    return view


def _views(group_ids: Sequence[str], blobs: Sequence[str | bytes | None]) -> Views:
    views = Views()
    for gid, blob in zip(group_ids, blobs, strict=True):
        if blob is not None and (view := _view(gid, blob)) is not None:
            views.groups[gid] = view
    return views


def _id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def open_store(settings: Settings, **options: Any) -> Store:
    """A store on its own connection pool, configured by ``settings``."""
    retention = Retention(
        results=settings.result_ttl, cache=settings.cache_ttl, log=settings.log_retention
    )
    return Store(connect(settings.client_url, **options), Keys(settings.namespace), retention)
