"""Cancellation, Idempotency-Key, dead letters, poison pills and hostile bodies,
through the real app (TestClient) and real workers and projector against the real
session server."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from typing import Any

import msgspec
import pytest
import redis
from starlette.testclient import TestClient

from consumers.projector import Projector
from consumers.worker import Handler, Worker
from sumbatch.config import Settings
from sumbatch.model.events import (
    GroupCancelled,
    GroupFinished,
    TaskCompleted,
    TaskDeadLettered,
    TaskFailed,
    TaskRevoked,
    TasksSubmitted,
    TaskStarted,
    from_fields,
    tasks_of,
    to_fields,
)
from sumbatch.model.keys import WORKER_GROUP, Keys
from sumbatch.model.wire import MAX_IDEMPOTENCY_KEY
from sumbatch.store import Begun, Store, task_key
from sumbatch.web.api import create_app
from tests.support import (
    Gate,
    appended,
    body_of,
    entries,
    events,
    kinds,
    post_group,
    project,
    run_with_store,
    wait_until,
    work,
)

PAIRS = [(1, 5), (9, 10), (12, 13)]


def recording(calls: list[tuple[int, int]]) -> Handler:
    def handler(a: int, b: int) -> int:
        calls.append((a, b))
        return a + b

    return handler


# -- cancellation ---------------------------------------------------------------


def test_cancel_revokes_every_task_not_started(
    client: TestClient, raw: redis.Redis, settings: Settings
) -> None:
    created = post_group(client, PAIRS)
    gid = created["groupTaskId"]

    response = client.delete(f"/grouptasks/{gid}")
    assert response.status_code == 202
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {"groupTaskId": gid, "grouptaskCancelled": True, "tasksRevoked": 3}

    project(settings)
    for tid in created["taskIds"]:
        task = client.get(f"/tasks/{tid}").json()
        assert (task["taskState"], task["resultReady"]) == ("REVOKED", True)
        assert (task["taskSucceeded"], task["result"], task["attempts"]) == (False, None, 0)
    group = client.get(f"/grouptasks/{gid}").json()
    assert group == {
        "groupTaskId": gid,
        "grouptaskProcessed": True,
        "grouptaskSucceeded": False,
        "results": [],
        "tasksCompleted": 3,
        "tasksTotal": 3,
        "tasksFailed": 0,
        "tasksRevoked": 3,
        "grouptaskCancelled": True,
    }
    log = events(raw, settings)
    assert [type(e) for e in log[1:]] == [GroupCancelled] + [TaskRevoked] * 3 + [GroupFinished]
    revoked = [e for e in log if isinstance(e, TaskRevoked)]
    assert [(e.task_id, e.index) for e in revoked] == [
        (tid, i) for i, tid in enumerate(created["taskIds"])
    ]
    (finished,) = [e for e in log if isinstance(e, GroupFinished)]
    assert (finished.tasks_revoked, finished.tasks_failed, finished.succeeded) == (3, 0, False)
    # The audit stream holds the same history.
    history = entries(raw, Keys(settings.namespace).group_log(gid))
    assert [f["type"] for _, f in history] == [type(e).__name__ for e in log]


def test_a_second_cancel_is_idempotent_and_appends_nothing(
    client: TestClient, raw: redis.Redis, settings: Settings
) -> None:
    gid = post_group(client, PAIRS)["groupTaskId"]
    assert client.delete(f"/grouptasks/{gid}").json()["tasksRevoked"] == 3
    before = appended(raw, settings)

    again = client.delete(f"/grouptasks/{gid}")
    assert again.status_code == 202
    assert again.json() == {"groupTaskId": gid, "grouptaskCancelled": True, "tasksRevoked": 0}
    assert appended(raw, settings) == before
    assert kinds(raw, settings)["GroupCancelled"] == 1


def test_cancelling_a_finished_group_is_409_and_changes_nothing(
    client: TestClient, raw: redis.Redis, settings: Settings
) -> None:
    created = post_group(client, [(1, 2)])
    work(settings)
    project(settings)
    before = appended(raw, settings)
    response = client.delete(f"/grouptasks/{created['groupTaskId']}")
    assert response.status_code == 409
    assert response.json()["error"] == "the group has already finished: nothing to cancel"
    assert appended(raw, settings) == before
    project(settings)
    group = client.get(f"/grouptasks/{created['groupTaskId']}").json()
    assert (group["grouptaskCancelled"], group["grouptaskSucceeded"]) == (False, True)


@pytest.mark.parametrize("ident", [str(uuid.uuid4()), "not-a-uuid", "*", "%7Bx%7D:events"])
def test_cancel_of_an_unknown_or_malformed_id_is_404_and_appends_nothing(
    client: TestClient, raw: redis.Redis, settings: Settings, ident: str
) -> None:
    response = client.delete(f"/grouptasks/{ident}")
    assert response.status_code == 404
    assert response.json() == {"error": "no such groupTaskId", "status": 404}
    assert appended(raw, settings) == (0, 0)
    keys = Keys(settings.namespace)
    # Nothing but what the app's start-up created: the work stream, the partition count.
    created = {keys.work, Keys.partitions_key(settings.namespace)}
    assert set(raw.scan_iter(match=f"{keys.tag}:*")) == created


def test_revoked_entries_are_acknowledged_without_running(
    client: TestClient, raw: redis.Redis, settings: Settings
) -> None:
    created = post_group(client, PAIRS)
    client.delete(f"/grouptasks/{created['groupTaskId']}")
    calls: list[tuple[int, int]] = []
    work(settings, recording(calls))

    assert calls == []
    counts = kinds(raw, settings)
    assert (counts["TaskStarted"], counts["TaskCompleted"], counts["TaskFailed"]) == (0, 0, 0)
    assert counts["GroupFinished"] == 1
    (info,) = raw.xinfo_groups(Keys(settings.namespace).work)
    assert (info["pending"], info["lag"]) == (0, 0)


def test_cancel_revokes_a_started_task_too_and_its_late_finish_writes_nothing(
    client: TestClient, raw: redis.Redis, settings: Settings
) -> None:
    """One worker slot: the first task is running (blocked) when the group is
    cancelled. Every task ends REVOKED at once, the running one included; when its
    run returns after all, the fence keeps its result out of the log."""
    created = post_group(client, PAIRS)
    gid, tids = created["groupTaskId"], created["taskIds"]
    gate = Gate()
    cancelled: dict[str, Any] = {}

    async def scenario(store: Store) -> None:
        one_slot = msgspec.structs.replace(settings, worker_concurrency=1)
        worker = Worker(one_slot, store, handler=gate.handler)
        running = asyncio.create_task(worker.run())

        async def first_started() -> bool:
            return any(
                isinstance(e, TaskStarted) and e.task_id == tids[0] for e in events(raw, settings)
            )

        await wait_until(first_started, what="the first task to start")
        response = await asyncio.to_thread(client.delete, f"/grouptasks/{gid}")
        cancelled.update(status=response.status_code, body=response.json())
        assert kinds(raw, settings)["GroupFinished"] == 1  # in the same step as the cancel
        gate.open()

        async def all_acked() -> bool:
            (info,) = await store.redis.xinfo_groups(store.keys.work)
            return bool(info["pending"] == 0 and info["lag"] == 0)

        await wait_until(all_acked, what="every entry to be acknowledged")
        worker.should_exit = True
        await asyncio.wait_for(running, 10)
        await Projector(store).run_until_idle()

    run_with_store(settings, scenario)

    assert cancelled == {
        "status": 202,
        "body": {"groupTaskId": gid, "grouptaskCancelled": True, "tasksRevoked": 3},
    }
    assert gate.calls == [PAIRS[0]]
    for tid in tids:
        task = client.get(f"/tasks/{tid}").json()
        assert (task["taskState"], task["result"], task["resultReady"]) == ("REVOKED", None, True)
    group = client.get(f"/grouptasks/{gid}").json()
    assert group["grouptaskProcessed"] is True
    assert group["grouptaskCancelled"] is True
    assert group["grouptaskSucceeded"] is False
    assert (group["results"], group["tasksCompleted"], group["tasksRevoked"]) == ([], 3, 3)
    log = events(raw, settings)
    assert [e.task_id for e in log if isinstance(e, TaskStarted)] == [tids[0]]
    assert [e for e in log if isinstance(e, TaskCompleted)] == []
    (finished,) = [e for e in log if isinstance(e, GroupFinished)]
    assert (finished.tasks_revoked, finished.succeeded) == (3, False)


def test_cancel_after_the_cancelled_group_finished_is_still_202_with_nothing_revoked(
    client: TestClient, raw: redis.Redis, settings: Settings
) -> None:
    """DELETE is idempotent: a cancel finishes the group at once (every task revoked),
    and a repeated DELETE answers as the first did, revoking nothing; only a group that
    finished without a cancel answers 409."""
    gid = post_group(client, PAIRS)["groupTaskId"]
    assert client.delete(f"/grouptasks/{gid}").status_code == 202
    project(settings)
    assert client.get(f"/grouptasks/{gid}").json()["grouptaskProcessed"] is True
    before = appended(raw, settings)
    again = client.delete(f"/grouptasks/{gid}")
    assert (again.status_code, again.json()["tasksRevoked"]) == (202, 0)
    assert appended(raw, settings) == before


# -- Idempotency-Key ------------------------------------------------------------


def test_same_key_and_body_replays_the_first_answer(
    client: TestClient, raw: redis.Redis, settings: Settings
) -> None:
    content = msgspec.json.encode(body_of(PAIRS))
    headers = {"content-type": "application/json", "idempotency-key": "order-42"}
    first = client.post("/grouptasks", content=content, headers=headers)
    second = client.post("/grouptasks", content=content, headers=headers)

    assert (first.status_code, second.status_code) == (200, 200)
    assert "idempotent-replayed" not in first.headers
    assert second.headers["idempotent-replayed"] == "true"
    assert second.json() == first.json()
    assert len(first.json()["taskIds"]) == 3
    assert kinds(raw, settings)["GroupSubmitted"] == 1
    assert appended(raw, settings) == (1, 3)


def test_same_key_with_another_body_is_422_and_appends_nothing(
    client: TestClient, raw: redis.Redis, settings: Settings
) -> None:
    headers = {"idempotency-key": "order-43"}
    first = client.post("/grouptasks", json=body_of(PAIRS), headers=headers)
    assert first.status_code == 200
    before = appended(raw, settings)

    other = client.post("/grouptasks", json=body_of([(1, 1)]), headers=headers)
    assert other.status_code == 422
    assert other.json() == {
        "error": "Idempotency-Key was used before with a different body",
        "status": 422,
    }
    assert appended(raw, settings) == before
    # The first group is untouched and still answers.
    group = client.get(f"/grouptasks/{first.json()['groupTaskId']}").json()
    assert group["tasksTotal"] == 3


@pytest.mark.parametrize("key", ["k" * (MAX_IDEMPOTENCY_KEY + 1), "k" * 10_000, ""])
def test_a_key_of_the_wrong_length_is_400_and_appends_nothing(
    client: TestClient, raw: redis.Redis, settings: Settings, key: str
) -> None:
    response = client.post("/grouptasks", json=body_of(PAIRS), headers={"idempotency-key": key})
    assert response.status_code == 400
    assert "Idempotency-Key must be 1 to 255 characters" in response.json()["error"]
    assert appended(raw, settings) == (0, 0)


def test_a_key_of_the_longest_length_is_accepted(client: TestClient) -> None:
    headers = {"idempotency-key": "k" * MAX_IDEMPOTENCY_KEY}
    first = client.post("/grouptasks", json=body_of(PAIRS), headers=headers)
    second = client.post("/grouptasks", json=body_of(PAIRS), headers=headers)
    assert (first.status_code, second.status_code) == (200, 200)
    assert second.headers["idempotent-replayed"] == "true"
    assert first.json() == second.json()


def test_different_keys_make_different_groups(
    client: TestClient, raw: redis.Redis, settings: Settings
) -> None:
    one = client.post("/grouptasks", json=body_of(PAIRS), headers={"idempotency-key": "a"})
    two = client.post("/grouptasks", json=body_of(PAIRS), headers={"idempotency-key": "b"})
    assert (one.status_code, two.status_code) == (200, 200)
    assert "idempotent-replayed" not in two.headers
    assert one.json()["groupTaskId"] != two.json()["groupTaskId"]
    assert not set(one.json()["taskIds"]) & set(two.json()["taskIds"])
    assert kinds(raw, settings)["GroupSubmitted"] == 2


# -- dead letters and poison pills ----------------------------------------------


def test_a_task_that_always_fails_is_dead_lettered_and_its_group_finishes(
    client: TestClient, raw: redis.Redis, settings: Settings
) -> None:
    created = post_group(client, [(1, 2), (13, 4)])
    gid, (ok_id, bad_id) = created["groupTaskId"], created["taskIds"]
    calls: Counter[tuple[int, int]] = Counter()

    def unlucky(a: int, b: int) -> int:
        calls[(a, b)] += 1
        if a == 13:
            raise RuntimeError("unlucky thirteen")
        return a + b

    work(settings, unlucky)
    project(settings)

    assert calls == Counter({(1, 2): 1, (13, 4): settings.max_attempts})
    bad = client.get(f"/tasks/{bad_id}").json()
    assert (bad["taskState"], bad["resultReady"], bad["taskSucceeded"]) == ("FAILURE", True, False)
    assert (bad["attempts"], bad["error"]) == (
        settings.max_attempts,
        "RuntimeError: unlucky thirteen",
    )
    assert client.get(f"/tasks/{ok_id}").json()["taskState"] == "SUCCESS"

    keys = Keys(settings.namespace)
    log = entries(raw, keys.events)
    ((failed_id, failed_fields),) = [(i, f) for i, f in log if f["type"] == "TaskFailed"]
    failed = from_fields(failed_fields)
    assert isinstance(failed, TaskFailed)
    assert (failed.task_id, failed.attempts) == (bad_id, settings.max_attempts)
    # The dead-letter stream holds exactly the TaskFailed event, naming its log entry.
    [(_, dead_fields)] = entries(raw, keys.dead_letters)
    assert dead_fields == {**failed_fields, "eventId": failed_id}
    assert failed_fields == to_fields(failed)
    dead = [e for e in (from_fields(f) for _, f in log) if isinstance(e, TaskDeadLettered)]
    assert dead == [
        TaskDeadLettered(
            task_id=bad_id,
            group_task_id=gid,
            index=1,
            param_a=13,
            param_b=4,
            error="RuntimeError: unlucky thirteen",
        )
    ]

    group = client.get(f"/grouptasks/{gid}").json()
    assert (group["grouptaskProcessed"], group["grouptaskSucceeded"]) == (True, False)
    assert (group["results"], group["tasksFailed"], group["tasksCompleted"]) == ([3], 1, 2)
    finished = [e for e in events(raw, settings) if isinstance(e, GroupFinished)]
    assert [(f.succeeded, f.tasks_failed) for f in finished] == [(False, 1)]


@pytest.mark.parametrize("extra_runs", [0, 1], ids=["max_attempts", "max_attempts+1"])
def test_a_poison_pill_is_given_up_without_running_it(
    client: TestClient, raw: redis.Redis, settings: Settings, extra_runs: int
) -> None:
    """Each run of the task kills its worker: the entry is claimed again and again,
    begun each time, never ended. Once it has used up its attempts, the next worker
    to take it over ends it as FAILURE instead of running it once more."""
    lost = settings.max_attempts + extra_runs
    created = post_group(client, [(4, 4)])
    (tid,) = created["taskIds"]
    calls: list[tuple[int, int]] = []
    worker_names: list[str] = []

    async def scenario(store: Store) -> None:
        [(entry_id, fields)] = await store.read_work("doomed-0", 10, block_ms=100)
        work = from_fields(fields)
        assert isinstance(work, TasksSubmitted)
        [item] = tasks_of(work)
        key = task_key(entry_id, item.index)
        for n in range(lost):
            if n:
                [(claimed, _)] = await store.autoclaim(f"doomed-{n}", min_idle_ms=0)
                assert claimed == entry_id
            [decision] = await store.begin([item], [key])
            assert decision == Begun("run", n + 1)  # attempt n + 1
        # The last one died long ago: its entry is idle past the claim timeout.
        idle = int(settings.claim_timeout * 1000) * 10
        await store.redis.xclaim(
            store.keys.work, WORKER_GROUP, f"doomed-{lost - 1}", 0, [entry_id], idle=idle
        )
        worker = Worker(settings, store, handler=recording(calls))
        worker_names.append(worker.name)
        await worker.run_until_idle()
        await Projector(store).run_until_idle()

    run_with_store(settings, scenario)

    assert calls == []
    log = events(raw, settings)
    assert not [e for e in log if isinstance(e, TaskStarted)]
    (failed,) = [e for e in log if isinstance(e, TaskFailed)]
    assert failed.worker == worker_names[0]
    assert (failed.task_id, failed.attempts) == (tid, lost)
    assert "gave up" in failed.error
    task = client.get(f"/tasks/{tid}").json()
    assert (task["taskState"], task["resultReady"]) == ("FAILURE", True)
    assert "gave up" in task["error"]
    group = client.get(f"/grouptasks/{created['groupTaskId']}").json()
    assert (group["grouptaskProcessed"], group["grouptaskSucceeded"]) == (True, False)
    (info,) = raw.xinfo_groups(Keys(settings.namespace).work)
    assert info["pending"] == 0


def test_a_task_with_attempts_left_after_lost_runs_is_run(
    client: TestClient, raw: redis.Redis, settings: Settings
) -> None:
    """The boundary of the poison-pill rule: one attempt left means one more run."""
    created = post_group(client, [(4, 4)])
    (tid,) = created["taskIds"]
    calls: list[tuple[int, int]] = []

    async def scenario(store: Store) -> None:
        [(entry_id, fields)] = await store.read_work("doomed-0", 10, block_ms=100)
        work = from_fields(fields)
        assert isinstance(work, TasksSubmitted)
        [item] = tasks_of(work)
        key = task_key(entry_id, item.index)
        for n in range(settings.max_attempts - 1):
            if n:
                await store.autoclaim(f"doomed-{n}", min_idle_ms=0)
            await store.begin([item], [key])
        idle = int(settings.claim_timeout * 1000) * 10
        await store.redis.xclaim(store.keys.work, WORKER_GROUP, "gone", 0, [entry_id], idle=idle)
        await Worker(settings, store, handler=recording(calls)).run_until_idle()
        await Projector(store).run_until_idle()

    run_with_store(settings, scenario)

    assert calls == [(4, 4)]
    done = [e for e in events(raw, settings) if isinstance(e, TaskCompleted)]
    assert [(e.task_id, e.attempt) for e in done] == [(tid, settings.max_attempts)]
    task = client.get(f"/tasks/{tid}").json()
    assert (task["taskState"], task["result"], task["attempts"]) == (
        "SUCCESS",
        8,
        settings.max_attempts,
    )


# -- hostile bodies -------------------------------------------------------------

DEPTH = 10_000


def nested(depth: int, open_: bytes, close: bytes, core: bytes = b"") -> bytes:
    return open_ * depth + core + close * depth


@pytest.mark.parametrize(
    "body",
    [
        b'{"tasks": ' + nested(DEPTH, b"[", b"]") + b"}",
        b'{"tasks": ' + nested(100_000, b"[", b"]") + b"}",
        nested(DEPTH, b"[", b"]"),
        nested(DEPTH, b'{"tasks": ', b"}", b"[]"),
        b'{"tasks": [{"paramA": ' + nested(DEPTH, b'{"a": ', b"}", b"1") + b', "paramB": 1}]}',
        b'{"tasks": [{"paramA": 1, "paramB": ' + nested(DEPTH, b"[", b"]") + b"}]}",
        b'{"tasks": [{"paramA": 1, "paramB": 1}], "x": ' + nested(DEPTH, b"[", b"]") + b"}",
        b'{"x": '
        + nested(DEPTH, b'{"y": ', b"}", b"0")
        + b', "tasks": [{"paramA": 1, "paramB": 1}]}',
        b'{"tasks": ' + b"[" * DEPTH,  # never closed
    ],
    ids=[
        "tasks-arrays",
        "tasks-arrays-100k",
        "top-level-arrays",
        "nested-tasks-objects",
        "param-objects",
        "param-arrays",
        "unknown-field-arrays",
        "unknown-field-first-objects",
        "unclosed",
    ],
)
def test_deep_nesting_is_a_4xx_and_appends_nothing(
    client: TestClient, raw: redis.Redis, settings: Settings, body: bytes
) -> None:
    response = client.post(
        "/grouptasks", content=body, headers={"content-type": "application/json"}
    )
    assert 400 <= response.status_code < 500, response.text
    assert response.headers["content-type"] == "application/json"
    answer = response.json()
    assert answer["status"] == response.status_code
    assert isinstance(answer["error"], str) and answer["error"]
    assert appended(raw, settings) == (0, 0)


def test_a_declared_content_length_over_the_limit_is_413(
    raw: redis.Redis, settings: Settings
) -> None:
    """The declared length alone is refused: the body sent is small and valid."""
    content = msgspec.json.encode(body_of([(1, 1)]))
    limit = len(content) + 10
    small = msgspec.structs.replace(settings, max_body_bytes=limit)
    with TestClient(create_app(small)) as client:
        fits = client.post(
            "/grouptasks", content=content, headers={"content-type": "application/json"}
        )
        assert fits.status_code == 200
        response = client.post(
            "/grouptasks",
            content=content,
            headers={"content-type": "application/json", "content-length": str(limit + 1)},
        )
    assert response.status_code == 413
    assert response.json() == {"error": f"body larger than {limit} bytes", "status": 413}
    assert kinds(raw, settings)["GroupSubmitted"] == 1


@pytest.mark.parametrize(
    ("body", "key"),
    [
        (b'{"tasks": [{"paramA": 1, "paramA": 2, "paramB": 3}]}', "paramA"),
        (b'{"tasks": [{"paramA": 1, "paramB": 3, "paramB": 4}]}', "paramB"),
        (b'{"tasks": [{"paramA": 1, "paramB": 2}], "tasks": [{"paramA": 5, "paramB": 6}]}',
         "tasks"),
        # The same key spelled with an escape: still the same key.
        (b'{"tasks": [{"paramA": 1, "param\\u0041": 2, "paramB": 3}]}', "paramA"),
        (b'{"tasks": [{"paramA": 1, "paramB": 2}, {"paramB": 3, "paramA": 4, "paramA": 4}]}',
         "paramA"),
    ],
    ids=["paramA", "paramB", "tasks", "escaped", "second-task"],
)  # fmt: skip
def test_a_key_given_twice_is_400_and_appends_nothing(
    client: TestClient, raw: redis.Redis, settings: Settings, body: bytes, key: str
) -> None:
    """msgspec, like most JSON parsers, would keep the last value silently; a body
    that can be read two ways is refused instead."""
    response = client.post(
        "/grouptasks", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"] == f"malformed JSON: duplicate key `{key}`"
    assert appended(raw, settings) == (0, 0)


def test_escapes_in_a_body_without_duplicates_are_accepted(client: TestClient) -> None:
    body = b'{"t\\u0061sks": [{"param\\u0041": 1, "paramB": 2}, {"paramA": 3, "paramB": 4}]}'
    response = client.post(
        "/grouptasks", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == 200, response.text
    assert len(response.json()["taskIds"]) == 2
