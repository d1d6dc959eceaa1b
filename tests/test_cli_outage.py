"""The command line when Redis is away: the commands that read it directly say so in
one line and exit 1, without a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from sumbatch.model import ids
from tests.support import free_port, run_sumbatch, up_env


@pytest.mark.parametrize(
    "args",
    [("audit", ids.new_group_id()), ("partitions",), ("replay", "--check")],
    ids=lambda args: args[0],
)
def test_a_command_that_reads_redis_says_it_is_away_in_one_line(
    args: tuple[str, ...], tmp_path: Path
) -> None:
    closed = free_port()  # nothing listens there
    env = up_env(tmp_path, closed, REDIS_URL=f"redis://127.0.0.1:{closed}/0")
    ran = run_sumbatch(*args, env=env, timeout=60)
    assert ran.returncode == 1, (ran.stdout, ran.stderr)
    assert "Traceback" not in ran.stderr
    lines = [line for line in ran.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"sumbatch {args[0]}: redis unavailable ("), (
        lines
    )
