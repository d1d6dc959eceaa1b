"""/metrics and /system, against a real server and the real app and consumers: the
counters kept in Redis by the scripts are exact, a retry or a replay counts nothing
twice, the histograms count the runs and groups there were, the gauges read a known
backlog, per-consumer pending follows a worker's claims, the partitions add up, and
the request latency is kept per route template."""

from __future__ import annotations

import asyncio
import hashlib
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest
import redis
from msgspec.structs import replace
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from starlette.testclient import TestClient

from sumbatch.config import Settings
from sumbatch.model.events import TaskCompleted
from sumbatch.model.keys import Keys
from sumbatch.model.submission import Submission
from sumbatch.model.tasks import Delay
from sumbatch.model.views import GroupView
from sumbatch.model.wire import TaskIn
from sumbatch.scripts import stats
from sumbatch.store import Outcome, open_store
from sumbatch.store.partitions import open_partitions
from sumbatch.web import metrics
from sumbatch.web.api import create_app
from tests.support import (
    Processes,
    answers_200,
    body_of,
    drop_namespace,
    env_for,
    events,
    free_port,
    fresh_namespace,
    group_processed,
    kinds,
    own_server,
    post_group,
    project,
    run_sumbatch,
    wait_until_sync,
    work,
)

COUNTER_NAMES = {field: name + "_total" for field, (name, _) in metrics.COUNTERS.items()}
CREATED = metrics.HTTP_LATENCY + "_created"


def fails_on_13(a: int, b: int) -> int:
    """The sum, except that a task with paramA 13 always fails."""
    if a == 13:
        raise ValueError("13 is unlucky")
    return a + b


# -- reading /metrics as Prometheus does ---------------------------------------------


def scrape(client: TestClient | httpx.Client) -> list[Metric]:
    answer = client.get("/metrics")
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("text/plain; version=")
    return list(text_string_to_metric_families(answer.text))


def samples(families: list[Metric], name: str) -> list[Sample]:
    return [s for family in families for s in family.samples if s.name == name]


def value(families: list[Metric], name: str, **labels: str) -> float | None:
    """The value of the sample ``name`` with exactly these labels, or None."""
    found = [s.value for s in samples(families, name) if s.labels == labels]
    assert len(found) <= 1, (name, labels, found)
    return found[0] if found else None


def counters(families: list[Metric]) -> dict[str, float | None]:
    return {field: value(families, name) for field, name in COUNTER_NAMES.items()}


def histogram(families: list[Metric], name: str, **labels: str) -> dict[str, float]:
    """A histogram's cumulative buckets by ``le``, with its ``count`` and ``sum``."""
    found = {
        s.labels["le"]: s.value
        for s in samples(families, f"{name}_bucket")
        if {k: v for k, v in s.labels.items() if k != "le"} == labels
    }
    found["count"] = value(families, f"{name}_count", **labels) or 0.0
    found["sum"] = value(families, f"{name}_sum", **labels) or 0.0
    return found


def counts(families: list[Metric]) -> dict[str, list[Sample]]:
    """The samples of every counter and histogram kept in Redis."""
    kept = {*(name for name, _ in metrics.COUNTERS.values()), "sumbatch_task_run_seconds",
            "sumbatch_group_seconds"}  # fmt: skip
    return {f.name: f.samples for f in families if f.name in kept}


def system(client: TestClient | httpx.Client) -> dict[str, Any]:
    answer = client.get("/system")
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    return body


def cancel(client: TestClient, gid: str) -> None:
    answer = client.delete(f"/grouptasks/{gid}")
    assert answer.status_code == 202, answer.text


# -- counters and histograms -----------------------------------------------------------


