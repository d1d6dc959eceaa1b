from __future__ import annotations

import pytest
from redis.crc import key_slot

from sumbatch.model import ids
from sumbatch.model.events import (
    GROUP_LOG_OMITS,
    AnyEvent,
    GroupCancelled,
    GroupFinished,
    GroupSubmitted,
    TaskCompleted,
    TaskDeadLettered,
    TaskFailed,
    TaskRetried,
    TaskRevoked,
    TaskStarted,
    TaskSubmitted,
    from_fields,
    from_group_log,
    to_fields,
    to_flat,
)
from sumbatch.model.keys import Keys

SAMPLES: list[AnyEvent] = [
    GroupSubmitted(group_task_id="g", tasks_total=2, params_a="1 -2", params_b="3 4"),
    TaskSubmitted(task_id="t", group_task_id="g", index=1, param_a=-(2**63), param_b=2**63 - 1),
    TaskStarted(task_id="t", group_task_id="g", index=1, attempt=2, worker="w"),
    TaskRetried(task_id="t", group_task_id="g", index=1, attempt=1, error="E: x", retry_in=0.25),
    TaskCompleted(
        task_id="t", group_task_id="g", index=1, result=-1, from_cache=True, attempt=0, worker="w"
    ),
    TaskFailed(task_id="t", group_task_id="g", index=0, attempts=3, error="boom", worker="w"),
    GroupFinished(
        group_task_id="g", tasks_total=2, tasks_failed=1, tasks_revoked=0, succeeded=False
    ),
    GroupCancelled(group_task_id="g"),
    TaskRevoked(task_id="t", group_task_id="g", index=1),
    TaskDeadLettered(task_id="t", group_task_id="g", index=0, param_a=1, param_b=2, error="x"),
]


@pytest.mark.parametrize("event", SAMPLES, ids=lambda e: type(e).__name__)
def test_round_trip_through_stream_fields(event: AnyEvent) -> None:
    fields = to_fields(event)
    assert all(isinstance(v, str) for v in fields.values())
    assert from_fields(fields) == event


@pytest.mark.parametrize("event", SAMPLES, ids=lambda e: type(e).__name__)
def test_type_comes_first_and_names_the_event(event: AnyEvent) -> None:
    assert next(iter(to_fields(event).items())) == ("type", type(event).__name__)


@pytest.mark.parametrize("event", SAMPLES, ids=lambda e: type(e).__name__)
def test_flat_fields_are_the_fields_in_order(event: AnyEvent) -> None:
    (flat,) = to_flat([event])
    assert flat == [text for pair in to_fields(event).items() for text in pair]


def test_fields_read_as_plain_text() -> None:
    fields = to_fields(SAMPLES[4])
    assert fields == {
        "type": "TaskCompleted",
        "taskId": "t",
        "groupTaskId": "g",
        "index": "1",
        "result": "-1",
        "fromCache": "true",
        "attempt": "0",
        "worker": "w",
    }


def test_unknown_type_is_rejected() -> None:
    with pytest.raises(Exception, match="Invalid value 'Nope'"):
        from_fields({"type": "Nope", "groupTaskId": "g"})


def test_a_partitions_keys_share_one_hash_tag_and_the_cache_has_none() -> None:
    keys = Keys("ns")
    names = [
        keys.events,
        keys.work,
        keys.dead_letters,
        keys.idempotency("k"),
        keys.projector_position,
        keys.group_log("g"),
        keys.ledger("g"),
        keys.group_view("g"),
        keys.ended("g"),
        keys.attempts("g"),
    ]
    assert all(name.startswith("{ns}:") for name in names)
    assert len(set(names)) == len(names)
    assert keys.cache(1, 2) == "{ns}:cache:1:2"
    # With several partitions: shared by them, and spread over a cluster's slots.
    assert Keys("ns", 1, 3).cache(1, 2) == "{ns:cache:1:2}"


def test_partitions_spread_evenly_over_the_cluster_slots() -> None:
    for count in (2, 3, 9, 64):
        slots = []
        for partition in range(count):
            keys = Keys("ns", partition, count)
            names = [keys.events, keys.work, *keys.of_group("g"), keys.group_view("g")]
            # One slot per partition: its scripts touch only keys of that slot.
            assert len({key_slot(name.encode()) for name in names}) == 1
            slots.append(key_slot(keys.events.encode()))
        # Partition p hashes into the p-th of `count` equal shares of the slots, so
        # masters with equal slot ranges get equal shares of partitions.
        share = 16384 / count
        assert [int(slot // share) for slot in slots] == list(range(count))
    # One partition: the names of before partitions existed.
    assert Keys("ns", 0, 1).events == "{ns}:events"


def test_a_group_log_entry_gets_back_the_ids_it_leaves_out_in_the_event_logs_order() -> None:
    gid = ids.new_group_id()
    events: list[AnyEvent] = [
        GroupSubmitted(group_task_id=gid, tasks_total=2, params_a="1 2", params_b="3 4"),
        TaskCompleted(
            task_id=ids.task_id(gid, 1),
            group_task_id=gid,
            index=1,
            result=6,
            from_cache=False,
            attempt=1,
            worker="w",
        ),  # fmt: skip
        GroupFinished(
            group_task_id=gid, tasks_total=2, tasks_failed=0, tasks_revoked=0, succeeded=True
        ),
    ]
    for event in events:
        full = to_fields(event)
        short = {k: v for k, v in full.items() if k not in GROUP_LOG_OMITS}
        assert list(from_group_log(gid, short).items()) == list(full.items())
        assert from_group_log(gid, full) == full  # an entry that has them keeps them


def test_a_group_log_entry_written_by_hand_keeps_what_it_says() -> None:
    gid = ids.new_group_id()
    other = ids.new_group_id()
    hand = {"type": "TaskCompleted", "groupTaskId": other, "index": "x"}
    assert from_group_log(gid, hand) == hand
    assert from_group_log(gid, {"type": "Nonsense"}) == {"type": "Nonsense", "groupTaskId": gid}
    for index in ("-1", "x", "²", "٣", "99999999999"):  # int() takes the last three
        assert "taskId" not in from_group_log(gid, {"type": "TaskCompleted", "index": index})
