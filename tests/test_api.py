"""The REST contract against a real server: shapes, read-your-writes, bad input."""

from __future__ import annotations

import json
import uuid

import msgspec
import pytest
import redis
from starlette.testclient import TestClient

from sumbatch.config import Settings
from sumbatch.model.keys import Keys
from sumbatch.web.api import create_app
from tests.support import appended, entries

ORIGINAL_EXAMPLE = {
    "tasks": [
        {"paramB": 5, "paramA": 1},
        {"paramB": 10, "paramA": 9},
        {"paramB": 13, "paramA": 12},
        {"paramB": 1, "paramA": 8},
    ]
}


def test_post_returns_a_group_id_and_one_task_id_per_task(client: TestClient) -> None:
    response = client.post("/grouptasks", json=ORIGINAL_EXAMPLE)
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"groupTaskId", "taskIds"}
    assert len(body["taskIds"]) == 4
    assert len({body["groupTaskId"], *body["taskIds"]}) == 5
    assert all(uuid.UUID(i) for i in [body["groupTaskId"], *body["taskIds"]])


def test_get_right_after_post_returns_the_group(client: TestClient) -> None:
    created = client.post("/grouptasks", json=ORIGINAL_EXAMPLE).json()
    response = client.get(f"/grouptasks/{created['groupTaskId']}")
    assert response.status_code == 200
    assert response.json() == {
        "groupTaskId": created["groupTaskId"],
        "grouptaskProcessed": False,
        "grouptaskSucceeded": True,
        "results": [],
        "tasksCompleted": 0,
        "tasksTotal": 4,
        "tasksFailed": 0,
        "tasksRevoked": 0,
        "grouptaskCancelled": False,
    }


def test_task_is_pending_until_a_worker_takes_it(client: TestClient) -> None:
    created = client.post("/grouptasks", json=ORIGINAL_EXAMPLE).json()
    task_id = created["taskIds"][2]
    body = client.get(f"/tasks/{task_id}").json()
    assert body["taskId"] == task_id
    assert body["taskState"] == "PENDING"
    assert (body["result"], body["resultReady"], body["taskSucceeded"]) == (None, False, False)
    assert body["groupTaskId"] == created["groupTaskId"]


def test_submission_appends_events_and_work_entries(
    client: TestClient, raw: redis.Redis, settings: Settings
) -> None:
    keys = Keys(settings.namespace)
    created = client.post("/grouptasks", json=ORIGINAL_EXAMPLE).json()
    gid = created["groupTaskId"]
    [(entry_id, submitted)] = entries(raw, keys.events)
    assert submitted == {
        "type": "GroupSubmitted",
        "groupTaskId": gid,
        "tasksTotal": "4",
        "paramsA": "1 9 12 8",
        "paramsB": "5 10 13 1",
    }
    # The group's own log: the same entry, less the id its key names.
    [(copy_id, copy)] = entries(raw, keys.group_log(gid))
    assert copy_id == entry_id
    assert copy == {k: v for k, v in submitted.items() if k != "groupTaskId"}
    # One work entry: the group's four tasks are one slice.
    [work] = [fields for _, fields in entries(raw, keys.work)]
    assert work == {
        "type": "TasksSubmitted",
        "groupTaskId": gid,
        "first": "0",
        "paramsA": "1 9 12 8",
        "paramsB": "5 10 13 1",
    }


@pytest.mark.parametrize(
    ("body", "status", "says"),
    [
        (b"not json", 400, "malformed JSON"),
        (b'{"tasks": [', 400, "malformed JSON"),
        (b"[]", 422, "Expected `object`"),
        (b"{}", 422, "missing required field `tasks`"),
        (b'{"tasks": {}}', 422, "Expected `array`"),
        (b'{"tasks": []}', 422, "length >= 1"),
        (b'{"tasks": [{"paramA": "1", "paramB": 2}]}', 422, "$.tasks[0].paramA"),
        (b'{"tasks": [{"paramA": 1.5, "paramB": 2}]}', 422, "Expected `int`, got `float`"),
        (b'{"tasks": [{"paramA": true, "paramB": 2}]}', 422, "Expected `int`, got `bool`"),
        (b'{"tasks": [{"paramA": null, "paramB": 2}]}', 422, "got `null`"),
        (b'{"tasks": [{"paramA": 1}]}', 422, "missing required field `paramB`"),
        (b'{"tasks": [{"paramA": 9223372036854775808, "paramB": 2}]}', 422, "$.tasks[0].paramA"),
        (b'{"tasks": [{"paramA": -9223372036854775809, "paramB": 2}]}', 422, "paramA"),
        (b'{"tasks": [{"paramA": 1, "paramB": 2, "paramC": 3}]}', 422, "unknown field `paramC`"),
        (b'{"tasks": [{"paramA": 1, "paramB": 2}], "x": 1}', 422, "unknown field `x`"),
    ],
)
def test_bad_input_is_a_clear_4xx_and_appends_nothing(
    client: TestClient, raw: redis.Redis, settings: Settings, body: bytes, status: int, says: str
) -> None:
    response = client.post(
        "/grouptasks", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    assert says in response.json()["error"]
    assert appended(raw, settings) == (0, 0)


def test_wrong_content_type_is_415(
    client: TestClient, raw: redis.Redis, settings: Settings
) -> None:
    response = client.post(
        "/grouptasks", content=json.dumps(ORIGINAL_EXAMPLE), headers={"content-type": "text/plain"}
    )
    assert response.status_code == 415
    assert response.json()["error"] == "Content-Type must be application/json"
    assert appended(raw, settings) == (0, 0)


def test_too_many_tasks_is_413(raw: redis.Redis, settings: Settings) -> None:
    small = msgspec.structs.replace(settings, max_tasks_per_group=3)
    with TestClient(create_app(small)) as client:
        response = client.post("/grouptasks", json=ORIGINAL_EXAMPLE)
    assert response.status_code == 413
    assert "at most 3 tasks" in response.json()["error"]
    assert appended(raw, settings) == (0, 0)


def test_body_over_the_limit_is_413(raw: redis.Redis, settings: Settings) -> None:
    small = msgspec.structs.replace(settings, max_body_bytes=100)
    with TestClient(create_app(small)) as client:
        response = client.post("/grouptasks", json=ORIGINAL_EXAMPLE)
    assert response.status_code == 413
    assert "larger than 100 bytes" in response.json()["error"]
    assert appended(raw, settings) == (0, 0)


@pytest.mark.parametrize("path", ["/grouptasks/{id}", "/tasks/{id}"])
@pytest.mark.parametrize("ident", [str(uuid.uuid4()), "not-a-uuid", "*", "%7Bx%7D:events"])
def test_unknown_or_malformed_ids_are_404(client: TestClient, path: str, ident: str) -> None:
    response = client.get(path.format(id=ident))
    assert response.status_code == 404
    assert response.json()["error"].startswith("no such")


def test_health(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready"}
