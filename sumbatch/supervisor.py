"""``sumbatch up``: start the embedded server when REDIS_URL is unset, then the API,
the workers and the projector as child processes; restart a child that dies; on
SIGTERM/SIGINT stop the children (they finish in-flight work), then the server."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from types import FrameType

from sumbatch.config import Settings
from sumbatch.embedded import EmbeddedServer, ServerNotFound

log = logging.getLogger("sumbatch.up")


@dataclass
class Child:
    name: str
    argv: list[str]
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0


class Supervisor:
    def __init__(
        self, settings: Settings, *, host: str | None, port: int | None, workers: int
    ) -> None:
        self.settings = settings
        self.host = host or settings.host
        self.port = port or settings.port
        self.workers = workers
        self.stopping = False
        self.server: EmbeddedServer | None = None

    def _children(self) -> list[Child]:
        me = [sys.executable, "-m", "sumbatch"]
        children = [Child("api", [*me, "api", "--host", self.host, "--port", str(self.port)])]
        children += [Child(f"worker-{i + 1}", [*me, "worker"]) for i in range(self.workers)]
        children.append(Child("projector", [*me, "projector"]))
        return children

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.stopping = True

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        env = dict(os.environ)
        if self.settings.redis_url is None:
            try:
                self.server = EmbeddedServer(
                    self.settings.data_dir,
                    self.settings.embedded_port,
                    appendfsync=self.settings.fsync,
                )
                self.server.start()
            except (ServerNotFound, RuntimeError, TimeoutError) as exc:
                log.error("%s", exc)
                return 1
            env["REDIS_URL"] = self.server.url
            log.info(
                "embedded server %s on %s, data in %s",
                self.server.binary,
                self.server.url,
                self.server.data_dir,
            )
        children = self._children()
        try:
            for child in children:
                self._spawn(child, env)
            log.info("API on http://%s:%d  (Ctrl-C to stop)", self.host, self.port)
            while not self.stopping:
                for child in children:
                    assert child.process is not None
                    code = child.process.poll()
                    if code is not None and not self.stopping:
                        child.restarts += 1
                        log.warning("%s exited with %s; restarting", child.name, code)
                        time.sleep(min(5.0, 0.2 * child.restarts))
                        self._spawn(child, env)
                time.sleep(0.2)
        finally:
            self._stop(children)
        return 0

    def _spawn(self, child: Child, env: dict[str, str]) -> None:
        # Children ignore the terminal's Ctrl-C; we forward one SIGTERM in order.
        child.process = subprocess.Popen(
            child.argv, env=env, stdin=subprocess.DEVNULL, start_new_session=True
        )

    def _stop(self, children: list[Child]) -> None:
        log.info("stopping")
        # Past the workers' own grace, so they can hand back what they could not finish.
        grace = self.settings.shutdown_grace + 10
        for child in children:
            if child.process is not None and child.process.poll() is None:
                child.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for child in children:
            if child.process is None:
                continue
            try:
                child.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in %.0fs; killing", child.name, grace)
                child.process.kill()
                child.process.wait()
        if self.server is not None:
            self.server.stop()
        log.info("stopped")
