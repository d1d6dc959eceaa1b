"""The HTTP edges of the served API, over raw sockets against a real uvicorn process
(sumbatch.web.http.serve, the real app, the session's Redis): malformed requests, requests
that stall before their headers end or half-way through their body, oversized headers,
and keep-alive between requests."""

from __future__ import annotations

import inspect
import json
import select
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
import uvicorn

from sumbatch.config import ConfigError, Settings
from sumbatch.model.keys import Keys
from sumbatch.model.tasks import Delay
from sumbatch.web.http import Limits
from tests.support import (
    answers_200,
    drop_namespace,
    env_for,
    free_port,
    fresh_namespace,
    wait_until_sync,
)

HEADER_TIMEOUT = 1.0
BODY_TIMEOUT = 1.0
# Slack for a loaded 2-core machine between a server timer firing and the client
# seeing the close; the bounds below are the configured timeout plus this.
MARGIN = 2.0
# How early the server's timer may fire as the client's clock sees it: uvloop's timers
# run on libuv's loop time, cached in whole milliseconds at each turn of the loop, so a
# 1 s timeout was seen to close after 0.99987 s. "Not before the timeout" allows this.
TIMER_SLACK = 0.05
KEEP_ALIVE = float(inspect.signature(uvicorn.Config).parameters["timeout_keep_alive"].default)
MAX_HEADER_BYTES = Limits().max_header_bytes

SERVE = """
import sys
from sumbatch.web.api import create_app
from sumbatch.config import Settings
from sumbatch.web.http import serve
settings = Settings.from_env()
serve(create_app(settings), "127.0.0.1", int(sys.argv[1]), settings)
"""

GROUP = b'{"tasks": [{"paramA": 1, "paramB": 5}, {"paramA": 9, "paramB": 10}]}'


@dataclass
class Served:
    port: int
    settings: Settings
    log: Path

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=10)


@pytest.fixture(scope="module")
def served(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    settings = Settings(redis_url=redis_url, namespace=fresh_namespace(), delay=Delay(0, 0))
    port = free_port()
    env = env_for(settings)
    env.update(
        SUMBATCH_HEADER_TIMEOUT=str(HEADER_TIMEOUT),
        SUMBATCH_BODY_TIMEOUT=str(BODY_TIMEOUT),
        SUMBATCH_LOG_LEVEL="INFO",
    )
    log = tmp_path_factory.mktemp("api") / "api.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-c", SERVE, str(port)],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:

        def up() -> bool:
            assert process.poll() is None, log.read_text()
            return answers_200(f"http://127.0.0.1:{port}/healthz", timeout=2)

        wait_until_sync(up, timeout=30, what="the API to answer /healthz")
        yield Served(port, settings, log)
    finally:
        process.terminate()
        process.wait(15)
        drop_namespace(redis_url, settings.namespace)


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> object:
        return json.loads(self.body)


def parse(raw: bytes) -> Answer:
    head, sep, body = raw.partition(b"\r\n\r\n")
    assert sep, f"no complete response head in {raw!r}"
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return Answer(int(status_line.split()[1]), headers, body)


