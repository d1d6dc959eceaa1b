"""``sumbatch up`` as a user runs it: which server it picks and why, how its embedded
server lives and dies with it, refusing a second instance, leaving no orphans, and
refusing at once what can never start."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx2 as httpx
import pytest
import redis

from sumbatch.config import Settings
from sumbatch.model.keys import Keys
from sumbatch.processes.embedded import (
    MIN_SERVER_VERSION,
    find_server,
    locate_server,
    parse_server_version,
    server_version,
)
from tests.support import (
    ROOT,
    answers_200,
    entries,
    free_port,
    group_processed,
    listening,
    own_server,
    run_sumbatch,
    up_env,
    wait_until_sync,
    with_credentials,
)

GROUP = {"tasks": [{"paramA": 1, "paramB": 5}, {"paramA": 9, "paramB": 10}]}


# --- which server, and why -------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "version"),
    [
        ("Redis server v=7.0.15 sha=00000000:0 malloc=jemalloc-5.3.0 bits=64", (7, 0, 15)),
        ("Valkey server v=8.1.8 sha=00000000:1 malloc=libc bits=64", (8, 1, 8)),
        ("Redis server v=6.0.16 sha=00000000:0", (6, 0, 16)),
        ("KeyDB server v=6.3 sha=0", (6, 3, 0)),
        ("redis-server: command not understood", None),
        ("", None),
    ],
)
def test_parse_server_version(text: str, version: tuple[int, ...] | None) -> None:
    assert parse_server_version(text) == version


def _fake_server(directory: Path, name: str, says: str) -> None:
    """A server binary as far as `--version` goes: all `up` asks a binary it may
    choose, and servers of just the versions to test are not installed here."""
    directory.mkdir(exist_ok=True)
    script = directory / name
    script.write_text(f"#!/bin/sh\necho '{says}'\n")
    script.chmod(0o755)


def test_a_server_on_path_older_than_the_minimum_is_passed_over(tmp_path: Path) -> None:
    _fake_server(tmp_path / "bin", "redis-server", "Redis server v=6.0.16 sha=00000000:0")
    found = locate_server({"PATH": str(tmp_path / "bin")})
    assert found.path != str(tmp_path / "bin" / "redis-server")
    assert found.version is not None and found.version >= MIN_SERVER_VERSION
    assert "redis-server 6.0.16 on PATH is older than 7.0" in found.reason
    assert "using the packaged valkey-server" in found.reason


def test_a_recent_server_on_path_is_taken(tmp_path: Path) -> None:
    _fake_server(tmp_path, "valkey-server", "Valkey server v=7.2.4 sha=0 malloc=libc bits=64")
    found = locate_server({"PATH": str(tmp_path)})
    assert found.path == str(tmp_path / "valkey-server")
    assert found.version == (7, 2, 4)
    assert found.reason.endswith("found on PATH")


def test_nothing_on_path_means_the_packaged_binary(tmp_path: Path) -> None:
    found = locate_server({"PATH": str(tmp_path)})
    assert "no redis-server or valkey-server on PATH" in found.reason
    assert Path(found.path).name == "valkey-server"
    assert server_version(found.path) == found.version


def test_sumbatch_redis_server_is_used_as_given(tmp_path: Path) -> None:
    _fake_server(tmp_path / "bin", "my-server", "Redis server v=6.2.0 sha=0")
    given = str(tmp_path / "bin" / "my-server")
    found = locate_server({"SUMBATCH_REDIS_SERVER": given, "PATH": ""})
    assert (found.path, found.version) == (given, (6, 2, 0))
    assert found.reason == "SUMBATCH_REDIS_SERVER is set"


# --- running `up` ------------------------------------------------------------------


@dataclass
class Up:
    process: subprocess.Popen[bytes]
    log: Path
    api_port: int
    redis_port: int
    data_dir: Path

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def client(self) -> httpx.Client:
        """A client of its API, for the helpers that take one (group_processed)."""
        return httpx.Client(base_url=self.base, timeout=2)


def descendants(pid: int) -> set[int]:
    found: set[int] = set()
    todo = [pid]
    while todo:
        try:
            # A process that exits meanwhile has no /proc entry left (its children,
            # if any, are reparented and found no more from here).
            tasks = list(Path(f"/proc/{todo.pop()}/task").iterdir())
        except OSError:
            continue
        for task in tasks:
            try:
                kids = {int(p) for p in (task / "children").read_text().split()}
            except OSError:
                continue
            todo += sorted(kids - found)
            found |= kids
    return found


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited


@contextmanager
def running_up(
    tmp_path: Path, *args: str, name: str = "up", wait: bool = True, **extra: str
) -> Iterator[Up]:
    api_port, redis_port = free_port(), free_port()
    data_dir = tmp_path / f"{name}-data"
    log = tmp_path / f"{name}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "sumbatch", "up", "--port", str(api_port), *args],
            env=up_env(data_dir, redis_port, **extra),
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path,
            start_new_session=True,  # its own process group, as a shell job is
        )  # fmt: skip
    up = Up(process, log, api_port, redis_port, data_dir)
    family: set[int] = set()
    try:
        if wait:
            wait_until_sync(
                lambda: answers_200(f"{up.base}/readyz"), timeout=30, what=f"the API\n{up.output()}"
            )
            family = descendants(process.pid)
        yield up
    finally:
        family |= descendants(process.pid)
        for pid in [process.pid, *family]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        process.wait(10)


def test_up_logs_which_server_it_runs_and_why(tmp_path: Path) -> None:
    with running_up(tmp_path, "--workers", "1") as up:
        said = up.output()
    chosen = find_server()
    assert f"embedded server: {chosen}" in said
    reason = locate_server().reason
    assert reason in said


def test_ctrl_c_stops_the_children_first_and_the_server_last(tmp_path: Path) -> None:
    with running_up(tmp_path, "--workers", "2", SUMBATCH_DELAY="2-3") as up:
        gid = httpx.post(f"{up.base}/grouptasks", json=GROUP).json()["groupTaskId"]
        task = f"{gid[:-8]}{1:08x}"

        def started() -> bool:
            state = httpx.get(f"{up.base}/tasks/{task}").json()["taskState"]
            return bool(state == "STARTED")

        wait_until_sync(started, timeout=20, what="a task in flight")
        began = time.monotonic()
        os.killpg(up.process.pid, signal.SIGINT)  # what Ctrl-C in its terminal does
        assert up.process.wait(40) == 0
        took = time.monotonic() - began
        said = up.output()
    # The workers finished their 2-3 s tasks against a live server: nowhere near the
    # 30 s grace they would wait for a server that had already gone.
    assert took < 15, said
    assert "Traceback" not in said and "ConnectionError" not in said, said
    with own_server(up.data_dir) as server:
        client = redis.Redis(port=server.port, decode_responses=True)
        log = Keys(Settings().namespace).group_log(gid)  # `up` runs the default namespace
        kinds = [fields["type"] for _, fields in entries(client, log)]
        client.close()
    assert kinds.count("TaskCompleted") == 2 and kinds[-1] == "GroupFinished", kinds


def test_a_killed_embedded_server_is_restarted_on_its_data(tmp_path: Path) -> None:
    with running_up(tmp_path, "--workers", "1") as up, up.client() as api:
        before = httpx.post(f"{up.base}/grouptasks", json=GROUP).json()["groupTaskId"]
        wait_until_sync(lambda: group_processed(api, before), timeout=20, what="the first group")
        client = redis.Redis(port=up.redis_port)
        pid = int(client.info("server")["process_id"])
        os.kill(pid, signal.SIGKILL)

        def post() -> str | None:
            try:
                answer = httpx.post(f"{up.base}/grouptasks", json=GROUP, timeout=3)
            except httpx.HTTPError:
                return None
            return str(answer.json()["groupTaskId"]) if answer.status_code == 200 else None

        after = wait_until_sync(post, timeout=30, what="a POST to succeed again")
        wait_until_sync(lambda: group_processed(api, after), timeout=30, what="the new group")
        assert group_processed(api, before)  # the data dir came back with it
        assert int(client.info("server")["process_id"]) != pid
        client.close()
        assert up.process.poll() is None
        assert "embedded server exited with -9; restarting it on" in up.output()


def _second_up(tmp_path: Path, env: dict[str, str], api_port: int) -> tuple[int, str, float]:
    began = time.monotonic()
    done = run_sumbatch("up", "--port", str(api_port), env=env, cwd=tmp_path, timeout=30)
    return done.returncode, done.stderr, time.monotonic() - began


def test_a_second_up_is_refused_at_once(tmp_path: Path) -> None:
    with running_up(tmp_path, "--workers", "1") as first:
        same_dir = up_env(first.data_dir, free_port())
        code, said, took = _second_up(tmp_path, same_dir, free_port())
        assert code != 0 and took < 5, said
        assert f"data dir {first.data_dir} is in use" in said

        same_redis_port = up_env(tmp_path / "other", first.redis_port)
        code, said, took = _second_up(tmp_path, same_redis_port, free_port())
        assert code != 0 and took < 5, said
        assert f"SUMBATCH_EMBEDDED_PORT: cannot listen on 127.0.0.1:{first.redis_port}" in said

        same_api_port = up_env(tmp_path / "third", free_port())
        code, said, took = _second_up(tmp_path, same_api_port, first.api_port)
        assert code != 0 and took < 5, said
        assert f"cannot listen on 127.0.0.1:{first.api_port}" in said
        assert "Traceback" not in said
        # The first one is untouched, and the refused ones left nothing behind.
        assert answers_200(f"{first.base}/readyz") and first.process.poll() is None
        assert not (tmp_path / "third" / "appendonlydir").exists()


def test_a_killed_up_leaves_no_orphans(tmp_path: Path) -> None:
    with running_up(tmp_path, "--workers", "2") as up:
        family = descendants(up.process.pid)
        assert len(family) == 5  # server, api, two workers, projector
        up.process.send_signal(signal.SIGKILL)
        up.process.wait(10)

        def all_gone() -> bool:
            return not any(alive(pid) for pid in family)

        wait_until_sync(all_gone, timeout=15, what="every child of the killed up to exit")
        assert not listening(up.api_port) and not listening(up.redis_port)


def test_a_child_that_keeps_dying_at_start_stops_up_with_one_message(tmp_path: Path) -> None:
    """A handler that loaded when `up` checked it but breaks later (a bad deploy while
    it runs): validation at start cannot see it, so the crash-loop guard must."""
    module = tmp_path / "mysum.py"
    module.write_text("def add(a, b):\n    return a + b\n")
    with running_up(
        tmp_path,
        "--workers",
        "1",
        SUMBATCH_HANDLER="mysum:add",
        PYTHONPATH=f"{ROOT}{os.pathsep}{tmp_path}",
        PYTHONDONTWRITEBYTECODE="1",
    ) as up:
        module.write_text("raise RuntimeError('the handler module broke')\n")
        worker = next(
            pid
            for pid in descendants(up.process.pid)
            if b"worker" in Path(f"/proc/{pid}/cmdline").read_bytes()
        )
        family = descendants(up.process.pid)
        os.kill(worker, signal.SIGKILL)
        code = up.process.wait(60)
        said = up.output()
    assert code != 0
    assert "worker-1 exited 5 times in a row" in said, said
    assert "Its last error: sumbatch: SUMBATCH_HANDLER='mysum:add' is not valid: " in said
    assert "the handler module broke" in said
    assert said.count("times in a row") == 1
    assert not any(alive(pid) for pid in family)


# --- refusing at once what can never start ----------------------------------------

BAD_SETTINGS = [
    ("REDIS_URL", "http://x", "REDIS_URL is not valid: scheme 'http'"),
    ("SUMBATCH_HANDLER", "nosuch:fn", "SUMBATCH_HANDLER='nosuch:fn' is not valid"),
    ("SUMBATCH_HANDLER", "nosuch", "SUMBATCH_HANDLER='nosuch' is not valid"),
    ("SUMBATCH_HANDLER", "os:sep", "SUMBATCH_HANDLER='os:sep' is not valid: sep is not callable"),
    ("SUMBATCH_DELAY", "nan", "SUMBATCH_DELAY='nan' is not valid"),
    ("SUMBATCH_DELAY", "1-inf", "SUMBATCH_DELAY='1-inf' is not valid"),
    ("SUMBATCH_PORT", "99999", "SUMBATCH_PORT='99999' is not valid: expected 1 to 65535"),
    ("SUMBATCH_EMBEDDED_PORT", "0", "SUMBATCH_EMBEDDED_PORT='0' is not valid"),
    ("SUMBATCH_LOG_LEVEL", "LOUD", "SUMBATCH_LOG_LEVEL='LOUD' is not valid"),
    ("SUMBATCH_TASK_TIMEOUT", "5", "SUMBATCH_TASK_TIMEOUT=5 is not valid"),
    # Issue 17, item 6: each was accepted, then broke the pipeline or `up`.
    ("SUMBATCH_WORKERS", "100000", "SUMBATCH_WORKERS='100000' is not valid: expected 0 to 256"),
    ("SUMBATCH_RESULT_TTL", "2147483647", "SUMBATCH_RESULT_TTL='2147483647' is not valid"),
    ("SUMBATCH_LOG_RETENTION", "9300000000000000", "SUMBATCH_LOG_RETENTION='93000000"),
    ("SUMBATCH_NAMESPACE", "{y}", "SUMBATCH_NAMESPACE='{y}' is not valid"),
]


@pytest.mark.parametrize("command", ["up", "worker"])
@pytest.mark.parametrize(("name", "value", "message"), BAD_SETTINGS)
def test_a_bad_setting_stops_at_once_naming_it(
    tmp_path: Path, command: str, name: str, value: str, message: str
) -> None:
    env = up_env(tmp_path / "data", free_port(), **{"SUMBATCH_DELAY": "3-10", name: value})
    port = ["--port", str(free_port())] if command == "up" else []
    done = run_sumbatch(command, *port, env=env, cwd=tmp_path, timeout=30)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "data" / "appendonlydir").exists()  # no server was started


def test_more_workers_than_the_range_are_refused_on_the_command_line(tmp_path: Path) -> None:
    env = up_env(tmp_path / "data", free_port())
    done = run_sumbatch("up", "--workers", "100000", env=env, cwd=tmp_path, timeout=30)
    assert done.returncode == 2
    assert "--workers: '100000' is not valid: expected 0 to 256" in done.stderr
    assert not (tmp_path / "data" / "appendonlydir").exists()


@pytest.mark.parametrize("how", ["SIGTERM", "Ctrl-C"])
def test_a_signal_while_up_starts_its_processes_stops_it_at_once(tmp_path: Path, how: str) -> None:
    """Issue 17, item 6: `up` went on starting every worker it was asked for after a
    SIGTERM. Now it starts no more, stops those it started and exits, leaving none."""
    workers = 256  # the most SUMBATCH_WORKERS allows
    with running_up(tmp_path, "--workers", str(workers), wait=False) as up:
        family: set[int] = set()

        def a_worker_started() -> bool:
            family.update(descendants(up.process.pid))
            return any(b"worker" in _cmdline(pid) for pid in family)

        wait_until_sync(a_worker_started, timeout=60, what=f"up's first worker\n{up.output()}")
        if how == "SIGTERM":
            up.process.send_signal(signal.SIGTERM)
        else:
            os.killpg(up.process.pid, signal.SIGINT)  # what Ctrl-C in its terminal does

        def exited() -> bool:
            family.update(descendants(up.process.pid))
            return up.process.poll() is not None

        wait_until_sync(exited, timeout=60, what=f"up to stop\n{up.output()}")
        said = up.output()
    assert up.process.returncode == 0, said
    total = workers + 2  # and the API and the projector
    started = re.search(rf"stopped while starting: (\d+) of {total} processes had started", said)
    assert started and int(started.group(1)) < total, said
    assert "API on http" not in said
    assert not any(alive(pid) for pid in family), said
    assert not listening(up.api_port) and not listening(up.redis_port)


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


@pytest.mark.parametrize("command", ["up", "api"])
def test_a_port_out_of_range_is_refused(tmp_path: Path, command: str) -> None:
    env = up_env(tmp_path / "data", free_port())
    done = run_sumbatch(command, "--port", "99999", env=env, cwd=tmp_path, timeout=30)
    assert done.returncode == 2
    assert "--port: '99999' is not a port: expected 1 to 65535" in done.stderr


def test_up_refuses_credentials_the_server_refuses(tmp_path: Path) -> None:
    with own_server(tmp_path / "auth", extra_args=("--requirepass", "right")) as server:
        env = up_env(tmp_path / "data", free_port())
        env["REDIS_URL"] = with_credentials(server.url, "", "wrong")
        port = str(free_port())
        began = time.monotonic()
        done = run_sumbatch("up", "--port", port, env=env, cwd=tmp_path, timeout=30)
    assert done.returncode == 2, done.stderr
    assert time.monotonic() - began < 10
    assert "REDIS_URL: the server refuses these credentials" in done.stderr
    assert "wrong" not in done.stderr  # the password is not echoed


def test_up_in_durable_mode_refuses_a_server_that_cannot_promise_it(tmp_path: Path) -> None:
    """SUMBATCH_DURABLE with the embedded server on appendfsync no: `up` stops at
    once, naming the setting, before any child starts, and stops its server."""
    env = up_env(tmp_path / "data", free_port(), SUMBATCH_DURABLE="true", SUMBATCH_FSYNC="no")
    done = run_sumbatch("up", "--port", str(free_port()), env=env, cwd=tmp_path, timeout=60)
    assert done.returncode == 2, done.stderr
    assert "appendfsync is no" in done.stderr
    assert "Traceback" not in done.stderr
    assert "API on http" not in done.stderr  # no child was started
