"""Durable mode (SUMBATCH_DURABLE): at start the API checks what the server can
promise, and refuses to start, naming the setting, when it can't; a POST answered
503 ("not confirmed on disk") and retried with the same Idempotency-Key gets the
first answer once the write is confirmed. Each test runs its own server, and its
expectations follow what that server is (with WAITAOF, or before Redis 7.2)."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
import redis
from starlette.testclient import TestClient

from sumbatch.config import Settings
from sumbatch.model.keys import Keys
from sumbatch.model.submission import Submission
from sumbatch.model.tasks import Delay
from sumbatch.model.views import GroupView
from sumbatch.model.wire import TaskIn
from sumbatch.processes.embedded import EmbeddedServer
from sumbatch.store import NotDurable, Store, _durable_mode, open_store
from sumbatch.web.api import create_app
from tests.support import (
    entries,
    env_for,
    free_port,
    fresh_namespace,
    has_waitaof,
    own_server,
    run_sumbatch,
    with_credentials,
)

BODY = {"tasks": [{"paramA": 1, "paramB": 2}]}


@pytest.fixture
def server(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[EmbeddedServer]:
    fsync = getattr(request, "param", "everysec")
    with own_server(tmp_path / "data", appendfsync=fsync) as own:
        yield own


def durable_settings(url: str) -> Settings:
    return Settings(redis_url=url, namespace=fresh_namespace("d"), delay=Delay(0, 0), durable=True)


def api_start(settings: Settings, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """``sumbatch api`` in durable mode, for as long as it takes to refuse; a test
    that expects it to start uses a TestClient instead."""
    env = env_for(settings)
    env["SUMBATCH_DURABLE"] = "true"
    return run_sumbatch("api", "--port", str(free_port()), env=env)


def assert_refused(done: subprocess.CompletedProcess[str], refusal: str) -> None:
    """The API refused to start as it should: exit status 2 (a configuration it cannot
    serve), a ``sumbatch: `` line saying ``refusal``, and no traceback."""
    assert done.returncode == 2, (done.returncode, done.stderr)
    said = [line for line in done.stderr.splitlines() if line.startswith("sumbatch: ")]
    assert any(refusal in line for line in said), done.stderr
    assert "Traceback" not in done.stderr, done.stderr


def served_with_waitaof_else_refused(
    server: EmbeddedServer, settings: Settings, tmp_path: Path, refusal: str
) -> None:
    """With WAITAOF a durable POST is confirmed (200); without it the API refuses to
    start, saying ``refusal``."""
    if has_waitaof(server.url):
        with TestClient(create_app(settings)) as client:
            assert client.post("/grouptasks", json=BODY).status_code == 200
    else:
        assert_refused(api_start(settings, tmp_path), refusal)


@pytest.mark.parametrize("server", ["no"], indirect=True)
def test_a_server_that_never_fsyncs_is_refused_at_start(
    server: EmbeddedServer, tmp_path: Path
) -> None:
    assert_refused(api_start(durable_settings(server.url), tmp_path), "appendfsync is no")


def test_a_server_without_aof_is_refused_at_start(server: EmbeddedServer, tmp_path: Path) -> None:
    admin = redis.Redis.from_url(server.url)
    admin.config_set("appendonly", "no")
    admin.close()
    assert_refused(api_start(durable_settings(server.url), tmp_path), "appendonly yes")


def test_this_server_in_its_default_fsync_is_used_or_refused_by_what_it_can_promise(
    server: EmbeddedServer, tmp_path: Path
) -> None:
    """appendfsync everysec: with WAITAOF every POST waits for its fsync (200);
    without (Redis before 7.2, such as Debian's 7.0) the API refuses to start and
    says to set appendfsync always."""
    settings = durable_settings(server.url)
    served_with_waitaof_else_refused(server, settings, tmp_path, "set appendfsync always")


@pytest.mark.parametrize("server", ["always"], indirect=True)
def test_appendfsync_always_is_durable_on_any_server(server: EmbeddedServer) -> None:
    with TestClient(create_app(durable_settings(server.url))) as client:
        answer = client.post("/grouptasks", json=BODY)
        assert answer.status_code == 200, answer.text
        gid = answer.json()["groupTaskId"]
        assert client.get(f"/grouptasks/{gid}").status_code == 200


def test_without_config_access_waitaof_alone_decides(
    server: EmbeddedServer, tmp_path: Path
) -> None:
    """A managed Redis often forbids CONFIG. With WAITAOF durable mode needs no
    CONFIG; without it, appendfsync cannot be checked, and the API refuses to start."""
    admin = redis.Redis.from_url(server.url)
    admin.acl_setuser(
        "app", enabled=True, passwords=["+pw"], keys=["*"], channels=["*"],
        commands=["+@all", "-config"],
    )  # fmt: skip
    admin.close()
    settings = durable_settings(with_credentials(server.url, "app", "pw"))
    served_with_waitaof_else_refused(server, settings, tmp_path, "CONFIG is not allowed")


def test_a_503_retried_with_the_same_key_gets_the_first_answer_once_confirmed(
    server: EmbeddedServer,
) -> None:
    """The server stops fsyncing after the API started (appendfsync no): WAITAOF
    confirms nothing, so the POST is a 503, and so is its retry. Once the server
    fsyncs again, the same retry gets the group created by the first POST: 200 with
    Idempotent-Replayed, and one group in the log."""
    if not has_waitaof(server.url):
        pytest.skip("needs WAITAOF (Redis 7.2+ or Valkey): without it durable mode runs "
                    "on appendfsync always, which a running server is not asked again")  # fmt: skip
    settings = durable_settings(server.url)
    admin = redis.Redis.from_url(server.url, decode_responses=True)
    headers = {"idempotency-key": "order-77"}
    with TestClient(create_app(settings)) as client:
        admin.config_set("appendfsync", "no")
        first = client.post("/grouptasks", json=BODY, headers=headers)
        again = client.post("/grouptasks", json=BODY, headers=headers)
        admin.config_set("appendfsync", "everysec")
        confirmed = client.post("/grouptasks", json=BODY, headers=headers)
    keys = Keys(settings.namespace)
    submitted = [f for _, f in entries(admin, keys.events) if f["type"] == "GroupSubmitted"]
    admin.close()
    for refused in (first, again):
        assert (refused.status_code, refused.headers["retry-after"]) == (503, "1")
        assert "not confirmed on disk" in refused.json()["error"]
        # The group is named, so the client can look it up or retry for it.
        gid = refused.json()["groupTaskId"]
        assert refused.headers["location"] == f"/grouptasks/{gid}"
    assert first.json()["groupTaskId"] == again.json()["groupTaskId"]
    assert confirmed.status_code == 200, confirmed.text
    assert confirmed.headers["idempotent-replayed"] == "true"
    assert [f["groupTaskId"] for f in submitted] == [confirmed.json()["groupTaskId"]]


@pytest.mark.parametrize(
    ("waitaof", "aof_off", "config", "answer"),
    [
        (True, False, {"appendonly": "yes", "appendfsync": "everysec"}, "waitaof"),
        (True, False, {"appendonly": "yes", "appendfsync": "always"}, "waitaof"),
        (True, False, None, "waitaof"),
        (False, False, {"appendonly": "yes", "appendfsync": "always"}, "always"),
        (False, False, {"appendonly": "yes", "appendfsync": "everysec"}, "set appendfsync always"),
        (True, False, {"appendonly": "yes", "appendfsync": "no"}, "appendfsync is no"),
        (False, False, {"appendonly": "no", "appendfsync": "always"}, "appendonly yes"),
        (True, True, None, "appendonly yes"),
        (False, False, None, "CONFIG is not allowed"),
    ],
)
def test_what_durable_mode_relies_on(
    waitaof: bool, aof_off: bool, config: dict[str, str] | None, answer: str
) -> None:
    if answer in ("waitaof", "always"):
        assert _durable_mode(waitaof, aof_off, config) == answer
    else:
        with pytest.raises(NotDurable, match=answer):
            _durable_mode(waitaof, aof_off, config)


def test_settings_can_say_durable() -> None:
    assert Settings.from_env({"SUMBATCH_DURABLE": "true"}).durable is True
    assert msgspec.structs.replace(Settings(), durable=True).durable


def test_a_submission_sent_again_on_a_new_connection_waits_for_the_first_ones_fsync(
    server: EmbeddedServer,
) -> None:
    """A client library resends a pipeline on a fresh connection when the first one
    dropped before its answer. The resent SUBMIT finds the group already written and
    writes nothing, so a WAITAOF after it once had nothing to wait for and confirmed
    at once, though the first write might not be on disk yet. The script now makes a
    write that changes nothing, so the WAITAOF covers the first write too. Shown with
    a server that never fsyncs: nothing may be confirmed."""
    if not has_waitaof(server.url):
        pytest.skip("needs WAITAOF (Redis 7.2+ or Valkey)")
    settings = durable_settings(server.url)
    submission = Submission.of([TaskIn(param_a=1, param_b=2)])
    group = GroupView.submitted(submission.created.group_task_id, 1)
    admin = redis.Redis.from_url(server.url)

    async def send(store: Store) -> bool | None:
        written = await store.submit(submission.event, group, None, fsync_timeout_ms=300)
        return written.fsynced

    async def scenario() -> list[bool | None]:
        answers = []
        for _ in range(2):  # the first send, then the resend on its own new connection
            async with open_store(settings) as store:
                answers.append(await send(store))
        return answers

    admin.config_set("appendfsync", "no")
    try:
        assert asyncio.run(scenario()) == [False, False]
    finally:
        admin.config_set("appendfsync", "everysec")
        admin.close()
