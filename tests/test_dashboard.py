"""The web dashboard: served from the package, and live in a real headless Chromium.

The browser tests drive Debian's chromium (``SUMBATCH_CHROMIUM``, else
/usr/bin/chromium or a ``chromium`` on PATH) with Playwright, against `sumbatch up`
run as a real process; they skip, saying so, where no browser is installed. Their
screenshots go to test-artifacts/; with SUMBATCH_SCREENSHOT_DOCS=1 the overview's also
becomes docs/dashboard.png, the README's picture.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import httpx2 as httpx
import pytest
import redis
from starlette.testclient import TestClient

from sumbatch.model import ids
from sumbatch.model.events import AnyEvent, GroupSubmitted, TaskFailed, to_fields
from sumbatch.model.keys import Keys
from sumbatch.web import dashboard
from tests.support import ROOT, answers_200, body_of, free_port, up_env, wait_until_sync

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page, Request, Route

ARTIFACTS = ROOT / "test-artifacts"
DOCS_SCREENSHOT = ROOT / "docs" / "dashboard.png"
PAGES = ("/dashboard", "/dashboard/groups/6f1d3c8e-5b7a-4c2d-9e31-a0b400000000")
TOKEN = "dashboard-test-token"
# What a page may wait for: each is a condition with this deadline, never a sleep.
WAIT_MS = 30_000


def chromium_path() -> str | None:
    """The browser the tests drive: SUMBATCH_CHROMIUM, else Debian's, else None."""
    named = os.environ.get("SUMBATCH_CHROMIUM")
    if named:
        # Named (as .ci/run does): its absence is a failure, not a reason to skip.
        assert Path(named).is_file(), f"SUMBATCH_CHROMIUM={named} names no file"
        return named
    candidates = ["/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser")]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return candidate
    return None


# -- what the pages reference: no browser needed ------------------------------------


class _Assets(HTMLParser):
    """The URLs a page loads by itself (scripts, stylesheets, icons, images), and
    every other URL it names (links)."""

    def __init__(self) -> None:
        super().__init__()
        self.assets: list[str] = []
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {name: value or "" for name, value in attrs}
        if tag == "script" and "src" in values:
            self.assets.append(values["src"])
        elif tag in ("img", "source", "iframe", "audio", "video") and "src" in values:
            self.assets.append(values["src"])
        elif tag == "link" and "href" in values:
            self.assets.append(values["href"])
        elif tag == "a" and "href" in values:
            self.links.append(values["href"])
        if tag == "script" and "src" not in values:
            raise AssertionError("an inline script: the page's CSP refuses it")


# The only URL any asset may spell out: SVG's namespace name, which is never fetched.
SVG_NAMESPACE = "http://www.w3.org/2000/svg"
URL = re.compile(r"(?:https?:)?//[\w.-]+\.\w+[^\s\"'`)]*")


def test_root_redirects_to_the_dashboard(client: TestClient) -> None:
    answer = client.get("/", follow_redirects=False)
    assert answer.status_code == 307
    assert answer.headers["location"] == "/dashboard"
    page = client.get("/")
    assert page.status_code == 200
    assert page.url.path == "/dashboard"
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    assert "<title>sumbatch dashboard</title>" in page.text


def test_every_asset_the_pages_reference_is_served_from_the_package(client: TestClient) -> None:
    served: set[str] = set()
    for path in PAGES:
        page = client.get(path)
        assert page.status_code == 200, path
        csp = page.headers["content-security-policy"]
        assert "default-src 'self'" in csp and "script-src 'self'" in csp
        found = _Assets()
        found.feed(page.text)
        assert found.assets, path
        for url in found.assets + found.links:
            # On this origin: a path, never a host (nor a scheme-relative //host).
            assert url.startswith("/") and not url.startswith("//"), (path, url)
        for url in found.assets:
            asset = client.get(url)
            assert asset.status_code == 200, url
            assert url.startswith("/dashboard/static/"), url
            packaged = dashboard.STATIC / url.removeprefix("/dashboard/static/")
            assert asset.content == packaged.read_bytes(), url
            served.add(packaged.name)
    # Nothing in the package names another host, HTML, JS, CSS or SVG: the dashboard
    # works offline (and the CSP would refuse it anyway).
    files = sorted(p for p in dashboard.STATIC.iterdir() if p.is_file())
    for file in files:
        text = file.read_text()
        assert URL.findall(text.replace(SVG_NAMESPACE, "")) == [], file.name
        for referenced in re.findall(r"/dashboard/static/([\w.-]+)", text):
            assert (dashboard.STATIC / referenced).is_file(), (file.name, referenced)
    # Every file of the package is used by a page.
    assert served == {f.name for f in files if f.suffix != ".html"}


