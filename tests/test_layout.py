"""The layout is the architecture, and these tests keep it so: each part of sumbatch
imports only the parts below it (the order each subpackage's docstring states), no
two modules import each other round a circle, and no module grows past the limit."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import sumbatch
from tests.support import run_sumbatch

SOURCE = Path(sumbatch.__file__).parent.parent

# Each part may import itself and the parts listed before it, never a later one; parts
# on one line are siblings and may not import each other.
LAYERS: list[tuple[str, ...]] = [
    ("sumbatch.model",),
    ("sumbatch.outage",),
    ("sumbatch.config",),
    ("sumbatch.scripts",),
    ("sumbatch.store",),
    ("sumbatch.web", "sumbatch.client"),
    ("sumbatch.replay",),
    ("sumbatch.processes",),
    ("consumers", "sumbatch.testing", "sumbatch.cli"),
]
# Modules that belong to no part: the package's own docstring, and `python -m`.
UNLAYERED = {"sumbatch", "sumbatch.__main__"}
MAX_LINES = 300
# A module that reads better whole may reach this, if its docstring says why.
MAX_LINES_EXCUSED = 350


def modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for top in ("sumbatch", "consumers"):
        for path in (SOURCE / top).rglob("*.py"):
            parts = path.relative_to(SOURCE).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def imports_of(path: Path, known: dict[str, Path]) -> set[str]:
    """The project's modules a module imports, anywhere in it (a call-time import
    counts: it is a dependency all the same)."""

    def resolve(name: str) -> str:
        while name and name not in known:
            name = name.rpartition(".")[0]
        return name

    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(resolve(alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                found.add(full if full in known else resolve(node.module))
    found.discard("")
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports_of(path, known) - {name} for name, path in known.items()}


def part_of(module: str) -> str | None:
    for layer in LAYERS:
        for part in layer:
            if module == part or module.startswith(part + "."):
                return part
    return None


def rank(part: str) -> int:
    return next(i for i, layer in enumerate(LAYERS) if part in layer)


def test_every_module_belongs_to_a_part() -> None:
    assert sorted(m for m in modules() if part_of(m) is None and m not in UNLAYERED) == []


def against_the_grain(edges: dict[str, set[str]]) -> list[str]:
    """Each import of a part by a part not above it."""
    found: list[str] = []
    for module, targets in edges.items():
        part = part_of(module)
        if part is None:
            continue
        for target in targets:
            other = part_of(target)
            if other is not None and other != part and rank(other) >= rank(part):
                found.append(f"{module} -> {target}")
    return sorted(found)


def test_imports_run_down_the_layers_only() -> None:
    assert against_the_grain(graph()) == []


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected set of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in edges.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycle_between_modules() -> None:
    assert cycles(graph()) == []


def test_the_checks_catch_what_they_guard() -> None:
    """The rules fail on an import against the grain and on a circle."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    upward = {
        "sumbatch.model.ids": {"sumbatch.store.work"},  # the model reaching for Redis
        "sumbatch.web.live.feed": {"sumbatch.client.rest"},  # a sibling
        "sumbatch.store.work": {"sumbatch.store.log", "sumbatch.model.ids"},  # fine
    }
    assert against_the_grain(upward) == [
        "sumbatch.model.ids -> sumbatch.store.work",
        "sumbatch.web.live.feed -> sumbatch.client.rest",
    ]


def test_no_module_is_over_the_limit() -> None:
    over: dict[str, int] = {}
    for name, path in modules().items():
        text = path.read_text()
        lines = text.count("\n")
        docstring = ast.get_docstring(ast.parse(text)) or ""
        limit = MAX_LINES_EXCUSED if "reads better whole" in docstring else MAX_LINES
        if lines > limit:
            over[name] = lines
    assert over == {}


def test_every_subpackage_says_its_role_and_what_it_may_import() -> None:
    silent = []
    for init in [*(SOURCE / "sumbatch").rglob("__init__.py"), SOURCE / "consumers/__init__.py"]:
        docstring = ast.get_docstring(ast.parse(init.read_text())) or ""
        if not docstring or "import" not in docstring:
            silent.append(str(init.relative_to(SOURCE)))
    assert silent == []


def test_the_consumers_commands_reach_the_command_line_through_the_entry_point() -> None:
    helps = run_sumbatch("--help", env=None)
    assert helps.returncode == 0, helps.stderr
    for command in ("worker", "projector", "replay"):
        assert f"    {command}" in helps.stdout
    # Importing the command line alone loads no consumer.
    probe = (
        "import sys, sumbatch.cli.main; "
        "print(sorted(m for m in sys.modules if m.startswith('consumers')))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout
    assert loaded.strip() == "[]"
