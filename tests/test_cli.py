"""The commands a user types: ``sumbatch up``, ``audit``, ``replay``, ``tail``."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import httpx2 as httpx
import msgspec
import pytest

from sumbatch.config import Settings
from sumbatch.model.tasks import Delay
from sumbatch.store import open_store
from tests.support import (
    ROOT,
    Processes,
    answers_200,
    env_for,
    free_port,
    group_processed,
    run_sumbatch,
    submit,
    up_env,
    wait_until_sync,
)

EXAMPLE = '{"tasks": [{"paramB" : 5, "paramA": 1}, {"paramB" : 10, "paramA": 9}, {"paramB" : 13, "paramA": 12}, {"paramB" : 1, "paramA": 8}]}'  # noqa: E501


def run_example(base: str) -> tuple[str, dict[str, object]]:
    """The original README's curl example, then poll until processed."""
    wait_until_sync(lambda: answers_200(f"{base}/healthz"), timeout=30, what="the API")
    with httpx.Client(base_url=base) as api:
        created = api.post(
            "/grouptasks", content=EXAMPLE, headers={"Content-type": "application/json"}
        ).json()
        gid = created["groupTaskId"]
        wait_until_sync(
            lambda: group_processed(api, gid), timeout=30, what="the group to be processed"
        )
        group: dict[str, object] = api.get(f"/grouptasks/{gid}").json()
    return gid, group


def test_up_starts_an_embedded_server_and_everything_and_stops_cleanly(tmp_path: Path) -> None:
    api_port, redis_port = free_port(), free_port()
    env = up_env(tmp_path / "data", redis_port, SUMBATCH_DELAY="0.1-0.3")
    log = (tmp_path / "up.log").open("wb")
    up = subprocess.Popen(
        [sys.executable, "-m", "sumbatch", "up", "--port", str(api_port), "--workers", "2"],
        env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path,
    )  # fmt: skip
    try:
        _, group = run_example(f"http://127.0.0.1:{api_port}")
        assert group["results"] == [6, 19, 25, 9]
        assert group["grouptaskSucceeded"] is True
        # AOF persistence in the data directory.
        assert (tmp_path / "data" / "appendonlydir").is_dir()
        up.send_signal(signal.SIGTERM)
        assert up.wait(30) == 0
        assert not answers_200(f"http://127.0.0.1:{api_port}/healthz")
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", redis_port), timeout=1).close()
    except BaseException:
        log.flush()
        print((tmp_path / "up.log").read_text(errors="replace"))  # shown with the failure
        raise
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
        log.close()


def test_up_uses_redis_url_when_set(settings: Settings, tmp_path: Path) -> None:
    api_port = free_port()
    env = env_for(msgspec.structs.replace(settings, delay=Delay(0, 0)))
    env["SUMBATCH_DATA_DIR"] = str(tmp_path / "unused")
    up = subprocess.Popen(
        [sys.executable, "-m", "sumbatch", "up", "--port", str(api_port), "--workers", "1"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT,
    )  # fmt: skip
    try:
        gid, group = run_example(f"http://127.0.0.1:{api_port}")
        assert group["results"] == [6, 19, 25, 9]
        assert not (tmp_path / "unused").exists()  # no embedded server was started
        audit = run_sumbatch("audit", gid, env=env_for(settings))
        assert audit.returncode == 0
    finally:
        up.send_signal(signal.SIGTERM)
        up.wait(30)
    kinds = [line.split()[1] for line in audit.stdout.splitlines()]
    assert kinds[0] == "GroupSubmitted"
    # No delay: each task logs only its TaskCompleted (it started and ended at once).
    assert Counter(kinds[1:-1]) == Counter({"TaskCompleted": 4})
    assert kinds[-1] == "GroupFinished"
    check = run_sumbatch("replay", "--check", env=env_for(settings))
    assert check.returncode == 0
    assert check.stdout.strip().startswith("replayed 6 events: 0 differences")


def test_audit_of_an_unknown_group_fails(settings: Settings) -> None:
    result = run_sumbatch("audit", "00000000-0000-0000-0000-000000000000", env=env_for(settings))
    assert result.returncode == 1
    assert "no events for group" in result.stderr


def test_tail_prints_events_as_they_are_appended(settings: Settings, procs: Processes) -> None:
    log_path = procs.logs / "tail-0.log"
    procs.start(settings, "tail", "--from-start")

    async def go() -> str:
        async with open_store(settings) as store:
            gid, _ = await submit(store, [(1, 2)])
        return gid

    gid = asyncio.run(go())

    def printed() -> bool:
        text = log_path.read_text()
        return "GroupSubmitted" in text

    wait_until_sync(printed, timeout=20, what="tail to print the submission")
    assert gid in log_path.read_text()


def test_bad_settings_exit_2_and_name_the_variable(settings: Settings) -> None:
    env = env_for(settings)
    env["SUMBATCH_DELAY"] = "fast"
    result = run_sumbatch("worker", env=env, timeout=30)
    assert result.returncode == 2
    assert "SUMBATCH_DELAY='fast' is not valid" in result.stderr
