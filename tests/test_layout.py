"""The dependency between the two packages runs one way: consumers use sumbatch, and
sumbatch reaches the consumers' commands only through its entry point."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import sumbatch
from tests.support import run_sumbatch

PACKAGE = Path(sumbatch.__file__).parent


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def test_sumbatch_never_imports_consumers() -> None:
    offenders = {
        str(path.relative_to(PACKAGE.parent)): sorted(
            name for name in imported_modules(path) if name.split(".")[0] == "consumers"
        )
        for path in PACKAGE.rglob("*.py")
    }
    assert {path: names for path, names in offenders.items() if names} == {}


def test_the_consumers_commands_reach_the_command_line_through_the_entry_point() -> None:
    helps = run_sumbatch("--help", env=None)
    assert helps.returncode == 0, helps.stderr
    for command in ("worker", "projector", "replay"):
        assert f"    {command}" in helps.stdout
    # Importing the command line alone loads no consumer.
    probe = (
        "import sys, sumbatch.cli; "
        "print(sorted(m for m in sys.modules if m.startswith('consumers')))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout
    assert loaded.strip() == "[]"
