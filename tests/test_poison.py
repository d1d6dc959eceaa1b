"""Hostile input that comes through Redis: log entries written by hand, a dead-letter
stream with ids from the future, group keys of the wrong type. None of them may stall
the pipeline or leave a group unfinished, and each is set aside where an operator
can see it."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import cast

import msgspec
import pytest
import redis
from starlette.testclient import TestClient

from consumers.projector import Projector
from consumers.worker import Worker
from sumbatch.config import Settings
from sumbatch.model import ids
from sumbatch.model.events import GroupFinished, TaskCompleted
from sumbatch.model.keys import Keys
from sumbatch.replay import differences
from sumbatch.store import Store, open_store
from tests.support import (
    entries,
    events,
    group_finished,
    group_processed,
    log_events,
    post_group,
    processes,
    project,
    run_with_store,
    wait_until,
    wait_until_sync,
    work,
    work_pending,
    work_pending_sync,
)


def xadd(raw: redis.Redis, key: str, fields: Mapping[str, str]) -> str:
    """Append ``fields`` to the stream ``key`` by hand; the new entry's id. (Copied
    into a dict of redis-py's own field types, which a dict[str, str] is not; ``raw``
    decodes replies, so the id is text.)"""
    return cast(str, raw.xadd(key, dict(fields.items())))


def work_entry(gid: str, task: int, index: str, param_a: int, param_b: int) -> dict[str, str]:
    """A TaskSubmitted work entry as a hand would write it: the id of task ``task``, at
    ``index`` (which need not be the same)."""
    return {"type": "TaskSubmitted", "taskId": ids.task_id(gid, task), "groupTaskId": gid,
            "index": index, "paramA": str(param_a), "paramB": str(param_b)}  # fmt: skip


def completed(gid: str, position: int, **overrides: str) -> dict[str, str]:
    """A TaskCompleted entry as a hand would write it with XADD."""
    fields = {
        "type": "TaskCompleted",
        "taskId": ids.task_id(gid, position) if 0 <= position < 2**32 - 1 else gid,
        "groupTaskId": gid,
        "index": str(position),
        "result": "1",
        "fromCache": "false",
        "attempt": "1",
        "worker": "a-hand",
    }
    fields.update(overrides)
    return fields


def poison(gid: str) -> dict[str, dict[str, str]]:
    """One malformed entry of each kind, against the live group ``gid``."""
    stranger = ids.new_group_id()
    missing = completed(gid, 0)
    del missing["result"]
    return {
        "index past the end": completed(gid, 99999),
        "negative index": completed(gid, -1),
        "unknown group": completed(stranger, 0),
        "unknown type": {"type": "TaskExploded", "groupTaskId": gid},
        "no type": {"groupTaskId": gid, "index": "0"},
        "index not a number": completed(gid, 0, index="first"),
        "result not a number": completed(gid, 0, result="lots"),
        "fromCache not a bool": completed(gid, 0, fromCache="maybe"),
        "missing field": missing,
        "task id of another task": completed(gid, 0, taskId=ids.task_id(gid, 1)),
        "submission of no tasks": {
            "type": "GroupSubmitted", "groupTaskId": stranger, "tasksTotal": "0",
            "paramsA": "", "paramsB": "",
        },
        "submission with fewer params than tasks": {
            "type": "GroupSubmitted", "groupTaskId": stranger, "tasksTotal": "1000000000",
            "paramsA": "1", "paramsB": "2",
        },
        "a copy of the live group's submission": {
            "type": "GroupSubmitted", "groupTaskId": gid, "tasksTotal": "2",
            "paramsA": "1 3", "paramsB": "2 4",
        },
        "submission whose params are no integers": {
            "type": "GroupSubmitted", "groupTaskId": ids.new_group_id(), "tasksTotal": "2",
            "paramsA": "1 x", "paramsB": "2 3",
        },
        "submission never made": {
            "type": "GroupSubmitted", "groupTaskId": ids.new_group_id(), "tasksTotal": "1",
            "paramsA": "1", "paramsB": "2",
        },
        "submission of a non-group id": {
            "type": "GroupSubmitted", "groupTaskId": "{x}:events", "tasksTotal": "1",
            "paramsA": "1", "paramsB": "2",
        },
    }  # fmt: skip


def test_a_copied_submission_of_a_finished_group_leaves_its_view_and_a_rebuild_alone(
    client: TestClient, settings: Settings, raw: redis.Redis
) -> None:
    """A GroupSubmitted copied by hand after its group finished: folded, it would start
    the view afresh (2 of 4 done on a finished group, its real GroupFinished then set
    aside). It is set aside, by the projector and by a rebuild from the log."""
    keys = Keys(settings.namespace)
    created = post_group(client, [(1, 2), (3, 4), (5, 6), (7, 8)])
    gid = created["groupTaskId"]
    work(settings)
    project(settings)
    first = entries(raw, keys.group_log(gid))[0]
    assert first[1]["type"] == "GroupSubmitted"
    copy = xadd(raw, keys.events, {"groupTaskId": gid, **first[1]})

    async def scenario() -> None:
        async with open_store(settings) as store:
            await Projector(store).run_until_idle()
            await store.forget_position()  # sumbatch replay: fold it all again
            await Projector(store).run_until_idle()
            check = await differences(store)
            assert check.differences == []
            assert [s.entry_id for s in check.set_aside] == [copy]

    asyncio.run(scenario())
    group = client.get(f"/grouptasks/{gid}").json()
    assert (group["grouptaskProcessed"], group["tasksCompleted"]) == (True, 4), group
    assert group["results"] == [3, 7, 11, 15]
    reasons = [f["reason"] for _, f in entries(raw, keys.rejected) if f["entryId"] == copy]
    assert reasons and all("a copy" in reason for reason in reasons)


def test_malformed_log_entries_are_set_aside_and_later_groups_still_finish(
    client: TestClient, settings: Settings, raw: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """Each kind of bad entry, written into a live log between two groups' events:
    the projector sets each aside (logged with its id and reason, copied to the
    rejected stream), moves past it, and later groups are processed. The bad entries
    change no view: the group they name ends exactly as its real events say."""
    keys = Keys(settings.namespace)
    first = post_group(client, [(1, 2), (3, 4)])
    gid = first["groupTaskId"]
    bad = {kind: xadd(raw, keys.events, fields) for kind, fields in poison(gid).items()}
    later = post_group(client, [(5, 6)])

    async def scenario() -> None:
        async with open_store(settings) as store:
            await Worker(settings, store).run_until_idle()
            with caplog.at_level(logging.ERROR, logger="sumbatch.projector"):
                projector = Projector(store)
                await projector.run_until_idle()
            assert projector.set_aside == len(bad)
            check = await differences(store)
            assert check.differences == []
            assert {s.entry_id for s in check.set_aside} == set(bad.values())

    asyncio.run(scenario())

    for created, results in ((first, [3, 7]), (later, [11])):
        group = client.get(f"/grouptasks/{created['groupTaskId']}").json()
        assert group["grouptaskProcessed"] is True, group
        assert (group["results"], group["tasksCompleted"]) == (results, len(results))
    assert [client.get(f"/tasks/{t}").json()["result"] for t in first["taskIds"]] == [3, 7]

    rejected = entries(raw, keys.rejected)
    assert {fields["entryId"]: fields["reason"] for _, fields in rejected}.keys() == set(
        bad.values()
    )
    by_id = {fields["entryId"]: fields for _, fields in rejected}
    assert "outside the group" in by_id[bad["index past the end"]]["reason"]
    assert "outside the group" in by_id[bad["negative index"]]["reason"]
    assert "unknown group" in by_id[bad["unknown group"]]["reason"]
    assert "not an event" in by_id[bad["unknown type"]]["reason"]
    assert by_id[bad["unknown type"]]["type"] == "TaskExploded"  # the entry as written
    assert "a copy" in by_id[bad["a copy of the live group's submission"]]["reason"]
    assert "integers" in by_id[bad["submission whose params are no integers"]]["reason"]
    assert "no such group" in by_id[bad["submission never made"]]["reason"]
    for kind in ("submission whose params are no integers", "submission never made"):
        # No view was made of them: no group that answers PENDING for ever.
        never = by_id[bad[kind]]["groupTaskId"]
        assert client.get(f"/grouptasks/{never}").status_code == 404
    for entry_id in bad.values():
        assert entry_id in caplog.text


def test_the_projector_process_survives_a_bad_entry_in_a_live_log(
    client: TestClient, settings: Settings, raw: redis.Redis, tmp_path: Path
) -> None:
    """The reproduction from the issue: a real projector process, a bad entry between
    two groups; the second group is processed and the process logged the entry once."""
    keys = Keys(settings.namespace)
    with processes(tmp_path) as procs:
        projector = procs.start(settings, "projector")
        procs.start(settings, "worker")
        first = post_group(client, [(1, 1)])
        bad_id = xadd(raw, keys.events, completed(first["groupTaskId"], 99999))
        second = post_group(client, [(2, 2)])

        wait_until_sync(
            lambda: group_processed(client, second["groupTaskId"]),
            what="the later group to be processed",
        )
        assert projector.poll() is None
    text = (tmp_path / "projector-0.log").read_text()
    assert text.count(bad_id) == 1, text
    assert "redis unavailable" not in text


def test_a_failed_task_finishes_its_group_when_the_dead_letter_stream_is_ahead(
    client: TestClient, settings: Settings, raw: redis.Redis
) -> None:
    """The dead-letter stream is also written with '*' ids (unreadable work entries):
    an entry id there at or past the log's next id once made the completion script
    fail after it had logged the TaskFailed, so the group never finished. Forced here
    with an id from the far future."""
    keys = Keys(settings.namespace)
    raw.xadd(keys.dead_letters, {"type": "Marker"}, id="99999999999999-0")
    created = post_group(client, [(13, 1), (2, 2)])

    def unlucky(a: int, b: int) -> int:
        if a == 13:
            raise RuntimeError("unlucky")
        return a + b

    async def scenario() -> None:
        async with open_store(settings) as store:
            await Worker(settings, store, handler=unlucky).run_until_idle()
            await Projector(store).run_until_idle()
            finished = [e for e in await log_events(store) if isinstance(e, GroupFinished)]
            assert [(e.group_task_id, e.tasks_failed) for e in finished] == [
                (created["groupTaskId"], 1)
            ]
            assert await work_pending(store) == 0

    asyncio.run(scenario())
    group = client.get(f"/grouptasks/{created['groupTaskId']}").json()
    assert (group["grouptaskProcessed"], group["tasksFailed"]) == (True, 1)
    dead = [f for _, f in entries(raw, keys.dead_letters) if f["type"] == "TaskFailed"]
    assert [d["taskId"] for d in dead] == [created["taskIds"][0]]
    # The group's ledger started to expire with the group: nothing is left behind.
    assert raw.ttl(keys.ledger(created["groupTaskId"])) > 0


@pytest.mark.parametrize("key", ["ended", "attempts", "log"])
def test_a_group_key_of_the_wrong_type_is_refused_before_any_write(
    client: TestClient, settings: Settings, raw: redis.Redis, key: str
) -> None:
    """A hand-made key of the wrong type where a script writes: the scripts check
    before their first write, so they refuse that group's entries whole (left
    pending, nothing logged for them) and every other group in the same batches
    finishes, each task counted once."""
    keys = Keys(settings.namespace)
    spoiled = post_group(client, [(1, 1), (2, 2)])
    fine = post_group(client, [(3, 3), (4, 4)])
    sgid = spoiled["groupTaskId"]
    target = {"ended": keys.ended, "attempts": keys.attempts, "log": keys.group_log}[key](sgid)
    raw.delete(target)
    raw.hset(target, "hand", "made")

    async def scenario(store: Store) -> None:
        worker = Worker(settings, store)
        running = asyncio.create_task(worker.run())

        try:
            await wait_until(
                lambda: group_finished(store, fine["groupTaskId"]),
                within=20,
                what="the other group to finish",
            )
        finally:
            worker.should_exit = True
            await asyncio.wait_for(running, 10)
        events = await log_events(store)
        assert not [
            e for e in events if e.group_task_id == sgid and type(e).__name__ != "GroupSubmitted"
        ]
        completed_fine = [e for e in events if isinstance(e, TaskCompleted)]
        assert sorted(e.index for e in completed_fine) == [0, 1]

    run_with_store(settings, scenario)
    assert raw.type(target) == "hash"  # untouched


def test_bytes_that_are_not_utf8_stall_neither_the_projector_nor_the_workers(
    client: TestClient, settings: Settings, raw: redis.Redis
) -> None:
    """An entry holding bytes that are not UTF-8, in the log and in the work stream.
    Once, decoding failed on the whole read that held it: the projector retried its
    batch for ever, and the workers re-claimed the batch, legitimate tasks with it, for
    ever. Now the bytes read as escapes: the log entry is set aside, the work entry
    dead-lettered, and the groups around them finish."""
    keys = Keys(settings.namespace)
    binary = redis.Redis.from_url(settings.client_url)  # no decoding: raw bytes out
    first = post_group(client, [(1, 2), (3, 4)])
    binary.xadd(keys.events, {b"type": b"TaskStarted", b"taskId": b"\xff\xfe"})
    binary.xadd(keys.work, {b"type": b"TaskSubmitted", b"taskId": b"\xff\xfe"})
    binary.close()
    later = post_group(client, [(5, 6)])

    work(settings)
    assert project(settings) == 1
    for created in (first, later):
        group = client.get(f"/grouptasks/{created['groupTaskId']}").json()
        assert group["grouptaskProcessed"] is True, group
    [(_, rejected)] = entries(raw, keys.rejected)
    assert rejected["taskId"] == "\\xff\\xfe"
    [(_, dead)] = entries(raw, keys.dead_letters)
    assert (dead["type"], dead["taskId"]) == ("UnreadableWorkEntry", "\\xff\\xfe")
    assert work_pending_sync(raw, settings) == 0


def test_a_work_entry_outside_its_group_is_dead_lettered_and_trimming_goes_on(
    client: TestClient, settings: Settings, raw: redis.Redis
) -> None:
    """A hand-written work entry for a task index the group does not have: no run can
    ever count for it. It is dead-lettered (acknowledged), so nothing stays pending
    for ever, and the work stream is still trimmed below the work done since."""
    keys = Keys(settings.namespace)
    created = post_group(client, [(1, 1), (2, 2)])
    gid = created["groupTaskId"]
    stray = xadd(raw, keys.work, work_entry(gid, 5, "5", 1, 1))
    later = post_group(client, [(3, 3)] * 5)

    async def scenario() -> None:
        async with open_store(settings) as store:
            await asyncio.wait_for(Worker(settings, store).run_until_idle(), 30)
            assert await store.trim_work() > 0

    asyncio.run(scenario())
    assert work_pending_sync(raw, settings) == 0
    [(_, dead)] = entries(raw, keys.dead_letters)
    assert (dead["type"], dead["workEntryId"], dead["index"]) == ("RefusedWorkEntry", stray, "5")
    assert raw.xlen(keys.work) <= 1  # trimmed below the last entry handed out
    project(settings)
    for group in (created, later):
        assert client.get(f"/grouptasks/{group['groupTaskId']}").json()["grouptaskProcessed"]


def test_a_work_entry_naming_another_task_is_refused_and_its_index_still_runs(
    client: TestClient, settings: Settings, raw: redis.Redis
) -> None:
    """A hand-written work entry whose taskId is not the one its group and index name
    (here task 1's id on index 0): its outcome would be logged for one task and fenced
    for another. It is dead-lettered before it begins; the real entries run, and the
    group's log and view agree."""
    keys = Keys(settings.namespace)
    created = post_group(client, [(1, 1), (2, 2)])
    gid = created["groupTaskId"]
    stray = xadd(raw, keys.work, work_entry(gid, 1, "0", 40, 2))

    async def scenario() -> None:
        async with open_store(settings) as store:
            await asyncio.wait_for(Worker(settings, store).run_until_idle(), 30)

    asyncio.run(scenario())
    assert work_pending_sync(raw, settings) == 0
    [(_, dead)] = entries(raw, keys.dead_letters)
    assert (dead["type"], dead["workEntryId"]) == ("RefusedWorkEntry", stray)
    assert "taskId" in dead["reason"]
    project(settings)
    group = client.get(f"/grouptasks/{gid}").json()
    assert (group["grouptaskProcessed"], group["results"]) == (True, [2, 4])
    completed = [e for e in events(raw, settings, gid) if isinstance(e, TaskCompleted)]
    assert sorted((e.index, e.task_id, e.result) for e in completed) == [
        (0, created["taskIds"][0], 2),
        (1, created["taskIds"][1], 4),
    ]


def _spoil(raw: redis.Redis, key: str, gid: str, how: str) -> None:
    """Overwrite a 2-task group's view by hand: a key of another type, or a hash whose
    fields are not of the fold's shape."""
    summary = [gid, 2, 0, 0, 0, False, False]
    chunk = [[None, None], "PP", [0, 0], {}]
    raw.delete(key)
    if how == "a string":
        raw.set(key, json.dumps({"groupTaskId": gid, "tasksTotal": 2}))
        return
    fields = {
        "no chunk": {"summary": json.dumps(summary)},
        "a short chunk": {"summary": json.dumps(summary), "0": json.dumps([[None], "P", [0], {}])},
        "a summary that is no JSON": {"summary": "{", "0": json.dumps(chunk)},
        "a summary of names": {
            "summary": json.dumps({"groupTaskId": gid, "tasksTotal": 2}),
            "0": json.dumps(chunk),
        },
        "another group's summary": {
            "summary": json.dumps([ids.new_group_id(), *summary[1:]]),
            "0": json.dumps(chunk),
        },
        "a state that is no state": {
            "summary": json.dumps(summary),
            "0": '[[null,null],"PZ",[0,0],{}]',
        },
    }[how]
    for name, value in fields.items():
        raw.hset(key, name, value)


@pytest.mark.parametrize(
    "how",
    [
        "a string",
        "no chunk",
        "a short chunk",
        "a summary that is no JSON",
        "a summary of names",
        "another group's summary",
        "a state that is no state",
    ],
)
def test_a_stored_view_of_the_wrong_shape_is_ignored_not_fatal(
    client: TestClient, settings: Settings, raw: redis.Redis, how: str
) -> None:
    """A view overwritten by hand with another type or fields of another shape: the
    projector counts it as absent (that group's later events are set aside) and goes
    on with the others, and GET /tasks and /grouptasks of that group are a 404, not
    a 500."""
    keys = Keys(settings.namespace)
    spoiled = post_group(client, [(1, 1), (2, 2)])
    project(settings)
    gid = spoiled["groupTaskId"]
    _spoil(raw, keys.group_view(gid), gid, how)
    later = post_group(client, [(3, 3)])

    work(settings)
    assert project(settings) >= 2  # the spoiled group's two outcomes, at least
    assert client.get(f"/grouptasks/{later['groupTaskId']}").json()["grouptaskProcessed"]
    answer = client.get(f"/tasks/{spoiled['taskIds'][0]}")
    assert answer.status_code == 404, answer.text
    # The group's status decodes its chunks' results only: a state it does not read
    # passes there.
    answer = client.get(f"/grouptasks/{gid}")
    assert answer.status_code == (200 if how == "a state that is no state" else 404), answer.text
    rejected = [f["reason"] for _, f in entries(raw, keys.rejected)]
    assert any(gid in reason for reason in rejected), rejected


def test_a_ledger_counter_that_is_no_integer_refuses_the_group_before_any_write(
    client: TestClient, settings: Settings, raw: redis.Redis
) -> None:
    """'0.0' passes Lua's tonumber but not HINCRBY: once, the completion script set
    the fence and logged the outcome, then failed counting it, and the group could
    never finish. Now the group is refused before the first write."""
    keys = Keys(settings.namespace)
    spoiled = post_group(client, [(1, 1)])
    fine = post_group(client, [(2, 2)])
    raw.hset(keys.ledger(spoiled["groupTaskId"]), "finished", "0.0")

    async def scenario() -> None:
        async with open_store(settings) as store:
            await asyncio.wait_for(Worker(settings, store).run_until_idle(), 30)

    asyncio.run(scenario())
    assert raw.getbit(keys.ended(spoiled["groupTaskId"]), 0) == 0  # no half-done step
    kinds = [f["type"] for _, f in entries(raw, keys.group_log(spoiled["groupTaskId"]))]
    assert kinds == ["GroupSubmitted"]
    assert raw.getbit(keys.ended(fine["groupTaskId"]), 0) == 1


def test_a_cache_key_of_the_wrong_type_is_a_miss_not_a_stuck_task(
    client: TestClient, settings: Settings, raw: redis.Redis
) -> None:
    """With one partition the begin script reads the cache itself: a cache key made by
    hand as a hash must count as a miss (as MGET has it), not fail the script and leave
    the task pending for ever. The task runs, and its sum replaces the hand-made key."""
    keys = Keys(settings.namespace)
    raw.hset(keys.cache(20, 22), "hand", "made")
    created = post_group(client, [(20, 22), (1, 2)])

    work(settings)
    project(settings)
    group = client.get(f"/grouptasks/{created['groupTaskId']}").json()
    assert (group["grouptaskProcessed"], group["results"]) == (True, [42, 3])
    task = client.get(f"/tasks/{created['taskIds'][0]}").json()
    assert task["fromCache"] is False
    assert raw.get(keys.cache(20, 22)) == "42"


def test_a_cached_value_that_is_no_integer_is_a_miss(
    client: TestClient, settings: Settings, raw: redis.Redis
) -> None:
    """A cache entry written by hand with text that is no integer: a miss, not an
    error that drops the task (and holds its slice pending) on every begin."""
    keys = Keys(settings.namespace)
    raw.set(keys.cache(20, 22), "forty-two")
    created = post_group(client, [(20, 22), (1, 2)])

    work(settings)
    project(settings)
    group = client.get(f"/grouptasks/{created['groupTaskId']}").json()
    assert (group["grouptaskProcessed"], group["results"]) == (True, [42, 3])
    assert raw.get(keys.cache(20, 22)) == "42"


def test_a_cache_write_the_server_refuses_costs_a_miss_not_the_task(
    client: TestClient, settings: Settings, raw: redis.Redis
) -> None:
    """The completion script writes the cache last and never fatally: with a TTL the
    server refuses (past its largest expiry), the outcomes are still recorded, counted
    and acknowledged; only the cache entries are missing."""
    settings = msgspec.structs.replace(settings, cache_ttl=10**17)
    keys = Keys(settings.namespace)
    created = post_group(client, [(20, 22), (1, 2)])

    work(settings)
    project(settings)
    group = client.get(f"/grouptasks/{created['groupTaskId']}").json()
    assert (group["grouptaskProcessed"], group["results"]) == (True, [42, 3])
    assert raw.exists(keys.cache(20, 22), keys.cache(1, 2)) == 0
    assert work_pending_sync(raw, settings) == 0