def test_a_run_is_counted_exactly_and_a_replay_changes_no_count(
    settings: Settings, raw: redis.Redis
) -> None:
    """Two computed tasks; a cache hit and one computed; a task that fails (two runs)
    and one computed; a group cancelled before it ran. Every run takes 0.2 s."""
    settings = replace(settings, delay=Delay(0.2, 0.2), max_attempts=2)
    with TestClient(create_app(settings)) as client:
        assert counters(scrape(client)) == dict.fromkeys(COUNTER_NAMES, 0.0)
        post_group(client, [(1, 2), (3, 4)])
        work(settings, fails_on_13)
        post_group(client, [(1, 2), (5, 6)])
        post_group(client, [(13, 1), (7, 8)])
        revoked = post_group(client, [(9, 9), (10, 10), (11, 11)])["groupTaskId"]
        cancel(client, revoked)
        work(settings, fails_on_13)
        project(settings)
        seen = scrape(client)
        assert counters(seen) == {
            "groupsSubmitted": 4,
            "groupsFinished": 4,
            "tasksSubmitted": 9,
            "tasksCompleted": 5,
            "tasksCached": 1,
            "tasksFailed": 1,
            "tasksRevoked": 3,
        }
        # The same as the log says.
        logged = kinds(raw, settings)
        assert (logged["GroupSubmitted"], logged["GroupFinished"]) == (4, 4)
        assert (logged["TaskCompleted"], logged["TaskFailed"], logged["TaskRevoked"]) == (5, 1, 3)
        cached = [e for e in events(raw, settings) if isinstance(e, TaskCompleted) and e.from_cache]
        assert len(cached) == 1

        # Four computed results and one failure, each run 0.2 s (nothing under 0.1 s);
        # the failed task's last run is the one counted.
        computed = histogram(seen, "sumbatch_task_run_seconds", outcome="completed")
        failed = histogram(seen, "sumbatch_task_run_seconds", outcome="failed")
        assert (computed["count"], computed["0.1"], computed["+Inf"]) == (4, 0, 4)
        assert (failed["count"], failed["0.1"], failed["+Inf"]) == (1, 0, 1)
        assert 0.8 <= computed["sum"] < 4 and 0.2 <= failed["sum"] < 1
        # Four groups, from submission to GroupFinished: the cancelled one at once, the
        # others after at least one run (the failed task: two runs).
        groups = histogram(seen, "sumbatch_group_seconds")
        assert groups["count"] == 4 and groups["+Inf"] == 4
        assert groups["sum"] >= 0.2 + 0.2 + 0.4
        buckets = [groups[repr(float(b))] for b in stats.GROUP.bounds] + [groups["+Inf"]]
        assert buckets == sorted(buckets), "buckets are cumulative"

        # `sumbatch replay` refolds the views from the log: no count moves.
        replayed = run_sumbatch("replay", env=env_for(settings))
        assert replayed.returncode == 0, replayed.stderr
        assert "rebuilt from the log" in replayed.stdout
        assert counts(scrape(client)) == counts(seen)


def test_a_step_sent_again_counts_once(settings: Settings) -> None:
    """What a lost reply makes redis-py send again: the same submission, the same
    outcome. Each script sees its own first run and counts nothing more."""

    async def scenario() -> None:
        async with open_store(settings) as store:
            sub = Submission.of([TaskIn(2, 3), TaskIn(4, 5)], store.keys.partition)
            gid = sub.created.group_task_id
            for _ in range(2):
                await store.submit(sub.event, GroupView.submitted(gid, 2))
            before = (await store.state()).counters
            assert (before["groupsSubmitted"], before["tasksSubmitted"]) == (1, 2)
            await store.ensure_worker_group()
            entries = await store.read_work("w", 10, 0)
            outcome = Outcome(
                entries[0][0],
                TaskCompleted(
                    task_id=sub.created.task_ids[0],
                    group_task_id=gid,
                    index=0,
                    result=5,
                    from_cache=False,
                    attempt=1,
                    worker="w",
                ),  # fmt: skip
                2,
                3,
                0.5,
            )
            for _ in range(2):
                await store.complete([outcome])
            after = await store.state()
            assert after.counters["tasksCompleted"] == 1
            run = after.histograms[stats.TASK_RUN["completed"].name]
            assert (run.count, run.sum) == (1, 0.5)
            assert after.counters["groupsFinished"] == 0  # one of its two tasks ended

    asyncio.run(scenario())


def test_a_stats_hash_broken_by_hand_loses_counts_not_work(
    settings: Settings, raw: redis.Redis
) -> None:
    raw.set(Keys(settings.namespace).stats, "not a hash")
    with TestClient(create_app(settings)) as client:
        gid = post_group(client, [(1, 1)])["groupTaskId"]
        work(settings)
        project(settings)
        assert group_processed(client, gid)
        seen = scrape(client)
        assert counters(seen) == dict.fromkeys(COUNTER_NAMES, 0.0)
        assert value(seen, "sumbatch_stream_length", partition="0", stream="events") == 3


# -- gauges ----------------------------------------------------------------------------


