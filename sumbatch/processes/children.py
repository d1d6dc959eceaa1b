"""The children of ``sumbatch up``: each a ``sumbatch`` process in its own session,
its stderr copied to ours with its last lines kept, so a crash loop can name its last
error."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO


@dataclass
class Child:
    """One child process, and what `up` remembers of its lives."""

    name: str
    argv: list[str]
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    started_at: float = 0.0
    quick_exits: int = 0
    # The tail of its stderr since its last start, to name its last error.
    last_lines: deque[str] = field(default_factory=lambda: deque(maxlen=20))

    def last_error(self) -> str:
        return next((line for line in reversed(self.last_lines) if line.strip()), "(nothing)")

    def spawn(self, env: dict[str, str]) -> None:
        # Children ignore the terminal's Ctrl-C (their own session): `up` sends each one
        # SIGTERM, then waits for them all, and stops the server last.
        self.process = subprocess.Popen(
            self.argv,
            env=env,
            stdin=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        self.started_at = time.monotonic()
        self.last_lines.clear()
        assert self.process.stderr is not None
        threading.Thread(
            target=forward, args=(self.process.stderr, self.last_lines), daemon=True
        ).start()


def forward(pipe: IO[bytes], last_lines: deque[str]) -> None:
    """Copy a child's stderr to ours line by line, keeping its tail."""
    with pipe:
        for line in iter(pipe.readline, b""):
            last_lines.append(line.decode(errors="replace").rstrip())
            try:
                sys.stderr.buffer.write(line)
                sys.stderr.buffer.flush()
            except (OSError, ValueError):
                pass  # our stderr is gone; keep draining so the child never blocks


def last_line(path: Path) -> str:
    """The last line of a log file that says something."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return next((line for line in reversed(lines) if line.strip()), "(empty log)")
