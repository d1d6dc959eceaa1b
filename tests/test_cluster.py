"""Partitions, on a real local Redis Cluster (3 masters, from the same server binary as
the rest of the suite) and on a single server with several partitions: the flows that
hold on one partition hold on many."""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import shlex
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest
import redis
from msgspec.structs import replace
from starlette.testclient import TestClient

from consumers.projector import Projector
from consumers.worker import Worker
from sumbatch.config import ConfigError, Settings
from sumbatch.model import ids
from sumbatch.model.events import TaskCompleted, from_fields
from sumbatch.model.keys import Keys
from sumbatch.model.tasks import Delay
from sumbatch.processes.cluster import TLS, LocalCluster
from sumbatch.processes.embedded import EmbeddedServer, find_cli, find_server
from sumbatch.replay import differences
from sumbatch.store.partitions import PER_MASTER, Partitions, open_partitions
from sumbatch.testing.ports import free_cluster_ports
from sumbatch.testing.processes import clean_env
from sumbatch.web.api import create_app, durable_problem
from tests.support import (
    Processes,
    answers_200,
    body_of,
    drop_namespace,
    env_for,
    free_port,
    fresh_namespace,
    group_processed,
    listening,
    outcomes,
    post_group,
    run_sumbatch,
    self_signed,
    stream_entries,
    submit,
    up_env,
    wait_until,
    wait_until_sync,
)
from tests.test_compose import REDIS_CONF_MOUNT, _command, _interpolate, _service

MASTERS = 3


def quick(url: str, prefix: str, **overrides: Any) -> Settings:
    """Settings for a fresh namespace on ``url``: no delay, a short claim timeout."""
    fresh = Settings(
        redis_url=url,
        namespace=fresh_namespace(prefix),
        delay=Delay(0.0, 0.0),
        claim_timeout=2.0,
        retry_base=0.01,
    )
    return replace(fresh, **overrides)


def on_cluster(cluster: LocalCluster, prefix: str, **overrides: Any) -> Settings:
    return quick(cluster.url, prefix, **overrides)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    local = LocalCluster(
        tmp_path_factory.mktemp("cluster"), free_cluster_ports(MASTERS), die_with_parent=True
    )
    try:
        local.start()
        yield local
    finally:
        local.stop()


@pytest.fixture(params=["cluster", "one-server"])
def partitioned(request: pytest.FixtureRequest, redis_url: str) -> Iterator[tuple[Settings, int]]:
    """Settings for a fresh namespace with several partitions, and how many: on the
    cluster, the default for a new namespace; on one server, 3 asked for."""
    if request.param == "cluster":
        cluster: LocalCluster = request.getfixturevalue("cluster")
        yield on_cluster(cluster, "p"), PER_MASTER * MASTERS
        return
    settings = quick(redis_url, "p", partitions=3)
    yield settings, 3
    drop_namespace(redis_url, settings.namespace, partitions=3)


async def run_consumers_until_idle(partitions: Partitions, settings: Settings) -> None:
    for store in partitions:
        await Worker(settings, store).run_until_idle()
        await Projector(store).run_until_idle()


def consume(settings: Settings) -> None:
    async def main() -> None:
        async with await open_partitions(settings) as partitions:
            await run_consumers_until_idle(partitions, settings)

    asyncio.run(main())


def test_groups_flow_through_every_partition(partitioned: tuple[Settings, int]) -> None:
    settings, count = partitioned
    rng = random.Random(7)
    submitted: dict[str, list[int]] = {}
    with TestClient(create_app(settings)) as client:
        for _ in range(24):
            pairs = [(rng.randrange(100), rng.randrange(100)) for _ in range(4)]
            created = post_group(client, pairs)
            submitted[created["groupTaskId"]] = [a + b for a, b in pairs]
        consume(settings)
        for gid, sums in submitted.items():
            status = client.get(f"/grouptasks/{gid}").json()
            assert (status["grouptaskProcessed"], status["results"]) == (True, sums)
            task = client.get(f"/tasks/{ids.task_id(gid, 3)}").json()
            assert (task["taskState"], task["result"]) == ("SUCCESS", sums[3])
    used = Counter(ids.partition_of(gid, count) for gid in submitted)
    assert len(used) >= 3, used

    async def check() -> None:
        async with await open_partitions(settings) as partitions:
            assert partitions.count == count
            for store in partitions:
                assert (await differences(store)).differences == []

    asyncio.run(check())


