"""The commands a user types: ``sumbatch up``, ``audit``, ``replay``, ``tail``."""

from __future__ import annotations

import asyncio
import os
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
from sumbatch.store import open_store
from sumbatch.tasks import Delay
from tests.support import ROOT, Processes, env_for, free_port, submit, wait_until_sync

EXAMPLE = '{"tasks": [{"paramB" : 5, "paramA": 1}, {"paramB" : 10, "paramA": 9}, {"paramB" : 13, "paramA": 12}, {"paramB" : 1, "paramA": 8}]}'  # noqa: E501


def sumbatch(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sumbatch", *args],
        env=env_for(settings),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )


def run_example(base: str) -> tuple[str, dict[str, object]]:
    """The original README's curl example, then poll until processed."""
    wait_until_sync(lambda: _ok(f"{base}/healthz"), timeout=30, what="the API")
    created = httpx.post(
        f"{base}/grouptasks", content=EXAMPLE, headers={"Content-type": "application/json"}
    ).json()
    gid = created["groupTaskId"]

    def processed() -> dict[str, object] | None:
        body: dict[str, object] = httpx.get(f"{base}/grouptasks/{gid}").json()
        return body if body["grouptaskProcessed"] else None

    group = wait_until_sync(processed, timeout=30, what="the group to be processed")
    assert group is not None  # wait_until_sync returns only a truthy answer
    return gid, group


def _ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_up_starts_an_embedded_server_and_everything_and_stops_cleanly(tmp_path: Path) -> None:
    api_port, redis_port = free_port(), free_port()
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("SUMBATCH_") and k != "REDIS_URL"
    }
    env.update(
        SUMBATCH_DELAY="0.1-0.3",
        SUMBATCH_DATA_DIR=str(tmp_path / "data"),
        SUMBATCH_EMBEDDED_PORT=str(redis_port),
        PYTHONPATH=str(ROOT),
    )
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
        assert not _ok(f"http://127.0.0.1:{api_port}/healthz")
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
        audit = sumbatch(settings, "audit", gid)
        assert audit.returncode == 0
    finally:
        up.send_signal(signal.SIGTERM)
        up.wait(30)
    kinds = [line.split()[1] for line in audit.stdout.splitlines()]
    assert kinds[0] == "GroupSubmitted"
    # No delay: each task logs only its TaskCompleted (it started and ended at once).
    assert Counter(kinds[1:-1]) == Counter({"TaskCompleted": 4})
    assert kinds[-1] == "GroupFinished"
    check = sumbatch(settings, "replay", "--check")
    assert check.returncode == 0
    assert check.stdout.strip().startswith("replayed 6 events: 0 differences")


def test_audit_of_an_unknown_group_fails(settings: Settings) -> None:
    result = sumbatch(settings, "audit", "00000000-0000-0000-0000-000000000000")
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
    result = subprocess.run(
        [sys.executable, "-m", "sumbatch", "worker"], env=env, capture_output=True, text=True,
        timeout=30, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 2
    assert "SUMBATCH_DELAY='fast' is not valid" in result.stderr
