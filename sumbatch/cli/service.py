"""The service family of ``sumbatch`` subcommands: ``up`` (everything, under a keeper)
and ``api`` (the REST API alone)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from sumbatch.config import Settings, parse_port, parse_workers, resolve_handler
from sumbatch.processes.running import run_async


def cmd_api(settings: Settings, args: argparse.Namespace) -> int:
    from sumbatch.web.api import create_app, durable_problem
    from sumbatch.web.http import serve

    if settings.durable and (problem := run_async(durable_problem(settings))):
        print(f"sumbatch: {problem}", file=sys.stderr)
        return 2
    app = create_app(settings)
    host, port = args.host or settings.host, args.port or settings.port
    serve(app, host, port, settings, stopping=app.state.live.close)
    return 0


def cmd_up(settings: Settings, args: argparse.Namespace) -> int:
    from sumbatch.processes.supervisor import Supervisor

    # Here, not in each worker: a handler that cannot load would make them crash-loop.
    resolve_handler(settings.handler)
    workers = args.workers if args.workers is not None else settings.workers
    if args.cluster and settings.redis_url is not None:
        print(
            "sumbatch: --cluster starts a local cluster; it cannot go with REDIS_URL",
            file=sys.stderr,
        )
        return 2
    supervisor = Supervisor(
        settings, host=args.host, port=args.port, workers=workers, cluster=args.cluster
    )
    return supervisor.run()


def _port_arg(text: str) -> int:
    try:
        return parse_port(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port: {exc}") from None


def _workers_arg(text: str) -> int:
    """As SUMBATCH_WORKERS: 0 to 256 (config.parse_workers says why)."""
    try:
        return parse_workers(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not valid: {exc}") from None


def add_service_commands(sub: argparse._SubParsersAction[Any]) -> None:
    """up, api: the service's own processes."""
    up = sub.add_parser(
        "up", help="run everything: server (if no REDIS_URL), api, workers, projector"
    )
    up.add_argument("--host", default=None)
    up.add_argument("--port", type=_port_arg, default=None)
    up.add_argument(
        "--workers",
        type=_workers_arg,
        default=None,
        help="worker processes, 0 to 256 (SUMBATCH_WORKERS)",
    )
    up.add_argument(
        "--cluster",
        type=int,
        default=0,
        metavar="N",
        help="with no REDIS_URL: start a local Redis Cluster of N masters instead of one server",
    )
    up.set_defaults(func=cmd_up)

    api = sub.add_parser("api", help="run the REST API")
    api.add_argument("--host", default=None)
    api.add_argument("--port", type=_port_arg, default=None)
    api.set_defaults(func=cmd_api)
