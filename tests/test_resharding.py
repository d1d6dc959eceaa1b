"""Resharding a live cluster: the hash slots of two partitions move to another master
by hand, as `redis-cli --cluster reshard` moves them (SETSLOT IMPORTING/MIGRATING,
GETKEYSINSLOT + MIGRATE in batches, SETSLOT NODE on every master), while groups
stream in over HTTP to a real API, with real workers and a projector. Clients meet ASK
while a slot is migrating, MOVED after, and multi-key scripts meet TRYAGAIN: each is
retried or answered 503, never a 500, and nothing is lost or run twice."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2 as httpx
import redis
from redis.crc import key_slot

from sumbatch.config import Settings
from sumbatch.model import ids
from sumbatch.model.keys import Keys
from sumbatch.model.tasks import Delay
from sumbatch.processes.cluster import LocalCluster
from sumbatch.store.partitions import PER_MASTER
from sumbatch.testing.ports import free_cluster_ports
from tests.support import (
    Processes,
    answers_200,
    body_of,
    env_for,
    free_port,
    fresh_namespace,
    outcomes,
    run_sumbatch,
    wait_until_sync,
)

MASTERS = 3
PARTITIONS = PER_MASTER * MASTERS
# Keys per MIGRATE, as redis-cli's --cluster-pipeline default.
BATCH = 10
# Requests (to the partition being moved) that must end in each phase of a move.
PER_PHASE = 4


@dataclass(frozen=True)
class Sent:
    """One HTTP request the client made: which partition it was for, when it began and
    ended (monotonic), and its status (0: no answer at all)."""

    method: str
    partition: int
    began: float
    ended: float
    status: int


@dataclass
class Client:
    """Submits groups over HTTP until told to stop, each with an Idempotency-Key, and
    retries a 503 with the same key and body until it is answered 200. After each
    group, and between retries, it reads back a group acknowledged before (one in the
    partitions ``focus`` names, those being moved, when there is one). Half the POSTs
    go to those partitions, the others round every partition."""

    base: str
    focus: list[int] = field(default_factory=list)
    sent: list[Sent] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    acked: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    unexpected: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.rng = random.Random(9)
        self.thread = threading.Thread(target=self._run, name="resharding-client", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def finish(self, timeout: float = 30.0) -> None:
        self.stop.set()
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the client did not finish its last group"

    def ended_since(self, partition: int, since: float) -> int:
        """How many requests for ``partition`` began at or after ``since`` and ended."""
        return sum(1 for s in list(self.sent) if s.partition == partition and s.began >= since)

    def _key_for(self, partition: int) -> str:
        """A fresh Idempotency-Key whose hash puts the group in ``partition`` (the rule
        of Partitions.for_new_group)."""
        while True:
            key = uuid.uuid4().hex
            if _partition_of_key(key) == partition:
                return key

    def _request(
        self, http: httpx.Client, method: str, partition: int, url: str, **kw: Any
    ) -> httpx.Response | None:
        began = time.monotonic()
        try:
            answer = http.request(method, url, **kw)
        except httpx.HTTPError as exc:
            self.sent.append(Sent(method, partition, began, time.monotonic(), 0))
            self.statuses[0] += 1
            self.unexpected.append(f"{method} {url}: no answer ({exc!r})")
            return None
        self.sent.append(Sent(method, partition, began, time.monotonic(), answer.status_code))
        self.statuses[answer.status_code] += 1
        return answer

    def _submit(self, http: httpx.Client, partition: int) -> None:
        pairs = [(self.rng.randrange(1000), self.rng.randrange(1000)) for _ in range(3)]
        key = self._key_for(partition)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            answer = self._request(
                http, "POST", partition, "/grouptasks",
                json=body_of(pairs), headers={"Idempotency-Key": key},
            )  # fmt: skip
            if answer is None:
                continue  # no answer: the same key again, as for a 503
            if answer.status_code == 200:
                gid = answer.json()["groupTaskId"]
                if ids.partition_of(gid, PARTITIONS) != partition:
                    self.unexpected.append(f"{gid} is not in partition {partition}")
                self.acked[gid] = pairs
                return
            if answer.status_code != 503:
                self.unexpected.append(f"POST: {answer.status_code} {answer.text}")
                return
            # A refusal: the same key and body again, after a read of a group in the
            # same partition (sooner than Retry-After's whole second, which would
            # starve the moves' phases; the read paces the loop).
            self._read_back(http)
        self.unexpected.append(f"POST with key {key}: no 200 within 30 s")

    def _read_back(self, http: httpx.Client) -> None:
        if not self.acked:
            return
        gids = list(self.acked)
        focused = [g for g in gids if ids.partition_of(g, PARTITIONS) in self.focus]
        gid = self.rng.choice(focused or gids)
        answer = self._request(http, "GET", ids.partition_of(gid, PARTITIONS), f"/grouptasks/{gid}")
        if answer is not None and answer.status_code not in (200, 503):
            self.unexpected.append(f"GET {gid}: {answer.status_code} {answer.text}")

    def _run(self) -> None:
        with httpx.Client(base_url=self.base, timeout=15) as http:
            for n in itertools.count():
                if self.stop.is_set():
                    return
                focus = list(self.focus)
                partition = self.rng.choice(focus) if focus and n % 2 else n % PARTITIONS
                self._submit(http, partition)
                self._read_back(http)


def _partition_of_key(key: str) -> int:
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % PARTITIONS


def _cmd(node: redis.Redis, *args: Any) -> Any:
    return node.execute_command(*args)  # type: ignore[no-untyped-call]


def _slot_owners(port: int) -> dict[int, int]:
    """Which master's port serves each slot, as the node at ``port`` sees it."""
    node = redis.Redis(port=port, decode_responses=True)
    try:
        shards = _cmd(node, "CLUSTER", "SLOTS")
    finally:
        node.close()
    return {
        slot: int(shard[2][1])
        for shard in shards
        for slot in range(int(shard[0]), int(shard[1]) + 1)
    }