def test_gauges_read_a_backlog_then_a_workers_claims(settings: Settings, procs: Processes) -> None:
    """Groups of 2, 3 and 4 tasks with no consumer running (a work entry each: a slice
    holds up to WORK_SLICE tasks; the first in the stream, the others queued in turn
    till a reader takes them); then a worker that claims every entry and holds it;
    then the projector; then a group after it."""
    settings = replace(settings, handler="tests.support:hang_forever")
    with TestClient(create_app(settings)) as client:
        for size in (2, 3, 4):
            post_group(client, [(size, n) for n in range(size)])
        seen = scrape(client)
        assert value(seen, "sumbatch_work_lag", partition="0") == 3
        assert value(seen, "sumbatch_work_pending", partition="0") == 0
        # No position yet: every entry of the log is lag.
        assert value(seen, "sumbatch_projector_lag_events", partition="0") == 3
        assert value(seen, "sumbatch_stream_length", partition="0", stream="events") == 3
        assert value(seen, "sumbatch_stream_length", partition="0", stream="work") == 1
        assert value(seen, "sumbatch_dead_letters", partition="0") == 0
        assert samples(seen, "sumbatch_consumer_pending") == []
        overview = system(client)
        assert overview["work"] == {"length": 1, "lag": 3, "pending": 0}
        assert (overview["projectorLag"], overview["eventLogLength"]) == (3, 3)
        assert overview["workers"] == []

        worker = procs.start(settings, "worker", "--name", "holder")
        wait_until_sync(lambda: system(client)["work"]["pending"] == 3, what="the worker's claims")
        seen = scrape(client)
        assert value(seen, "sumbatch_work_lag", partition="0") == 0
        assert value(seen, "sumbatch_work_pending", partition="0") == 3
        assert value(seen, "sumbatch_consumer_pending", partition="0", consumer="holder") == 3
        idle = value(seen, "sumbatch_consumer_idle_seconds", partition="0", consumer="holder")
        assert idle is not None and 0 <= idle < 60
        # Each run logged its TaskStarted: 3 + 9 entries the views do not include.
        wait_until_sync(lambda: system(client)["projectorLag"] == 12, what="9 TaskStarted")
        (holder,) = system(client)["workers"]
        assert (holder["name"], holder["partition"], holder["pending"]) == ("holder", 0, 3)

        procs.kill9(worker)
        project(settings)
        assert system(client)["projectorLag"] == 0
        post_group(client, [(7, 7)])
        overview = system(client)
        # Counted from the projector's position now: one GroupSubmitted after it.
        assert overview["projectorLag"] == 1
        assert overview["work"] == {"length": 4, "lag": 1, "pending": 3}


def test_system_is_the_contracts_json(settings: Settings, raw: redis.Redis) -> None:
    with TestClient(create_app(settings)) as client:
        post_group(client, [(1, 2), (3, 4)])
        work(settings)
        before = int(raw.time()[0]) * 1000
        body = system(client)
        after = (int(raw.time()[0]) + 1) * 1000
    assert set(body) == {
        "time", "partitions", "counters", "work", "projectorLag", "deadLetters",
        "eventLogLength", "workers", "redisMemoryBytes",
    }  # fmt: skip
    assert before <= body["time"] <= after
    assert body["partitions"] == 1
    assert body["counters"] == {
        "groupsSubmitted": 1, "groupsFinished": 1, "tasksSubmitted": 2, "tasksCompleted": 2,
        "tasksCached": 0, "tasksFailed": 0, "tasksRevoked": 0,
    }  # fmt: skip
    assert body["work"] == {"length": 1, "lag": 0, "pending": 0}  # one slice
    # GroupSubmitted, two TaskCompleted, GroupFinished; no projector ran.
    assert (body["projectorLag"], body["eventLogLength"], body["deadLetters"]) == (4, 4, 0)
    (worker,) = body["workers"]
    assert set(worker) == {"name", "partition", "pending", "idleMs"}
    assert (worker["partition"], worker["pending"]) == (0, 0)
    assert isinstance(worker["name"], str) and isinstance(worker["idleMs"], int)
    used = int(raw.info("memory")["used_memory"])
    assert isinstance(body["redisMemoryBytes"], int)
    assert 0.5 * used < body["redisMemoryBytes"] < 2 * used


# -- partitions --------------------------------------------------------------------------


def partition_key(partition: int, count: int) -> str:
    """An Idempotency-Key whose group lands in ``partition`` (as the API picks it)."""
    for n in range(10_000):
        key = f"metrics-{n}"
        if int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % count == partition:
            return key
    raise AssertionError("unreachable")


@pytest.fixture
def three(redis_url: str) -> Iterator[Settings]:
    """A namespace of three partitions on the one server."""
    namespace = fresh_namespace("m")
    yield Settings(redis_url=redis_url, namespace=namespace, delay=Delay(0.0, 0.0), partitions=3)
    drop_namespace(redis_url, namespace, partitions=3)


