from __future__ import annotations

import uuid

import pytest

from sumbatch.model import ids


def test_group_ids_are_v4_uuids_ending_in_zeros() -> None:
    gid = ids.new_group_id()
    parsed = uuid.UUID(gid)
    assert (parsed.version, parsed.variant) == (4, uuid.RFC_4122)
    assert ids.is_group_id(gid)
    assert len({ids.new_group_id() for _ in range(1000)}) == 1000


def test_task_ids_name_their_group_and_index() -> None:
    gid = ids.new_group_id()
    tids = ids.task_ids(gid, 3)
    assert len(set(tids)) == 3
    for index, tid in enumerate(tids):
        assert str(uuid.UUID(tid)) == tid
        assert ids.split_task_id(tid) == (gid, index)
        assert not ids.is_group_id(tid)
    assert ids.split_task_id(gid) is None


@pytest.mark.parametrize(
    "text", ["x", "", "{sumbatch}:events", "12345678-1234-1234-1234-1234567890123"]
)
def test_anything_but_a_uuid_is_refused(text: str) -> None:
    assert ids.parse_uuid(text) is None


def test_uuids_are_canonicalised() -> None:
    upper = "858C8724-03C4-4027-B1E9-418500000000"
    assert ids.parse_uuid(upper) == upper.lower()
    assert ids.parse_uuid("{" + upper + "}") == upper.lower()
