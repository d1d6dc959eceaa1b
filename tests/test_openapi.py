"""The OpenAPI document against the app: every route it serves is described, method by
method; the document is valid OpenAPI 3.1; what it restates (version, limits) comes
from where those values live; and what the real app answers (with Redis up, and with
Redis unreachable) is what the document says it answers."""

from __future__ import annotations

import functools
import importlib.metadata
import re
import tomllib
from collections.abc import Iterator
from typing import Any

import jsonschema_rs
import msgspec
import pytest
import redis
import schemathesis
from starlette.routing import Mount, Route
from starlette.testclient import TestClient

import sumbatch.web.api
import sumbatch.web.openapi
import sumbatch.web.openapi_parts
from sumbatch.config import Settings
from sumbatch.model import ids
from sumbatch.model.keys import Keys
from sumbatch.web.api import create_app
from sumbatch.web.openapi import openapi_schema, package_version
from tests.support import ROOT, free_port

# Starlette answers HEAD on every GET route, as GET without the body (RFC 9110
# §9.3.2); describing it would repeat every GET operation.
IMPLIED = {"HEAD"}
TOKEN = "s3cret"


def served_operations(routes: list[Any], prefix: str = "") -> set[tuple[str, str]]:
    """(path with parameters as {}, method) for every operation the routes serve."""
    served = set()
    for route in routes:
        if isinstance(route, Route):
            path = re.sub(r"\{[^}]*\}", "{}", prefix + route.path)
            served |= {(path, method) for method in route.methods or () if method not in IMPLIED}
        elif isinstance(route, Mount) and route.routes:
            served |= served_operations(route.routes, prefix + route.path)
        elif isinstance(route, Mount):
            # An app of its own (static files, say): GET of any path below it.
            served.add((prefix + route.path + "/{}", "GET"))
        else:
            raise AssertionError(f"{route!r}: a route of a kind this test cannot read yet")
    return served


def documented_operations(document: dict[str, Any]) -> set[tuple[str, str]]:
    methods = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}
    return {
        (re.sub(r"\{[^}]*\}", "{}", path), method.upper())
        for path, item in document["paths"].items()
        for method in item
        if method in methods
    }


@pytest.mark.parametrize("token", ["", TOKEN])
def test_every_route_the_app_serves_is_documented_with_each_method(token: str) -> None:
    settings = Settings(api_token=token)
    served = served_operations(create_app(settings).routes)
    documented = documented_operations(openapi_schema(settings))
    assert served, "the app serves no routes?"
    assert served - documented == set(), "served but not documented"
    assert documented - served == set(), "documented but not served"


def test_every_path_parameter_is_declared() -> None:
    for path, item in openapi_schema(Settings(api_token=TOKEN))["paths"].items():
        names = set(re.findall(r"\{([^}]*)\}", path))
        for method, operation in item.items():
            if method == "parameters":
                continue
            declared = {
                p["name"]
                for p in item.get("parameters", []) + operation.get("parameters", [])
                if p["in"] == "path"
            }
            assert declared == names, f"{method.upper()} {path}"


def oas31_errors(document: dict[str, Any]) -> list[str]:
    """What the official OpenAPI 3.1 schema (as schemathesis ships it) and the JSON
    Schema 2020-12 meta-schema (for each component) find wrong with ``document``."""
    found = []
    try:
        schemathesis.openapi.from_dict(document).validate()
    except jsonschema_rs.ValidationError as exc:
        found.append(str(exc))
    for name, schema in document.get("components", {}).get("schemas", {}).items():
        try:
            jsonschema_rs.meta.validate(schema)
        except jsonschema_rs.ValidationError as exc:
            found.append(f"{name}: {exc}")
    return found


@pytest.mark.parametrize("token", ["", TOKEN])
def test_the_document_is_valid_openapi_3_1(token: str) -> None:
    assert oas31_errors(openapi_schema(Settings(api_token=token))) == []


