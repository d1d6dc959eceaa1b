"""The API's command-line clients: ``sumbatch submit``, ``status`` and ``top``, run as
real commands against a real ``sumbatch up``; and their parsing, as plain functions."""

from __future__ import annotations

import fcntl
import io
import json
import os
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest
import redis
from rich.console import Console

from sumbatch.client.following import Tally, follow_events, until_processed
from sumbatch.client.inputs import InputError, parse_pair, read_input
from sumbatch.client.rest import Api, Message, default_url, parse_sse
from sumbatch.client.top import Sample, frame, rate, size
from sumbatch.config import Settings
from sumbatch.model.keys import WORKER_GROUP, Keys
from tests.support import ROOT, answers_200, free_port, run_sumbatch, up_env, wait_until_sync

TOKEN = "cli-test-token"
EXAMPLE = {"tasks": [{"paramA": a, "paramB": b} for a, b in ((1, 5), (9, 10), (12, 13), (8, 1))]}


# -- parsing, as plain functions -----------------------------------------------------


def test_pairs_take_negative_numbers() -> None:
    assert parse_pair("1+2") == (1, 2)
    assert parse_pair("-3+4") == (-3, 4)
    assert parse_pair("5+-2") == (5, -2)
    assert parse_pair(" -7 + -8 ") == (-7, -8)


@pytest.mark.parametrize("text", ["1+", "+2", "1-2", "1+2+3", "a+b", "1.5+2", "", "1 2"])
def test_a_malformed_pair_is_refused(text: str) -> None:
    with pytest.raises(InputError, match="is not a pair of integers"):
        parse_pair(text)


def test_a_pair_outside_64_bits_is_refused() -> None:
    assert parse_pair(f"{2**63 - 1}+{-(2**63)}") == (2**63 - 1, -(2**63))
    with pytest.raises(InputError, match="paramB is outside the signed 64-bit range"):
        parse_pair(f"1+{2**63}")


def _body(raw: bytes) -> Any:
    return json.loads(raw)


def test_input_from_pairs_a_file_or_stdin(tmp_path: Path) -> None:
    no_stdin = io.StringIO("")
    assert _body(read_input(["1+2", "-3+4"], no_stdin)) == {
        "tasks": [{"paramA": 1, "paramB": 2}, {"paramA": -3, "paramB": 4}]
    }
    path = tmp_path / "group.json"
    path.write_text(json.dumps(EXAMPLE))
    assert _body(read_input([str(path)], no_stdin)) == EXAMPLE
    assert _body(read_input(["-"], io.StringIO(json.dumps(EXAMPLE)))) == EXAMPLE


@pytest.mark.parametrize(
    ("args", "stdin", "message"),
    [
        ([], "", "nothing to submit"),
        (["-"], "", "stdin is empty"),
        (["-"], "{not json", "stdin is not JSON"),
        (["1+2", "-"], "", "cannot go with other arguments"),
        (["missing.json"], "", "is neither a file nor a pair"),
        (["1+2", "3+x"], "", "'3+x' is not a pair"),
    ],
)
def test_bad_input_is_refused(args: list[str], stdin: str, message: str) -> None:
    with pytest.raises(InputError, match=re.escape(message)):
        read_input(args, io.StringIO(stdin))


def test_a_file_that_is_not_json_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "group.json"
    path.write_text("tasks: 1+2")
    with pytest.raises(InputError, match="group.json is not JSON"):
        read_input([str(path)], io.StringIO(""))


def test_event_stream_messages_are_parsed() -> None:
    lines = [
        "retry: 1000\n", ": open\n", "\n",
        "id: 1-0\n", "event: TaskCompleted\n", 'data: {"a":\n', "data: 1}\n", "\n",
        ": keepalive\n", "\n",
        "event: GroupFinished\n", "data: {}\n", "\n",
    ]  # fmt: skip
    assert list(parse_sse(lines)) == [
        Message("TaskCompleted", '{"a":\n1}', "1-0"),
        Message("GroupFinished", "{}", "1-0"),
    ]


def test_tally_counts_each_task_once() -> None:
    tally = Tally(3)
    tally.apply({"type": "TaskStarted", "taskId": "t1"})
    assert tally.done == 0
    tally.apply({"type": "TaskCompleted", "taskId": "t1"})
    tally.apply({"type": "TaskCompleted", "taskId": "t1"})
    tally.apply({"type": "TaskFailed", "taskId": "t2"})
    tally.apply({"type": "TaskRevoked", "taskId": "t3"})
    assert (tally.done, tally.failed, tally.revoked, tally.finished) == (3, 1, 1, False)
    tally.apply({"type": "GroupFinished", "tasksTotal": 3})
    assert tally.finished