def test_the_partitions_counts_add_up(three: Settings, procs: Processes) -> None:
    """Real api, worker and projector processes; a group of 1, 2 and 3 tasks in
    partitions 0, 1 and 2."""
    port = free_port()
    for command in ("worker", "projector"):
        procs.start(three, command)
    procs.start(three, "api", "--port", str(port))
    base = f"http://127.0.0.1:{port}"
    wait_until_sync(lambda: answers_200(f"{base}/healthz"), what="the API to answer")
    with httpx.Client(base_url=base, timeout=20) as client:
        gids = []
        for partition in range(3):
            pairs = [(partition, n) for n in range(partition + 1)]
            key = partition_key(partition, 3)
            answer = client.post(
                "/grouptasks", json=body_of(pairs), headers={"Idempotency-Key": key}
            )
            assert answer.status_code == 200, answer.text
            gids.append(answer.json()["groupTaskId"])
        wait_until_sync(lambda: all(group_processed(client, gid) for gid in gids))
        seen = scrape(client)
        overview = system(client)
    assert counters(seen) == {
        "groupsSubmitted": 3,
        "groupsFinished": 3,
        "tasksSubmitted": 6,
        "tasksCompleted": 6,
        "tasksCached": 0,
        "tasksFailed": 0,
        "tasksRevoked": 0,
    }
    assert overview["counters"]["tasksCompleted"] == 6 and overview["partitions"] == 3

    async def each_partition() -> list[dict[str, int]]:
        async with await open_partitions(three) as partitions:
            return [dict((await store.state()).counters) for store in partitions]

    # Each partition counted its own group, and the totals are their sums.
    per_partition = asyncio.run(each_partition())
    assert [c["tasksSubmitted"] for c in per_partition] == [1, 2, 3]
    assert [c["groupsFinished"] for c in per_partition] == [1, 1, 1]
    for at in ("0", "1", "2"):
        # GroupSubmitted, a TaskCompleted per task, GroupFinished.
        assert value(seen, "sumbatch_stream_length", partition=at, stream="events") == int(at) + 3
        assert value(seen, "sumbatch_work_pending", partition=at) == 0
        assert value(seen, "sumbatch_projector_lag_events", partition=at) == 0
    assert sorted(w["partition"] for w in overview["workers"]) == [0, 1, 2]
    run = histogram(seen, "sumbatch_task_run_seconds", outcome="completed")
    assert run["count"] == 6
    assert histogram(seen, "sumbatch_group_seconds")["count"] == 3


# -- what /metrics holds, and request latency ----------------------------------------


def test_metrics_exposes_every_family_it_names(settings: Settings) -> None:
    with TestClient(create_app(settings)) as client:
        client.get("/healthz")
        names = {family.name for family in scrape(client)}
    # prometheus-client adds when each latency series was created, as a gauge of its own.
    assert names == {*metrics.NAMES, CREATED}
    # Histograms keep the bounds the scripts count in.
    assert all(math.isfinite(b) and b > 0 for h in stats.HISTOGRAMS for b in h.bounds)


def test_request_latency_is_kept_by_route_template(settings: Settings) -> None:
    with TestClient(create_app(settings)) as client:
        created = post_group(client, [(1, 2)])
        gid, (tid,) = created["groupTaskId"], created["taskIds"]
        work(settings)
        project(settings)
        for _ in range(2):
            assert client.get(f"/grouptasks/{gid}").status_code == 200
        assert client.get(f"/grouptasks/{gid[:-1]}f").status_code == 404
        assert client.get("/no/such/route").status_code == 404
        # A long-poll and an event stream: their time is the client's wait.
        assert client.get(f"/tasks/{tid}", params={"wait": "1"}).status_code == 200
        with client.stream("GET", f"/grouptasks/{gid}/events") as stream:
            assert stream.headers["content-type"].startswith("text/event-stream")
            assert "GroupFinished" in "".join(stream.iter_text())
        seen = scrape(client)
    count = metrics.HTTP_LATENCY + "_count"
    group = "/grouptasks/{group_task_id}"
    assert value(seen, count, route="/grouptasks", method="POST", status="200") == 1
    assert value(seen, count, route=group, method="GET", status="200") == 2
    assert value(seen, count, route=group, method="GET", status="404") == 1
    assert value(seen, count, route="unmatched", method="GET", status="404") == 1
    routes = {s.labels["route"] for s in samples(seen, count)}
    assert routes == {"/grouptasks", group, "unmatched"}


def test_metrics_says_when_redis_is_away(settings: Settings, tmp_path: Path) -> None:
    with own_server(tmp_path) as server:
        settings = replace(settings, redis_url=server.url)
        with TestClient(create_app(settings)) as client:
            assert value(scrape(client), "sumbatch_redis_up") == 1
            server.stop()
            seen = scrape(client)
            assert value(seen, "sumbatch_redis_up") == 0
            assert {f.name for f in seen} == {"sumbatch_redis_up", metrics.HTTP_LATENCY, CREATED}
            assert client.get("/system").status_code == 503
