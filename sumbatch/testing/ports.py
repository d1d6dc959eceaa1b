"""Free ports for servers about to start: never one an outgoing connection could be
given first, never the same one twice in a process."""

from __future__ import annotations

import contextlib
import random
import socket
from pathlib import Path

from sumbatch.processes.cluster import BUS_OFFSET

_handed_out: set[int] = set()


def free_port() -> int:
    """A port free now, for a server about to be started. Taken below the kernel's
    ephemeral range, so that no outgoing connection can be given it before that server
    binds it (as a port from bind(0) can be), and never one handed out before in this
    process, so that two servers started together never get the same."""
    first_ephemeral = 32768
    with contextlib.suppress(OSError, ValueError):
        first_ephemeral = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    while True:
        port = random.randrange(20000, max(20001, first_ephemeral))
        if port in _handed_out or not _bindable(port):
            continue
        _handed_out.add(port)
        return port


def free_cluster_ports(count: int, *, consecutive: bool = False) -> list[int]:
    """Ports for the nodes of a local cluster: each one free, and its bus port (port +
    10,000) free too, none handed out before in this process; with ``consecutive``,
    ``count`` ports in a row (as `sumbatch up --cluster` takes them)."""
    ports: list[int] = []
    while len(ports) < count:
        first = random.randrange(11000, 20000 - count)
        wanted = [first + n for n in range(count if consecutive else 1)]
        taken = {*wanted, *(port + BUS_OFFSET for port in wanted)}
        if taken & _handed_out or not all(_bindable(port) for port in taken):
            continue
        _handed_out.update(taken)
        ports += wanted
    return ports


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True