def test_the_default_url_comes_from_the_settings() -> None:
    assert default_url(Settings()) == "http://127.0.0.1:5000"
    assert default_url(Settings(host="0.0.0.0", port=8080)) == "http://127.0.0.1:8080"
    assert default_url(Settings(host="10.1.2.3", port=81)) == "http://10.1.2.3:81"


SYSTEM: dict[str, Any] = {
    "time": 1_764_462_000_000,
    "partitions": 1,
    "counters": {"groupsSubmitted": 2, "groupsFinished": 1, "tasksSubmitted": 30,
                 "tasksCompleted": 20, "tasksCached": 4, "tasksFailed": 1, "tasksRevoked": 0},
    "work": {"length": 30, "lag": None, "pending": 9},
    "projectorLag": 3,
    "deadLetters": 1,
    "eventLogLength": 77,
    "workers": [{"name": "w-b", "partition": 0, "pending": 5, "idleMs": 1500},
                {"name": "w-a", "partition": 0, "pending": 4, "idleMs": 12}],
    "redisMemoryBytes": 3 * 1024 * 1024 // 2,
}  # fmt: skip


def test_top_frame_shows_rates_counters_and_workers() -> None:
    counters = {**SYSTEM["counters"], "tasksCompleted": 10, "tasksFailed": 0, "tasksSubmitted": 10}
    earlier = {**SYSTEM, "time": SYSTEM["time"] - 2000, "counters": counters}
    before, after = Sample(earlier), Sample(SYSTEM)
    assert rate(before, after, "tasksCompleted", "tasksFailed") == 5.5
    assert rate(None, after, "tasksCompleted") is None
    assert size(3 * 1024 * 1024 // 2) == "1.5 MiB"
    out = io.StringIO()
    Console(file=out, width=100, color_system=None).print(frame("http://x", after, before))
    text = out.getvalue()
    assert "5.5/s tasks ended, 10.0/s submitted" in text
    assert "lag ?, pending 9, length 30" in text
    assert "projector lag  3" in text
    assert "dead letters   1" in text
    assert "1.5 MiB" in text
    assert "workers: 2" in text
    # Sorted by partition, then name; idle in ms or s.
    assert text.index("w-a") < text.index("w-b")
    assert "12 ms" in text and "1.5 s" in text


# -- the commands, against a real service ----------------------------------------------


@dataclass
class Service:
    """A running `sumbatch up`: its API's URL and its embedded server."""

    url: str
    redis_port: int
    process: subprocess.Popen[bytes]
    log: Path

    def events_logged(self) -> int:
        client = redis.Redis(port=self.redis_port)
        try:
            return int(client.xlen(Keys("sumbatch").events))
        finally:
            client.close()

    def group(self, gid: str) -> dict[str, Any]:
        answer = httpx.get(f"{self.url}/grouptasks/{gid}")
        assert answer.status_code == 200, answer.text
        found: dict[str, Any] = answer.json()
        return found


def _start(tmp: Path, delay: str) -> Service:
    api_port, redis_port = free_port(), free_port()
    env = up_env(tmp / "data", redis_port, SUMBATCH_DELAY=delay, SUMBATCH_API_TOKEN=TOKEN)
    log = tmp / "up.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "sumbatch", "up", "--port", str(api_port), "--workers", "2"],
            env=env, stdout=out, stderr=subprocess.STDOUT, cwd=tmp,
        )  # fmt: skip
    url = f"http://127.0.0.1:{api_port}"
    service = Service(url, redis_port, process, log)
    try:
        wait_until_sync(lambda: answers_200(f"{url}/readyz"), timeout=60, what="the API")
    except BaseException:
        _stop(service)
        raise
    return service


def _stop(service: Service) -> None:
    service.process.send_signal(signal.SIGTERM)
    try:
        service.process.wait(30)
    except subprocess.TimeoutExpired:
        service.process.kill()
        service.process.wait()
        print(service.log.read_text(errors="replace"))
        raise


