"""`kill -9` of `up` while its workers run tasks: its embedded server dies with it, so
the children cannot finish or hand back their work; they exit as soon as they see the
server gone, not after their shutdown grace, and what they held stays pending."""

from __future__ import annotations

import signal
from pathlib import Path

import httpx2 as httpx

from tests.support import listening, wait_until_sync
from tests.test_up import GROUP, alive, descendants, running_up


def test_a_killed_up_with_tasks_in_flight_leaves_no_child_for_the_grace(tmp_path: Path) -> None:
    # Tasks far longer than the deadline below, and a grace longer still: a child that
    # waited for either would outlive the deadline.
    with running_up(
        tmp_path, "--workers", "2", SUMBATCH_DELAY="60-61", SUMBATCH_SHUTDOWN_GRACE="120"
    ) as up:
        gid = httpx.post(f"{up.base}/grouptasks", json=GROUP).json()["groupTaskId"]
        task = f"{gid[:-8]}{1:08x}"

        def started() -> bool:
            state = httpx.get(f"{up.base}/tasks/{task}").json()["taskState"]
            return bool(state == "STARTED")

        wait_until_sync(started, timeout=30, what="a task to start")
        family = descendants(up.process.pid)
        up.process.send_signal(signal.SIGKILL)
        up.process.wait(10)

        def all_gone() -> bool:
            return not any(alive(pid) for pid in family)

        wait_until_sync(all_gone, timeout=30, what="every child of the killed up to exit")
        assert not listening(up.api_port) and not listening(up.redis_port)
