"""The ``sumbatch`` subcommands that run the consumers of the log: ``worker``,
``projector`` and ``replay``. Plugged into the command line through the
``sumbatch.commands`` entry point, so that ``sumbatch`` never imports this package."""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from consumers.projector import Projector
from consumers.worker import Worker
from sumbatch.config import Settings, resolve_handler
from sumbatch.replay import differences
from sumbatch.running import run_until_signal
from sumbatch.store import open_store


def add_commands(sub: argparse._SubParsersAction[Any]) -> None:
    worker = sub.add_parser("worker", help="run one worker process")
    worker.add_argument("--name", default=None, help="consumer name (default host-pid-random)")
    worker.set_defaults(func=run_worker)

    sub.add_parser("projector", help="run the projector").set_defaults(func=run_projector)

    replay = sub.add_parser("replay", help="rebuild the views from the log")
    replay.add_argument("--check", action="store_true", help="only compare, change nothing")
    replay.set_defaults(func=run_replay)


def run_worker(settings: Settings, args: argparse.Namespace) -> int:
    handler = resolve_handler(settings.handler)
    worker = Worker(settings, open_store(settings), handler=handler, name=args.name)
    run_until_signal(worker, worker.run)
    return 0


def run_projector(settings: Settings, args: argparse.Namespace) -> int:
    projector = Projector(open_store(settings))
    run_until_signal(projector, projector.run)
    return 0


def run_replay(settings: Settings, args: argparse.Namespace) -> int:
    async def run() -> int:
        async with open_store(settings) as store:
            if args.check:
                check = await differences(store)
                for line in check.differences:
                    print(line)
                for entry in check.set_aside:
                    print(f"set aside {entry.entry_id}: {entry.reason}")
                print(
                    f"replayed {check.events} events: {len(check.differences)} differences, "
                    f"{len(check.set_aside)} entries set aside"
                )
                return 1 if check.differences else 0
            await store.forget_position()
            await Projector(store).run_until_idle()
            print(f"views rebuilt from the log, up to {await store.position()}")
            return 0

    return asyncio.run(run())
