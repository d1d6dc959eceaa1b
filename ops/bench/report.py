"""The benchmark's figures and how they are reported: a table on stdout, JSON in
ops/bench/results/. A figure that was not measured is None, printed as "missing" and
written as null, never as 0 or as some other figure standing in for it. A figure with a
goal says whether it met it: goals are on ratios to a reference measured in the same
run (a ceiling, a floor), so that a reader compares them with their own run."""

from __future__ import annotations

import argparse
import json
import operator
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

RESULTS = Path(__file__).resolve().parent / "results"
MISSING = "missing"


@dataclass(frozen=True)
class Goal:
    """A bound on a row's ratio to its reference (or on its value, for a figure that
    has no reference, such as bytes per task)."""

    on: Literal["ratio", "value"]
    op: Literal["<=", ">="]
    bound: float

    def met(self, row: Row) -> bool | None:
        """Whether the row meets it; None when its figure is missing."""
        figure = row.ratio if self.on == "ratio" else row.value
        if figure is None:
            return None
        compare = operator.le if self.op == "<=" else operator.ge
        return bool(compare(figure, self.bound))

    def __str__(self) -> str:
        return f"{self.on} {self.op} {self.bound:g}"


@dataclass
class Row:
    figure: str
    value: float | None
    unit: str
    reference: float | None = None
    reference_name: str = ""
    goal: Goal | None = None

    @property
    def ratio(self) -> float | None:
        if self.value is None or not self.reference:
            return None
        return self.value / self.reference

    @property
    def verdict(self) -> str:
        if self.goal is None:
            return ""
        met = self.goal.met(self)
        return {True: "pass", False: "FAIL", None: MISSING}[met]


def _ratio(row: Row) -> str:
    if row.ratio is not None:
        return f"{row.ratio:7.3f}"
    return f"{MISSING:>7}" if row.reference_name else " " * 7


def _reference(row: Row) -> str:
    if not row.reference_name:
        return ""
    value = MISSING if row.reference is None else f"{row.reference:,.1f}"
    return f"{row.reference_name} {value}"


def report(rows: list[Row], args: argparse.Namespace) -> list[Row]:
    """Print the table and write the JSON; the rows whose goal was not met (failed, or
    its figure missing)."""
    width = max(len(r.figure) for r in rows)
    print()
    print(f"{'figure':<{width}}  {'value':>12}  {'unit':<8} {'ratio':>7}  {'goal':<14} "
          f"{'':7} reference")  # fmt: skip
    for r in rows:
        value = f"{MISSING:>12}" if r.value is None else f"{r.value:12,.2f}"
        goal = str(r.goal) if r.goal else ""
        print(f"{r.figure:<{width}}  {value}  {r.unit:<8} {_ratio(r)}  {goal:<14} "
              f"{r.verdict:7} {_reference(r)}")  # fmt: skip
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / time.strftime("bench-%Y%m%d-%H%M%S.json")
    settings = {**vars(args), "cpus": os.cpu_count(), "python": platform.python_version(),
                "cpu_model": cpu_model()}  # fmt: skip
    rows_out = [
        {**asdict(r), "goal": str(r.goal) if r.goal else None, "ratio": r.ratio,
         "verdict": r.verdict or None}
        for r in rows
    ]  # fmt: skip
    out.write_text(json.dumps({"settings": settings, "rows": rows_out}, indent=2))
    print(f"\nwritten to {out}")
    unmet = [r for r in rows if r.goal is not None and r.goal.met(r) is not True]
    goals = sum(r.goal is not None for r in rows)
    print(f"goals met: {goals - len(unmet)} of {goals}")
    return unmet


def cpu_model() -> str:
    """The machine, for a reader comparing figures: the CPU model, from /proc/cpuinfo."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
