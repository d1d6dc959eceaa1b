"""A real server, really killed or stopped, under the real API, workers and projector.

What a 2xx on POST promises in each persistence mode when Redis dies (``kill -9``),
and how every process lives through Redis being away (SIGTERM, then a restart on the
same data directory and port). Each test runs its own server: never the session one.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx2 as httpx

from sumbatch.config import Settings
from sumbatch.model import ids
from sumbatch.model.events import GroupFinished, GroupSubmitted, TaskCompleted, TaskStarted
from sumbatch.model.keys import WORKER_GROUP
from sumbatch.model.tasks import Delay
from sumbatch.processes.embedded import EmbeddedServer
from sumbatch.replay import differences
from sumbatch.store import Store, open_store
from tests.support import (
    Processes,
    answers_200,
    body_of,
    env_for,
    free_port,
    fresh_namespace,
    has_waitaof,
    log_events,
    own_server,
    processes,
    wait_until,
    wait_until_sync,
)

HANG = 15.0  # seconds: an HTTP answer slower than this counts as a hang
TASKS_PER_GROUP = 5
UNAVAILABLE = "redis unavailable"
BACK = re.compile(r"redis is back after (\d+) failed tries")
OUTAGE = 2.0  # seconds Redis stays away in the outage test, at least


# -- the server: support's own_server, killed or stopped and started again ------------


def settings_for(server: EmbeddedServer, delay: Delay) -> Settings:
    """Settings for our processes on ``server`` (a test's own_server, which the test
    may kill or stop and start again on the same port and data: it loads the AOF)."""
    return Settings(
        redis_url=server.url,
        namespace=fresh_namespace("f"),
        delay=delay,
        claim_timeout=1.5,
        retry_base=0.01,
    )


# -- our processes -------------------------------------------------------------------


@dataclass
class Proc:
    process: subprocess.Popen[bytes]
    log: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def count(self, phrase: str) -> int:
        return sum(phrase in line for line in self.text().splitlines())

    def failed_tries(self) -> list[int]:
        """N of each "redis is back after N failed tries" line."""
        return [int(n) for n in BACK.findall(self.text())]


def start(
    procs: Processes, settings: Settings, *args: str, env: dict[str, str] | None = None
) -> Proc:
    process = procs.start(settings, *args, env=env)
    return Proc(process, procs.log_of(process))


def start_api(procs: Processes, settings: Settings, *, durable: bool = False) -> tuple[str, Proc]:
    """The API as a subprocess; returns its base URL once /readyz answers 200."""
    port = free_port()
    env = env_for(settings)
    if durable:
        env["SUMBATCH_DURABLE"] = "true"
        env["SUMBATCH_LOG_LEVEL"] = "INFO"  # so its log says which durable check it uses
    api = start(procs, settings, "api", "--port", str(port), env=env)
    base = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        assert api.process.poll() is None, f"the API exited:\n{api.text()}"
        return answers_200(f"{base}/readyz", timeout=2)

    wait_until_sync(ready, timeout=30, what="the API to be ready")
    return base, api


def start_consumers(procs: Processes, settings: Settings, workers: int = 2) -> list[Proc]:
    """``workers`` worker processes, then the projector (last in the list)."""
    started = [start(procs, settings, "worker") for _ in range(workers)]
    return [*started, start(procs, settings, "projector")]


# -- submitting over HTTP, and what was acknowledged ------------------------------------


@dataclass(frozen=True)
class Acked:
    group_task_id: str
    task_ids: list[str]
    pairs: list[tuple[int, int]]
    sent: float  # wall clock when the POST was sent
    at: float  # wall clock when the 2xx arrived


@dataclass
class Submissions:
    """Concurrent POSTs until told to stop; records every 2xx and every refusal."""

    client: httpx.AsyncClient
    acked: list[Acked] = field(default_factory=list)
    refused: Counter[int] = field(default_factory=Counter)
    failures: int = 0
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    numbers: Iterator[int] = field(default_factory=itertools.count)

    async def post_one(self) -> Acked | None:
        n = next(self.numbers)
        pairs = [(n, i) for i in range(TASKS_PER_GROUP)]
        sent = time.time()
        try:
            answer = await self.client.post("/grouptasks", json=body_of(pairs))
        except httpx.HTTPError:
            self.failures += 1
            return None
        if not answer.is_success:
            self.refused[answer.status_code] += 1
            return None
        created = answer.json()
        acked = Acked(created["groupTaskId"], created["taskIds"], pairs, sent, time.time())
        self.acked.append(acked)
        return acked

    async def run(self) -> None:
        while not self.stop.is_set():
            if await self.post_one() is None:
                await asyncio.sleep(0.05)  # pacing after a refusal, not a wait for a state

    def acked_since(self, moment: float) -> int:
        return sum(a.at > moment for a in self.acked)


# -- checks over the log ---------------------------------------------------------------


async def groups_in_log(store: Store) -> set[str]:
    return {e.group_task_id for e in await log_events(store) if isinstance(e, GroupSubmitted)}


async def settled(store: Store, acked: list[Acked]) -> bool:
    """Every acknowledged group that is in the log is processed, and every group in
    the log (acknowledged or not) has finished."""
    events = await log_events(store)
    submitted = {e.group_task_id for e in events if isinstance(e, GroupSubmitted)}
    finished = {e.group_task_id for e in events if isinstance(e, GroupFinished)}
    if finished != submitted:
        return False
    for group in acked:
        if group.group_task_id in submitted:
            view = await store.group_view(group.group_task_id)
            if view is None or not view.processed:
                return False
    return True


async def assert_log_exactly_once(store: Store, acked: list[Acked]) -> None:
    """Each task in the log completed once, each group finished once, no work entry is
    left pending, the views equal a replay, and every surviving acknowledged group has
    the right results."""
    events = await log_events(store)
    submitted = [e.group_task_id for e in events if isinstance(e, GroupSubmitted)]
    tasks = [
        tid
        for e in events
        if isinstance(e, GroupSubmitted)
        for tid in ids.task_ids(e.group_task_id, e.tasks_total)
    ]
    completed = Counter(e.task_id for e in events if isinstance(e, TaskCompleted))
    finished = Counter(e.group_task_id for e in events if isinstance(e, GroupFinished))
    assert len(set(submitted)) == len(submitted)
    assert completed == Counter(tasks)
    assert finished == Counter(submitted)
    pending = await store.redis.xpending(store.keys.work, WORKER_GROUP)
    assert pending["pending"] == 0
    diffs = (await differences(store)).differences
    assert diffs == []
    present = set(submitted)
    for group in acked:
        if group.group_task_id in present:
            view = await store.group_view(group.group_task_id)
            assert view is not None
            assert view.results == [a + b for a, b in group.pairs]
            assert view.processed and view.succeeded


@dataclass(frozen=True)
class Crash:
    subs: Submissions
    killed_at: float  # wall clock just before the kill -9
    restarted_at: float  # wall clock just before the new server process was started


async def crash_and_restart(server: EmbeddedServer, base: str, *, before: int, after: int) -> Crash:
    """Four concurrent submitters; ``kill -9`` of the server once ``before`` groups
    were acknowledged, a restart on the same directory and port, and ``after`` more
    acknowledged groups."""
    async with httpx.AsyncClient(base_url=base, timeout=HANG) as client:
        subs = Submissions(client)
        runners = [asyncio.create_task(subs.run()) for _ in range(4)]
        try:

            async def acked_before() -> bool:
                return len(subs.acked) >= before

            await wait_until(acked_before, within=30, what=f"{before} acknowledged groups")
            killed_at = time.time()
            server.kill()

            async def refused() -> bool:
                return sum(subs.refused.values()) > 0

            await wait_until(refused, within=HANG, what="the API to refuse a POST")
            restarted_at = time.time()
            await asyncio.to_thread(server.start)

            async def acked_after() -> bool:
                return subs.acked_since(killed_at) >= after

            await wait_until(acked_after, within=30, what=f"{after} groups acked after restart")
        finally:
            subs.stop.set()
            await asyncio.gather(*runners)
    return Crash(subs, killed_at, restarted_at)


def assert_consumers_alive(consumers: list[Proc]) -> None:
    for proc in consumers:
        assert proc.process.poll() is None, f"{proc.log.name} exited:\n{proc.text()}"
        assert "Traceback" not in proc.text(), proc.text()


# -- the tests -------------------------------------------------------------------------


def test_durable_mode_loses_no_acknowledged_group_when_redis_is_killed(tmp_path: Path) -> None:
    """SUMBATCH_DURABLE: each 2xx waited for WAITAOF (or, on a server before 7.2, the
    server runs appendfsync always). kill -9 of Redis mid-stream, a restart: every
    acknowledged group is there and runs, each task exactly once."""
    with own_server(tmp_path / "data") as server, processes(tmp_path) as procs:
        if not has_waitaof(server.url):
            server.appendfsync = "always"  # what durable mode asks of such a server
            server.stop()
            server.start()
        settings = settings_for(server, Delay(0.0, 0.2))
        consumers = start_consumers(procs, settings)
        base, api = start_api(procs, settings, durable=True)
        assert "durable mode" in api.text()

        async def scenario() -> None:
            subs = (await crash_and_restart(server, base, before=40, after=20)).subs
            assert subs.refused.keys() <= {503} and subs.failures == 0
            async with open_store(settings) as store:
                await wait_until(
                    lambda: settled(store, subs.acked), within=45, what="every group to finish"
                )
                in_log = await groups_in_log(store)
                lost = [a.group_task_id for a in subs.acked if a.group_task_id not in in_log]
                assert lost == []
                await assert_log_exactly_once(store, subs.acked)
            print(
                f"\ndurable: {len(subs.acked)} groups acknowledged, 0 lost, "
                f"{sum(subs.refused.values())} POSTs refused while Redis was down"
            )

        asyncio.run(scenario())
        assert_consumers_alive(consumers)


def test_default_mode_loses_at_most_the_last_second_of_acknowledged_groups(
    tmp_path: Path,
) -> None:
    """appendfsync everysec, no durable mode: what kill -9 of Redis loses is only
    what was acknowledged just before it (the server's write hold while it fsyncs, plus
    the round trips measured in the run)."""
    with (
        own_server(tmp_path / "data", appendfsync="everysec") as server,
        processes(tmp_path) as procs,
    ):
        settings = settings_for(server, Delay(0.0, 0.2))
        consumers = start_consumers(procs, settings)
        base, _ = start_api(procs, settings)

        async def scenario() -> None:
            crash = await crash_and_restart(server, base, before=60, after=20)
            subs, killed_at = crash.subs, crash.killed_at
            assert subs.refused.keys() <= {503} and subs.failures == 0
            async with open_store(settings) as store:
                # kill -9 loses only what the server acknowledged but had not yet
                # written to the AOF file (the page cache outlives the process). With
                # everysec (read back here) it fsyncs once a second in the background
                # and, while an fsync runs, holds its writes back for at most two
                # seconds (twice that period), answering clients all the same. It
                # checks that hold once per event-loop turn against a clock read at the
                # turn's start, and writes arrive about once per round trip: hence
                # the slack of twice the slowest round trip measured before the kill.
                fsync = await store.redis.config_get("appendfsync")
                assert fsync == {"appendfsync": "everysec"}, fsync
                fsync_every_ms = 1000
                hold_ms = 2 * fsync_every_ms
                before_kill = [a for a in subs.acked if a.at <= killed_at]
                slowest_ms = max((a.at - a.sent) * 1000 for a in before_kill)
                bound_ms = hold_ms + 2 * slowest_ms
                in_log = await groups_in_log(store)
                lost = [a for a in subs.acked if a.group_task_id not in in_log]
                ages_ms = [(killed_at - a.at) * 1000 for a in lost]
                # The newest event the old server kept, by its own clock (its entry id):
                # whatever came later was lost, so it must lie within the bound of the
                # last acknowledgement before the kill, lost or not.
                old_server = str(int(crash.restarted_at * 1000) - 1)  # ids up to that ms
                kept = await store.redis.xrevrange(store.keys.events, old_server, count=1)
                assert kept, "nothing written before the kill survived it"
                kept_ms = ids.entry_order(str(kept[0][0]))[0]
                behind_ms = max(a.at for a in before_kill) * 1000 - kept_ms
                print(
                    f"\neverysec: {len(before_kill)} groups acknowledged before kill -9, "
                    f"{len(lost)} lost, max age of a lost ack "
                    f"{max(ages_ms, default=0.0):.0f} ms, the kept log ends {behind_ms:.0f} ms "
                    f"before the last ack; bound {bound_ms:.0f} ms (slowest ack "
                    f"{slowest_ms:.0f} ms)"
                )
                assert all(age <= bound_ms for age in ages_ms), (ages_ms, bound_ms)
                assert behind_ms <= bound_ms, (behind_ms, bound_ms)
                # Acknowledged by the new server: written to an AOF no one killed.
                assert all(a.at < crash.restarted_at for a in lost), lost
                await wait_until(
                    lambda: settled(store, subs.acked), within=45, what="every group to finish"
                )
                await assert_log_exactly_once(store, subs.acked)

        asyncio.run(scenario())
        assert_consumers_alive(consumers)


def test_an_outage_answers_503_and_every_process_resumes_on_its_own(tmp_path: Path) -> None:
    """Redis stopped (SIGTERM, AOF persisted) with tasks in flight: the API answers
    503 with Retry-After, /healthz stays up, /readyz says not ready; after a restart
    everything completes exactly once, by the same processes, which logged the
    outage a bounded number of times."""
    with own_server(tmp_path / "data") as server, processes(tmp_path) as procs:
        settings = settings_for(server, Delay(0.2, 1.0))
        consumers = start_consumers(procs, settings)
        workers = consumers[:-1]
        base, api = start_api(procs, settings)
        timings: dict[str, float] = {}

        async def scenario() -> None:
            async with httpx.AsyncClient(base_url=base, timeout=HANG) as client:
                subs = Submissions(client)
                before = [await subs.post_one() for _ in range(6)]
                assert all(group is not None for group in before)
                gid = subs.acked[0].group_task_id
                async with open_store(settings) as store:

                    async def some_started() -> bool:
                        events = await log_events(store)
                        return sum(isinstance(e, TaskStarted) for e in events) >= 10

                    await wait_until(some_started, within=15, what="tasks to start")
                stopped_at = time.monotonic()
                server.stop()

                async def timed(what: str, method: str, path: str) -> httpx.Response:
                    began = time.monotonic()
                    body = body_of([(1, 2)]) if method == "POST" else None
                    answer = await client.request(method, path, json=body)
                    timings[what] = time.monotonic() - began
                    return answer

                for what, method, path in [
                    ("POST /grouptasks", "POST", "/grouptasks"),
                    ("GET /grouptasks/<id>", "GET", f"/grouptasks/{gid}"),
                    ("GET /tasks/<id>", "GET", f"/tasks/{subs.acked[0].task_ids[0]}"),
                ]:
                    answer = await timed(what, method, path)
                    assert answer.status_code == 503, (what, answer.text)
                    assert answer.headers.get("retry-after"), what
                    assert "error" in answer.json(), what
                assert (await timed("GET /healthz", "GET", "/healthz")).status_code == 200
                assert (await timed("GET /readyz", "GET", "/readyz")).status_code == 503
                while time.monotonic() - stopped_at < OUTAGE:  # not ready for all of it
                    assert (await client.get("/readyz")).status_code == 503
                    await asyncio.sleep(0.1)

                def all_noticed() -> bool:
                    return all(proc.count(UNAVAILABLE) >= 1 for proc in consumers)

                await asyncio.to_thread(
                    wait_until_sync, all_noticed, HANG, "every consumer to notice the outage"
                )

                def a_completion_waited() -> bool:
                    return any(w.count(f"completions: {UNAVAILABLE}") for w in workers)

                await asyncio.to_thread(
                    wait_until_sync, a_completion_waited, HANG, "a completion to meet the outage"
                )
                timings["outage"] = time.monotonic() - stopped_at
                await asyncio.to_thread(server.start)
                restarted_at = time.monotonic()

                async def ready() -> bool:
                    return (await client.get("/readyz")).status_code == 200

                await wait_until(ready, within=HANG, what="/readyz to answer 200 again")
                timings["ready after restart"] = time.monotonic() - restarted_at
                after = await subs.post_one()
                assert after is not None, subs.refused

                async def processed() -> bool:
                    for group in subs.acked:
                        answer = await client.get(f"/grouptasks/{group.group_task_id}")
                        if answer.status_code != 200 or not answer.json()["grouptaskProcessed"]:
                            return False
                    return True

                await wait_until(processed, within=30, what="every group to be processed")
                timings["all processed after restart"] = time.monotonic() - restarted_at
                for group in subs.acked:
                    body = (await client.get(f"/grouptasks/{group.group_task_id}")).json()
                    assert body["results"] == [a + b for a, b in group.pairs]
                    assert body["grouptaskSucceeded"] is True

            async with open_store(settings) as store:
                await assert_log_exactly_once(store, subs.acked)
                events = await log_events(store)
                assert await groups_in_log(store) == {a.group_task_id for a in subs.acked}
                # The group submitted after the outage ran on the original workers.
                ran_on = {
                    e.worker.rsplit("-", 2)[1]
                    for e in events
                    if isinstance(e, TaskCompleted) and e.group_task_id == after.group_task_id
                }
                assert ran_on and ran_on <= {str(w.process.pid) for w in workers}

        asyncio.run(scenario())

        def all_recovered() -> bool:
            # Every loop that logged the outage logs its end (backoff is capped at 5 s).
            return all(len(p.failed_tries()) == p.count(UNAVAILABLE) for p in consumers)

        wait_until_sync(all_recovered, HANG, "every loop of every consumer to be back")
        assert_consumers_alive([*consumers, api])
        counts = {proc.log.name: proc.count(UNAVAILABLE) for proc in consumers}
        tries = {proc.log.name: proc.failed_tries() for proc in consumers}
        print(f"\noutage: {', '.join(f'{k} {v:.2f}s' for k, v in timings.items())}")
        print(f"'{UNAVAILABLE}' lines per log: {counts}; failed tries when back: {tries}")
        # Each loop logs an outage once: a worker runs six (reads, renewals, sweeps,
        # trims, cancellations, completions), the projector one.
        loops = {proc.log.name: 6 if proc in workers else 1 for proc in consumers}
        assert all(1 <= counts[name] <= loops[name] for name in counts), (counts, loops)
        # Each process tried again and again, yet logged the outage only those few times.
        assert all(max(n) >= 2 for n in tries.values()), tries
