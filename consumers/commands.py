"""The ``sumbatch`` subcommands that run the consumers of the log: ``worker``,
``projector`` and ``replay``. Plugged into the command line through the
``sumbatch.commands`` entry point, so that ``sumbatch`` never imports this package."""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from consumers.projector import Projector
from consumers.worker import Load, Worker, consumer_name
from sumbatch.config import Settings, resolve_handler
from sumbatch.processes.running import Consumer, Together, run_until_signal, when_reachable
from sumbatch.replay import Check, differences
from sumbatch.store.partitions import Partitions, open_partitions


def partition_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected numbers such as 0,2") from None


def add_commands(sub: argparse._SubParsersAction[Any]) -> None:
    only = {
        "type": partition_list,
        "default": None,
        "help": "consume only these partitions, e.g. 0,2 (default: all)",
    }
    worker = sub.add_parser("worker", help="run one worker process")
    worker.add_argument("--name", default=None, help="consumer name (default host-pid-random)")
    worker.add_argument("--partitions", **only)
    worker.set_defaults(func=run_worker)

    projector = sub.add_parser("projector", help="run the projector")
    projector.add_argument("--partitions", **only)
    projector.set_defaults(func=run_projector)

    replay = sub.add_parser("replay", help="rebuild the views from the log")
    replay.add_argument("--check", action="store_true", help="only compare, change nothing")
    replay.set_defaults(func=run_replay)


class _Process:
    """What a consumer process holds: its partitions, opened once Redis answers."""

    def __init__(self, settings: Settings, what: str) -> None:
        self.settings = settings
        self.what = what
        self.partitions: Partitions | None = None

    async def open(self) -> Partitions:
        self.partitions = await when_reachable(self.what, lambda: open_partitions(self.settings))
        return self.partitions

    async def close(self) -> None:
        if self.partitions is not None:
            await self.partitions.aclose()


def run_worker(settings: Settings, args: argparse.Namespace) -> int:
    handler = resolve_handler(settings.handler)
    process = _Process(settings, "worker")
    name = args.name or consumer_name()

    async def start() -> Consumer:
        partitions = await process.open()
        load = Load(settings.worker_concurrency)
        return Together(
            [
                Worker(settings, store, handler=handler, name=name, load=load)
                for store in partitions.only(args.partitions)
            ]
        )

    run_until_signal(start, process.close)
    return 0


def run_projector(settings: Settings, args: argparse.Namespace) -> int:
    process = _Process(settings, "projector")

    async def start() -> Consumer:
        partitions = await process.open()
        return Together([Projector(store) for store in partitions.only(args.partitions)])

    run_until_signal(start, process.close)
    return 0


def run_replay(settings: Settings, args: argparse.Namespace) -> int:
    async def check(partitions: Partitions) -> int:
        events = differ = set_aside = 0
        for store in partitions:
            found = await differences(store)
            for line in found.differences:
                print(line)
            for entry in found.set_aside:
                print(f"set aside {entry.entry_id}: {entry.reason}")
            if partitions.count > 1:
                print(f"partition {store.keys.partition}: {_summary(found)}")
            events += found.events
            differ += len(found.differences)
            set_aside += len(found.set_aside)
        print(f"replayed {events} events: {differ} differences, {set_aside} entries set aside")
        return 1 if differ else 0

    async def rebuild(partitions: Partitions) -> int:
        for store in partitions:
            await store.forget_position()
            await Projector(store).run_until_idle()
            where = f"partition {store.keys.partition}" if partitions.count > 1 else "views"
            print(f"{where} rebuilt from the log, up to {await store.position()}")
        return 0

    async def run() -> int:
        async with await open_partitions(settings) as partitions:
            return await (check if args.check else rebuild)(partitions)

    return asyncio.run(run())


def _summary(check: Check) -> str:
    return (
        f"replayed {check.events} events: {len(check.differences)} differences, "
        f"{len(check.set_aside)} entries set aside"
    )
