"""Bearer token on the writing endpoints, Redis ACL users, and TLS to Redis."""

from __future__ import annotations

import asyncio
import ssl
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, cast
from urllib.parse import quote, urlsplit

import httpx2 as httpx
import msgspec
import pytest
import redis
from starlette.testclient import TestClient

from consumers.projector import Projector
from consumers.worker import Worker
from sumbatch.config import Settings
from sumbatch.model import ids
from sumbatch.model.events import GroupFinished, GroupSubmitted, TaskCompleted, from_fields
from sumbatch.model.keys import Keys
from sumbatch.processes.embedded import find_server
from sumbatch.store.partitions import open_partitions
from sumbatch.web.api import create_app
from tests.support import (
    appended,
    entries,
    free_port,
    own_server,
    self_signed,
    with_credentials,
)

TOKEN = "s3cret"
TASKS = {"tasks": [{"paramA": 1, "paramB": 2}, {"paramA": 3, "paramB": 4}]}


# -- (a) bearer token -----------------------------------------------------------


@pytest.fixture
def guarded(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(msgspec.structs.replace(settings, api_token=TOKEN))) as client:
        yield client


WRONG = [
    None,
    f"Bearer {TOKEN}x",
    "Bearer s3cre",
    "Bearer ",
    "Bearer",
    f"Basic {TOKEN}",
    TOKEN,
    f"Token {TOKEN}",
]


def auth(value: str | None) -> dict[str, str]:
    return {} if value is None else {"authorization": value}


def assert_401(response: httpx.Response) -> None:
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {"error": "missing or wrong bearer token", "status": 401}


@pytest.mark.parametrize("header", WRONG)
def test_post_without_the_right_token_is_401_and_appends_nothing(
    guarded: TestClient, raw: redis.Redis, settings: Settings, header: str | None
) -> None:
    assert_401(guarded.post("/grouptasks", json=TASKS, headers=auth(header)))
    assert appended(raw, settings) == (0, 0)


@pytest.mark.parametrize("header", WRONG)
def test_delete_without_the_right_token_is_401_and_appends_nothing(
    guarded: TestClient, raw: redis.Redis, settings: Settings, header: str | None
) -> None:
    created = guarded.post("/grouptasks", json=TASKS, headers=auth(f"Bearer {TOKEN}"))
    assert created.status_code == 200
    before = appended(raw, settings)
    assert_401(guarded.delete(f"/grouptasks/{created.json()['groupTaskId']}", headers=auth(header)))
    assert appended(raw, settings) == before
    group = guarded.get(f"/grouptasks/{created.json()['groupTaskId']}").json()
    assert group["grouptaskCancelled"] is False


def test_the_token_is_checked_before_the_body(
    guarded: TestClient, raw: redis.Redis, settings: Settings
) -> None:
    """No hint about the body's validity to a caller without the token."""
    response = guarded.post("/grouptasks", content=b"not json", headers={"content-type": "x/y"})
    assert_401(response)
    assert appended(raw, settings) == (0, 0)


@pytest.mark.parametrize("header", [f"Bearer {TOKEN}", f"bearer {TOKEN}", f"BEARER  {TOKEN} "])
def test_the_right_token_is_accepted(
    guarded: TestClient, raw: redis.Redis, settings: Settings, header: str
) -> None:
    created = guarded.post("/grouptasks", json=TASKS, headers=auth(header))
    assert created.status_code == 200
    assert appended(raw, settings) == (1, 2)
    gid = created.json()["groupTaskId"]
    cancelled = guarded.delete(f"/grouptasks/{gid}", headers=auth(header))
    assert cancelled.status_code == 202
    assert cancelled.json() == {"groupTaskId": gid, "grouptaskCancelled": True, "tasksRevoked": 2}


def test_reads_stay_open(guarded: TestClient) -> None:
    created = guarded.post("/grouptasks", json=TASKS, headers=auth(f"Bearer {TOKEN}")).json()
    for path in [
        f"/grouptasks/{created['groupTaskId']}",
        f"/tasks/{created['taskIds'][0]}",
        "/healthz",
        "/readyz",
        "/openapi.json",
    ]:
        response = guarded.get(path)
        assert response.status_code == 200, path
    assert guarded.get(f"/grouptasks/{uuid.uuid4()}").status_code == 404


def test_the_document_declares_the_bearer_scheme(guarded: TestClient) -> None:
    document = guarded.get("/openapi.json").json()
    assert document["components"]["securitySchemes"]["bearer"] == {
        "type": "http",
        "scheme": "bearer",
    }
    paths = document["paths"]
    assert paths["/grouptasks"]["post"]["security"] == [{"bearer": []}]
    assert paths["/grouptasks/{groupTaskId}"]["delete"]["security"] == [{"bearer": []}]
    assert "security" not in paths["/grouptasks/{groupTaskId}"]["get"]


def test_without_a_token_configured_writes_are_open(settings: Settings, raw: redis.Redis) -> None:
    with TestClient(create_app(settings)) as client:
        assert client.post("/grouptasks", json=TASKS).status_code == 200
    assert appended(raw, settings) == (1, 2)