def test_the_validator_used_above_rejects_a_broken_document() -> None:
    def broken() -> dict[str, Any]:
        copy: dict[str, Any] = msgspec.json.decode(msgspec.json.encode(openapi_schema(Settings())))
        return copy

    without_version = broken()
    del without_version["info"]["version"]
    assert oas31_errors(without_version)
    bad_response = broken()
    bad_response["paths"]["/healthz"]["get"]["responses"]["200"] = {"content": 7}
    assert oas31_errors(bad_response)
    bad_component = broken()
    bad_component["components"]["schemas"]["Health"]["type"] = "no-such-type"
    assert oas31_errors(bad_component)


def test_the_version_is_the_packages() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert openapi_schema(Settings())["info"]["version"] == project["version"]
    assert package_version() == importlib.metadata.version("sumbatch")


def test_the_version_without_package_metadata(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert package_version() == project["version"]
    monkeypatch.setattr(sumbatch.web.openapi, "_PYPROJECT", ROOT / "no-such-pyproject.toml")
    assert package_version() == "0+unknown"


def test_limits_come_from_the_api_and_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    # The API and its document read the one limit the wire model sets.
    monkeypatch.setattr(sumbatch.web.openapi_parts, "MAX_IDEMPOTENCY_KEY", 17)
    document = openapi_schema(Settings(max_tasks_per_group=3, max_body_bytes=999))
    post = document["paths"]["/grouptasks"]["post"]
    (key,) = [p for p in post["parameters"] if p["name"] == "Idempotency-Key"]
    assert key["schema"] == {"type": "string", "minLength": 1, "maxLength": 17}
    assert "17 characters" in post["responses"]["400"]["description"]
    assert "999 bytes" in post["responses"]["413"]["description"]
    assert document["components"]["schemas"]["GroupIn"]["properties"]["tasks"]["maxItems"] == 3


# -- the document against the real app's answers -------------------------------------


def requests(
    document: dict[str, Any], gid: str | None = None
) -> Iterator[tuple[str, str, str, dict[str, Any]]]:
    """(method, documented path, URL, request options): one valid request for every
    documented operation, in the document's order, about group ``gid`` (default: an
    id of the right shape that names no group)."""
    gid = gid or ids.new_group_id()
    values = {"groupTaskId": gid, "taskId": ids.task_ids(gid, 1)[0]}
    for path, item in document["paths"].items():
        # Other path parameters (an asset's name) have their example in the document.
        known = values | {
            p["name"]: p["example"] for p in item.get("parameters", []) if "example" in p
        }
        url = re.sub(r"\{([^}]*)\}", functools.partial(_fill, known), path)
        for method in item:
            if method == "parameters":
                continue
            # A redirect is an answer of its own, documented as such.
            options: dict[str, Any] = {"follow_redirects": False}
            if "requestBody" in item[method]:
                options["json"] = {"tasks": [{"paramA": 1, "paramB": 2}]}
            yield method.upper(), path, url, options


def _fill(known: dict[str, str], match: re.Match[str]) -> str:
    return known[match.group(1)]


def streams(document: dict[str, Any], method: str, path: str) -> bool:
    """Whether the operation's 200 is an event stream (it may never end)."""
    ok = document["paths"][path][method.lower()]["responses"].get("200", {})
    return "text/event-stream" in ok.get("content", {})


def operations(document: dict[str, Any]) -> set[tuple[str, str]]:
    return {
        (method.upper(), path)
        for path, item in document["paths"].items()
        for method in item
        if method != "parameters"
    }


def assert_documented(
    document: dict[str, Any], method: str, path: str, status: int, headers: Any, body: bytes
) -> None:
    """The answer is one the document lists for this operation: its status, its
    required headers, its content type, a body valid against its schema."""
    responses = document["paths"][path][method.lower()]["responses"]
    where = f"{method} {path} answered {status}"
    assert str(status) in responses, f"{where}, which is not documented: {body!r}"
    answer = responses[str(status)]
    for name, header in answer.get("headers", {}).items():
        if header.get("required"):
            assert name.lower() in headers, f"{where} without {name}"
    if "content" not in answer:
        assert body == b"", f"{where} with a body it does not document"
        return
    ((media, content),) = answer["content"].items()
    if media == "*/*":
        return
    assert headers["content-type"].split(";")[0] == media, where
    if media != "application/json":
        return
    schema = {**content["schema"], "components": document["components"]}
    validator = jsonschema_rs.validator_for(schema)
    errors = [str(e) for e in validator.iter_errors(msgspec.json.decode(body))]
    assert errors == [], f"{where}, body not as documented: {errors}"


@pytest.mark.parametrize("about", ["a real group", "no group"])
def test_every_operation_answers_as_documented(
    client: TestClient, settings: Settings, about: str
) -> None:
    document = openapi_schema(settings)
    gid = None
    if about == "a real group":
        gid = client.post("/grouptasks", json={"tasks": [{"paramA": 1, "paramB": 2}]}).json()[
            "groupTaskId"
        ]
    statuses = {}
    streamed = set()
    for method, path, url, options in requests(document, gid):
        # The test client waits for a whole body, and an event stream of a group that
        # goes on, or of the log, has none: tests/test_live.py reads those over HTTP.
        if streams(document, method, path) and (gid or "{" not in path):
            streamed.add((method, path))
            continue
        response = client.request(method, url, **options)
        assert_documented(
            document, method, path, response.status_code, response.headers, response.content
        )
        statuses[(method, path)] = response.status_code
    assert set(statuses) == operations(document) - streamed
    # The dashboard's group page is the page, for any id: it says itself what it finds.
    about_group = {
        k: v
        for k, v in statuses.items()
        if re.search(r"\{(groupTaskId|taskId)\}", k[1]) and not k[1].startswith("/dashboard/")
    }
    if gid:
        assert set(about_group.values()) <= {200, 202}, about_group
    else:
        assert set(about_group.values()) == {404}, about_group


def test_with_redis_unreachable_every_redis_route_answers_the_documented_503() -> None:
    """Nothing listens on the port: each operation that touches Redis answers 503
    with Retry-After, and exactly those document it; the others still answer."""
    settings = Settings(redis_url=f"redis://127.0.0.1:{free_port()}/0")
    document = openapi_schema(settings)
    unavailable: set[tuple[str, str]] = set()
    answered: set[tuple[str, str]] = set()
    with TestClient(create_app(settings)) as client:
        for method, path, url, options in requests(document):
            response = client.request(method, url, **options)
            assert_documented(
                document, method, path, response.status_code, response.headers, response.content
            )
            (unavailable if response.status_code == 503 else answered).add((method, path))
            if response.status_code == 503:
                assert int(response.headers["retry-after"]) >= 0
    documents_503 = {
        (method, path)
        for method, path in operations(document)
        if "503" in document["paths"][path][method.lower()]["responses"]
    }
    assert unavailable == documents_503
    # What needs no storage: health, this document, the pages with their assets, and
    # the metrics (which then say sumbatch_redis_up 0).
    assert answered == {
        ("GET", "/metrics"),
        ("GET", "/healthz"),
        ("GET", "/openapi.json"),
        ("GET", "/docs"),
        ("GET", "/docs/static/{path}"),
        ("GET", "/"),
        ("GET", "/dashboard"),
        ("GET", "/dashboard/groups/{groupTaskId}"),
        ("GET", "/dashboard/static/{path}"),
    }
    for method, path in documents_503:
        retry_after = document["paths"][path][method.lower()]["responses"]["503"]["headers"]
        assert retry_after["Retry-After"]["required"] is True, (method, path)


def test_readyz_answers_the_documented_503_before_the_workers_group_exists(
    client: TestClient, settings: Settings
) -> None:
    document = openapi_schema(settings)
    raw = redis.Redis.from_url(settings.client_url)
    try:
        # The app made the group at start; without it, not ready.
        raw.delete(Keys(settings.namespace).work)
    finally:
        raw.close()
    response = client.get("/readyz")
    assert response.status_code == 503
    assert_documented(document, "GET", "/readyz", 503, response.headers, response.content)
