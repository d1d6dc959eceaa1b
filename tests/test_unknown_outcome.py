"""A POST whose submit times out or loses its reply: the API resends the same call (the
same ids) within SUBMIT_BUDGET, and a resend that meets the first run answers 200 as
the first would have; past the budget it answers 503 with the groupTaskId and a
Location (the outcome is unknown), and a retry with the same Idempotency-Key never
makes a second group. Faults come from a proxy between the API and the server
(sumbatch.testing.proxy) and from the server itself (DEBUG SLEEP, CLIENT PAUSE).

Every test checks its answers with one history checker: every acknowledged group is
in the log once, a group answered "unknown" at most once, and no group comes from any
other answer (a 4xx, a plain 503)."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx2 as httpx
import pytest
import redis
from starlette.testclient import TestClient

from sumbatch.config import Settings
from sumbatch.model.events import WORK_SLICE
from sumbatch.model.keys import Keys
from sumbatch.model.tasks import Delay
from sumbatch.processes.embedded import EmbeddedServer
from sumbatch.testing.proxy import FaultProxy, running_proxy
from sumbatch.web.api import create_app
from sumbatch.web.submit import SUBMIT_BUDGET
from tests.support import (
    body_of,
    debug_server,
    fresh_namespace,
    stalled,
    wait_until_sync,
    work_entries,
)

BODY = body_of([(1, 2), (3, 4), (5, 6)])
# The largest group the tests submit: the most SUMBATCH_MAX_TASKS should allow, from
# ops/bench/submit_time.py (its script holds the server about 0.1 s).
LARGEST = 100_000


@dataclass
class History:
    """Every answer a test got, and what the log must hold for them."""

    answers: list[tuple[int, str | None]] = field(default_factory=list)

    def record(self, answer: httpx.Response) -> httpx.Response:
        gid = answer.json().get("groupTaskId") if answer.status_code in (200, 503) else None
        self.answers.append((answer.status_code, gid))
        return answer

    def check(self, admin: redis.Redis, keys: Keys) -> Counter[str]:
        """Groups in the log by id: each acknowledged one once, each unknown one at most
        once, none from any other answer; each with its work entries once."""
        groups: Counter[str] = Counter()
        sizes: dict[str, int] = {}
        entries: Any = admin.xrange(keys.events)
        for _, fields in entries:
            if fields["type"] == "GroupSubmitted":
                groups[fields["groupTaskId"]] += 1
                sizes[fields["groupTaskId"]] = int(fields["tasksTotal"])
        work: Counter[str] = Counter(f["groupTaskId"] for f in work_entries(admin, keys))
        acked = {gid for status, gid in self.answers if status == 200 and gid is not None}
        unknown = {gid for status, gid in self.answers if status == 503 and gid is not None}
        for gid in acked:
            assert gid is not None and groups[gid] == 1, (gid, groups[gid], self.answers)
        for gid in unknown:
            assert groups[gid] <= 1, (gid, groups[gid], self.answers)
        assert set(groups) <= acked | unknown, (groups, self.answers)
        for gid, size in sizes.items():
            assert work[gid] == -(-size // WORK_SLICE), (gid, work[gid], size)
        return groups


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedServer]:
    with debug_server(tmp_path_factory.mktemp("unknown")) as own:
        yield own


@pytest.fixture
def admin(server: EmbeddedServer) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(server.url, decode_responses=True, socket_timeout=60)
    yield client
    client.close()


@pytest.fixture
def proxy(server: EmbeddedServer) -> Iterator[FaultProxy]:
    with running_proxy(server.port) as running:
        yield running


@pytest.fixture
def app(proxy: FaultProxy) -> Iterator[tuple[TestClient, Keys]]:
    settings = Settings(
        redis_url=proxy.url,
        namespace=fresh_namespace("u"),
        delay=Delay(0, 0),
        max_tasks_per_group=LARGEST,
        max_body_bytes=40 * LARGEST,
    )
    with TestClient(create_app(settings)) as client:
        yield client, Keys(settings.namespace)


def unknown_answer(answer: httpx.Response) -> str:
    """The groupTaskId of a 503 that says the outcome is unknown, checked whole."""
    assert answer.status_code == 503, answer.text
    body = answer.json()
    gid = body["groupTaskId"]
    assert set(body) == {"error", "status", "groupTaskId"} and body["status"] == 503
    assert "outcome is unknown" in body["error"] and f"/grouptasks/{gid}" in body["error"]
    assert answer.headers["location"] == f"/grouptasks/{gid}"
    assert answer.headers["retry-after"] == "1"
    return str(gid)


@pytest.mark.parametrize("fault", ["reply dropped", "connection cut"])
@pytest.mark.parametrize("key", [None, "lost-reply"])
def test_a_submit_whose_reply_is_lost_is_resent_and_answers_200_once(
    app: tuple[TestClient, Keys],
    admin: redis.Redis,
    proxy: FaultProxy,
    fault: str,
    key: str | None,
) -> None:
    """The script runs, its reply never comes back (thrown away until the API gives up
    on the call, or its connection cut once the request is through): the resend finds
    the first run and answers 200 with the same ids, not as a replay of another
    request, and the group is in the log once."""
    client, keys = app
    history = History()
    headers = {} if key is None else {"Idempotency-Key": key}
    before = proxy.requests
    proxy.drop_replies_of_next_call()
    if fault == "connection cut":
        # Cut once the request is through and its reply has been thrown away.
        def cut_once_dropped() -> None:
            wait_until_sync(lambda: proxy.dropped, 10, "a reply dropped")
            proxy.cut()

        threading.Thread(target=cut_once_dropped, daemon=True).start()
    answer = history.record(client.post("/grouptasks", json=BODY, headers=headers))
    assert answer.status_code == 200, answer.text
    assert "idempotent-replayed" not in answer.headers
    assert proxy.dropped >= 1 and proxy.requests >= before + 2  # the call, and its resend
    groups = history.check(admin, keys)
    assert groups == {answer.json()["groupTaskId"]: 1}


def test_a_stall_longer_than_the_budget_answers_unknown_and_a_retry_makes_no_second_group(
    app: tuple[TestClient, Keys], admin: redis.Redis, server: EmbeddedServer
) -> None:
    """DEBUG SLEEP longer than SUBMIT_BUDGET: the POST answers 503 with its groupTaskId
    and a Location; the server runs the queued submit (and its resends) once awake, so
    the group is then in the log once, and a retry with the same Idempotency-Key
    answers that group, never a second one."""
    client, keys = app
    history = History()
    headers = {"Idempotency-Key": "stalled"}
    sleeper = threading.Thread(
        target=lambda: redis.Redis.from_url(server.url, socket_timeout=60).execute_command(  # type: ignore[no-untyped-call]
            "DEBUG", "SLEEP", SUBMIT_BUDGET + 2
        )
    )
    sleeper.start()
    try:
        wait_until_sync(lambda: stalled(server), 10, "the server to sleep")
        gid = unknown_answer(history.record(client.post("/grouptasks", json=BODY, headers=headers)))
    finally:
        sleeper.join(60)
    wait_until_sync(lambda: admin.exists(keys.ledger(gid)), 10, "the stalled submit to run")
    retry = history.record(client.post("/grouptasks", json=BODY, headers=headers))
    assert retry.status_code == 200 and retry.json()["groupTaskId"] == gid, retry.text
    assert retry.headers["idempotent-replayed"] == "true"
    assert client.get(f"/grouptasks/{gid}").status_code == 200
    assert history.check(admin, keys) == {gid: 1}


@pytest.mark.parametrize("held", ["delivered late", "never delivered"])
def test_a_network_stall_answers_unknown_and_a_retry_makes_exactly_one_group(
    app: tuple[TestClient, Keys], admin: redis.Redis, proxy: FaultProxy, held: str
) -> None:
    """The proxy holds the request past the budget: 503, outcome unknown. Then either
    it reaches the server late (the script runs after its caller gave up), and a retry
    with the same key answers that group; or its connection is cut with it (the script
    never ran), and the retry makes exactly one group of its own."""
    client, keys = app
    history = History()
    headers = {"Idempotency-Key": f"network {held}"}
    proxy.stall()
    try:
        gid = unknown_answer(history.record(client.post("/grouptasks", json=BODY, headers=headers)))
        if held == "never delivered":
            proxy.cut()
    finally:
        proxy.resume()
    if held == "delivered late":
        wait_until_sync(lambda: admin.exists(keys.ledger(gid)), 10, "the late submit to run")
    retry = history.record(client.post("/grouptasks", json=BODY, headers=headers))
    assert retry.status_code == 200, retry.text
    groups = history.check(admin, keys)
    assert sum(groups.values()) == 1 and groups[retry.json()["groupTaskId"]] == 1
    if held == "delivered late":
        assert retry.json()["groupTaskId"] == gid
    else:
        assert not admin.exists(keys.ledger(gid))


def test_a_paused_server_answers_unknown_and_a_retry_with_the_key_makes_one_group(
    app: tuple[TestClient, Keys], admin: redis.Redis
) -> None:
    """CLIENT PAUSE WRITE past the budget: the submit and its resends wait in the server;
    the API answers unknown. Once unpaused, a retry with the same key gives one group:
    the stalled one if it ran, else its own."""
    client, keys = app
    history = History()
    headers = {"Idempotency-Key": "paused"}
    pause_ms = int((SUBMIT_BUDGET + 5) * 1000)
    admin.execute_command("CLIENT", "PAUSE", pause_ms, "WRITE")  # type: ignore[no-untyped-call]
    try:
        gid = unknown_answer(history.record(client.post("/grouptasks", json=BODY, headers=headers)))
    finally:
        admin.execute_command("CLIENT", "UNPAUSE")  # type: ignore[no-untyped-call]
    retry = history.record(client.post("/grouptasks", json=BODY, headers=headers))
    assert retry.status_code == 200, retry.text
    groups = history.check(admin, keys)
    assert sum(groups.values()) == 1 and set(groups) <= {gid, retry.json()["groupTaskId"]}


@pytest.mark.parametrize("size", [1_000, LARGEST])
def test_large_groups_answer_200_once(
    app: tuple[TestClient, Keys], admin: redis.Redis, size: int
) -> None:
    """A 1,000-task group and the largest allowed group answer 200 with no fault, and
    one more than allowed is a 413 that writes nothing."""
    client, keys = app
    history = History()
    answer = history.record(client.post("/grouptasks", json=body_of([(i, i) for i in range(size)])))
    assert answer.status_code == 200, answer.text[:200]
    assert len(answer.json()["taskIds"]) == size
    too_many = body_of([(1, 1)] * (LARGEST + 1))
    assert history.record(client.post("/grouptasks", json=too_many)).status_code == 413
    assert history.check(admin, keys) == {answer.json()["groupTaskId"]: 1}