# -- the whole flow, for (b) and (c) --------------------------------------------


def run_flow(settings: Settings) -> tuple[dict[str, Any], str]:
    """POST over the API, a worker and the projector, GET the group; returns the
    group and the user the worker's connection is authenticated as."""
    with TestClient(create_app(settings)) as client:
        created = client.post("/grouptasks", json=TASKS)
        assert created.status_code == 200, created.text
        whoami: list[str] = []

        async def work_and_project() -> None:
            async with await open_partitions(settings) as partitions:
                whoami.append(str(await partitions.redis.acl_whoami()))
                for store in partitions:
                    await Worker(settings, store).run_until_idle()
                    await Projector(store).run_until_idle()

        asyncio.run(work_and_project())
        group = client.get(f"/grouptasks/{created.json()['groupTaskId']}")
        assert group.status_code == 200
        body: dict[str, Any] = group.json()
        return body, whoami[0]


def assert_processed(group: dict[str, Any]) -> None:
    assert group["grouptaskProcessed"] is True
    assert group["grouptaskSucceeded"] is True
    assert group["results"] == [3, 7]


# -- (b) ACL --------------------------------------------------------------------


@pytest.fixture
def acl_user(redis_url: str, settings: Settings) -> Iterator[tuple[str, str, redis.Redis]]:
    """A unique ACL user, deleted at the end; yields (name, password, admin client)."""
    admin = redis.Redis.from_url(redis_url, decode_responses=True)
    name = f"sumbatch-test-{uuid.uuid4().hex[:8]}"
    password = uuid.uuid4().hex
    try:
        yield name, password, admin
    finally:
        admin.acl_deluser(name)
        admin.close()


def create_user(admin: redis.Redis, name: str, password: str, key_pattern: str) -> None:
    """ACL SETUSER <name> on ><password> ~<key_pattern> &* +@all"""
    created = admin.acl_setuser(
        name,
        enabled=True,
        passwords=[f"+{password}"],
        keys=[key_pattern],
        channels=["*"],
        categories=["+@all"],
    )
    assert created is True
    rules = cast(dict[str, Any], admin.acl_getuser(name))
    assert (rules["enabled"], rules["keys"]) == (True, [f"~{key_pattern}"])
    assert (rules["channels"], rules["categories"]) == (["&*"], ["+@all"])


@pytest.mark.parametrize(
    ("keys", "partitions"),
    [("*", 1), ("namespace", 1), ("namespace", 3)],
    ids=["all-keys", "namespace-keys-only", "namespace-keys-only-3-partitions"],
)
def test_the_flow_runs_as_an_acl_user(
    acl_user: tuple[str, str, redis.Redis],
    redis_url: str,
    settings: Settings,
    keys: str,
    partitions: int,
) -> None:
    """With the key pattern the docs give for the namespace (Keys.pattern)."""
    name, password, admin = acl_user
    pattern = keys if keys == "*" else Keys(settings.namespace, 0, partitions).pattern
    create_user(admin, name, password, pattern)
    as_user = msgspec.structs.replace(
        settings, redis_url=with_credentials(redis_url, name, password), partitions=partitions
    )
    group, whoami = run_flow(as_user)
    assert whoami == name
    assert_processed(group)


def test_a_wrong_password_makes_the_api_answer_503(
    acl_user: tuple[str, str, redis.Redis], redis_url: str, settings: Settings, raw: redis.Redis
) -> None:
    name, password, admin = acl_user
    create_user(admin, name, password, "*")
    wrong = msgspec.structs.replace(
        settings, redis_url=with_credentials(redis_url, name, password + "x")
    )
    with TestClient(create_app(wrong)) as client:
        for response in [
            client.post("/grouptasks", json=TASKS),
            client.get(f"/grouptasks/{ids.new_group_id()}"),
            client.delete(f"/grouptasks/{ids.new_group_id()}"),
            client.get("/readyz"),
        ]:
            assert response.status_code == 503, response.text
            assert response.headers["retry-after"] == "1"
            assert response.json() == {"error": "storage unavailable, retry later", "status": 503}
        assert client.get("/healthz").status_code == 200
    assert appended(raw, settings) == (0, 0)


# -- (c) TLS --------------------------------------------------------------------


@contextmanager
def tls_server(tmp_path: Path, cert: Path, key: Path) -> Iterator[int]:
    """A server with a TLS port beside its plain one, for the time of the ``with``:
    its TLS port; or a skip that says why the binary cannot do it."""
    binary = find_server()
    tls_port = free_port()
    tls = (
        "--tls-port", str(tls_port),
        "--tls-cert-file", str(cert),
        "--tls-key-file", str(key),
        "--tls-ca-cert-file", str(cert),
        "--tls-auth-clients", "no",
    )  # fmt: skip
    with ExitStack() as stack:
        try:  # only the start: what fails inside the ``with`` is no reason to skip
            stack.enter_context(own_server(tmp_path / "tls-data", binary=binary, extra_args=tls))
        except (RuntimeError, TimeoutError) as exc:
            log = tmp_path / "tls-data" / "server.log"
            said = log.read_text(errors="replace").strip().splitlines() if log.exists() else []
            why = [line.split(" # ", 1)[-1] for line in said if " # " in line]
            pytest.skip(f"{binary} cannot serve TLS: {'; '.join(why[-2:]) or exc}")
        yield tls_port


