"""Every Redis key name sumbatch uses, built in one place (``Keys``); nothing else
writes a key literal.

All keys of one partition of a namespace share the hash tag ``{<namespace>}`` (or a
tag per partition): every atomic step (submission, completion, projection commit)
touches several of them at once, and a shared tag keeps them in one cluster slot.
"""

from __future__ import annotations

from typing import Final

from redis.crc import key_slot

WORKER_GROUP: Final = "workers"
# The fairness key of a group submitted without one: every such group shares one turn
# among the keys (``scripts/dispatch.py``).
DEFAULT_FAIRNESS_KEY: Final = "-"


class Keys:
    """Every key name of one partition of a namespace, built in one place; nothing else
    writes a key literal. A partition's keys share one hash tag (one cluster slot),
    so every atomic step stays within it; the cache's keys have no tag and spread."""

    def __init__(
        self, namespace: str = "sumbatch", partition: int = 0, partitions: int = 1
    ) -> None:
        self.namespace = namespace
        self.partition = partition
        self.partitions = partitions
        self.tag = partition_tag(namespace, partition, partitions)

    @staticmethod
    def partitions_key(namespace: str) -> str:
        """How many partitions the namespace has, written by the first process to start:
        every id's partition depends on it, so it cannot change under live data."""
        return "{" + namespace + "}:partitions"

    @property
    def events(self) -> str:
        """The event log: every event of every group, in order. Tail and replay this."""
        return f"{self.tag}:events"

    @property
    def work(self) -> str:
        """Work entries, read by the ``workers`` consumer group."""
        return f"{self.tag}:work"

    @property
    def fair_keys(self) -> str:
        """The fairness keys with queued slices, in turn order (a list): the head's
        next group hands out a slice, then goes to the back (``scripts/dispatch.py``)."""
        return f"{self.tag}:fair:keys"

    @property
    def fair_groups_prefix(self) -> str:
        """What ``fair_groups`` puts before a fairness key: the scripts name the rings
        themselves."""
        return f"{self.tag}:fair:groups:"

    def fair_groups(self, fairness_key: str) -> str:
        """One fairness key's groups with queued slices, in turn order (a list)."""
        return self.fair_groups_prefix + fairness_key

    @property
    def queue_prefix(self) -> str:
        """What ``queue`` puts before a group id: the scripts name queues themselves."""
        return f"{self.tag}:queue:"

    def queue(self, group_task_id: str) -> str:
        """A group's slices not yet handed out (a list of work entries' fields, as
        JSON arrays): moved one at a time, in turn with other groups, to ``work``."""
        return self.queue_prefix + group_task_id

    @property
    def projector_position(self) -> str:
        """Id of the last event the views include; written with the views."""
        return f"{self.tag}:projector:position"

    @property
    def dead_letters(self) -> str:
        """TaskFailed events of tasks that ran out of attempts (each naming its log
        entry in ``eventId``), and work entries no worker can run
        (``UnreadableWorkEntry``, ``RefusedWorkEntry``): for inspection or rerun."""
        return f"{self.tag}:dead"

    @property
    def cancellations(self) -> str:
        """Pub/sub channel: the cancel script publishes a group's id once it has
        revoked its tasks, so workers stop those runs at once (best effort: a run
        nobody stops meets the fence at its end and writes nothing)."""
        return f"{self.tag}:cancelled"

    @property
    def rejected(self) -> str:
        """Log entries the projector could not apply, each with its entry id and the
        reason, for an operator to inspect."""
        return f"{self.tag}:rejected"

    @property
    def stats(self) -> str:
        """The partition's counters and histograms (a hash, ``scripts/stats.py``),
        written by the scripts that append what they count, in the same step; /metrics
        and /system add up the partitions'."""
        return f"{self.tag}:stats"

    def cache(self, param_a: int, param_b: int) -> str:
        """A computed sum, with its own TTL; shared by every partition. With several
        partitions each sum is a hash tag of its own, spread over a cluster's slots;
        with one, the partition's tag, as before partitions existed."""
        if self.partitions == 1:
            return f"{self.tag}:cache:{param_a}:{param_b}"
        return "{" + f"{self.namespace}:cache:{param_a}:{param_b}" + "}"

    @property
    def pattern(self) -> str:
        """A glob that matches every key of the namespace, in every partition, and no
        other namespace's: for an ACL user's key pattern, or SCAN."""
        if self.partitions == 1:
            return f"{self.tag}:*"
        return "{" + self.namespace + "[:}]*"

    def idempotency(self, key: str) -> str:
        """The answer given to a POST with this Idempotency-Key (hashed by the API)."""
        return f"{self.tag}:idem:{key}"

    def call(self, token: str) -> str:
        """The reply of one call of a state-changing script, kept for a short while
        (``scripts.lib.CALL_TTL``) so that a resend of that call changes nothing more
        and gets the same reply. ``token``: the store's, one per call."""
        return f"{self.tag}:call:{token}"

    def of_group(self, group_task_id: str) -> list[str]:
        """A group's write-side keys, in the order the scripts declare them."""
        return [
            self.ledger(group_task_id),
            self.ended(group_task_id),
            self.attempts(group_task_id),
            self.group_log(group_task_id),
        ]

    def group_log(self, group_task_id: str) -> str:
        """One group's history (same entry ids as in the event log), for audit; its
        entries leave out GROUP_LOG_OMITS, which ``from_group_log`` puts back."""
        return f"{self.tag}:log:{group_task_id}"

    def ledger(self, group_task_id: str) -> str:
        """Write-side counters of a group: ``total``, ``finished``, ``failed``,
        ``revoked`` and ``cancelled``."""
        return f"{self.tag}:ledger:{group_task_id}"

    def ended(self, group_task_id: str) -> str:
        """The completion fence: one bit per task index, set when the task ends."""
        return f"{self.tag}:ended:{group_task_id}"

    def attempts(self, group_task_id: str) -> str:
        """One byte per task index: how many times a worker started it (BITFIELD u8)."""
        return f"{self.tag}:attempts:{group_task_id}"

    def group_view(self, group_task_id: str) -> str:
        """The projected status of a group and its tasks: a hash, its counts in one
        field and its tasks in chunks (``chunks.py``)."""
        return f"{self.tag}:view:{group_task_id}"


def partition_tag(namespace: str, partition: int, partitions: int) -> str:
    """The hash tag of one partition's keys. With one partition, ``{namespace}``, as
    before partitions existed. With more, each tag is picked to hash into the middle
    of its own equal share of the 16,384 cluster slots, so that a cluster whose masters
    hold equal slot ranges (as ``--cluster create`` makes them) gets an equal share of
    partitions on each master."""
    if "{" in namespace or "}" in namespace:
        # A brace makes a tag of its own: every name tried would hash alike for ever.
        raise ValueError(f"namespace {namespace!r}: no braces, it is the keys' hash tag")
    if partitions == 1:
        return "{" + namespace + "}"
    share = SLOTS / partitions
    low, high = (partition + 0.25) * share, (partition + 0.75) * share
    for attempt in range(TAG_ATTEMPTS):
        name = f"{namespace}:{partition}" + (f"~{attempt}" if attempt else "")
        if low <= key_slot(name.encode()) < high:
            return "{" + name + "}"
    raise ValueError(f"namespace {namespace!r}: no tag found for partition {partition}")


SLOTS = 16384
# Names partition_tag tries at most. Each lands in the wanted half-share with a chance
# of at least 1 in 512 (256 partitions); a million tries all miss with a chance of
# about e**-1950: the bound only turns a namespace that can never match into an error.
TAG_ATTEMPTS = 1_000_000