@dataclass
class Move:
    """One partition's slot moved from ``source`` to ``target`` (ports), and when each
    phase began: slot marked migrating, first keys moved, owner set."""

    partition: int
    slot: int
    source: int
    target: int
    keys_moved: int = 0
    phases: dict[str, float] = field(default_factory=dict)


def move_slot(move: Move, masters: list[int], phase: Callable[[str], None]) -> None:
    """Move ``move.slot`` as `redis-cli --cluster reshard` does; ``phase(name)`` is
    called once the slot is marked migrating (no key moved yet), once some of its keys
    have moved (the rest not yet), once every key has moved (owner not yet set), and
    once every master says the target owns it."""
    nodes = {port: redis.Redis(port=port, decode_responses=True) for port in masters}
    try:
        node_id = {port: str(_cmd(node, "CLUSTER", "MYID")) for port, node in nodes.items()}
        source, target = nodes[move.source], nodes[move.target]
        _cmd(target, "CLUSTER", "SETSLOT", move.slot, "IMPORTING", node_id[move.source])
        _cmd(source, "CLUSTER", "SETSLOT", move.slot, "MIGRATING", node_id[move.target])
        phase("migrating")
        while True:
            keys = _cmd(source, "CLUSTER", "GETKEYSINSLOT", move.slot, BATCH)
            if not keys:
                break
            _cmd(source, "MIGRATE", "127.0.0.1", move.target, "", 0, 5000, "KEYS", *keys)
            if move.keys_moved == 0:
                phase("keys moving")
            move.keys_moved += len(keys)
        phase("keys moved")
        # The target first, then the source, then the rest, as redis-cli does.
        order = [
            move.target,
            move.source,
            *(p for p in masters if p not in (move.source, move.target)),
        ]
        for port in order:
            _cmd(nodes[port], "CLUSTER", "SETSLOT", move.slot, "NODE", node_id[move.target])
        phase("owned")
    finally:
        for node in nodes.values():
            node.close()


def _traceback(log: str) -> str:
    """The first traceback in a process's log, with the line that introduced it."""
    lines = log.splitlines()
    at = next((n for n, line in enumerate(lines) if line.startswith("Traceback")), None)
    if at is None:
        return "(no traceback)"
    end = next(
        (n for n in range(at + 1, len(lines)) if not lines[n].startswith((" ", "Traceback"))),
        len(lines) - 1,
    )
    return "\n".join(lines[max(0, at - 1) : end + 1])


def _error_stats(masters: list[int]) -> Counter[str]:
    """The redirections and refusals the masters answered (INFO errorstats), summed."""
    found: Counter[str] = Counter()
    for port in masters:
        node = redis.Redis(port=port, decode_responses=True)
        try:
            for name, value in node.info("errorstats").items():
                found[name.removeprefix("errorstat_")] += int(value["count"])
        finally:
            node.close()
    return found


