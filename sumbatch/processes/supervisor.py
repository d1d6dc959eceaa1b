"""``sumbatch up``: start the embedded server when REDIS_URL is unset, then the API,
the workers and the projector as child processes; restart a child (or the server)
that dies, but give up on one that keeps dying at once; on SIGTERM/SIGINT stop the
children (they finish in-flight work), then the server."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType
from typing import IO

import msgspec

from sumbatch.config import PARENT_PID_ENV, Settings
from sumbatch.processes.children import Child, last_line
from sumbatch.processes.cluster import BUS_OFFSET, LocalCluster
from sumbatch.processes.embedded import EmbeddedServer, ServerNotFound, locate_server, version_text
from sumbatch.processes.preflight import Refused, check_credentials, check_port_free, lock_data_dir

log = logging.getLogger("sumbatch.up")

# A child that exits within QUICK_EXIT seconds of its start CRASH_LOOP times in a row
# cannot start (bad credentials, a broken handler...): restarting it forever only
# prints the same traceback forever.
QUICK_EXIT = 10.0
CRASH_LOOP = 5


class CrashLoop(Exception):
    pass


class Supervisor:
    def __init__(
        self,
        settings: Settings,
        *,
        host: str | None,
        port: int | None,
        workers: int,
        cluster: int = 0,
        quick_exit: float = QUICK_EXIT,
        crash_loop: int = CRASH_LOOP,
    ) -> None:
        self.settings = settings
        self.host = host or settings.host
        self.port = port or settings.port
        self.workers = workers
        self.quick_exit = quick_exit
        self.crash_loop = crash_loop
        # Masters of a local cluster to start instead of one server (0: one server).
        self.cluster = cluster
        self.stopping = False
        # The embedded server, or the nodes of the local cluster.
        self.servers: list[EmbeddedServer] = []
        self.server_quick_exits: dict[int, int] = {}
        self._lock: IO[str] | None = None

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
        env[PARENT_PID_ENV] = str(os.getpid())
        try:
            self._preflight()
            if self.settings.redis_url is None:
                env["REDIS_URL"] = self._start_server()
            self._check_durable(env.get("REDIS_URL") or self.settings.client_url)
        except Refused as exc:
            log.error("%s", exc)
            self._release()
            return exc.code
        children = self._children()
        try:
            if not self._spawn(children, env):
                return 0
            log.info("API on http://%s:%d  (Ctrl-C to stop)", self.host, self.port)
            while not self.stopping:
                self._watch_server()
                for child in children:
                    self._watch(child, env)
                time.sleep(0.2)
        except CrashLoop as exc:
            log.error("%s", exc)
            return 1
        finally:
            self._stop(children)
        return 0

    def _spawn(self, children: list[Child], env: dict[str, str]) -> bool:
        """Start the children one after the other, unless a signal comes meanwhile:
        then start no more (``_stop`` stops those already started). Whether all
        started."""
        for started, child in enumerate(children):
            if self.stopping:
                log.warning(
                    "stopped while starting: %d of %d processes had started",
                    started, len(children),
                )  # fmt: skip
                return False
            child.spawn(env)
        return True

    def _preflight(self) -> None:
        """Refuse at once what would otherwise fail later in every child: a data dir
        or a port another instance holds, credentials the server refuses."""
        if self.settings.redis_url is None:
            self._lock = lock_data_dir(Path(self.settings.data_dir))
            for port in self._server_ports():
                check_port_free("127.0.0.1", port, "SUMBATCH_EMBEDDED_PORT")
        else:
            check_credentials(self.settings.redis_url)
        check_port_free(self.host, self.port, "the API port (--port, SUMBATCH_PORT)")

    def _check_durable(self, url: str) -> None:
        """Durable mode on a server that cannot promise it would stop the API at its
        start: refuse here, once, naming the setting."""
        if not self.settings.durable:
            return
        from sumbatch.web.api import durable_problem

        settings = msgspec.structs.replace(self.settings, redis_url=url)
        problem = asyncio.run(durable_problem(settings))
        if problem:
            raise Refused(problem, 2)

    def _server_ports(self) -> list[int]:
        """The embedded server's port; or its cluster's nodes', and their bus ports."""
        first = self.settings.embedded_port
        if not self.cluster:
            return [first]
        nodes = [first + n for n in range(self.cluster)]
        return nodes + [port + BUS_OFFSET for port in nodes]

    def _start_server(self) -> str:
        try:
            found = locate_server()
        except ServerNotFound as exc:
            raise Refused(str(exc)) from exc
        log.info(
            "embedded server: %s (%s): %s", found.path, version_text(found.version), found.reason
        )
        if self.cluster:
            return self._start_cluster(found.path)
        server = EmbeddedServer(
            self.settings.data_dir,
            self.settings.embedded_port,
            appendfsync=self.settings.fsync,
            binary=found.path,
            die_with_parent=True,
        )
        self.servers = [server]
        try:
            server.start()
        except (RuntimeError, TimeoutError) as exc:
            raise Refused(str(exc)) from exc
        log.info("embedded server on %s, data in %s", server.url, server.data_dir)
        return server.url

    def _start_cluster(self, binary: str) -> str:
        try:
            cluster = LocalCluster(
                Path(self.settings.data_dir) / "cluster",
                [self.settings.embedded_port + n for n in range(self.cluster)],
                appendfsync=self.settings.fsync,
                binary=binary,
                die_with_parent=True,
            )
        except ValueError as exc:
            raise Refused(f"--cluster {self.cluster}: {exc}") from exc
        self.servers = cluster.nodes
        try:
            cluster.start()
        except (RuntimeError, TimeoutError, subprocess.CalledProcessError) as exc:
            raise Refused(f"the local cluster did not start: {exc}") from exc
        log.info(
            "local cluster of %d masters on %s, data in %s",
            self.cluster, ", ".join(str(node.port) for node in cluster.nodes), cluster.data_dir,
        )  # fmt: skip
        return cluster.url

    def _watch_server(self) -> None:
        for server in self.servers:
            self._watch_one(server)

    def _watch_one(self, server: EmbeddedServer) -> None:
        """A server (or cluster node) is supervised like the children: restarted on its
        data dir, where a node finds its cluster again."""
        if server.running or self.stopping:
            return
        assert server.process is not None
        log.warning(
            "embedded server exited with %s; restarting it on %s",
            server.process.returncode,
            server.data_dir,
        )
        try:
            server.start()
        except (RuntimeError, TimeoutError) as exc:
            log.warning("embedded server did not restart: %s", exc)
        if server.running:
            self.server_quick_exits[server.port] = 0
            log.info("embedded server is back on %s", server.url)
            return
        failed = self.server_quick_exits[server.port] = (
            self.server_quick_exits.get(server.port, 0) + 1
        )
        if failed >= self.crash_loop:
            raise CrashLoop(
                f"the embedded server failed to start {failed} times in a "
                f"row; stopping. Its last error: {last_line(server.data_dir / 'server.log')} "
                f"(see {server.data_dir / 'server.log'})"
            )
        self._pause(min(5.0, 0.2 * failed))

    def _watch(self, child: Child, env: dict[str, str]) -> None:
        assert child.process is not None
        code = child.process.poll()
        if code is None or self.stopping:
            return
        lived = time.monotonic() - child.started_at
        child.quick_exits = child.quick_exits + 1 if lived < self.quick_exit else 0
        if child.quick_exits >= self.crash_loop:
            raise CrashLoop(
                f"{child.name} exited {child.quick_exits} times in a row within "
                f"{self.quick_exit:g}s of its start (last exit code {code}); stopping. "
                f"Its last error: {child.last_error()}"
            )
        child.restarts += 1
        log.warning("%s exited with %s; restarting", child.name, code)
        self._pause(min(5.0, 0.2 * max(1, child.quick_exits)))
        if not self.stopping:
            child.spawn(env)

    def _pause(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self.stopping and time.monotonic() < deadline:
            time.sleep(0.05)

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
        # Last: the children needed it to hand back their work.
        self._release()
        log.info("stopped")

    def _release(self) -> None:
        for server in self.servers:
            server.stop()
        if self._lock is not None:
            self._lock.close()
