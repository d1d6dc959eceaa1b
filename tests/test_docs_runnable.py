"""The docs cannot rot: every code block of README.md and docs/*.md marked
``<!-- runnable -->`` is run, as pasted, against a live service started as the quick
start starts it (`sumbatch up`: embedded server, API, two workers, the projector).

A page's blocks run in order in one bash (``set -euo pipefail``), as a reader pastes
them into one terminal: a variable set in one block is seen by the next. They run from
a directory laid out like a clone after the quick start (``.venv/bin/sumbatch`` works
there), and the only change made to them is the service's address: ``127.0.0.1:5000``
and the server port ``6399`` become the ports this test chose."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support import ROOT, answers_200, free_port, up_env, wait_until_sync

MARK = "<!-- runnable -->"
FENCE = re.compile(r"^```bash\s*$")
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@dataclass(frozen=True)
class Block:
    line: int  # of the opening fence, 1-based
    code: str


def runnable_blocks(text: str) -> list[Block]:
    """The blocks a page marks runnable. A mark not directly above a ```bash fence, or
    a fence never closed, is an error: a block meant to be run must not be skipped."""
    lines = text.splitlines()
    blocks: list[Block] = []
    for i, line in enumerate(lines):
        if line.strip() != MARK:
            continue
        if i + 1 >= len(lines) or not FENCE.match(lines[i + 1]):
            raise ValueError(f"line {i + 1}: {MARK} is not directly above a ```bash fence")
        try:
            end = next(j for j in range(i + 2, len(lines)) if lines[j].strip() == "```")
        except StopIteration:
            raise ValueError(f"line {i + 2}: the runnable block is never closed") from None
        blocks.append(Block(i + 2, "\n".join(lines[i + 2 : end])))
    return blocks


def script_of(blocks: list[Block], api_port: int, redis_port: int) -> str:
    """One bash script of a page's blocks, the service's address put in, each block
    announced so that a failure names the block it came from."""
    parts = ["set -euo pipefail", "trap 'echo \"failed in the block at line $BLOCK\" >&2' ERR"]
    for block in blocks:
        code = block.code.replace("127.0.0.1:5000", f"127.0.0.1:{api_port}")
        code = code.replace("localhost:5000", f"localhost:{api_port}")
        code = re.sub(r"\b6399\b", str(redis_port), code)
        parts += [f"BLOCK={block.line}", code]
    return "\n".join(parts) + "\n"


def test_blocks_are_found_and_a_bad_mark_is_refused() -> None:
    page = f"text\n{MARK}\n```bash\necho one\necho two\n```\n```bash\nnot marked\n```\n"
    assert runnable_blocks(page) == [Block(3, "echo one\necho two")]
    with pytest.raises(ValueError, match="not directly above"):
        runnable_blocks(f"{MARK}\n\n```bash\necho\n```\n")
    with pytest.raises(ValueError, match="never closed"):
        runnable_blocks(f"{MARK}\n```bash\necho\n")
    script = script_of([Block(3, "curl -s http://127.0.0.1:5000/x -p 6399 16399")], 8123, 7001)
    assert "http://127.0.0.1:8123/x -p 7001 16399" in script


def test_the_readme_has_runnable_blocks() -> None:
    assert runnable_blocks((ROOT / "README.md").read_text()) != []


@dataclass(frozen=True)
class Service:
    api_port: int
    redis_port: int
    clone: Path  # laid out like a clone after the quick start
    env: dict[str, str]


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    base = tmp_path_factory.mktemp("docs")
    venv = Path(sys.prefix)
    if not (venv / "bin" / "sumbatch").exists():
        pytest.fail(f"the tests run from a venv with sumbatch installed; {venv} has none")
    clone = base / "clone"
    clone.mkdir()
    for entry in ROOT.iterdir():
        if entry.name not in (".venv", ".git", ".sumbatch-data"):
            (clone / entry.name).symlink_to(entry)
    (clone / ".venv").symlink_to(venv)

    api_port, redis_port = free_port(), free_port()
    env = up_env(base / "data", redis_port, SUMBATCH_DELAY="0.05-0.2", SUMBATCH_PORT=str(api_port))
    env.pop("PYTHONPATH", None)  # as a user's shell: the venv's install, nothing else
    log_path = base / "up.log"
    with log_path.open("wb") as log:
        up = subprocess.Popen(
            [str(venv / "bin" / "sumbatch"), "up", "--workers", "2"],
            env=env, cwd=clone, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            wait_until_sync(
                lambda: answers_200(f"http://127.0.0.1:{api_port}/healthz"),
                timeout=60,
                what="the service to answer",
            )
            yield Service(api_port, redis_port, clone, env)
        except BaseException:
            print(log_path.read_text(errors="replace"))
            raise
        finally:
            up.send_signal(signal.SIGTERM)
            try:
                up.wait(30)
            except subprocess.TimeoutExpired:
                up.kill()
                up.wait()


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "page", [p for p in PAGES if runnable_blocks(p.read_text())], ids=lambda p: p.name
)
def test_the_runnable_blocks_of_a_page_run_as_pasted(page: Path, service: Service) -> None:
    blocks = runnable_blocks(page.read_text())
    script = script_of(blocks, service.api_port, service.redis_port)
    ran = subprocess.run(
        ["bash", "-c", script],
        cwd=service.clone,
        env={**service.env, "PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert ran.returncode == 0, (
        f"{page.name}: {len(blocks)} runnable blocks\n--- stdout\n{ran.stdout[-4000:]}"
        f"\n--- stderr\n{ran.stderr[-4000:]}"
    )
