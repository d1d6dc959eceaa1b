"""What the benchmark scripts share beyond sumbatch.testing: running the service's real
processes as a user would, and reading figures off them. (Each script runs with this
folder on sys.path, as `python ops/bench/<script>.py` puts it there.)"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from sumbatch.testing.groups import body_of
from sumbatch.testing.ports import free_port
from sumbatch.testing.processes import clean_env
from sumbatch.testing.waiting import answers_200, wait_until_sync

ME = [sys.executable, "-m", "sumbatch"]


def peak_rss_kib(pid: int) -> int | None:
    """A live process's peak resident memory (VmHWM), in KiB; None when it is not
    known (the process is gone, or the kernel does not say)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return None


def wait_ready(base: str, path: str = "/readyz", timeout: float = 30) -> None:
    wait_until_sync(lambda: answers_200(base + path), timeout, f"{base}{path} to answer 200")


@contextmanager
def service(
    url: str,
    namespace: str,
    delay: str,
    workers: int,
    up: bool = False,
    *,
    env: Mapping[str, str] | None = None,
    logs: Path | None = None,
) -> Iterator[tuple[str, list[subprocess.Popen[bytes]]]]:
    """The real processes, configured by environment as a user would: the API's base
    URL, and the children, in order the API, the workers, the projector (with ``up``,
    the one `sumbatch up`, whose children they are). ``env``: more variables for them
    (SUMBATCH_PARTITIONS, say); ``logs``: a folder where each child writes its output,
    to ``<command>-<n>.log``, instead of this terminal."""
    port = free_port()
    child_env = clean_env(
        REDIS_URL=url, SUMBATCH_NAMESPACE=namespace, SUMBATCH_DELAY=delay,
        SUMBATCH_LOG_LEVEL="WARNING", **(env or {}),
    )  # fmt: skip
    children: list[subprocess.Popen[bytes]] = []
    with ExitStack() as files:

        def start(*args: str) -> subprocess.Popen[bytes]:
            out = None
            if logs is not None:
                out = files.enter_context((logs / f"{args[0]}-{len(children)}.log").open("wb"))
            return subprocess.Popen([*ME, *args], env=child_env, stdout=out, stderr=out)

        if up:
            children.append(start("up", "--port", str(port)))
        else:
            children.append(start("api", "--port", str(port)))
            for _ in range(workers):
                children.append(start("worker"))
            children.append(start("projector"))
        base = f"http://127.0.0.1:{port}"
        try:
            wait_ready(base)
            yield base, children
        finally:
            for child in children:
                child.send_signal(signal.SIGTERM)
            for child in children:
                child.wait(60)


def tasks_for(n: int) -> tuple[dict[str, Any], list[int]]:
    """A POST body of ``n`` random tasks, and the sums it must come back with."""
    pairs = [(random.randrange(-(10**9), 10**9), random.randrange(10**9)) for _ in range(n)]
    return body_of(pairs), [a + b for a, b in pairs]