def read_until_closed(sock: socket.socket, within: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes, and when the close came (monotonic).
    Fails if the connection is still open after ``within`` seconds."""
    deadline = time.monotonic() + within
    received = b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"still open after {within} s; received {received!r}")
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        if not chunk:
            return received, time.monotonic()
        received += chunk


def read_one_response(sock: socket.socket, within: float = 10.0) -> Answer:
    """One response with a Content-Length, reading not a byte past it, so the
    connection can carry the next one."""
    sock.settimeout(within)
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        byte = sock.recv(1)
        assert byte, f"closed before a whole response head: {head!r}"
        head += byte
    answer = parse(head)
    length = int(answer.headers["content-length"])
    while len(answer.body) < length:
        chunk = sock.recv(length - len(answer.body))
        assert chunk, "closed mid-body"
        answer.body += chunk
    return answer


def assert_json_error(answer: Answer, status: int) -> None:
    assert answer.status == status, answer
    assert answer.headers["content-type"] == "application/json", answer.headers
    assert answer.headers["connection"] == "close", answer.headers
    body = answer.json()
    assert isinstance(body, dict) and body["status"] == status, body
    assert isinstance(body["error"], str) and body["error"], body


def post(body: bytes, length: int | None = None) -> bytes:
    return (
        b"POST /grouptasks HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % (len(body) if length is None else length)
    ) + body


def events_in_log(served: Served) -> int:
    client = redis.Redis.from_url(served.settings.client_url)
    try:
        return int(client.xlen(Keys(served.settings.namespace).events))
    finally:
        client.close()


@pytest.mark.parametrize(
    "part",
    [b"GET /heal", b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Slow: "],
    ids=["half a request line", "half the headers"],
)
def test_a_request_stalled_before_its_headers_end_gets_408_and_is_closed(
    served: Served, part: bytes
) -> None:
    started = time.monotonic()
    with served.connect() as sock:
        sock.sendall(part)
        raw, closed = read_until_closed(sock, HEADER_TIMEOUT + MARGIN)
    assert closed - started >= HEADER_TIMEOUT - TIMER_SLACK, "closed before the header timeout"
    answer = parse(raw)
    assert_json_error(answer, 408)


def test_a_connection_that_sends_nothing_is_closed_without_an_answer(served: Served) -> None:
    started = time.monotonic()
    with served.connect() as sock:
        raw, closed = read_until_closed(sock, HEADER_TIMEOUT + MARGIN)
    assert raw == b""
    assert closed - started >= HEADER_TIMEOUT - TIMER_SLACK


def test_headers_trickled_a_byte_at_a_time_are_cut_at_the_deadline(served: Served) -> None:
    """Slowloris proper: every byte arrives well within the timeout, the headers never
    end. The deadline is for the whole head, not between bytes."""
    started = time.monotonic()
    deadline = started + HEADER_TIMEOUT + MARGIN
    with served.connect() as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n")
        # Paced well inside the timeout, until the server answers.
        while not select.select([sock], [], [], HEADER_TIMEOUT / 5)[0]:
            assert time.monotonic() < deadline, "the server never cut the trickle"
            sock.sendall(b"X")
        raw, closed = read_until_closed(sock, MARGIN)
    assert closed - started >= HEADER_TIMEOUT - TIMER_SLACK
    assert_json_error(parse(raw), 408)


def test_a_body_that_stops_half_way_gets_408_and_appends_nothing(served: Served) -> None:
    before = events_in_log(served)
    with served.connect() as sock:
        sock.sendall(post(GROUP[: len(GROUP) // 2], length=len(GROUP)))
        sent = time.monotonic()
        raw, closed = read_until_closed(sock, BODY_TIMEOUT + MARGIN)
    assert closed - sent >= BODY_TIMEOUT - TIMER_SLACK, "closed before the body timeout"
    assert_json_error(parse(raw), 408)
    assert events_in_log(served) == before
    # The handler that was waiting for the body ended; the server serves on.
    assert answers_200(f"http://127.0.0.1:{served.port}/healthz", timeout=5)


def test_a_slow_but_steady_body_is_not_cut(served: Served) -> None:
    """The body timeout bounds each pause, not the whole body: four pieces, each pause
    half the timeout, together longer than it."""
    pieces = [GROUP[i : i + len(GROUP) // 4 + 1] for i in range(0, len(GROUP), len(GROUP) // 4 + 1)]
    assert len(pieces) == 4
    started = time.monotonic()
    with served.connect() as sock:
        sock.sendall(post(b"", length=len(GROUP)))
        for piece in pieces:
            # Pacing the client is what is under test here, not a wait for the server.
            time.sleep(BODY_TIMEOUT / 2)
            sock.sendall(piece)
        answer = read_one_response(sock)
    assert time.monotonic() - started > BODY_TIMEOUT
    assert answer.status == 200, answer
    body = answer.json()
    assert isinstance(body, dict) and len(body["taskIds"]) == 2


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"NOT A REQUEST\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: t\r\nNo colon here\r\n\r\n",
        b"POST /grouptasks HTTP/1.1\r\nHost: t\r\nContent-Length: ten\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nZZ\r\n",
    ],
    ids=["no method", "header without colon", "bad content-length", "bad chunk size"],
)
def test_a_malformed_request_gets_the_json_400(served: Served, request_bytes: bytes) -> None:
    with served.connect() as sock:
        sock.sendall(request_bytes)
        raw, _ = read_until_closed(sock, MARGIN)
    assert_json_error(parse(raw), 400)


def test_a_whole_request_is_served_as_before(served: Served) -> None:
    with served.connect() as sock:
        sock.sendall(post(GROUP))
        created = read_one_response(sock)
        assert created.status == 200, created
        body = created.json()
        assert isinstance(body, dict)
        sock.sendall(
            b"GET /grouptasks/%s HTTP/1.1\r\nHost: t\r\n\r\n" % body["groupTaskId"].encode()
        )
        group = read_one_response(sock)
    assert group.status == 200, group
    status = group.json()
    assert isinstance(status, dict) and status["tasksTotal"] == 2


def test_pipelined_requests_are_all_answered(served: Served) -> None:
    request = b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n"
    with served.connect() as sock:
        sock.sendall(request * 3)
        answers = [read_one_response(sock) for _ in range(3)]
    assert [a.status for a in answers] == [200, 200, 200]


def test_a_body_sent_after_100_continue_is_served(served: Served) -> None:
    with served.connect() as sock:
        sock.sendall(post(b"", length=len(GROUP))[:-2] + b"Expect: 100-continue\r\n\r\n")
        sock.settimeout(10)
        interim = b""
        while b"\r\n\r\n" not in interim:
            chunk = sock.recv(1)
            assert chunk, "closed before 100 Continue"
            interim += chunk
        assert interim.startswith(b"HTTP/1.1 100 "), interim
        sock.sendall(GROUP)
        answer = read_one_response(sock)
    assert answer.status == 200, answer


def test_headers_over_the_limit_get_431(served: Served) -> None:
    # The server counts whole reads inside one request's head, so it may see up to one
    # read (256 KiB with uvloop) less than was sent; this is well past that.
    lines = (MAX_HEADER_BYTES + 512 * 1024) // 8192
    with served.connect() as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n")
        for i in range(lines):
            sock.sendall(b"X-Pad-%d: %s\r\n" % (i, b"a" * 8192))
        # The head never ends: without the limit, this would wait for the 408.
        raw, _ = read_until_closed(sock, MARGIN)
    assert_json_error(parse(raw), 431)


def test_a_head_over_the_limit_is_refused_however_it_was_read(served: Served) -> None:
    """Counted as the parser reads it, not by socket reads: a head of about twice the
    limit, in two writes whose second ends the head (a read that ends the head, like
    the first read of a request, says nothing of where the head began), gets 431."""
    half = b"".join(b"X-Pad-%d: %s\r\n" % (i, b"a" * 8192) for i in range(7))
    assert MAX_HEADER_BYTES < 2 * len(half) < 2 * MAX_HEADER_BYTES
    with served.connect() as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n" + half)
        # Most often read apart from the rest; refused whichever way it is read.
        select.select([sock], [], [], 0.2)
        sock.sendall(half.replace(b"X-Pad-", b"X-Pod-") + b"\r\n")
        raw, _ = read_until_closed(sock, MARGIN)
    assert_json_error(parse(raw), 431)


def test_headers_just_under_the_limit_in_one_write_are_served(served: Served) -> None:
    pad = b"".join(b"X-Pad-%d: %s\r\n" % (i, b"a" * 8192) for i in range(7))
    assert len(pad) < MAX_HEADER_BYTES - 1024
    with served.connect() as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n" + pad + b"\r\n")
        answer = read_one_response(sock)
    assert answer.status == 200, answer


def test_large_headers_under_the_limit_are_served(served: Served) -> None:
    with served.connect() as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n")
        for i in range(MAX_HEADER_BYTES // 2 // 8192):
            sock.sendall(b"X-Pad-%d: %s\r\n" % (i, b"a" * 8192))
        sock.sendall(b"\r\n")
        answer = read_one_response(sock)
    assert answer.status == 200, answer
    assert answer.json() == {"status": "ok"}


def test_kept_alive_connections_follow_uvicorns_keep_alive(served: Served) -> None:
    """Between requests only uvicorn's keep-alive applies: an idle connection outlives
    the (shorter) header timeout, takes the next request, and closes at keep-alive."""
    assert HEADER_TIMEOUT + MARGIN < KEEP_ALIVE
    request = b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n"
    with served.connect() as sock:
        sock.sendall(request)
        assert read_one_response(sock).status == 200
        # Readable here would mean closed (or unasked-for bytes): neither may happen.
        assert not select.select([sock], [], [], HEADER_TIMEOUT + MARGIN)[0]
        sock.sendall(request)
        second = read_one_response(sock)
        answered = time.monotonic()
        assert second.status == 200 and second.headers.get("connection") != "close"
        raw, closed = read_until_closed(sock, KEEP_ALIVE + MARGIN)
    assert raw == b""
    assert closed - answered >= KEEP_ALIVE - 0.5


def test_limits_from_the_environment() -> None:
    assert Limits.of(Settings.from_env({})) == Limits()
    read = Limits.of(
        Settings.from_env({"SUMBATCH_HEADER_TIMEOUT": "2.5", "SUMBATCH_BODY_TIMEOUT": "30"})
    )
    assert (read.header_timeout, read.body_timeout) == (2.5, 30.0)
    for name in ("SUMBATCH_HEADER_TIMEOUT", "SUMBATCH_BODY_TIMEOUT"):
        for bad in ("0", "-1", "soon", "inf", "nan"):
            with pytest.raises(ConfigError, match=name):
                Settings.from_env({name: bad})
