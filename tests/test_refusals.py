"""A server that answers but refuses (out of memory, read-only, master down, not
enough replicas, busy with a script, loading its data), and one that hangs: each a
real server made to do it. The API answers 503 with Retry-After and a JSON error that
names the refusal, changes nothing, and never holds a request much past its Redis
timeout. Each test runs its own server: never the session one."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx2 as httpx
import msgspec
import pytest
import redis
from redis.backoff import NoBackoff
from redis.exceptions import (
    BusyLoadingError,
    ClusterDownError,
    MasterDownError,
    OutOfMemoryError,
    ReadOnlyError,
    ResponseError,
    TryAgainError,
)
from redis.retry import Retry
from starlette.testclient import TestClient

from sumbatch.config import Settings
from sumbatch.model.keys import Keys
from sumbatch.model.tasks import Delay
from sumbatch.outage import is_transient, refusal
from sumbatch.processes.embedded import EmbeddedServer, find_server
from sumbatch.web.api import REDIS_TIMEOUT, create_app
from sumbatch.web.submit import SUBMIT_BUDGET
from tests.support import free_port, fresh_namespace, own_server, wait_until_sync

BODY = {"tasks": [{"paramA": 1, "paramB": 2}, {"paramA": 3, "paramB": 4}]}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedServer]:
    with own_server(tmp_path_factory.mktemp("refusing")) as own:
        yield own


@pytest.fixture
def admin(server: EmbeddedServer) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(server.url, decode_responses=True)
    yield client
    client.close()


@pytest.fixture
def app(server: EmbeddedServer) -> Iterator[tuple[TestClient, Keys]]:
    settings = Settings(redis_url=server.url, namespace=fresh_namespace("r"), delay=Delay(0, 0))
    with TestClient(create_app(settings)) as client:
        yield client, Keys(settings.namespace)


def written(admin: redis.Redis, keys: Keys) -> tuple[int, int, int]:
    """What the log, the work stream and the key space hold of this namespace."""
    return (
        admin.xlen(keys.events),
        admin.xlen(keys.work),
        len(list(admin.scan_iter(match=f"{keys.tag}:*"))),
    )


def assert_refused(answer: httpx.Response, word: str) -> None:
    assert answer.status_code == 503, answer.text
    assert answer.headers["retry-after"] == "1"
    assert answer.headers["content-type"] == "application/json"
    body = answer.json()
    assert body["status"] == 503 and word in body["error"], body


def refuses_writes(client: TestClient, admin: redis.Redis, keys: Keys, gid: str, word: str) -> None:
    """POST and DELETE are refused with ``word`` and write nothing."""
    before = written(admin, keys)
    assert_refused(client.post("/grouptasks", json=BODY), word)
    assert_refused(client.delete(f"/grouptasks/{gid}"), word)
    assert written(admin, keys) == before


def test_out_of_memory_is_503_and_writes_nothing(
    app: tuple[TestClient, Keys], admin: redis.Redis
) -> None:
    client, keys = app
    gid = client.post("/grouptasks", json=BODY).json()["groupTaskId"]
    admin.config_set("maxmemory", "1")
    try:
        refuses_writes(client, admin, keys, gid, "OOM")
        assert client.get(f"/grouptasks/{gid}").status_code == 200  # reads still work
    finally:
        admin.config_set("maxmemory", "0")
    assert client.delete(f"/grouptasks/{gid}").status_code == 202


def test_not_enough_replicas_is_503_and_writes_nothing(
    app: tuple[TestClient, Keys], admin: redis.Redis
) -> None:
    client, keys = app
    gid = client.post("/grouptasks", json=BODY).json()["groupTaskId"]
    admin.config_set("min-replicas-to-write", "1")
    try:
        refuses_writes(client, admin, keys, gid, "NOREPLICAS")
    finally:
        admin.config_set("min-replicas-to-write", "0")
    assert client.post("/grouptasks", json=BODY).status_code == 200


def test_a_read_only_replica_is_503_and_a_stale_one_that_will_not_serve_too(
    app: tuple[TestClient, Keys], admin: redis.Redis
) -> None:
    """REPLICAOF a master that is not there: writes are READONLY; with
    replica-serve-stale-data no, reads are MASTERDOWN."""
    client, keys = app
    gid = client.post("/grouptasks", json=BODY).json()["groupTaskId"]
    admin.replicaof("127.0.0.1", str(free_port()))
    try:
        refuses_writes(client, admin, keys, gid, "READONLY")
        assert client.get(f"/grouptasks/{gid}").status_code == 200  # stale reads served
        admin.config_set("replica-serve-stale-data", "no")
        assert_refused(client.get(f"/grouptasks/{gid}"), "MASTERDOWN")
        assert_refused(client.get(f"/tasks/{gid[:-1]}1"), "MASTERDOWN")
    finally:
        admin.config_set("replica-serve-stale-data", "yes")
        admin.replicaof("NO", "ONE")
    assert client.delete(f"/grouptasks/{gid}").status_code == 202


SPIN = """
local t0 = redis.call('TIME')
while true do
  local t = redis.call('TIME')
  if (t[1] - t0[1]) * 1000000 + (t[2] - t0[2]) > tonumber(ARGV[1]) then return 1 end