def assert_the_log_holds_the_flow(
    client: redis.Redis, settings: Settings, group: dict[str, Any]
) -> None:
    """The event log on ``client`` holds exactly what the flow writes: the group's
    submission, one outcome per task (each with its result), its end, and nothing else
    but progress notes (TaskStarted, at most one per task: it ran once). Derived from
    the events present, so it holds whether or not a worker logs TaskStarted."""
    key = Keys(settings.namespace).events
    events = [from_fields(fields) for _, fields in entries(client, key)]
    gid = group["groupTaskId"]
    assert {e.group_task_id for e in events} == {gid}
    kinds = Counter(type(e).__name__ for e in events)
    started = kinds.pop("TaskStarted", 0)
    tasks = len(TASKS["tasks"])
    assert kinds == {"GroupSubmitted": 1, "TaskCompleted": tasks, "GroupFinished": 1}, kinds
    assert started <= tasks
    assert isinstance(events[0], GroupSubmitted) and isinstance(events[-1], GroupFinished)
    sums = [t["paramA"] + t["paramB"] for t in TASKS["tasks"]]
    completed = sorted((e.index, e.result) for e in events if isinstance(e, TaskCompleted))
    assert completed == list(enumerate(sums)), completed
    assert client.xlen(key) == 1 + started + tasks + 1


def test_the_flow_runs_over_tls(tmp_path: Path, settings: Settings) -> None:
    cert, key = self_signed(tmp_path)
    with tls_server(tmp_path, cert, key) as tls_port:
        url = f"rediss://127.0.0.1:{tls_port}/0?ssl_ca_certs={quote(str(cert))}"
        over_tls = msgspec.structs.replace(settings, redis_url=url)
        group, _ = run_flow(over_tls)
        assert_processed(group)
        # The port really speaks TLS only: a plain client cannot talk to it.
        plain = redis.Redis(port=tls_port, socket_connect_timeout=2, socket_timeout=2)
        with pytest.raises((redis.ConnectionError, redis.TimeoutError)):
            plain.ping()
        plain.close()
        # And the data went to that server, not to the session one.
        secure = redis.Redis.from_url(url, decode_responses=True)
        try:
            assert_the_log_holds_the_flow(secure, settings, group)
        finally:
            secure.close()
        session = redis.Redis.from_url(settings.redis_url or "")
        try:
            assert session.exists(Keys(settings.namespace).events) == 0
        finally:
            session.close()


class TlsProxy:
    """Terminates TLS on a free port and forwards the bytes to a plain server: the
    client side of rediss:// (sumbatch's connections, the CA in the URL) gets tested
    even with a server binary built without TLS."""

    def __init__(self, upstream: str, cert: Path, key: Path) -> None:
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 6379)
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(cert, key)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.handlers: set[asyncio.Task[None]] = set()
        self.connections = 0
        self.port = 0

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.handlers.add(task)
        self.connections += 1
        up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        try:
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            up_writer.close()
            writer.close()
            self.handlers.discard(task)

    async def _start(self) -> asyncio.Server:
        server = await asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=self.context)
        self.port = server.sockets[0].getsockname()[1]
        return server

    async def _stop(self, server: asyncio.Server) -> None:
        server.close()
        for task in list(self.handlers):
            task.cancel()
        await asyncio.gather(*self.handlers, return_exceptions=True)
        await server.wait_closed()

    def __enter__(self) -> TlsProxy:
        self.thread.start()
        self.server = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(self.server), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def test_the_flow_runs_over_tls_through_a_terminating_proxy(
    tmp_path: Path, redis_url: str, settings: Settings
) -> None:
    cert, key = self_signed(tmp_path)
    with TlsProxy(redis_url, cert, key) as proxy:
        url = f"rediss://127.0.0.1:{proxy.port}/0?ssl_ca_certs={quote(str(cert))}"
        group, _ = run_flow(msgspec.structs.replace(settings, redis_url=url))
        assert_processed(group)
        assert proxy.connections >= 2  # the API's, and the worker's and projector's
        # What went through the proxy is the whole flow, in the server behind it.
        behind = redis.Redis.from_url(redis_url, decode_responses=True)
        try:
            assert_the_log_holds_the_flow(behind, settings, group)
        finally:
            behind.close()
        # Without the CA the certificate is refused: the URL's CA is what is used.
        untrusting = redis.Redis.from_url(f"rediss://127.0.0.1:{proxy.port}/0")
        with pytest.raises(redis.ConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
            untrusting.ping()
        untrusting.close()
