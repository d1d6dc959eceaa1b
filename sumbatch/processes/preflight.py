"""What ``sumbatch up`` checks before it starts anything, so that a problem every
child would meet is one clear refusal: the data dir another instance holds, a port in
use, credentials the server refuses."""

from __future__ import annotations

import fcntl
import logging
import os
import socket
from pathlib import Path
from typing import IO

import redis

from sumbatch.outage import REDIS_DOWN, is_transient

log = logging.getLogger("sumbatch.up")

LOCK_FILE = "sumbatch.lock"


class Refused(Exception):
    """``up`` cannot start; the message says why. ``code`` is the exit status."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def lock_data_dir(data_dir: Path) -> IO[str]:
    """Hold an exclusive lock on the data dir for as long as the returned file is open
    (the kernel drops it when we die, however we die)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    lock = (data_dir / LOCK_FILE).open("a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "?"
        lock.close()
        raise Refused(
            f"data dir {data_dir.resolve()} is in use by another sumbatch up (pid {holder}); "
            "stop it, or set SUMBATCH_DATA_DIR and SUMBATCH_EMBEDDED_PORT for a second one"
        ) from None
    lock.truncate(0)
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    return lock


def check_port_free(host: str, port: int, what: str) -> None:
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        with socket.socket(family, kind, proto) as probe:
            # As servers bind: a port in TIME_WAIT is free, one with a listener is not.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
    except OSError as exc:
        raise Refused(f"{what}: cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def check_credentials(url: str) -> None:
    """A server that refuses our credentials will refuse every child forever; one that
    cannot be reached yet may come up, and the children wait for it."""
    client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
    try:
        client.ping()
    except redis.AuthenticationError as exc:
        raise Refused(f"REDIS_URL: the server refuses these credentials: {exc}", 2) from None
    except redis.ResponseError as exc:
        if isinstance(exc, redis.exceptions.NoPermissionError) or str(exc).startswith(
            ("NOAUTH", "WRONGPASS")
        ):
            raise Refused(f"REDIS_URL: the server refuses these credentials: {exc}", 2) from None
        if not is_transient(exc):
            raise Refused(f"REDIS_URL: the server answers PING with an error: {exc}") from None
        log.warning("redis refuses for now (%s); the children will keep trying", exc)
    except REDIS_DOWN as exc:
        log.warning("redis unavailable at start (%s); the children will keep trying", exc)
    finally:
        client.close()
