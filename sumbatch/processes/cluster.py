"""A local Redis Cluster on this machine: ``sumbatch up --cluster N`` and the tests.
Each node is an embedded server with ``--cluster-enabled yes`` in a data dir of its
own; the first start joins them with ``valkey-cli --cluster create`` (or redis-cli),
later starts find the cluster in each node's ``nodes.conf``."""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import redis

from sumbatch.processes.embedded import EmbeddedServer, find_cli

# Every node also listens on port + BUS_OFFSET, for the cluster bus.
BUS_OFFSET = 10_000
HIGHEST_PORT = 65_535 - BUS_OFFSET


@dataclass(frozen=True)
class TLS:
    """TLS for a local cluster: a TLS port per node beside its plain one (which stays,
    for creating the cluster and for health checks), TLS on the cluster bus, and one
    certificate that clients are told to trust."""

    ports: list[int]
    cert: Path
    key: Path

    def args(self, node: int) -> tuple[str, ...]:
        return (
            "--tls-port", str(self.ports[node]),
            "--tls-cert-file", str(self.cert),
            "--tls-key-file", str(self.key),
            "--tls-ca-cert-file", str(self.cert),
            "--tls-auth-clients", "no",
            "--tls-cluster", "yes",
            "--tls-replication", "yes",
        )  # fmt: skip


class LocalCluster:
    def __init__(
        self,
        data_dir: str | Path,
        ports: list[int],
        *,
        replicas: int = 0,
        appendfsync: str = "everysec",
        node_timeout_ms: int = 2000,
        binary: str | None = None,
        die_with_parent: bool = False,
        tls: TLS | None = None,
    ) -> None:
        if len(ports) % (1 + replicas) or not ports:
            raise ValueError(
                f"{len(ports)} ports cannot hold masters with {replicas} replicas each"
            )
        too_high = [port for port in ports if port > HIGHEST_PORT]
        if too_high:
            raise ValueError(f"ports {too_high}: a cluster node needs port + {BUS_OFFSET} free too")
        self.replicas = replicas
        self.data_dir = Path(data_dir)
        self.tls = tls
        self.nodes = [
            EmbeddedServer(
                self.data_dir / f"node-{port}",
                port,
                appendfsync=appendfsync,
                extra_args=(
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    str(node_timeout_ms),
                    *(tls.args(n) if tls else ()),
                ),
                binary=binary,
                die_with_parent=die_with_parent,
            )
            for n, port in enumerate(ports)
        ]

    @property
    def url(self) -> str:
        """Any node will do: the cluster client finds the others. With TLS, the first
        node's TLS port, trusting the cluster's certificate."""
        if self.tls:
            ca = quote(str(self.tls.cert))
            return f"rediss://127.0.0.1:{self.tls.ports[0]}?ssl_ca_certs={ca}"
        return f"redis://127.0.0.1:{self.nodes[0].port}"

    @property
    def masters(self) -> int:
        return len(self.nodes) // (1 + self.replicas)

    def start(self, timeout: float = 60.0) -> None:
        for node in self.nodes:
            node.start()
        if not self._formed():
            self._create()
        self.wait_ok(timeout)

    def _formed(self) -> bool:
        client = redis.Redis(port=self.nodes[0].port, decode_responses=True)
        try:
            info = client.cluster("INFO")
        finally:
            client.close()
        return int(_field(info, "cluster_slots_assigned")) == 16384

    def _create(self) -> None:
        cli = find_cli()
        if cli is None:
            raise RuntimeError("creating a cluster needs valkey-cli or redis-cli")
        subprocess.run(
            [
                cli,
                "--cluster",
                "create",
                *(f"127.0.0.1:{node.port}" for node in self.nodes),
                "--cluster-replicas",
                str(self.replicas),
                "--cluster-yes",
            ],  # fmt: skip
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=60,
        )

    def wait_ok(self, timeout: float = 60.0) -> None:
        """Until every running node says the cluster is ok and knows every node."""
        deadline = time.monotonic() + timeout
        while not all(self._ok(node) for node in self.nodes if node.running):
            if time.monotonic() > deadline:
                raise TimeoutError(f"cluster on {self.url} not ok within {timeout}s")
            time.sleep(0.1)

    def _ok(self, node: EmbeddedServer) -> bool:
        client = redis.Redis(port=node.port, decode_responses=True, socket_timeout=2)
        try:
            info = client.cluster("INFO")
            known = int(_field(info, "cluster_known_nodes"))
            return _field(info, "cluster_state") == "ok" and known == len(self.nodes)
        except redis.RedisError:
            return False
        finally:
            client.close()

    def master_ports(self) -> list[int]:
        """The ports of the nodes that are masters now (a failover changes them)."""
        client = redis.Redis(port=self._any_running().port, decode_responses=True)
        try:
            shards = client.execute_command("CLUSTER", "SLOTS")  # type: ignore[no-untyped-call]
        finally:
            client.close()
        return sorted({int(shard[2][1]) for shard in shards})

    def _any_running(self) -> EmbeddedServer:
        return next(node for node in self.nodes if node.running)

    def node(self, port: int) -> EmbeddedServer:
        return next(node for node in self.nodes if node.port == port)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


def _field(info: object, name: str) -> str:
    """A field of CLUSTER INFO, whichever shape the client returned it in."""
    if isinstance(info, dict):
        return str(info[name])
    for line in str(info).splitlines():
        key, _, value = line.partition(":")
        if key == name:
            return value.strip()
    raise KeyError(name)
