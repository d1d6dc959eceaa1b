"""The two events the Lua scripts build themselves (GroupFinished, TaskRevoked) are
field for field what ``events.py`` writes for them: their field lists are generated
from the event definitions, so the two cannot drift."""

from __future__ import annotations

import asyncio
from typing import cast

import pytest
import redis

from sumbatch.config import Settings
from sumbatch.model import ids
from sumbatch.model.events import (
    GROUP_LOG_OMITS,
    GroupFinished,
    GroupSubmitted,
    TaskRevoked,
    TasksSubmitted,
    from_fields,
    tasks_of,
    to_fields,
)
from sumbatch.model.keys import Keys
from sumbatch.model.submission import Submission
from sumbatch.model.views import GroupView
from sumbatch.model.wire import TaskIn
from sumbatch.scripts.lib import lua_fields
from sumbatch.store import open_store, task_key
from tests.support import entries, submit, work, work_entries


def test_a_field_list_must_name_every_field_of_its_event() -> None:
    with pytest.raises(TypeError, match="TaskRevoked"):
        lua_fields(TaskRevoked, task_id="a", group_task_id="b")
    with pytest.raises(TypeError, match="TaskRevoked"):
        lua_fields(TaskRevoked, task_id="a", group_task_id="b", index="c", extra="d")


def test_the_work_entries_submit_builds_are_what_events_py_writes(
    settings: Settings, raw: redis.Redis
) -> None:
    """SUBMIT builds the work entries from columns: each must be, field for field and in
    order, the TasksSubmitted slice that events.to_flat writes; params at the ends of
    the 64-bit range pass exactly, and a group past 256 tasks gets every index's id."""
    pairs = [(-(2**63), 2**63 - 1), (0, -1), *[(n, n + 1) for n in range(300)]]
    submission = Submission.of([TaskIn(param_a=a, param_b=b) for a, b in pairs])

    async def scenario() -> None:
        async with open_store(settings) as store:
            group = GroupView.submitted(submission.created.group_task_id, len(pairs))
            await store.submit(submission.event, group)

    asyncio.run(scenario())
    written = work_entries(raw, Keys(settings.namespace))
    assert [list(f.items()) for f in written] == [
        list(to_fields(w).items()) for w in submission.work
    ]
    tasks = [task for f in written for task in tasks_of(cast(TasksSubmitted, from_fields(f)))]
    assert [t.task_id for t in tasks] == submission.created.task_ids
    assert [(t.param_a, t.param_b) for t in tasks] == pairs


def test_submit_refuses_columns_that_do_not_hold_every_task_and_writes_nothing(
    settings: Settings, raw: redis.Redis
) -> None:
    gid = ids.new_group_id()
    short = GroupSubmitted(group_task_id=gid, tasks_total=3, params_a="1 2 3", params_b="4 5")

    async def scenario() -> None:
        async with open_store(settings) as store:
            with pytest.raises(redis.ResponseError, match="tasksTotal values"):
                await store.submit(short, GroupView.submitted(gid, 3))

    asyncio.run(scenario())
    keys = Keys(settings.namespace)
    assert raw.exists(keys.events, keys.work, keys.ledger(gid), keys.group_view(gid)) == 0