def test_the_keys_of_a_run_land_on_every_master(cluster: LocalCluster) -> None:
    settings = on_cluster(cluster, "k")
    with TestClient(create_app(settings)) as client:
        for n in range(30):
            post_group(client, [(n, n)])
    consume(settings)
    pattern = Keys(settings.namespace, 0, PER_MASTER * MASTERS).pattern
    per_master = {}
    for port in cluster.master_ports():
        node = redis.Redis(port=port)
        try:
            per_master[port] = sum(1 for _ in node.scan_iter(match=pattern, count=1000))
        finally:
            node.close()
    assert len(per_master) == MASTERS
    assert all(found > 0 for found in per_master.values()), per_master


def test_a_sum_computed_in_one_partition_is_served_from_the_cache_in_another(
    partitioned: tuple[Settings, int],
) -> None:
    settings, count = partitioned

    def key_for(partition: int) -> str:
        # An Idempotency-Key whose hash puts the group in ``partition``.
        return next(
            key
            for n in range(10_000)
            if int(hashlib.sha256((key := f"k{n}").encode()).hexdigest()[:8], 16) % count
            == partition
        )

    with TestClient(create_app(settings)) as client:
        body = {"tasks": [{"paramA": 40, "paramB": 2}]}
        first = client.post("/grouptasks", json=body, headers={"Idempotency-Key": key_for(0)})
        consume(settings)
        second = client.post("/grouptasks", json=body, headers={"Idempotency-Key": key_for(1)})
        consume(settings)
    gids = [first.json()["groupTaskId"], second.json()["groupTaskId"]]
    assert [ids.partition_of(gid, count) for gid in gids] == [0, 1]

    async def outcomes() -> list[TaskCompleted]:
        async with await open_partitions(settings) as partitions:
            found = []
            for gid in gids:
                history = await partitions.of(gid).group_history(gid)
                found += [e for _, f in history if isinstance(e := from_fields(f), TaskCompleted)]
            return found

    done = asyncio.run(outcomes())
    assert [(e.result, e.from_cache) for e in done] == [(42, False), (42, True)]


def test_a_namespace_keeps_its_number_of_partitions(partitioned: tuple[Settings, int]) -> None:
    settings, count = partitioned
    consume(settings)  # creates the namespace with its count
    other = replace(settings, partitions=count + 1)
    with pytest.raises(ConfigError, match=f"created with {count} partitions"):
        asyncio.run(open_partitions(other))
    done = run_sumbatch("replay", "--check", env=env_for(other))
    assert done.returncode == 2 and f"created with {count} partitions" in done.stderr


def test_kill_9_of_workers_and_the_projector_on_a_cluster_loses_and_doubles_nothing(
    cluster: LocalCluster, procs: Processes
) -> None:
    settings = on_cluster(cluster, "f", delay=Delay(0.05, 0.3))
    workers = [procs.start(settings, "worker") for _ in range(2)]
    projector = procs.start(settings, "projector")
    groups: dict[str, list[int]] = {}
    with TestClient(create_app(settings)) as client:
        for n in range(40):
            pairs = [(n, k) for k in range(5)]
            groups[post_group(client, pairs)["groupTaskId"]] = [a + b for a, b in pairs]

        async def started() -> bool:
            async with await open_partitions(settings) as partitions:
                logged = [await store.redis.xlen(store.keys.events) for store in partitions]
                return sum(logged) > 100

        asyncio.run(wait_until(started, within=30, what="work to be under way"))
        procs.kill9(workers[0])
        procs.kill9(projector)
        procs.start(settings, "worker")
        procs.start(settings, "projector")

        def all_processed() -> bool:
            return all(
                client.get(f"/grouptasks/{gid}").json()["grouptaskProcessed"] for gid in groups
            )

        wait_until_sync(all_processed, timeout=60, what="every group processed")
        for gid, sums in groups.items():
            assert client.get(f"/grouptasks/{gid}").json()["results"] == sums

    completed, finished = asyncio.run(outcomes(settings))
    assert set(completed.values()) == {1} and len(completed) == 200
    assert set(finished.values()) == {1} and set(finished) == set(groups)
    done = run_sumbatch("replay", "--check", env=env_for(settings))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 differences" in done.stdout.splitlines()[-1]


