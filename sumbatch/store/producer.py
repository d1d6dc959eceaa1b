"""The producer's steps: submitting a group (durable mode included) and cancelling
one."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import (
    AskError,
    ClusterDownError,
    NoPermissionError,
    ResponseError,
    TryAgainError,
)

from sumbatch import scripts
from sumbatch.model import chunks, ids
from sumbatch.model.events import GroupCancelled, GroupSubmitted, to_flat
from sumbatch.model.keys import DEFAULT_FAIRNESS_KEY
from sumbatch.model.views import GroupView
from sumbatch.outage import BUSY, REDIS_DOWN, refusal
from sumbatch.store.base import DurableMode, StoreBase, _json


@dataclass(frozen=True)
class Submitted:
    earlier: str | None  # the first answer to this Idempotency-Key, if it was used before
    fsynced: bool | None  # None: not asked


class OutcomeUnknown(Exception):
    """A submit that was sent and whose reply never came (a timeout, a lost
    connection): its script may have run, or may still run. The cause is chained."""


async def _send(connection: AbstractConnection, commands: list[tuple[Any, ...]]) -> list[Any]:
    """Send ``commands`` on a connected ``connection`` and read every reply (an error
    reply as its exception, in its place). Past the send, a failure is OutcomeUnknown,
    and the connection is dropped: a reply left unread would answer its next call."""
    try:
        await connection.send_packed_command(connection.pack_commands(commands))
        replies: list[Any] = []
        for _ in commands:
            try:
                replies.append(await connection.read_response())
            except ResponseError as exc:
                replies.append(exc)
    except BaseException as exc:
        await connection.disconnect()
        if isinstance(exc, (*REDIS_DOWN, OSError)):
            raise OutcomeUnknown(f"no reply to the submit ({type(exc).__name__}: {exc})") from exc
        raise
    return replies + [None] * (2 - len(replies))


@dataclass(frozen=True)
class CancelOutcome:
    """What a DELETE did: ``unknown`` group, ``finished`` without a cancel (nothing to
    do), cancelled ``before``, or ``cancelled`` now, revoking ``revoked`` tasks."""

    status: Literal["unknown", "finished", "before", "cancelled"]
    revoked: int = 0


class NotDurable(Exception):
    """The server cannot confirm writes on disk as durable mode needs; the message
    names the setting to change."""


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


class Producer(StoreBase):
    async def submit(
        self,
        event: GroupSubmitted,
        group: GroupView,
        idempotency: tuple[str, str] | None = None,
        fsync_timeout_ms: int | None = None,
        fairness_key: str = DEFAULT_FAIRNESS_KEY,
    ) -> Submitted:
        """Append a group's GroupSubmitted, queue its work entries (TasksSubmitted, a
        slice of its tasks each) to be handed out in turn with other groups (under
        ``fairness_key``: ``scripts/dispatch.py``), and write its first view; or
        nothing. The script builds the work entries from the event's columns: no entry
        is built or sent one by one.

        ``idempotency`` is (key, record): when the key was used before, nothing is
        appended and the earlier record is returned instead. With
        ``fsync_timeout_ms``, also wait (WAITAOF, on the same connection; WAIT 1 on a
        cluster) until the write is fsynced to the server's AOF (held by a replica).

        One call, never resent here. The script is keyed by the group's id: the same
        call again (same ids) finds its own first run and writes nothing more, so a
        caller may resend it. Raises OutcomeUnknown when the call was sent and its
        reply never came (a timeout, a lost connection); any other error (a refusal,
        a connection that could not be made, every connection busy) means the script
        did not run."""
        gid = event.group_task_id
        if (group.group_task_id, group.tasks_total) != (gid, event.tasks_total):
            raise ValueError("the view must be the submitted group's")
        idem_key, record = idempotency or ("", "")
        keys = [
            self.keys.events,
            self.keys.work,
            self.keys.ledger(gid),
            self.keys.group_log(gid),
            self.keys.idempotency(idem_key),
            self.keys.group_view(gid),
            self.keys.stats,
            self.keys.fair_keys,
            self.keys.fair_groups(fairness_key),
            self.keys.queue(gid),
        ]
        args: list[str | int | bytes] = [
            group.tasks_total,
            record,
            self.retention.results,
            _json.encode(to_flat([event])),
            gid,
            event.params_a,
            event.params_b,
            fairness_key,
            self.keys.fair_groups_prefix,
            self.keys.queue_prefix,
            *chunks.flat_fields(group),
        ]
        commands: list[tuple[Any, ...]] = [("EVAL", scripts.SUBMIT, len(keys), *keys, *args)]
        cluster = isinstance(self.redis, RedisCluster)
        # appendfsync always: the server fsyncs before it answers.
        waits = fsync_timeout_ms is not None and self.durable != "always"
        if waits:
            commands.append(("WAIT", 1, fsync_timeout_ms) if cluster
                            else ("WAITAOF", 1, 0, fsync_timeout_ms))  # fmt: skip
        waited: Any
        if isinstance(self.redis, RedisCluster) and not waits:
            # The cluster client follows MOVED and ASK, and resends on a lost
            # connection itself: which calls it sent cannot be told apart.
            try:
                earlier, waited = await self._submit(keys=keys, args=args), None
            except REDIS_DOWN as exc:
                if isinstance(exc, BUSY):
                    raise  # no connection to send it on
                raise OutcomeUnknown(f"no reply to the submit ({exc})") from exc
        elif isinstance(self.redis, RedisCluster):
            earlier, waited = await self._on_master(self.redis, keys[0], commands)
        else:
            pool = self.redis.connection_pool
            # Connected, or raises: nothing is sent yet.
            connection = await pool.get_connection()  # type: ignore[no-untyped-call]
            try:
                earlier, waited = await _send(connection, commands)
            finally:
                await pool.release(connection)
        if isinstance(earlier, Exception):
            raise earlier  # the server's answer to the script: it did not run
        # An error from WAITAOF (AOF switched off since the start) confirms nothing.
        fsynced: bool | None = None if fsync_timeout_ms is None else True
        if waits:
            replicas = waited if cluster or isinstance(waited, Exception) else waited[0]
            fsynced = not isinstance(replicas, Exception) and int(replicas) >= 1
        return Submitted(None if earlier is None else str(earlier), fsynced=fsynced)

    async def _on_master(
        self, cluster: RedisCluster, key: str, commands: list[tuple[Any, ...]]
    ) -> tuple[Any, Any]:
        """The durable submit on a cluster, on a connection to the partition's master (WAIT
        counts that connection's writes, so a durable POST is answered once a replica
        has the group and survives its master)."""
        node = cluster.get_node_from_key(key)
        if node is None:
            raise ClusterDownError("no master serves this partition's slot")
        connection = node.acquire_connection()
        try:
            await connection.connect()  # type: ignore[no-untyped-call]  # nothing sent yet
            earlier, waited = await _send(connection, commands)
        except BaseException:
            await connection.disconnect()
            raise
        finally:
            node.release(connection)
        if isinstance(earlier, AskError):  # MOVED too: the slot went elsewhere
            await cluster.nodes_manager.initialize()
            raise TryAgainError(f"the partition moved ({earlier}); retry") from earlier
        return earlier, waited

    async def _check_replicated(self, cluster: RedisCluster) -> DurableMode:
        """Durable mode on a cluster needs a replica on every master (WAIT 1)."""
        replication = await cluster.info("replication", target_nodes=RedisCluster.PRIMARIES)
        alone = sorted(
            str(node) for node, info in replication.items() if not info.get("connected_slaves")
        )
        if alone:
            raise NotDurable(
                "durable mode on a cluster answers a POST once a replica has it (WAIT 1): "
                f"every master needs a replica, and {', '.join(alone)} has none"
            )
        self.durable = "replica"
        return self.durable

    async def check_durable(self) -> DurableMode:
        """How this server can confirm that a write is on disk, as durable mode needs:
        WAITAOF (Redis 7.2+, Valkey), or ``appendfsync always`` before that. Raises
        NotDurable, naming the setting to change, when it can't; the answer is kept
        in ``self.durable``."""
        if isinstance(self.redis, RedisCluster):
            return await self._check_replicated(self.redis)
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
            self.keys.stats,
        ]
        (fields,) = to_flat([event])
        args: list[str | int | bytes] = [
            group_task_id,
            self.retention.results,
            _json.encode(fields),
            ids.group_prefix(group_task_id),
            self.keys.cancellations,
        ]
        # Once per call: a resend of a cancel that ran answers as the first did.
        after = [self.keys.queue(group_task_id), self.keys.fair_keys]
        args.append(self.keys.fair_groups_prefix)
        reply: Any = await self._once(self._cancel, keys, after, args)
        code = int(reply)
        if code == -1:
            return CancelOutcome("unknown")
        if code == -2:
            return CancelOutcome("finished")
        return CancelOutcome("before") if code == 0 else CancelOutcome("cancelled", code - 1)