@pytest.fixture(scope="module")
def fast(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """A service whose tasks take 0.05-0.2 s."""
    service = _start(tmp_path_factory.mktemp("fast"), "0.05-0.2")
    yield service
    _stop(service)


@pytest.fixture(scope="module")
def slow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """A service whose tasks take 3 s: long enough to act while a group runs."""
    service = _start(tmp_path_factory.mktemp("slow"), "3-3")
    yield service
    _stop(service)


def cli_env(service: Service | None = None, **extra: str) -> dict[str, str]:
    """A user's environment for the client commands: the API's token, and its port
    (so the default URL finds it) when given a service."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SUMBATCH_")}
    env.update(PYTHONPATH=str(ROOT), SUMBATCH_API_TOKEN=TOKEN, TERM="xterm")
    if service is not None:
        env["SUMBATCH_PORT"] = service.url.rsplit(":", 1)[1]
    env.update(extra)
    return env


def sumbatch(
    *args: str, service: Service, stdin: str | None = None, **extra: str
) -> subprocess.CompletedProcess[str]:
    """The command against ``service`` (found through SUMBATCH_PORT), stdout a pipe."""
    return subprocess.run(
        [sys.executable, "-m", "sumbatch", *args],
        env=cli_env(service, **extra), cwd=ROOT, input=stdin, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip


@contextmanager
def running(*args: str, service: Service) -> Iterator[subprocess.Popen[str]]:
    """The command against ``service``, running, its stdout and stderr pipes; killed
    at the end if it has not ended."""
    with subprocess.Popen(
        [sys.executable, "-m", "sumbatch", *args],
        env=cli_env(service), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    ) as process:  # fmt: skip
        try:
            yield process
        finally:
            if process.poll() is None:
                process.kill()


def first_line_gid(process: subprocess.Popen[str]) -> str:
    """The group id in submit's first line on stderr (``group <id>: ...``)."""
    assert process.stderr is not None
    return process.stderr.readline().split()[1].rstrip(":")


def only_json(stdout: str) -> dict[str, Any]:
    """stdout is exactly one JSON document, on one line."""
    assert stdout.endswith("\n") and stdout.count("\n") == 1, stdout
    found: dict[str, Any] = json.loads(stdout)
    return found


def test_submit_pairs_prints_the_results(fast: Service) -> None:
    result = sumbatch("submit", "1+2", "-3+4", "5+-2", "-7+-8", service=fast)
    assert result.returncode == 0, result.stderr
    status = only_json(result.stdout)
    assert status["results"] == [3, 1, 3, -15]
    assert status["grouptaskProcessed"] is True
    assert status["grouptaskSucceeded"] is True
    gid = status["groupTaskId"]
    # The ids on stderr, and nothing drawn there either (stdout is not a terminal).
    assert result.stderr == f"group {gid}: 4 tasks, {gid[:-1]}1 to {gid[:-1]}4\n"


def test_submit_a_json_file_and_stdin(fast: Service, tmp_path: Path) -> None:
    path = tmp_path / "group.json"
    path.write_text(json.dumps(EXAMPLE))
    from_file = sumbatch("submit", str(path), service=fast)
    assert from_file.returncode == 0, from_file.stderr
    assert only_json(from_file.stdout)["results"] == [6, 19, 25, 9]
    from_stdin = sumbatch("submit", "-", service=fast, stdin=json.dumps(EXAMPLE))
    assert from_stdin.returncode == 0, from_stdin.stderr
    assert only_json(from_stdin.stdout)["results"] == [6, 19, 25, 9]


def test_bad_input_exits_2_and_submits_nothing(fast: Service, tmp_path: Path) -> None:
    before = fast.events_logged()
    bad_pair = sumbatch("submit", "1+2", "3+", service=fast)
    assert (bad_pair.returncode, bad_pair.stdout) == (2, "")
    assert bad_pair.stderr == "sumbatch: '3+' is not a pair of integers such as 1+2 or -3+4\n"
    not_json = sumbatch("submit", "-", service=fast, stdin="1+2")
    assert not_json.returncode == 2
    assert "stdin is not JSON" in not_json.stderr
    # The API's refusal (422: a float) is a usage error too, with the API's message.
    path = tmp_path / "bad.json"
    path.write_text('{"tasks": [{"paramA": 1.5, "paramB": 2}]}')
    refused = sumbatch("submit", str(path), service=fast)
    assert refused.returncode == 2
    assert "the API refused the group: invalid request" in refused.stderr
    assert "(422)" in refused.stderr
    assert fast.events_logged() == before
    assert "Traceback" not in bad_pair.stderr + not_json.stderr + refused.stderr


def test_submit_sends_the_token(fast: Service) -> None:
    refused = sumbatch("submit", "1+2", service=fast, SUMBATCH_API_TOKEN="wrong")
    assert refused.returncode == 2
    assert "(401)" in refused.stderr


def test_idempotency_key_gives_the_same_group(fast: Service) -> None:
    first = sumbatch("submit", "--no-wait", "--idempotency-key", "k-1", "4+4", service=fast)
    again = sumbatch("submit", "--no-wait", "--idempotency-key", "k-1", "4+4", service=fast)
    assert first.returncode == again.returncode == 0
    assert only_json(first.stdout) == only_json(again.stdout)


def test_no_wait_returns_before_the_group_is_processed(slow: Service) -> None:
    result = sumbatch("submit", "--no-wait", "20+22", "1+1", service=slow)
    assert result.returncode == 0, result.stderr
    created = only_json(result.stdout)
    gid = created["groupTaskId"]
    assert created["taskIds"] == [f"{gid[:-1]}1", f"{gid[:-1]}2"]
    assert result.stderr == ""
    # Each task takes 3 s: the command has returned before the group could end.
    assert slow.group(gid)["grouptaskProcessed"] is False
    # ... and the group goes on: status --wait answers once it is processed.
    waited = sumbatch("status", gid, "--wait", "30", service=slow)
    assert waited.returncode == 0, waited.stderr
    status = only_json(waited.stdout)
    assert status["grouptaskProcessed"] is True
    assert status["results"] == [42, 2]


def test_a_cancelled_group_exits_1(slow: Service) -> None:
    with running("submit", "2+3", "4+5", service=slow) as submit:
        gid = first_line_gid(submit)
        cancelled = httpx.delete(
            f"{slow.url}/grouptasks/{gid}", headers={"Authorization": f"Bearer {TOKEN}"}
        )
        assert cancelled.status_code == 202, cancelled.text
        out, err = submit.communicate(timeout=30)
    assert submit.returncode == 1, err
    status = only_json(out)
    assert status["grouptaskCancelled"] is True
    assert status["grouptaskSucceeded"] is False
    assert status["tasksRevoked"] == 2


def test_interrupted_submit_leaves_the_group_going(slow: Service) -> None:
    with running("submit", "6+7", service=slow) as submit:
        gid = first_line_gid(submit)
        submit.send_signal(signal.SIGINT)
        out, err = submit.communicate(timeout=30)
    assert (submit.returncode, out) == (130, "")
    assert err == f"sumbatch: stopped waiting; the group goes on: sumbatch status {gid}\n"
    waited = sumbatch("status", gid, "--wait", "30", service=slow)
    assert waited.returncode == 0, waited.stderr
    assert only_json(waited.stdout)["results"] == [13]


def test_without_the_event_stream_the_group_is_long_polled(fast: Service) -> None:
    """The fallback for an API without GET /grouptasks/{id}/events (a 404) or whose
    stream broke: the group's status, long-polled until processed."""
    api = Api(fast.url, TOKEN)
    created = api.post("/grouptasks", json.dumps(EXAMPLE).encode())
    tally = Tally(4)
    shown: list[int] = []
    unknown = "6f1d3c8e-5b7a-4c2d-9e31-a0b400000000"
    assert follow_events(api, unknown, tally, lambda t: shown.append(t.done)) is False
    assert shown == []
    status = until_processed(api, created["groupTaskId"], tally, lambda t: shown.append(t.done))
    assert status["results"] == [6, 19, 25, 9]
    assert (tally.done, tally.total, tally.finished) == (4, 4, True)
    assert shown[-1] == 4


def test_status_of_a_group_and_of_a_task(fast: Service) -> None:
    created = only_json(sumbatch("submit", "--no-wait", "10+20", "30+40", service=fast).stdout)
    gid, tids = created["groupTaskId"], created["taskIds"]
    group = sumbatch("status", gid, "--wait", "30", service=fast)
    assert group.returncode == 0, group.stderr
    assert only_json(group.stdout)["results"] == [30, 70]
    task = sumbatch("status", tids[1], "--api", fast.url, service=fast)
    assert task.returncode == 0, task.stderr
    found = only_json(task.stdout)
    assert (found["taskId"], found["taskState"], found["result"]) == (tids[1], "SUCCESS", 70)
    # A task id in another spelling (upper case) is the same task.
    upper = sumbatch("status", tids[0].upper(), service=fast)
    assert only_json(upper.stdout)["result"] == 30


def test_status_of_an_unknown_id_exits_1(fast: Service) -> None:
    for unknown in ("6f1d3c8e-5b7a-4c2d-9e31-a0b400000000", "not-an-id"):
        result = sumbatch("status", unknown, service=fast)
        assert (result.returncode, result.stdout) == (1, "")
        assert result.stderr == f"sumbatch: no group or task {unknown}\n"


def test_status_wait_is_checked(fast: Service) -> None:
    result = sumbatch("status", "x", "--wait", "61", service=fast)
    assert result.returncode == 2
    assert "'61' is not a number of seconds 0 to 60" in result.stderr


def test_an_unreachable_api_exits_3() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    for args in (["submit", "1+2"], ["status", "x"], ["top", "--once"]):
        result = run_sumbatch(*args, "--api", url, env=cli_env())
        assert (result.returncode, result.stdout) == (3, ""), result.stderr
        assert result.stderr == f"sumbatch: cannot reach the API at {url}: Connection refused\n"


def run_in_pty(args: list[str], env: dict[str, str], timeout: float = 60) -> tuple[int, str]:
    """Run ``python -m sumbatch *args`` with a terminal (120 columns) as its stdin,
    stdout and stderr; its exit status and all it wrote there."""
    controller, terminal = os.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    process = subprocess.Popen(
        [sys.executable, "-m", "sumbatch", *args],
        env=env, cwd=ROOT, stdin=terminal, stdout=terminal, stderr=terminal,
    )  # fmt: skip
    os.close(terminal)
    written = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while True:
            ready, _, _ = select.select([controller], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise AssertionError(f"no end after {timeout}s: {written.decode(errors='replace')}")
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # EIO: every holder of the terminal has closed it
                break
            if not chunk:
                break
            written += chunk
        return process.wait(10), written.decode(errors="replace")
    finally:
        os.close(controller)
        if process.poll() is None:
            process.kill()
            process.wait()


def test_submit_draws_a_bar_on_a_terminal(fast: Service) -> None:
    status, written = run_in_pty(["submit", "1+1", "2+2", "3+3"], cli_env(fast))
    assert status == 0, written
    assert "━" in written  # rich's bar
    assert "3/3" in written
    # The status is still the last thing written, on a line of its own.
    last = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", written).rstrip().rsplit("\n", 1)[-1]
    assert json.loads(last)["results"] == [2, 4, 6]


def test_top_once_shows_the_counters_and_workers(fast: Service) -> None:
    assert sumbatch("submit", "100+1", "100+2", service=fast).returncode == 0
    # The service is idle now: what /system says stays so while top samples it.
    counters = httpx.get(f"{fast.url}/system").json()["counters"]
    result = sumbatch("top", "--once", "--interval", "0.2", service=fast)
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert text.startswith(f"sumbatch top  {fast.url}  partitions 1  ")
    assert "0.0/s tasks ended, 0.0/s submitted" in text
    assert (
        f"submitted {counters['tasksSubmitted']:,}, completed {counters['tasksCompleted']:,}"
        in text
    )
    for label in ("work", "projector lag", "dead letters", "event log", "redis memory"):
        assert f"\n{label} " in text
    # Each worker the work stream's consumer group knows, by name (before Redis 7.2 a
    # worker is listed once it has been served an entry).
    client = redis.Redis(port=fast.redis_port, decode_responses=True)
    try:
        consumers = client.xinfo_consumers(Keys("sumbatch").work, WORKER_GROUP)
    finally:
        client.close()
    assert consumers
    assert f"workers: {len(consumers)}" in text
    for consumer in consumers:
        assert consumer["name"] in text
    assert "\x1b[" not in text  # plain text


def test_top_prints_frames_in_a_pipe_until_ctrl_c(fast: Service) -> None:
    with running("top", "--interval", "0.2", service=fast) as top:
        assert top.stdout is not None
        frames = 0
        while frames < 3:
            line = top.stdout.readline()
            assert line, f"top ended: {top.communicate(timeout=10)[1]}"
            frames += line.startswith("sumbatch top")
        top.send_signal(signal.SIGINT)
        _, err = top.communicate(timeout=30)
    assert (top.returncode, err) == (0, "")