def test_tail_prints_every_partitions_events_merged_in_id_order(
    partitioned: tuple[Settings, int], tmp_path: Path
) -> None:
    settings, count = partitioned
    with TestClient(create_app(settings)) as client:
        for n in range(20):
            post_group(client, [(n, 1), (n, 2)])
    consume(settings)

    async def every_entry() -> list[str]:
        async with await open_partitions(settings) as partitions:
            found = []
            for store in partitions:
                found += [eid for eid, _ in await stream_entries(store, store.keys.events)]
            return found

    expected = sorted(asyncio.run(every_entry()), key=ids.entry_order)
    out = tmp_path / "tail.out"
    with out.open("wb") as stdout:
        tail = subprocess.Popen(
            [sys.executable, "-m", "sumbatch", "tail", "--from-start"],
            env=env_for(settings), stdout=stdout, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:

        def printed() -> list[str]:
            return [line.split()[0] for line in out.read_text().splitlines() if line.strip()]

        wait_until_sync(lambda: len(printed()) >= len(expected), timeout=30, what="tail")
        assert printed() == expected
    finally:
        tail.kill()
        tail.wait(10)


def test_up_with_a_local_cluster_runs_the_example_and_stops_clean(tmp_path: Path) -> None:
    first = free_cluster_ports(MASTERS, consecutive=True)[0]
    api = free_port()
    data_dir = tmp_path / "data"
    log = tmp_path / "up.log"
    with log.open("wb") as out:
        up = subprocess.Popen(
            [sys.executable, "-m", "sumbatch", "up", "--cluster", str(MASTERS),
             "--port", str(api), "--workers", "2"],
            env=up_env(data_dir, first), stdin=subprocess.DEVNULL, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    base = f"http://127.0.0.1:{api}"
    try:
        wait_until_sync(
            lambda: answers_200(f"{base}/readyz"), timeout=60, what=f"the API\n{log.read_text()}"
        )
        pairs = [(1, 5), (9, 10), (12, 13), (8, 1)]
        with httpx.Client(base_url=base) as client:
            gid = client.post("/grouptasks", json=body_of(pairs)).json()["groupTaskId"]
            wait_until_sync(lambda: group_processed(client, gid), timeout=30, what="the group")
            assert client.get(f"/grouptasks/{gid}").json()["results"] == [6, 19, 25, 9]
        said = log.read_text()
        assert f"local cluster of {MASTERS} masters" in said
        nodes = redis.Redis(port=first, decode_responses=True)
        try:
            assert int(nodes.cluster("INFO")["cluster_known_nodes"]) == MASTERS
            assert nodes.get(Keys.partitions_key("sumbatch")) == str(PER_MASTER * MASTERS)
        finally:
            nodes.close()
        shown = run_sumbatch(
            "partitions", env=clean_env(REDIS_URL=f"redis://127.0.0.1:{first}")
        ).stdout.splitlines()
        assert len(shown) == PER_MASTER * MASTERS
        masters = {line.rsplit(" on ", 1)[1] for line in shown}
        assert masters == {f"127.0.0.1:{first + n}" for n in range(MASTERS)}, shown
        os.killpg(up.pid, signal.SIGINT)  # what Ctrl-C in its terminal does
        assert up.wait(60) == 0, log.read_text()
        assert "Traceback" not in log.read_text()
        assert not any(listening(first + n) for n in range(MASTERS))
    finally:
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGKILL)
            up.wait(10)


def _compose_node_args(service: str) -> tuple[str, ...]:
    """A cluster node's redis-server arguments from compose.yaml, as compose would pass
    them with no variable set, announcing this host instead of the service's name."""
    words = shlex.split(_interpolate(" ".join(_command(_service(service))), {}))
    assert words[:2] == ["redis-server", REDIS_CONF_MOUNT], words
    args = words[2:]
    announced = args.index("--cluster-announce-hostname") + 1
    assert args[announced] == service
    args[announced] = "localhost"
    return tuple(args)


def _cluster_init(nodes: list[EmbeddedServer]) -> str:
    script = Path(__file__).resolve().parents[1] / "ops" / "cluster-init.sh"
    done = subprocess.run(
        ["sh", str(script), *(f"localhost:{node.port}" for node in nodes)],
        env={**os.environ, "REDIS_CLI": find_cli() or "redis-cli"},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_the_compose_cluster_profile_forms_a_cluster_the_service_runs_on(
    tmp_path: Path,
) -> None:
    """compose.yaml's cluster profile without Docker: its three nodes' arguments and its
    cluster-init script, with this suite's server binary. The script forms the cluster,
    clients are pointed at the announced host name, a group flows, and after every node
    restarts the script finds the cluster formed, and the group is still there."""
    services = ["cluster-redis-0", "cluster-redis-1", "cluster-redis-2"]
    nodes = [
        EmbeddedServer(tmp_path / service, port, extra_args=_compose_node_args(service))
        for service, port in zip(services, free_cluster_ports(len(services)), strict=True)
    ]
    try:
        for node in nodes:
            node.start()
        assert "creating a cluster of 3 masters" in _cluster_init(nodes)
        raw = redis.Redis(port=nodes[0].port, decode_responses=True)
        try:
            endpoints = {shard[2][0] for shard in raw.execute_command("CLUSTER", "SLOTS")}  # type: ignore[no-untyped-call]
        finally:
            raw.close()
        assert endpoints == {"localhost"}, endpoints
        settings = quick(f"redis://localhost:{nodes[0].port}/0", "compose")
        pairs = [(1, 5), (9, 10), (12, 13), (8, 1)]
        with TestClient(create_app(settings)) as client:
            gid = post_group(client, pairs)["groupTaskId"]
            consume(settings)
            assert client.get(f"/grouptasks/{gid}").json()["results"] == [6, 19, 25, 9]
        for node in nodes:
            node.stop()
        for node in nodes:
            node.start()
        assert "formed before" in _cluster_init(nodes)
        with TestClient(create_app(settings)) as client:
            status = client.get(f"/grouptasks/{gid}").json()
            assert (status["grouptaskProcessed"], status["results"]) == (True, [6, 19, 25, 9])
    finally:
        for node in nodes:
            node.stop()


@pytest.mark.parametrize("durable", [False, True], ids=["default", "durable"])
def test_a_master_killed_under_load_fails_over_losing_only_unreplicated_writes(
    tmp_path: Path, procs: Processes, durable: bool
) -> None:
    """3 masters, a replica each. kill -9 of a master while groups stream in: its
    replica takes over, POSTs to its partitions are refused (503) meanwhile, and the
    service goes on. By default an acknowledged group can be lost only if it was
    acknowledged after the last moment its replica was seen caught up (asynchronous
    replication, as docs/guarantees.md says); in durable mode (WAIT 1) none is. None is run
    twice."""
    cluster = LocalCluster(
        tmp_path / "cluster", free_cluster_ports(2 * MASTERS), replicas=1, die_with_parent=True
    )
    try:
        cluster.start()
        settings = on_cluster(cluster, "o", delay=Delay(0.0, 0.05), durable=durable)
        for _ in range(2):
            procs.start(settings, "worker")
        procs.start(settings, "projector")
        url_port = int(cluster.url.rsplit(":", 1)[1])
        victim = next(port for port in cluster.master_ports() if port != url_port)
        acked: dict[str, float] = {}
        refused = 0
        with TestClient(create_app(settings)) as client:

            def post(n: int) -> None:
                nonlocal refused
                answer = client.post("/grouptasks", json=body_of([(n, 1), (n, 2)]))
                if answer.status_code == 200:
                    acked[answer.json()["groupTaskId"]] = time.monotonic()
                else:
                    assert answer.status_code == 503, answer.text
                    refused += 1

            for n in range(100):
                post(n)
            caught_up = _replicas_caught_up(cluster, victim)
            cluster.node(victim).kill()
            killed_at = time.monotonic()
            # POSTs go on while the replica takes over: those to its partitions are
            # refused meanwhile.
            n, deadline = 100, time.monotonic() + 30
            while victim in cluster.master_ports():
                assert time.monotonic() < deadline, "the replica did not take over"
                post(n)
                n += 1
            took_over = time.monotonic() - killed_at
            for m in range(n, n + 100):
                post(m)
            cluster.node(victim).start()  # back as a replica of the new master

            def settled() -> bool:
                return all(
                    client.get(f"/grouptasks/{gid}").json().get("grouptaskProcessed") is True
                    or client.get(f"/grouptasks/{gid}").status_code == 404
                    for gid in acked
                )

            wait_until_sync(settled, timeout=60, what="every surviving group processed")
            lost = [gid for gid in acked if client.get(f"/grouptasks/{gid}").status_code == 404]
            for gid in set(acked) - set(lost):
                assert client.get(f"/grouptasks/{gid}").json()["grouptaskProcessed"] is True
        # Lost only what was acknowledged after the replica was last seen caught up;
        # in durable mode, a replica had each group before its POST was answered.
        assert all(acked[gid] >= caught_up for gid in lost), (lost, caught_up)
        if durable:
            assert lost == []

        async def completions() -> Counter[str]:
            async with await open_partitions(settings) as partitions:
                done: Counter[str] = Counter()
                for store in partitions:
                    for _, fields in await stream_entries(store, store.keys.events):
                        if fields.get("type") == "TaskCompleted":
                            done[fields["taskId"]] += 1
                return done

        done = asyncio.run(completions())
        assert set(done.values()) == {1}, [t for t, c in done.items() if c > 1]
        print(
            f"\nfailover ({'durable' if durable else 'default'}): took over in "
            f"{took_over:.1f} s; {len(acked)} groups acknowledged, {len(lost)} lost, "
            f"{refused} POSTs refused meanwhile"
        )
    finally:
        cluster.stop()


def _replicas_caught_up(cluster: LocalCluster, master: int) -> float:
    """When the master's replica had every write the master had made so far."""
    node = redis.Redis(port=master, decode_responses=True)
    try:
        info = node.info("replication")
        offset = int(info["master_repl_offset"])
        taken = time.monotonic()

        def caught_up() -> bool:
            replica = node.info("replication")["slave0"]
            return int(replica["offset"]) >= offset

        wait_until_sync(caught_up, timeout=10, what="the replica to catch up")
        return taken
    finally:
        node.close()


def test_durable_mode_on_a_cluster_needs_a_replica_on_every_master(cluster: LocalCluster) -> None:
    settings = on_cluster(cluster, "d", durable=True)
    problem = asyncio.run(durable_problem(settings))
    assert problem is not None and "every master needs a replica" in problem, problem


def test_a_cancel_stops_running_tasks_in_their_partition(
    partitioned: tuple[Settings, int],
) -> None:
    """The cancel script publishes on the partition's channel (a cluster broadcasts it
    to every node); the worker running the group's tasks stops them at once."""
    settings, count = partitioned
    slow = replace(settings, delay=Delay(60.0, 60.0), task_timeout=120.0)

    async def scenario() -> None:
        async with await open_partitions(slow) as partitions:
            store = partitions.stores[count - 1]
            gid, _ = await submit(store, [(1, 2), (3, 4)])
            assert ids.partition_of(gid, count) == count - 1
            worker = Worker(slow, store)
            running = asyncio.create_task(worker.run())
            try:
                await wait_until(lambda: _running(worker, 2), within=20, what="both runs")
                outcome = await partitions.of(gid).cancel(gid)
                assert (outcome.status, outcome.revoked) == ("cancelled", 2)
                await wait_until(lambda: _running(worker, 0), within=10, what="runs stopped")
            finally:
                worker.should_exit = True
                await asyncio.wait_for(running, 30)

    asyncio.run(scenario())


async def _running(worker: Worker, count: int) -> bool:
    return len(worker.runs) == count


def test_the_flow_runs_on_a_cluster_over_tls(tmp_path: Path) -> None:
    """`rediss://` naming one node of a cluster whose nodes speak TLS only to clients
    on their TLS ports: the cluster client finds the others' TLS ports and trusts the
    certificate the URL names."""
    cert, key = self_signed(tmp_path)
    ports = free_cluster_ports(2 * MASTERS)
    tls = TLS(ports[MASTERS:], cert, key)
    cluster = LocalCluster(tmp_path / "cluster", ports[:MASTERS], tls=tls, die_with_parent=True)
    try:
        try:
            cluster.start()
        except (RuntimeError, TimeoutError) as exc:
            said = [
                line
                for node in cluster.nodes
                if (node.data_dir / "server.log").exists()
                for line in (node.data_dir / "server.log").read_text().splitlines()
                if "TLS" in line
            ]
            if said:
                pytest.skip(f"{find_server()} cannot serve TLS: {said[-1]}")
            raise AssertionError(f"the cluster did not start: {exc}") from exc
        settings = on_cluster(cluster, "s")
        with TestClient(create_app(settings)) as client:
            gid = post_group(client, [(1, 2), (3, 4)])["groupTaskId"]
            consume(settings)
            status = client.get(f"/grouptasks/{gid}").json()
        assert (status["grouptaskProcessed"], status["results"]) == (True, [3, 7])
        # The TLS ports really speak TLS only.
        plain = redis.Redis(port=tls.ports[0], socket_connect_timeout=2, socket_timeout=2)
        with pytest.raises((redis.ConnectionError, redis.TimeoutError)):
            plain.ping()
        plain.close()
    finally:
        cluster.stop()