end
"""


def test_a_server_busy_with_a_long_script_is_503(
    app: tuple[TestClient, Keys], admin: redis.Redis, server: EmbeddedServer
) -> None:
    client, keys = app
    gid = client.post("/grouptasks", json=BODY).json()["groupTaskId"]
    admin.config_set("busy-reply-threshold", "100")
    spinner = redis.Redis.from_url(server.url, socket_timeout=30)
    errors: list[BaseException] = []

    def spin() -> None:
        try:
            spinner.eval(SPIN, 0, 20_000_000)  # 20 s, unless killed
        except ResponseError as exc:
            errors.append(exc)  # SCRIPT KILL ends it with an error: expected

    thread = threading.Thread(target=spin)
    thread.start()
    try:

        def busy() -> bool:
            try:
                admin.ping()
            except ResponseError as exc:
                return str(exc).startswith("BUSY")
            return False

        wait_until_sync(busy, timeout=10, what="the server to answer BUSY")
        refuses_writes_busy = client.post("/grouptasks", json=BODY)
        assert_refused(refuses_writes_busy, "BUSY")
        assert_refused(client.get(f"/grouptasks/{gid}"), "BUSY")
    finally:
        admin.script_kill()
        thread.join(30)
        spinner.close()
        admin.config_set("busy-reply-threshold", "5000")
    assert errors and not thread.is_alive()


def test_a_server_loading_its_data_is_503(tmp_path: Path) -> None:
    """A server that is still loading its dataset (slowed down with key-load-delay,
    and made to answer while it loads) answers LOADING to everything."""
    port = free_port()
    binary = find_server()
    base = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp_path),
            "--save", "", "--appendonly", "no", "--rdbcompression", "no"]  # fmt: skip
    seed = subprocess.Popen(base, stdout=subprocess.DEVNULL)
    # No retries: redis-py would retry LOADING (a ConnectionError) until loaded.
    client = redis.Redis(port=port, retry=Retry(NoBackoff(), 0))
    try:
        wait_until_sync(_answers(client), timeout=10, what="the seeding server")
        for i in range(100):
            client.set(f"k{i}", "x" * 3000)
        client.save()
        client.shutdown(nosave=True)
    except redis.ConnectionError:
        pass  # SHUTDOWN closes the connection
    seed.wait(10)
    loading = subprocess.Popen(
        [*base, "--key-load-delay", "50000", "--loading-process-events-interval-bytes", "1024"],
        stdout=subprocess.DEVNULL,
    )
    try:

        def says_loading() -> bool:
            try:
                client.get("k0")  # PING is served while loading; data commands are not
            except BusyLoadingError:
                return True
            except redis.ConnectionError:
                return False
            raise AssertionError("loaded before the test could see it loading")

        wait_until_sync(says_loading, timeout=10, what="the server to answer LOADING")
        settings = Settings(redis_url=f"redis://127.0.0.1:{port}/0", namespace="loading")
        with TestClient(create_app(settings)) as api:
            assert_refused(api.post("/grouptasks", json=BODY), "LOADING")
            assert_refused(api.get(f"/grouptasks/{uuid.uuid4().hex[:24]}00000000"), "LOADING")
            assert api.get("/readyz").status_code == 503
    finally:
        client.close()
        loading.kill()
        loading.wait(10)


def _answers(client: redis.Redis) -> Callable[[], bool]:
    def check() -> bool:
        try:
            return bool(client.ping())
        except redis.ConnectionError:
            return False

    return check


def test_a_hung_server_gets_a_503_within_about_the_redis_timeout(
    app: tuple[TestClient, Keys], server: EmbeddedServer
) -> None:
    """SIGSTOP: the server accepts connections and answers nothing. Every route that
    reads Redis answers 503 after about REDIS_TIMEOUT, not after the client's own
    patience; a POST whose submit was sent (on a connection made before the stop)
    resends it for SUBMIT_BUDGET, then answers 503 with its outcome unknown and a
    Location. With the server back, everything works again."""
    client, _ = app
    gid = client.post("/grouptasks", json=BODY).json()["groupTaskId"]
    calls: dict[str, Callable[[], httpx.Response]] = {
        "GET group": lambda: client.get(f"/grouptasks/{gid}"),
        "GET task": lambda: client.get(f"/tasks/{gid[:-1]}1"),
        "POST": lambda: client.post("/grouptasks", json=BODY),
        "DELETE": lambda: client.delete(f"/grouptasks/{gid}"),
        "readyz": lambda: client.get("/readyz"),
    }
    assert server.process is not None
    os.kill(server.process.pid, signal.SIGSTOP)
    took: dict[str, float] = {}
    try:
        for name, call in calls.items():
            started = time.monotonic()
            answer = call()
            took[name] = time.monotonic() - started
            assert answer.status_code == 503, (name, answer.text)
            assert answer.headers["retry-after"] == "1"
            if "groupTaskId" in answer.json():  # a POST whose submit was sent: unknown
                assert answer.headers["location"].endswith(answer.json()["groupTaskId"])
    finally:
        os.kill(server.process.pid, signal.SIGCONT)
    print(f"\nhung server, seconds to a 503: {msgspec.json.encode(took).decode()}")
    # Two timeouts per call (it is resent once), and at most a fresh connection's own
    # before them: 4x leaves room for a loaded machine, and is far below the 10-20 s
    # these took before. The POST resends its submit for SUBMIT_BUDGET, then says its
    # outcome is unknown.
    post = took.pop("POST")
    assert max(took.values()) < 4 * REDIS_TIMEOUT, took
    assert post < SUBMIT_BUDGET + 4 * REDIS_TIMEOUT, post
    assert client.get(f"/grouptasks/{gid}").status_code == 200


@pytest.mark.parametrize(
    ("exc", "word"),
    [
        (OutOfMemoryError("command not allowed", status_code="OOM"), "OOM"),
        (ReadOnlyError("You can't write", status_code="READONLY"), "READONLY"),
        (MasterDownError("Link with MASTER is down", status_code="MASTERDOWN"), "MASTERDOWN"),
        (TryAgainError("Multiple keys request", status_code="TRYAGAIN"), "TRYAGAIN"),
        (ClusterDownError("The cluster is down", status_code="CLUSTERDOWN"), "CLUSTERDOWN"),
        (BusyLoadingError("Redis is loading", status_code="LOADING"), "LOADING"),
        (ResponseError("BUSY Redis is busy running a script."), "BUSY"),
        (ResponseError("NOREPLICAS Not enough good replicas to write."), "NOREPLICAS"),
    ],
)
def test_refusals_are_classified_by_class_or_by_prefix(exc: Exception, word: str) -> None:
    """Cluster refusals (TRYAGAIN, CLUSTERDOWN) need a cluster to produce: their
    classification is checked here on redis-py's own exception classes."""
    assert refusal(exc) == word and is_transient(exc)


@pytest.mark.parametrize(
    "exc", [ResponseError("WRONGTYPE Operation against a key"), ResponseError("ERR syntax")]
)
def test_other_errors_are_not_transient(exc: Exception) -> None:
    assert refusal(exc) is None and not is_transient(exc)