def test_the_pages_refuse_what_is_not_theirs(client: TestClient) -> None:
    assert client.get("/dashboard/groups/not-a-uuid").status_code == 404
    # A task's id is not a group's.
    task = "6f1d3c8e-5b7a-4c2d-9e31-a0b400000001"
    assert client.get(f"/dashboard/groups/{task}").status_code == 404
    assert client.get("/dashboard/static/nothing.js").status_code == 404
    assert client.get("/dashboard/static/../__init__.py").status_code == 404
    missing = client.get("/dashboard/static/nothing.js")
    assert missing.json() == {"error": "Not Found", "status": 404}


# -- the service, and a browser ------------------------------------------------------


@dataclass
class Service:
    """`sumbatch up` running: its API's base URL, and the token it wants (or none)."""

    base: str
    token: str | None
    log: Path
    up: subprocess.Popen[bytes]
    redis_url: str

    def api_pid(self) -> int:
        """The pid of `up`'s API child (`sumbatch api ...`)."""
        for status in Path("/proc").glob("[0-9]*/status"):
            try:
                parent = re.search(r"^PPid:\s+(\d+)", status.read_text(), re.M)
                argv = (status.parent / "cmdline").read_bytes().split(b"\0")
            except OSError:  # gone meanwhile
                continue
            if parent and int(parent[1]) == self.up.pid and b"api" in argv:
                return int(status.parent.name)
        raise AssertionError("`up` runs no API child")

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def submit(self, pairs: list[tuple[int, int]]) -> dict[str, Any]:
        answer = httpx.post(f"{self.base}/grouptasks", json=body_of(pairs), headers=self.headers())
        assert answer.status_code == 200, answer.text
        created: dict[str, Any] = answer.json()
        return created

    def group(self, gid: str, wait: float = 0) -> dict[str, Any]:
        answer = httpx.get(
            f"{self.base}/grouptasks/{gid}", params={"wait": wait}, timeout=wait + 10
        )
        assert answer.status_code == 200, answer.text
        group: dict[str, Any] = answer.json()
        return group

    def first_event_id(self, gid: str) -> str:
        """The id of the group's first event (its GroupSubmitted)."""
        with httpx.stream("GET", f"{self.base}/grouptasks/{gid}/events", timeout=10) as answer:
            assert answer.status_code == 200
            for line in answer.iter_lines():
                if line.startswith("id: "):
                    return line.removeprefix("id: ")
        raise AssertionError("the group's stream ended with no event")

    def events(self, gid: str) -> list[tuple[str, dict[str, Any]]]:
        """The group's whole history from GET /grouptasks/{id}/events (which ends
        after GroupFinished): each event's id and data."""
        found: list[tuple[str, dict[str, Any]]] = []
        entry_id = ""
        timeout = httpx.Timeout(10, read=30)
        with httpx.stream("GET", f"{self.base}/grouptasks/{gid}/events", timeout=timeout) as answer:
            assert answer.status_code == 200
            for line in answer.iter_lines():
                if line.startswith("id: "):
                    entry_id = line.removeprefix("id: ")
                elif line.startswith("data: "):
                    found.append((entry_id, json.loads(line.removeprefix("data: "))))
                    if found[-1][1]["type"] == "GroupFinished":
                        break
        return found


