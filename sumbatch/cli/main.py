"""``sumbatch`` command line: run the service or one of its processes, and look into
the log (audit, tail, replay). This module assembles the parser from the subcommand
families (``service``, ``log``, ``clients``, and the consumers' through their entry
point) and runs the one asked for."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from importlib.metadata import entry_points

import redis
from redis.exceptions import RedisError

from sumbatch.cli.clients import add_client_commands
from sumbatch.cli.log import add_log_commands
from sumbatch.cli.service import add_service_commands
from sumbatch.config import PARENT_PID_ENV, ConfigError, Settings
from sumbatch.outage import is_transient, refusal

log = logging.getLogger("sumbatch")

# The entry-point group through which other packages add subcommands (as Flask's
# "flask.commands"): each entry is a function given the subparsers to add to.
COMMANDS = "sumbatch.commands"


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="sumbatch",
        description="Event-sourced batch task service on Redis Streams. "
        "Configured by environment variables (REDIS_URL, SUMBATCH_*); see docs/configuration.md.",
    )
    sub = top.add_subparsers(dest="command", required=True)
    add_service_commands(sub)
    add_log_commands(sub)
    add_client_commands(sub)

    # The commands that run the consumers of the log (worker, projector, replay) come
    # from the consumers package, which depends on this one and never the other way.
    for plugin in entry_points(group=COMMANDS):
        plugin.load()(sub)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        print(f"sumbatch: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level,
        format="%(asctime)s %(process)d %(name)s %(levelname)s %(message)s",
    )
    parent = os.environ.pop(PARENT_PID_ENV, None)
    if parent:
        _exit_with_parent(int(parent), settings.shutdown_grace + 10, settings.client_url)
    try:
        result: int = args.func(settings, args)
    except ConfigError as exc:
        print(f"sumbatch: {exc}", file=sys.stderr)
        return 2
    except RedisError as exc:
        # Redis away or refusing is the operator's news, not a bug: one line, no
        # traceback (redis-py's messages name the address, never a password).
        if not is_transient(exc):
            raise
        kind = refusal(exc) or type(exc).__name__
        print(f"sumbatch {args.command}: redis unavailable ({kind}: {exc})", file=sys.stderr)
        return 1
    return result


def _exit_with_parent(parent: int, grace: float, redis_url: str) -> None:
    """For the children of `up`: when it dies, even by `kill -9`, we are reparented;
    then stop as on its SIGTERM (finish or hand back work), and at once after
    ``grace``, or as soon as Redis stops answering: `up`'s embedded server dies with it,
    and with no server nothing can be finished or handed back (what this process holds
    stays pending, for a worker to take over once a server runs again). Polling getppid
    works wherever we run, unlike PR_SET_PDEATHSIG."""
    if os.getppid() != parent:
        log.warning("sumbatch up (pid %d) is already gone; exiting", parent)
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        log.warning("sumbatch up (pid %d) is gone; stopping", parent)
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            if not _answers(redis_url):
                log.warning("redis does not answer either: nothing to hand back; exiting")
                break
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _answers(url: str) -> bool:
    client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1)
    try:
        return bool(client.ping())
    except (RedisError, OSError):
        return False
    finally:
        client.close()
