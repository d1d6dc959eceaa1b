"""Small helpers the benchmark scripts share (each script runs with this folder on
sys.path, as `python ops/bench/<script>.py` puts it there)."""

from __future__ import annotations

import socket
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def peak_rss_kib(pid: int) -> int:
    """A live process's peak resident memory (VmHWM), in KiB; 0 if unknown."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0