def start_service(directory: Path, **env: str) -> Iterator[Service]:
    """`sumbatch up` (two workers) on free ports, its data and log in ``directory``,
    until the generator is closed; its log is printed when it fails to start or to
    stop cleanly."""
    api_port, redis_port = free_port(), free_port()
    log_path = directory / "up.log"
    log = log_path.open("wb")
    up = subprocess.Popen(
        [sys.executable, "-m", "sumbatch", "up", "--port", str(api_port), "--workers", "2"],
        env=up_env(directory / "data", redis_port, **env),
        stdout=log, stderr=subprocess.STDOUT, cwd=directory,
    )  # fmt: skip
    base = f"http://127.0.0.1:{api_port}"
    try:
        try:
            wait_until_sync(lambda: answers_200(f"{base}/readyz"), timeout=60, what="the API")
        except AssertionError:
            print(log_path.read_text(errors="replace"))
            raise
        redis_url = f"redis://127.0.0.1:{redis_port}/0"
        yield Service(base, env.get("SUMBATCH_API_TOKEN"), log_path, up, redis_url)
    finally:
        up.send_signal(signal.SIGTERM)
        try:
            code = up.wait(30)
        except subprocess.TimeoutExpired:
            up.kill()
            code = up.wait()
        log.close()
        if code != 0:
            print(log_path.read_text(errors="replace"))


@pytest.fixture(scope="module")
def chromium() -> str:
    path = chromium_path()
    if path is None:
        pytest.skip(
            "no chromium binary: install Debian's chromium (apt-get install chromium) "
            "or name one with SUMBATCH_CHROMIUM"
        )
    return path


