"""The benchmark's figures and how they are reported: a table on stdout, JSON in
ops/bench/results/. A figure that was not measured is None, printed as "missing" and
written as null, never as 0 or as some other figure standing in for it."""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
MISSING = "missing"


@dataclass
class Row:
    figure: str
    value: float | None
    unit: str
    reference: float | None = None
    reference_name: str = ""
    goal: str = ""

    @property
    def ratio(self) -> float | None:
        if self.value is None or not self.reference:
            return None
        return self.value / self.reference


def _ratio(row: Row) -> str:
    if row.ratio is not None:
        return f"{row.ratio:7.3f}"
    return f"{MISSING:>7}" if row.reference_name else " " * 7


def _reference(row: Row) -> str:
    if not row.reference_name:
        return ""
    value = MISSING if row.reference is None else f"{row.reference:,.1f}"
    return f"{row.reference_name} {value}"


def report(rows: list[Row], args: argparse.Namespace) -> Path:
    """Print the table and write the JSON; where it was written."""
    width = max(len(r.figure) for r in rows)
    print()
    print(f"{'figure':<{width}}  {'value':>12}  {'unit':<8} {'ratio':>7}  reference / goal")
    for r in rows:
        value = f"{MISSING:>12}" if r.value is None else f"{r.value:12,.2f}"
        print(f"{r.figure:<{width}}  {value}  {r.unit:<8} {_ratio(r)}  {_reference(r)} {r.goal}")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / time.strftime("bench-%Y%m%d-%H%M%S.json")
    settings = {**vars(args), "cpus": os.cpu_count(), "python": platform.python_version()}
    rows_out = [{**asdict(r), "ratio": r.ratio} for r in rows]
    out.write_text(json.dumps({"settings": settings, "rows": rows_out}, indent=2))
    print(f"\nwritten to {out}")
    return out