def test_the_events_the_scripts_build_are_what_events_py_writes(
    settings: Settings, raw: redis.Redis
) -> None:
    async def submit_and_cancel() -> tuple[str, list[str]]:
        async with open_store(settings) as store:
            first = await submit(store, [(1, 2)])
            gid, task_ids = await submit(store, [(3, 4), (5, 6), (7, 8)])
            await store.cancel(gid)
            return first[0], [gid, *task_ids]

    done_gid, (gid, *task_ids) = asyncio.run(submit_and_cancel())
    work(settings)  # finishes the first group; the cancelled one has nothing to run
    built = {
        (fields["type"], fields["groupTaskId"], fields.get("index")): fields
        for _, fields in entries(raw, Keys(settings.namespace).events)
        if fields["type"] in ("GroupFinished", "TaskRevoked")
    }
    expected = [TaskRevoked(task_id=task_ids[i], group_task_id=gid, index=i) for i in range(3)] + [
        GroupFinished(
            group_task_id=gid, tasks_total=3, tasks_failed=0, tasks_revoked=3, succeeded=False
        ),
        GroupFinished(
            group_task_id=done_gid, tasks_total=1, tasks_failed=0, tasks_revoked=0, succeeded=True
        ),
    ]
    for event in expected:
        index = str(event.index) if isinstance(event, TaskRevoked) else None
        fields = built.pop((type(event).__name__, event.group_task_id, index))
        # The same names, values and order as XADD gets from events.to_flat.
        assert list(fields.items()) == list(to_fields(event).items())
        assert from_fields(fields) == event
    assert built == {}
    assert task_ids == [ids.task_id(gid, i) for i in range(3)]


def test_a_groups_log_holds_its_events_less_the_ids_its_key_and_index_give(
    settings: Settings, raw: redis.Redis
) -> None:
    """Every script's copy in a group's own log (submitted, started, completed,
    cancelled, revoked, finished): the event log's entry, same id, less the omitted
    fields; read back through the store, the very entry of the event log."""

    async def submit_and_cancel() -> tuple[str, str]:
        async with open_store(settings) as store:
            done, _ = await submit(store, [(1, 2), (3, 4)])
            cancelled, _ = await submit(store, [(5, 6), (7, 8)])
            await store.cancel(cancelled)
            return done, cancelled

    groups = asyncio.run(submit_and_cancel())
    work(settings)
    keys = Keys(settings.namespace)
    logged = entries(raw, keys.events)

    async def histories() -> dict[str, list[tuple[str, dict[str, str]]]]:
        async with open_store(settings) as store:
            return {gid: await store.group_history(gid) for gid in groups}

    read_back = asyncio.run(histories())
    for gid in groups:
        own = [(eid, f) for eid, f in logged if f.get("groupTaskId") == gid]
        kinds = {f["type"] for _, f in own}
        assert {"GroupSubmitted", "GroupFinished"} <= kinds and len(kinds) >= 3
        assert entries(raw, keys.group_log(gid)) == [
            (eid, {k: v for k, v in f.items() if k not in GROUP_LOG_OMITS}) for eid, f in own
        ]
        assert [(eid, list(f.items())) for eid, f in read_back[gid]] == [
            (eid, list(f.items())) for eid, f in own
        ]


def test_begin_reads_the_cache_of_every_entry_of_a_batch_past_a_thousand(
    settings: Settings, raw: redis.Redis
) -> None:
    """With one partition the begin script reads the cache itself, a thousand keys per
    MGET: a sweep's claim can hand it thousands of entries at once, and each one's sum
    must be found, the last ones too."""
    pairs = [(n, 1) for n in range(2500)]
    submission = Submission.of([TaskIn(param_a=a, param_b=b) for a, b in pairs])
    keys = Keys(settings.namespace)
    for a, b in pairs[::2]:  # every other sum is cached
        raw.set(keys.cache(a, b), a + b)

    async def scenario() -> list[tuple[str, int]]:
        async with open_store(settings) as store:
            group = GroupView.submitted(submission.created.group_task_id, len(pairs))
            await store.submit(submission.event, group)
            await store.ensure_worker_group()
            read = await store.read_work("c", len(pairs), 0)
            tasks = [
                (task_key(entry_id, task.index), task)
                for entry_id, fields in read
                for task in tasks_of(cast(TasksSubmitted, from_fields(fields)))
            ]
            begun = await store.begin([task for _, task in tasks], [key for key, _ in tasks])
            return [(b.kind, b.value) for b in begun]

    decisions = asyncio.run(scenario())
    assert decisions == [("cached", n + 1) if n % 2 == 0 else ("run", 1) for n in range(len(pairs))]