@pytest.fixture(scope="module")
def browser(chromium: str) -> Iterator[Browser]:
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=chromium, headless=True)
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def service(chromium: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """The service the browser tests share: tasks take 0.3-1 s, and each of the two
    workers runs 4 at a time, so a group's bar moves in steps, and fast."""
    yield from start_service(
        tmp_path_factory.mktemp("dashboard"),
        SUMBATCH_DELAY="0.3-1.0",
        SUMBATCH_WORKER_CONCURRENCY="4",
    )


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    """A page of its own (fresh storage), at a desktop size; it fails the test on a
    script error or on a request to any other origin."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    tab = context.new_page()
    errors: list[str] = []
    foreign: list[str] = []
    tab.on("pageerror", lambda exc: errors.append(str(exc)))

    def check_origin(request: Request) -> None:
        if not request.url.startswith("http://127.0.0.1:"):
            foreign.append(request.url)

    tab.on("request", check_origin)
    tab.set_default_timeout(WAIT_MS)
    yield tab
    context.close()
    assert errors == [], errors
    assert foreign == [], foreign


@pytest.fixture(scope="module")
def artifacts() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


def pairs(count: int) -> list[tuple[int, int]]:
    """Parameters no earlier group had: every task runs (no cache hit), so it takes
    its delay."""
    return [(random.randrange(10**9), random.randrange(10**9)) for _ in range(count)]


def bar_of(gid: str) -> str:
    return f"#groups tr[data-group='{gid}'] .progress"


def screenshot(page: Page, path: Path) -> None:
    """The whole page, once every full progress bar has finished its animation."""
    page.wait_for_function(
        """() => [...document.querySelectorAll('.progress[data-progress="100"]')].every(
            (bar) => bar.querySelector('.fill').getBoundingClientRect().width
                >= bar.getBoundingClientRect().width - 1)"""
    )
    page.screenshot(path=str(path), full_page=True)


# -- the overview --------------------------------------------------------------------


def test_overview_shows_a_group_reach_100_percent_live(
    service: Service, page: Page, artifacts: Path
) -> None:
    page.goto(f"{service.base}/dashboard")
    page.wait_for_selector("#live[data-state='live']")
    created = service.submit(pairs(12))
    gid = created["groupTaskId"]
    # Another, larger, behind it: still in flight when the first one has finished
    # (and, most likely, in the screenshot).
    later = service.submit(pairs(80))["groupTaskId"]
    # Every value the group's bar shows, recorded in the page as it changes.
    page.wait_for_selector(bar_of(gid), state="attached")
    page.evaluate(
        """(selector) => {
            const bar = document.querySelector(selector);
            window.seen = [bar.dataset.progress];
            new MutationObserver(() => window.seen.push(bar.dataset.progress))
                .observe(bar, {attributes: true, attributeFilter: ['data-progress']});
        }""",
        bar_of(gid),
    )
    page.wait_for_function(
        "(selector) => document.querySelector(selector).dataset.progress === '100'",
        arg=bar_of(gid),
    )
    seen = [int(value) for value in page.evaluate("window.seen")]
    assert seen == sorted(seen)  # a bar only moves forward
    assert any(0 < value < 100 for value in seen), seen  # and it moved, live
    row = page.locator(f"#groups tr[data-group='{gid}']")
    assert row.locator(".tasks").inner_text() == "12 / 12"
    page.wait_for_function(
        "(gid) => document.querySelector(`#groups tr[data-group='${gid}'] span.state`)"
        ".textContent === 'succeeded'",
        arg=gid,
    )
    assert service.group(gid)["grouptaskProcessed"] is True

    # The tail has the group's events, newest first: the submission at the bottom,
    # the finish on top.
    tail = page.locator(f"#tail tr[data-group='{gid}']")
    types = tail.evaluate_all("(rows) => rows.map((row) => row.dataset.type)")
    assert types[0] == "GroupFinished" and types[-1] == "GroupSubmitted"
    assert types.count("TaskCompleted") == 12
    assert page.locator(f"#tail tr[data-group='{gid}'] a").first.get_attribute("href") == (
        f"/dashboard/groups/{gid}"
    )

    # Workers, from /system: the ones that ran the group's tasks are listed, with
    # their pending entries and idle times.
    ran = {e["worker"] for _, e in service.events(gid) if e["type"] == "TaskCompleted"}
    page.wait_for_function(
        "(names) => names.every((n) => document.querySelector(`#workers tr[data-worker='${n}']`))",
        arg=sorted(ran),
    )
    for name in ran:
        worker = page.locator(f"#workers tr[data-worker='{name}']")
        assert worker.locator(".pending").inner_text().isdigit()
        assert re.fullmatch(r"[\d.]+ (ms|s)|\d+ min \d+ s", worker.locator(".idle").inner_text())
    # Throughput, from /system's counters: a chart with a line of points.
    page.wait_for_function("() => Number(document.querySelector('#chart').dataset.points) >= 2")
    assert page.locator("#chart polyline.completed").count() == 1
    assert page.locator("#stat-rate").inner_text() != "unavailable"

    screenshot(page, artifacts / "dashboard-overview.png")
    if os.environ.get("SUMBATCH_SCREENSHOT_DOCS") == "1":
        DOCS_SCREENSHOT.parent.mkdir(exist_ok=True)
        shutil.copyfile(artifacts / "dashboard-overview.png", DOCS_SCREENSHOT)
    page.wait_for_function(
        "(selector) => document.querySelector(selector).dataset.progress === '100'",
        arg=bar_of(later),
    )
    assert service.group(later)["grouptaskProcessed"] is True


def test_overview_submits_a_group_from_its_form(service: Service, page: Page) -> None:
    page.goto(f"{service.base}/dashboard")
    page.fill("#submit-count", "3")
    page.click("#submit-form button[type=submit]")
    link = page.locator("#submit-result a[data-group]")
    link.wait_for()
    gid = link.get_attribute("data-group")
    assert gid is not None
    page.wait_for_function(
        "(selector) => document.querySelector(selector)?.dataset.progress === '100'",
        arg=bar_of(gid),
    )
    group = service.group(gid, wait=30)
    assert group["tasksTotal"] == 3 and group["grouptaskSucceeded"] is True


@pytest.mark.parametrize(
    ("status", "reason"),
    [(404, "this server has no /system (404)"), (503, "storage unavailable (503)")],
)
def test_overview_without_system_says_unavailable_and_stays_live(
    service: Service, page: Page, status: int, reason: str
) -> None:
    # /system answers as an older server (404) or one whose Redis is away (503)
    # would; the rest of the API is the real one.
    page.route(
        "**/system",
        lambda route: route.fulfill(
            status=status, content_type="application/json",
            body=json.dumps({"error": "unavailable", "status": status}),
        ),
    )  # fmt: skip
    page.goto(f"{service.base}/dashboard")
    page.locator("#workers-empty[data-state='unavailable']").wait_for()
    assert page.locator("#workers-empty").inner_text() == f"Workers unavailable: {reason}."
    assert page.locator("#chart-note").inner_text() == f"Throughput unavailable: {reason}."
    assert page.locator("#stat-lag").inner_text() == "unavailable"
    # The live parts carry on.
    gid = service.submit(pairs(2))["groupTaskId"]
    page.wait_for_function(
        "(selector) => document.querySelector(selector)?.dataset.progress === '100'",
        arg=bar_of(gid),
    )


def test_overview_retries_an_event_stream_refused_at_first(service: Service, page: Page) -> None:
    # The first GET /events is refused as beyond the streams' cap would be (503, which
    # EventSource does not retry by itself); the next ones go to the real API.
    refused: list[str] = []

    def once(route: Route) -> None:
        if not refused:
            refused.append(route.request.url)
            route.fulfill(status=503, content_type="application/json",
                          body='{"error":"too many event streams","status":503}')  # fmt: skip
        else:
            route.continue_()

    page.route("**/events?*", once)
    page.goto(f"{service.base}/dashboard")
    page.wait_for_selector("#live[data-state='live']")
    assert len(refused) == 1
    gid = service.submit(pairs(2))["groupTaskId"]
    page.wait_for_function(
        "(selector) => document.querySelector(selector)?.dataset.progress === '100'",
        arg=bar_of(gid),
    )


def test_overview_follows_the_log_across_a_restart_of_the_api(service: Service, page: Page) -> None:
    page.goto(f"{service.base}/dashboard")
    page.wait_for_selector("#live[data-state='live']")
    before = service.submit(pairs(3))["groupTaskId"]
    page.wait_for_function(
        "(selector) => document.querySelector(selector)?.dataset.progress === '100'",
        arg=bar_of(before),
    )
    # The API dies; `up` starts it again, and the page's stream reconnects from the
    # last event it had (Last-Event-ID), by itself.
    os.kill(service.api_pid(), signal.SIGKILL)
    page.wait_for_selector("#live:not([data-state='live'])")
    wait_until_sync(lambda: answers_200(f"{service.base}/readyz"), timeout=60, what="the API")
    page.wait_for_selector("#live[data-state='live']")
    after = service.submit(pairs(3))["groupTaskId"]
    page.wait_for_function(
        "(selector) => document.querySelector(selector)?.dataset.progress === '100'",
        arg=bar_of(after),
    )
    # Nothing was shown twice, nothing of either group is missing.
    ids = page.locator("#tail tr").evaluate_all("(rows) => rows.map((row) => row.dataset.id)")
    assert len(ids) == len(set(ids))
    for gid in (before, after):
        shown = page.locator(f"#tail tr[data-group='{gid}']").evaluate_all(
            "(rows) => rows.map((row) => row.dataset.id).reverse()"
        )
        assert shown == [entry_id for entry_id, _ in service.events(gid)]


# -- a group's page ------------------------------------------------------------------


def test_group_page_shows_tasks_results_and_audit_trail(
    service: Service, page: Page, artifacts: Path
) -> None:
    submitted = pairs(6)
    created = service.submit(submitted)
    gid = created["groupTaskId"]
    page.goto(f"{service.base}/dashboard/groups/{gid}")
    page.wait_for_function(
        "() => document.querySelector('#group-progress').dataset.progress === '100'"
    )
    page.locator("#group-state[data-state='SUCCEEDED']").wait_for()
    group = service.group(gid)
    assert group["grouptaskProcessed"] is True
    results = json.dumps(group["results"], separators=(",", ":"))
    assert page.locator("#group-results").inner_text() == results
    assert page.locator("#group-ended").inner_text() == "6"
    assert page.locator("#group-total").inner_text() == "6"

    rows = page.locator("#tasks tr")
    assert rows.count() == 6
    for index, (a, b) in enumerate(submitted):
        row = rows.nth(index)
        tid = created["taskIds"][index]
        assert row.get_attribute("data-task") == tid
        task = httpx.get(f"{service.base}/tasks/{tid}").json()
        assert task["taskState"] == "SUCCESS"
        assert row.locator(".state").inner_text() == "SUCCESS"
        assert row.locator(".result").inner_text() == str(task["result"]) == str(a + b)
        assert row.locator(".a").inner_text() == str(a)
        assert row.locator(".b").inner_text() == str(b)
        assert row.locator(".attempts").inner_text() == str(task["attempts"])

    # The audit trail is the group's log as GET /grouptasks/{id}/events gives it,
    # GroupSubmitted to GroupFinished.
    history = service.events(gid)
    audit = page.locator("#audit tr")
    assert audit.count() == len(history)
    shown = [
        (audit.nth(i).get_attribute("data-id"), audit.nth(i).get_attribute("data-type"))
        for i in range(audit.count())
    ]
    assert shown == [(entry_id, event["type"]) for entry_id, event in history]
    assert shown[0][1] == "GroupSubmitted" and shown[-1][1] == "GroupFinished"
    assert [t for _, t in shown].count("TaskCompleted") == 6
    assert page.locator("#cancel").is_disabled()
    screenshot(page, artifacts / "dashboard-group.png")


def test_group_page_without_its_event_stream_polls_the_tasks(service: Service, page: Page) -> None:
    # A server without GET /grouptasks/{id}/events (404, as before it existed): the
    # page asks for each task instead, and says the audit trail is unavailable.
    page.route(
        "**/grouptasks/*/events",
        lambda route: route.fulfill(status=404, content_type="application/json",
                                    body='{"error":"Not Found","status":404}'),
    )  # fmt: skip
    submitted = pairs(3)
    created = service.submit(submitted)
    gid = created["groupTaskId"]
    page.goto(f"{service.base}/dashboard/groups/{gid}")
    page.locator("#group-state[data-state='SUCCEEDED']").wait_for()
    page.wait_for_function(
        "() => document.querySelectorAll(\"#tasks tr[data-state='SUCCESS']\").length === 3"
    )
    results = page.locator("#tasks tr .result").all_inner_texts()
    assert results == [str(a + b) for a, b in submitted]
    assert page.locator("#audit tr").count() == 0
    assert page.locator("#audit-note").inner_text().startswith("Audit trail unavailable")
    assert page.locator("#live").get_attribute("data-state") == "ended"


def test_group_page_of_an_unknown_group_says_so(service: Service, page: Page) -> None:
    page.goto(f"{service.base}/dashboard/groups/6f1d3c8e-5b7a-4c2d-9e31-a0b400000000")
    missing = page.locator("#group-missing")
    missing.wait_for()
    assert "No such group" in missing.inner_text()


def forge(service: Service, lies: list[AnyEvent]) -> list[str]:
    """Write events by hand into the log, and each naming a group into that group's
    audit stream under the same id (as the scripts do); returns their ids, once the
    projector has set the last one aside."""
    keys = Keys("sumbatch")
    raw = redis.Redis.from_url(service.redis_url, decode_responses=True)
    try:
        written: list[str] = []
        for lie in lies:
            fields: dict[Any, Any] = to_fields(lie)
            entry_id = cast(str, raw.xadd(keys.events, fields))
            if raw.exists(keys.group_log(lie.group_task_id)):
                raw.xadd(keys.group_log(lie.group_task_id), fields, id=entry_id)
            written.append(entry_id)

        def set_aside() -> bool:
            rejected = cast(list[tuple[str, dict[str, str]]], raw.xrange(keys.rejected))
            return any(f.get("entryId") == written[-1] for _, f in rejected)

        wait_until_sync(set_aside, timeout=30, what="the projector to set the last lie aside")
        return written
    finally:
        raw.close()


def forged_failure(gid: str, index: int, task_id: str | None = None) -> TaskFailed:
    return TaskFailed(
        task_id=task_id or ids.task_id(gid, index), group_task_id=gid, index=index,
        attempts=1, error="forged", worker="hand",
    )  # fmt: skip


def test_overview_shows_the_api_figures_not_a_fold_of_forged_events(
    service: Service, page: Page
) -> None:
    """Entries written by hand after a group finished: a TaskFailed for a task that
    had completed, one for a task outside the group, and a GroupSubmitted whose params
    are not integers (the projector sets the last two aside, and folds the first as
    the no-op a second outcome is). The overview, opened on the log after the group's
    end, once counted "failed 1" on the succeeded group and listed the forged group
    in flight; it shows what the API says (issue 17, item 7)."""
    gid = service.submit(pairs(4))["groupTaskId"]
    assert service.group(gid, wait=30)["grouptaskProcessed"] is True
    finished_at = service.events(gid)[-1][0]  # its GroupFinished
    forged_gid = ids.new_group_id()
    lies: list[AnyEvent] = [
        forged_failure(gid, 1),
        forged_failure(gid, 9),
        GroupSubmitted(group_task_id=forged_gid, tasks_total=2, params_a="1 x", params_b="2 3"),
    ]
    first, *_ = forge(service, lies)
    after = service.group(gid)
    assert (after["tasksFailed"], after["grouptaskSucceeded"]) == (0, True)
    assert httpx.get(f"{service.base}/grouptasks/{forged_gid}").status_code == 404

    page.goto(f"{service.base}/dashboard?from={finished_at}")  # the lies on
    page.locator(f"#tail tr[data-id='{first}']").wait_for(state="attached")
    row = page.locator(f"#groups tr[data-group='{gid}']")
    row.locator("span.state[data-state='succeeded']").wait_for()
    assert row.locator(".failed").inner_text() == "0"
    assert row.locator(".tasks").inner_text() == "4 / 4"
    # Asked for, answered 404: never listed.
    page.wait_for_function(
        "(gid) => performance.getEntriesByType('resource').some("
        "(r) => r.name.endsWith(`/grouptasks/${gid}`))",
        arg=forged_gid,
    )
    assert page.locator(f"#groups tr[data-group='{forged_gid}']").count() == 0


@pytest.fixture(scope="module")
def slow_service(chromium: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """Tasks of 60 s, and a token to change anything: a group stays in flight until
    it is cancelled."""
    yield from start_service(
        tmp_path_factory.mktemp("dashboard-slow"), SUMBATCH_DELAY="60", SUMBATCH_API_TOKEN=TOKEN
    )


def test_cancel_button_revokes_the_tasks_asking_for_the_token(
    slow_service: Service, page: Page, artifacts: Path
) -> None:
    created = slow_service.submit(pairs(4))
    gid = created["groupTaskId"]
    page.goto(f"{slow_service.base}/dashboard/groups/{gid}")
    # Running: every task started, none ended.
    page.wait_for_function(
        "() => document.querySelectorAll(\"#tasks tr[data-state='STARTED']\").length === 4"
    )
    assert page.locator("#group-progress").get_attribute("data-progress") == "0"
    page.once("dialog", lambda dialog: dialog.accept())
    page.click("#cancel")
    # The DELETE is refused without the token: the page asks for it. A wrong one is
    # refused again, and said so.
    page.locator("#token-form").wait_for()
    page.fill("#token-input", "wrong")
    page.click("#token-form button[type=submit]")
    page.locator("#token-form .token-message:text('That token was refused.')").wait_for()
    page.fill("#token-input", TOKEN)
    page.click("#token-form button[type=submit]")
    page.locator("#cancel-result:text('cancelled: 4 tasks revoked')").wait_for()
    assert page.locator("#token-form").is_hidden()
    assert page.evaluate("localStorage.getItem('sumbatch.token')") == TOKEN

    # The group's events bring the revocations in: every task REVOKED, the group
    # cancelled and done.
    page.wait_for_function(
        "() => document.querySelectorAll(\"#tasks tr[data-state='REVOKED']\").length === 4"
    )
    page.locator("#group-state[data-state='CANCELLED']").wait_for()
    page.wait_for_function(
        "() => document.querySelector('#group-progress').dataset.progress === '100'"
    )
    assert page.locator("#cancel").is_disabled()
    assert page.locator("#group-revoked").inner_text() == "4"
    audit = page.locator("#audit tr").evaluate_all("(rows) => rows.map((r) => r.dataset.type)")
    assert audit[0] == "GroupSubmitted" and audit[-1] == "GroupFinished"
    assert "GroupCancelled" in audit and audit.count("TaskRevoked") == 4
    group = slow_service.group(gid, wait=10)
    assert group["grouptaskCancelled"] is True and group["tasksRevoked"] == 4
    screenshot(page, artifacts / "dashboard-cancelled.png")


def test_overview_learns_a_group_it_sees_mid_way(slow_service: Service, page: Page) -> None:
    gid = slow_service.submit(pairs(4))["groupTaskId"]
    # The page's stream starts just after the group's GroupSubmitted: it learns the
    # group's size from GET /grouptasks/{id}.
    page.goto(f"{slow_service.base}/dashboard?from={slow_service.first_event_id(gid)}")
    row = page.locator(f"#groups tr[data-group='{gid}']")
    page.wait_for_function(
        "(gid) => document.querySelector(`#groups tr[data-group='${gid}'] .tasks`)"
        "?.textContent === '0 / 4'",
        arg=gid,
    )
    assert row.locator(".progress").get_attribute("data-progress") == "0"
    row.locator("span.state[data-state='running']").wait_for()  # its tasks started
    assert page.locator(f"#tail tr[data-group='{gid}'][data-type='GroupSubmitted']").count() == 0
    cancelled = httpx.delete(
        f"{slow_service.base}/grouptasks/{gid}", headers=slow_service.headers()
    )
    assert cancelled.status_code == 202
    page.wait_for_function(
        "(selector) => document.querySelector(selector).dataset.progress === '100'",
        arg=bar_of(gid),
    )
    assert row.locator("span.state").inner_text() == "cancelled"
    assert row.locator(".revoked").inner_text() == "4"


def test_group_page_shows_the_api_figures_not_a_fold_of_forged_events(
    slow_service: Service, page: Page
) -> None:
    """A running group, and TaskFailed entries written by hand that name no task of
    it (an index outside it; a task id that is not its index's): the projector sets
    them aside. The page once grew its task table to the forged index and counted
    "failed 1"; it keeps 4 tasks, none failed, and shows the lies in the audit trail
    only."""
    gid = slow_service.submit(pairs(4))["groupTaskId"]
    page.goto(f"{slow_service.base}/dashboard/groups/{gid}")
    page.wait_for_function(
        "() => document.querySelectorAll(\"#tasks tr[data-state='STARTED']\").length === 4"
    )
    wrong_id = ids.task_id(gid, 2)
    lies: list[AnyEvent] = [forged_failure(gid, 9), forged_failure(gid, 1, task_id=wrong_id)]
    outside, mismatched = forge(slow_service, lies)
    for entry_id in (outside, mismatched):
        page.locator(f"#audit tr[data-id='{entry_id}']").wait_for(state="attached")
    assert slow_service.group(gid)["tasksFailed"] == 0
    assert page.locator("#tasks tr").count() == 4
    assert page.locator("#group-failed").inner_text() == "0"
    states = page.locator("#tasks tr").evaluate_all("(rows) => rows.map((r) => r.dataset.state)")
    assert states == ["STARTED"] * 4
    assert page.locator("#group-state").get_attribute("data-state") == "RUNNING"
    cancelled = httpx.delete(
        f"{slow_service.base}/grouptasks/{gid}", headers=slow_service.headers()
    )
    assert cancelled.status_code == 202
