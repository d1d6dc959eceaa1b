"""``sumbatch top``: a live view of the service from the API's ``GET /system``, taken
every second: throughput (from the counters' change since the last sample), the work
stream's lag and pending entries, the projector's lag, dead letters, the server's
memory, and each worker. On a terminal one frame redraws in place (rich.live); in a
pipe, frames follow one another; ``--once`` prints one and exits."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from sumbatch.client.rest import Api, ApiError, Unreachable

# Exit statuses, as the other client commands: 1 no /system (an older API), 3 no API.
OK, NO_SYSTEM, UNREACHABLE = 0, 1, 3


@dataclass(frozen=True)
class Sample:
    """One answer of GET /system."""

    system: dict[str, Any]

    @property
    def ms(self) -> int:
        return int(self.system.get("time") or 0)

    def counter(self, name: str) -> int:
        return int(self.system.get("counters", {}).get(name) or 0)


def rate(before: Sample | None, after: Sample, *names: str) -> float | None:
    """Per second, how much the sum of the counters ``names`` grew between two samples
    (by the server's clock); None without an earlier sample to compare with."""
    if before is None or after.ms <= before.ms:
        return None
    grown = sum(after.counter(n) - before.counter(n) for n in names)
    return max(grown, 0) * 1000 / (after.ms - before.ms)


def size(count: object) -> str:
    """Bytes in binary units: ``1.5 MiB``."""
    if not isinstance(count, int | float):
        return "?"
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _n(value: object) -> str:
    return f"{value:,}" if isinstance(value, int) else "?"


def _per_second(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}/s"


def _idle(ms: object) -> str:
    if not isinstance(ms, int | float):
        return "?"
    return f"{ms:.0f} ms" if ms < 1000 else f"{ms / 1000:.1f} s"


def frame(
    url: str, sample: Sample, before: Sample | None, problem: str | None = None
) -> RenderableType:
    """What ``top`` shows for ``sample`` (and the rates since ``before``)."""
    system = sample.system
    counters = system.get("counters", {})
    work = system.get("work", {})
    lines = Table.grid(padding=(0, 2))
    lines.add_column(style="bold")
    lines.add_column()
    done = rate(before, sample, "tasksCompleted", "tasksFailed")
    lines.add_row(
        "throughput",
        f"{_per_second(done)} tasks ended, "
        f"{_per_second(rate(before, sample, 'tasksSubmitted'))} submitted",
    )
    lines.add_row(
        "tasks",
        f"submitted {_n(counters.get('tasksSubmitted'))}, completed "
        f"{_n(counters.get('tasksCompleted'))} (cached {_n(counters.get('tasksCached'))}), "
        f"failed {_n(counters.get('tasksFailed'))}, revoked {_n(counters.get('tasksRevoked'))}",
    )
    lines.add_row(
        "groups",
        f"submitted {_n(counters.get('groupsSubmitted'))}, "
        f"finished {_n(counters.get('groupsFinished'))}",
    )
    lines.add_row(
        "work",
        f"lag {_n(work.get('lag'))}, pending {_n(work.get('pending'))}, "
        f"length {_n(work.get('length'))}",
    )
    lines.add_row("projector lag", _n(system.get("projectorLag")))
    lines.add_row("dead letters", _n(system.get("deadLetters")))
    lines.add_row("event log", f"{_n(system.get('eventLogLength'))} entries")
    lines.add_row("redis memory", size(system.get("redisMemoryBytes")))
    workers = system.get("workers") or []
    table = Table(title=f"workers: {len(workers)}", title_justify="left", box=box.SIMPLE)
    for name, justify in (("name", "left"), ("partition", "right"), ("pending", "right")):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    table.add_column("idle", justify="right")
    for worker in sorted(workers, key=lambda w: (w.get("partition", 0), str(w.get("name")))):
        table.add_row(
            str(worker.get("name")),
            _n(worker.get("partition")),
            _n(worker.get("pending")),
            _idle(worker.get("idleMs")),
        )
    when = time.strftime("%H:%M:%S", time.localtime(sample.ms / 1000))
    head = Text(f"sumbatch top  {url}  partitions {_n(system.get('partitions'))}  {when}")
    parts: list[RenderableType] = [head, lines, table]
    if problem:
        parts.insert(1, Text(problem, style="bold red"))
    return Group(*parts)


def top(api: Api, *, once: bool, interval: float, out: IO[str], err: IO[str]) -> int:
    """Show /system every ``interval`` s until Ctrl-C (which ends it with status 0)."""
    try:
        before = _sample(api)
        if once:
            time.sleep(interval)
            after = _sample(api)
            Console(file=out, color_system=None, highlight=False).print(
                frame(api.base, after, before)
            )
            return OK
        _loop(api, before, interval, out)
    except KeyboardInterrupt:
        return OK
    except ApiError as exc:
        if exc.status == 404:
            print(f"sumbatch: the API at {api.base} has no /system (an older version?)", file=err)
            return NO_SYSTEM
        print(f"sumbatch: the API cannot serve now: {exc}", file=err)
        return UNREACHABLE
    except Unreachable as exc:
        print(f"sumbatch: {exc}", file=err)
        return UNREACHABLE
    return OK


def _sample(api: Api) -> Sample:
    return Sample(api.get("/system"))


def _loop(api: Api, first: Sample, interval: float, out: IO[str]) -> None:
    """Show frames until interrupted: in place on a terminal, one after another in a
    pipe."""
    console = Console(file=out, highlight=False)
    shown = frame(api.base, first, None)
    if not console.is_terminal:
        console.print(shown)
        for shown in _frames(api, first, interval):
            console.print(shown)
        return
    with Live(shown, console=console, auto_refresh=False) as live:
        for shown in _frames(api, first, interval):
            live.update(shown, refresh=True)


def _frames(api: Api, last: Sample, interval: float) -> Iterator[RenderableType]:
    """A frame every ``interval`` s, forever. A failed sample after the first is
    shown over the last good one, and the next is tried at the next tick."""
    before: Sample | None = None
    while True:
        time.sleep(interval)
        try:
            sample = _sample(api)
        except (Unreachable, ApiError) as exc:
            yield frame(api.base, last, before, f"{exc}; trying again")
        else:
            before, last = last, sample
            yield frame(api.base, last, before)
