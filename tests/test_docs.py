"""/docs: the OpenAPI document rendered by Swagger UI from the package's own assets,
checked over HTTP and, where Debian's chromium is installed, in a real browser that is
refused every request to another host."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest
from starlette.testclient import TestClient

from sumbatch.config import Settings
from sumbatch.web.openapi import openapi_schema
from tests.support import Processes, answers_200, env_for, free_port, wait_until_sync
from tests.test_dashboard import chromium_path


def test_the_docs_page_is_served_with_every_asset_from_the_package(client: TestClient) -> None:
    page = client.get("/docs")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert not re.search(r"https?://", page.text), "the page names another host"
    referenced = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert "/docs/static/swagger-ui-bundle.js" in referenced
    for path in referenced:
        asset = client.get(path)
        assert asset.status_code == 200 and asset.content, path
    assert '"/openapi.json"' in page.text
    assert client.get("/docs/static/no-such-file.js").status_code == 404


@pytest.fixture
def api(procs: Processes, settings: Settings) -> Iterator[str]:
    port = free_port()
    procs.start(settings, "api", "--port", str(port), env=env_for(settings))
    base = f"http://127.0.0.1:{port}"
    wait_until_sync(lambda: answers_200(f"{base}/healthz"), timeout=30, what="the API")
    yield base


def test_swagger_ui_renders_every_operation_offline(api: str, settings: Settings) -> None:
    executable = chromium_path()
    if executable is None:
        pytest.skip("no chromium binary: apt-get install chromium, or set SUMBATCH_CHROMIUM")
    from playwright.sync_api import Route, sync_playwright

    refused: list[str] = []

    def only_ours(route: Route) -> None:
        if route.request.url.startswith(api):
            route.continue_()
        else:
            refused.append(route.request.url)
            route.abort()

    document: dict[str, Any] = openapi_schema(settings)
    operations = sum(
        1 for item in document["paths"].values() for method in item if method != "parameters"
    )
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, headless=True)
        try:
            page = browser.new_page()
            page.route("**/*", only_ours)
            page.goto(f"{api}/docs")
            page.wait_for_function(
                f"document.querySelectorAll('.opblock').length === {operations}", timeout=30_000
            )
            shown = page.locator(".opblock-summary-path").all_inner_texts()
        finally:
            browser.close()
    assert refused == []
    assert {text.replace("\u200b", "") for text in shown} == set(document["paths"])
