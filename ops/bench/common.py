"""Small helpers the benchmark scripts share (each script runs with this folder on
sys.path, as `python ops/bench/<script>.py` puts it there)."""

from __future__ import annotations

import random
import socket
from pathlib import Path


def free_port() -> int:
    """A free port below the kernel's ephemeral range (as tests/support.py picks
    them), so no outgoing connection takes it before the server that is to bind it."""
    while True:
        port = random.randrange(20000, 32768)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port


def peak_rss_kib(pid: int) -> int:
    """A live process's peak resident memory (VmHWM), in KiB; 0 if unknown."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0