def test_moving_partitions_slots_under_load_is_retried_not_a_500(
    tmp_path: Path, procs: Processes
) -> None:
    began = time.monotonic()
    cluster = LocalCluster(tmp_path / "cluster", free_cluster_ports(MASTERS), die_with_parent=True)
    try:
        cluster.start()
        settings = Settings(
            redis_url=cluster.url,
            namespace=fresh_namespace("rs"),
            delay=Delay(0.0, 0.0),
            claim_timeout=2.0,
            retry_base=0.01,
        )
        api_port = free_port()
        api = procs.start(settings, "api", "--port", str(api_port))
        for _ in range(2):
            procs.start(settings, "worker")
        procs.start(settings, "projector")
        base = f"http://127.0.0.1:{api_port}"

        def ready() -> bool:
            assert api.poll() is None, procs.log_of(api).read_text()
            return answers_200(f"{base}/readyz", timeout=2)

        wait_until_sync(ready, timeout=30, what="the API to be ready")
        masters = cluster.master_ports()
        for port in masters:
            node = redis.Redis(port=port)
            try:
                _cmd(node, "CONFIG", "RESETSTAT")
            finally:
                node.close()

        # Two partitions, on two masters, each to the next master.
        owners = _slot_owners(masters[0])
        slots = [
            key_slot(Keys(settings.namespace, p, PARTITIONS).tag.encode())
            for p in range(PARTITIONS)
        ]
        moves = []
        for n in range(2):
            source, target = masters[n], masters[(n + 1) % MASTERS]
            p = next(p for p in range(PARTITIONS) if owners[slots[p]] == source)
            moves.append(Move(p, slots[p], source, target))

        client = Client(base)
        client.start()
        try:
            # Some groups in every partition first, so each slot has keys to move.
            wait_until_sync(
                lambda: len({ids.partition_of(g, PARTITIONS) for g in list(client.acked)})
                == PARTITIONS,
                timeout=30, what="a group in every partition",
            )  # fmt: skip
            for move in moves:
                client.focus[:] = [move.partition]

                def phase(name: str, move: Move = move) -> None:
                    move.phases[name] = since = time.monotonic()
                    wait_until_sync(
                        lambda: client.ended_since(move.partition, since) >= PER_PHASE,
                        timeout=30,
                        what=f"requests to partition {move.partition} ({name})",
                    )

                move_slot(move, masters, phase)
            client.focus[:] = []
            # Some more after the last move, to the moved partitions too.
            after = time.monotonic()
            wait_until_sync(
                lambda: all(client.ended_since(m.partition, after) >= 2 for m in moves),
                timeout=30, what="requests after the moves",
            )  # fmt: skip
        finally:
            client.finish()

        # Requests really ran while each slot was moving: from marked migrating to
        # owned, some began for that partition and ended before it was owned.
        during = {
            m.partition: Counter(
                f"{s.method} {s.status}"
                for s in client.sent
                if s.partition == m.partition
                and m.phases["migrating"] <= s.began
                and s.ended <= m.phases["owned"]
            )
            for m in moves
        }
        seen = _error_stats(masters)
        print(
            f"\nresharding: {len(client.acked)} groups acknowledged in {len(client.sent)} "
            f"requests {dict(client.statuses)}; while moving, by partition: "
            f"{ {p: dict(c) for p, c in during.items()} }; keys moved "
            f"{[m.keys_moved for m in moves]}; each move took "
            f"{[round(m.phases['owned'] - m.phases['migrating'], 2) for m in moves]} s; "
            f"servers answered {dict(seen)}"
        )
        statuses = Counter(client.statuses)
        said = procs.log_of(api).read_text(errors="replace")
        assert 500 not in statuses, f"{statuses}; the API:\n{_traceback(said)}"
        assert client.unexpected == [], client.unexpected[:10]
        assert set(statuses) <= {200, 503}, statuses
        assert all(c.total() >= 3 * PER_PHASE for c in during.values()), during
        # ... and met what a move answers: ASK and TRYAGAIN while it ran, MOVED after.
        assert all(seen[reply] > 0 for reply in ("ASK", "TRYAGAIN", "MOVED")), seen

        # The slots really moved: every master says the target serves them now.
        for port in masters:
            owners = _slot_owners(port)
            assert [owners[m.slot] for m in moves] == [m.target for m in moves], port
        assert all(m.keys_moved > 0 for m in moves), moves

        # Every acknowledged group is processed, with the right sums.
        with httpx.Client(base_url=base, timeout=15) as http:
            pending = set(client.acked)

            def all_processed() -> bool:
                for gid in list(pending):
                    answer = http.get(f"/grouptasks/{gid}")
                    assert answer.status_code in (200, 503), answer.text
                    if answer.status_code == 200 and answer.json()["grouptaskProcessed"]:
                        pending.discard(gid)
                return not pending

            wait_until_sync(all_processed, timeout=60, what="every group processed")
            for gid, pairs in client.acked.items():
                status = http.get(f"/grouptasks/{gid}").json()
                assert status["results"] == [a + b for a, b in pairs], (gid, status)

        # Exactly once: each task of each acknowledged group completed once, each group
        # finished once, in the event logs of every partition.
        completed, finished = asyncio.run(outcomes(settings))
        doubled = [tid for tid, count in completed.items() if count > 1]
        assert doubled == [], doubled
        tasks = {
            tid for gid, pairs in client.acked.items() for tid in ids.task_ids(gid, len(pairs))
        }
        assert set(completed) == tasks
        assert finished == Counter(set(client.acked))

        done = run_sumbatch("replay", "--check", env=env_for(settings))
        assert done.returncode == 0, done.stdout + done.stderr
        assert "0 differences" in done.stdout.splitlines()[-1], done.stdout

        for process in procs.started:
            log = procs.log_of(process)
            assert process.poll() is None, f"{log.name} exited:\n{log.read_text()}"
            said = log.read_text(errors="replace")
            assert "Traceback" not in said, f"{log.name}:\n{_traceback(said)}"
        print(f"resharding: took {time.monotonic() - began:.1f} s")
    finally:
        procs.cleanup()  # before the cluster, so no process logs its going
        cluster.stop()
