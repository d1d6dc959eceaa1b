"""Long-poll and server-sent events, against real api, worker and projector processes,
with a real HTTP client."""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx2 as httpx
import pytest
import redis
from msgspec.structs import replace

from consumers.worker import Worker
from sumbatch.config import Settings
from sumbatch.model import ids
from sumbatch.model.keys import Keys
from sumbatch.model.tasks import Delay
from sumbatch.store import Store
from sumbatch.testing.groups import submit
from sumbatch.testing.monitor import Monitor
from sumbatch.testing.waiting import wait_until
from sumbatch.web.live import streams
from sumbatch.web.live.feed import Feed, FeedEntry, Interrupted, Listener
from sumbatch.web.live.sse import parse_entry_id, parse_wait
from tests.support import (
    Processes,
    answers_200,
    body_of,
    drop_namespace,
    entries,
    env_for,
    free_port,
    run_with_store,
    wait_until_sync,
)

PAIRS = [(1, 5), (9, 10), (12, 13), (8, 1)]


@dataclass
class Service:
    base: str
    settings: Settings
    api: Any
    procs: Processes
    client: httpx.Client = field(init=False)

    def __post_init__(self) -> None:
        self.client = httpx.Client(base_url=self.base, timeout=20)

    def submit(self, pairs: list[tuple[int, int]] = PAIRS) -> dict[str, Any]:
        answer = self.client.post("/grouptasks", json=body_of(pairs))
        assert answer.status_code == 200, answer.text
        created: dict[str, Any] = answer.json()
        return created


class Starter:
    """Starts the service for a test, and closes its HTTP clients after."""

    def __init__(self, procs: Processes) -> None:
        self.procs = procs
        self.clients: list[httpx.Client] = []

    def __call__(self, settings: Settings, *, workers: bool = True, **env: str) -> Service:
        service = start_service(self.procs, settings, workers=workers, **env)
        self.clients.append(service.client)
        return service

    def client(self, base: str, timeout: float) -> httpx.Client:
        made = httpx.Client(base_url=base, timeout=timeout)
        self.clients.append(made)
        return made


@pytest.fixture
def start(procs: Processes) -> Iterator[Starter]:
    starter = Starter(procs)
    yield starter
    for client in starter.clients:
        client.close()


def start_service(
    procs: Processes,
    settings: Settings,
    *,
    workers: bool = True,
    **env: str,
) -> Service:
    port = free_port()
    environment = {**env_for(settings), **env}
    if workers:
        procs.start(settings, "worker", env=environment)
    procs.start(settings, "projector", env=environment)
    api = procs.start(settings, "api", "--port", str(port), env=environment)
    base = f"http://127.0.0.1:{port}"
    wait_until_sync(lambda: answers_200(f"{base}/healthz"), timeout=30, what="the API to answer")
    return Service(base, settings, api, procs)


@pytest.fixture
def slow(settings: Settings) -> Settings:
    """Tasks that take a moment, so a client sees them run."""
    return replace(settings, delay=Delay(0.2, 0.4))


@dataclass
class Message:
    id: str | None
    event: str | None
    data: Any


def messages(lines: Iterator[str]) -> Iterator[Message | str]:
    """Server-sent events as a client parses them; a comment line comes out as text."""
    fields: dict[str, str] = {}
    for line in lines:
        if line.startswith(":"):
            yield line
            continue
        if line == "":
            if "data" in fields:
                yield Message(fields.get("id"), fields.get("event"), json.loads(fields["data"]))
            fields = {}
            continue
        name, _, value = line.partition(":")
        fields[name] = value.removeprefix(" ")


def read_stream(
    client: httpx.Client, path: str, headers: dict[str, str] | None = None
) -> list[Message]:
    """Every event of a stream that ends by itself."""
    with client.stream("GET", path, headers=headers) as answer:
        assert answer.status_code == 200, answer.read()
        assert answer.headers["content-type"].startswith("text/event-stream")
        return [m for m in messages(answer.iter_lines()) if isinstance(m, Message)]


def group_log_ids(settings: Settings, gid: str) -> list[str]:
    raw = redis.Redis.from_url(settings.client_url, decode_responses=True)
    try:
        return [eid for eid, _ in entries(raw, Keys(settings.namespace).group_log(gid))]
    finally:
        raw.close()


class ReadsOf(Monitor):
    """Counts the reads of one view key that clients send (HGETALL of the whole view,
    HMGET of some fields), from the server's MONITOR feed: the server-wide command
    count also holds other processes' reads (the projector's run inside its scripts,
    which the monitor leaves out), so only this key's reads tell whether the API
    polls."""

    def __init__(self, settings: Settings, key: str) -> None:
        super().__init__(settings.client_url)
        self.key = key

    def count(self) -> int:
        return sum(
            command == f"HGETALL {self.key}" or command.startswith(f"HMGET {self.key} ")
            for command in self.commands()
        )


def accepted(port: int) -> int:
    """Connections the server listening on ``port`` (on this host) has accepted and
    holds open, from /proc/net/tcp."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as rows:
            for row in list(rows)[1:]:
                local, state = row.split()[1], row.split()[3]
                count += int(local.rsplit(":", 1)[1], 16) == port and state == "01"
    return count


# -- pure ------------------------------------------------------------------------------


def test_wait_and_entry_ids_are_parsed_strictly() -> None:
    assert parse_wait(None) == 0 and parse_wait("") == 0
    assert parse_wait("2.5") == 2.5 and parse_wait("60") == 60
    for bad in ["-1", "61", "nan", "inf", "abc", "1e3"]:
        with pytest.raises(ValueError):
            parse_wait(bad)
    assert parse_entry_id("1700000000000-3") == "1700000000000-3"
    assert parse_entry_id("0") == "0-0"
    assert parse_entry_id(f"{2**64 - 1}-{2**64 - 1}") == f"{2**64 - 1}-{2**64 - 1}"
    too_big = ["99999999999999999999", f"{2**64}-0", f"0-{2**64}", "٣-0"]
    for bad in ["$", "-", "1-2-3", "abc", "1 2", "", "+", *too_big]:
        with pytest.raises(ValueError):
            parse_entry_id(bad)


# -- the feed ------------------------------------------------------------------------


def test_the_feed_reads_only_while_someone_listens_and_misses_nothing_when_it_starts_again(
    settings: Settings,
) -> None:
    async def scenario(store: Store) -> None:
        feed = Feed([store], linger=0.2)
        assert not feed.running
        async with feed.listen(None) as everything:
            assert feed.running
            first, _ = await submit(store, [(1, 2)])
            entry = await everything.next(10)
            assert entry is not None and entry.fields["groupTaskId"] == first
        # Nobody listens: after its linger the feed stops reading.
        await wait_until(lambda: _true(not feed.running), within=10, what="the feed to stop")
        async with feed.listen(None) as again:
            assert feed.running
            second, _ = await submit(store, [(3, 4)])
            entry = await again.next(10)
            assert entry is not None and entry.fields["groupTaskId"] == second
        await feed.close()
        assert not feed.running or all(r.done() for r in feed._readers)

    run_with_store(settings, scenario)


async def _true(value: bool) -> bool:
    return value


def test_a_listener_that_falls_behind_says_so_after_what_it_holds() -> None:
    async def scenario() -> None:
        listener = Listener(None, limit=3)
        for n in range(5):
            listener.offer(FeedEntry(0, f"{n + 1}-0", {}))
        assert listener.overflowed
        held = [await listener.next(1) for _ in range(3)]
        assert [e.entry_id for e in held if e is not None] == ["1-0", "2-0", "3-0"]
        with pytest.raises(Interrupted):
            await listener.next(1)

    asyncio.run(scenario())


def test_a_groups_stream_that_falls_behind_catches_up_from_the_log(settings: Settings) -> None:
    """A listener that holds 2 entries, and a group whose 6 tasks end while the stream
    is not read: the stream still sends every event once, in order, then ends."""

    async def scenario(store: Store) -> None:
        feed = Feed([store], listener_limit=2)
        gid, _ = await submit(store, [(n, n) for n in range(6)])
        body = streams.group_events(store, feed, gid, None, heartbeat=5)
        sent = [await anext(body), await anext(body)]  # the opening, GroupSubmitted
        # Registered and reading: now the tasks end, with nobody taking the entries.
        await wait_until(lambda: _true(feed.running), within=5, what="the feed")
        await Worker(settings, store).run_until_idle()
        async for chunk in body:
            sent.append(chunk)
        await feed.close()
        text = b"".join(sent).decode()
        got = [line.removeprefix("id: ") for line in text.splitlines() if line.startswith("id: ")]
        logged = [eid for eid, _ in await store.group_history(gid)]
        assert got == logged
        assert text.count("event: TaskCompleted") == 6 and "event: GroupFinished" in text

    run_with_store(settings, scenario)


# -- long-poll -------------------------------------------------------------------------


def test_a_long_poll_answers_once_the_group_is_processed(start: Starter, slow: Settings) -> None:
    service = start(slow)
    created = service.submit()
    # A wait of 60 s on a client that gives up after 20: only an answer at processing
    # time gets through.
    status = service.client.get(f"/grouptasks/{created['groupTaskId']}?wait=60").json()
    assert status["grouptaskProcessed"] is True
    assert status["results"] == [a + b for a, b in PAIRS]
    task = service.client.get(f"/tasks/{created['taskIds'][3]}?wait=60").json()
    assert (task["taskState"], task["result"]) == ("SUCCESS", 9)


def test_a_task_long_poll_answers_when_that_task_ends(start: Starter, slow: Settings) -> None:
    service = start(replace(slow, delay=Delay(0.1, 0.1)))
    created = service.submit([(2, 3)])
    task = service.client.get(f"/tasks/{created['taskIds'][0]}?wait=60").json()
    assert (task["taskState"], task["result"], task["resultReady"]) == ("SUCCESS", 5, True)


def test_a_long_poll_with_nothing_happening_waits_its_time_without_polling_redis(
    start: Starter, settings: Settings
) -> None:
    service = start(settings, workers=False)
    gid = service.submit()["groupTaskId"]
    tid = ids.task_id(gid, 0)
    keys = Keys(settings.namespace)
    # The projector reads the view too, for the batch that holds the submission: let
    # it fold everything logged first, so that only the API's reads are counted.
    with redis.Redis.from_url(settings.client_url, decode_responses=True) as raw:

        def folded() -> bool:
            last = raw.xrevrange(keys.events, count=1)
            return bool(last) and raw.get(keys.projector_position) == last[0][0]

        wait_until_sync(folded, what="the projector's fold of the submission")
    with ReadsOf(settings, keys.group_view(gid)) as reads:
        # A first read through the monitor, so the count is known to be live.
        assert service.client.get(f"/grouptasks/{gid}").status_code == 200
        reads.settle()
        assert reads.count() == 1, reads.commands()
        started = time.monotonic()
        status = service.client.get(f"/grouptasks/{gid}?wait=1.5").json()
        task = service.client.get(f"/tasks/{tid}?wait=1.5").json()
        waited = time.monotonic() - started
        assert status["grouptaskProcessed"] is False and task["taskState"] == "PENDING"
        assert waited >= 3.0, f"answered after {waited:.2f}s, before the waits were over"
        # Each wait reads the view at most three times (on arrival, once registered with
        # the feed, at its end): no loop of reads between.
        reads.settle()
        assert 1 + 2 <= reads.count() <= 1 + 6, "\n".join(reads.commands())


def test_past_the_cap_of_waiters_a_long_poll_answers_at_once(
    start: Starter, settings: Settings
) -> None:
    service = start(settings, workers=False, SUMBATCH_MAX_WAITERS="0")
    gid = service.submit()["groupTaskId"]
    quick = start.client(service.base, timeout=5)
    status = quick.get(f"/grouptasks/{gid}?wait=30").json()
    assert status["grouptaskProcessed"] is False


@pytest.mark.parametrize("wait", ["-1", "61", "nan", "soon"])
def test_a_bad_wait_is_a_422_and_waits_for_nothing(
    start: Starter, settings: Settings, wait: str
) -> None:
    service = start(settings, workers=False)
    gid = service.submit()["groupTaskId"]
    for path in (f"/grouptasks/{gid}", f"/tasks/{ids.task_id(gid, 0)}"):
        answer = service.client.get(f"{path}?wait={wait}")
        assert answer.status_code == 422
        assert answer.json()["status"] == 422 and "wait" in answer.json()["error"]


# -- a group's event stream ------------------------------------------------------------


def test_a_groups_stream_sends_its_history_then_live_events_and_ends_when_it_finishes(
    start: Starter, slow: Settings
) -> None:
    service = start(slow)
    gid = service.submit()["groupTaskId"]
    got = read_stream(service.client, f"/grouptasks/{gid}/events")
    kinds = [m.event for m in got]
    assert kinds[0] == "GroupSubmitted" and kinds[-1] == "GroupFinished", kinds
    assert kinds.count("TaskCompleted") == len(PAIRS)
    # Every event of the group's log, once, with its entry id, in order.
    assert [m.id for m in got] == group_log_ids(slow, gid)
    for m in got:
        assert m.data["type"] == m.event and m.data["groupTaskId"] == gid
    results = {m.data["index"]: m.data["result"] for m in got if m.event == "TaskCompleted"}
    assert results == {i: a + b for i, (a, b) in enumerate(PAIRS)}
    assert all(isinstance(r, int) for r in results.values())
    finished = got[-1].data
    assert (finished["succeeded"], finished["tasksTotal"]) == (True, len(PAIRS))


def test_a_groups_stream_resumes_after_last_event_id(start: Starter, settings: Settings) -> None:
    service = start(settings)
    gid = service.submit()["groupTaskId"]
    everything = read_stream(service.client, f"/grouptasks/{gid}/events")
    assert everything[-1].event == "GroupFinished"
    second = everything[1].id
    assert second is not None
    rest = read_stream(service.client, f"/grouptasks/{gid}/events", {"Last-Event-ID": second})
    assert [m.id for m in rest] == [m.id for m in everything[2:]]


def test_a_groups_stream_resumed_at_or_past_its_end_answers_204_at_once(
    start: Starter, settings: Settings
) -> None:
    """An EventSource reconnects with the last id it saw, GroupFinished's: the stream
    must not stay open (keepalives for ever), nor close (it would reconnect): 204."""
    service = start(settings)
    gid = service.submit()["groupTaskId"]
    everything = read_stream(service.client, f"/grouptasks/{gid}/events")
    end = everything[-1].id
    assert everything[-1].event == "GroupFinished" and end is not None
    ms, _, seq = end.partition("-")
    for after in (end, f"{ms}-{int(seq) + 1}", f"{2**64 - 1}-{2**64 - 1}"):
        answer = service.client.get(
            f"/grouptasks/{gid}/events", headers={"Last-Event-ID": after}, timeout=5
        )
        assert (answer.status_code, answer.content) == (204, b""), after
    # Just before the end, the end is still sent, and the stream closes after it.
    before = everything[-2].id
    assert before is not None
    rest = read_stream(service.client, f"/grouptasks/{gid}/events", {"Last-Event-ID": before})
    assert [m.id for m in rest] == [end]


def test_ids_past_what_redis_takes_are_refused_before_the_stream_starts(
    start: Starter, settings: Settings
) -> None:
    service = start(settings)
    gid = service.submit()["groupTaskId"]
    for bad in ("99999999999999999999", f"{2**64}-0"):
        answer = service.client.get(f"/grouptasks/{gid}/events", headers={"Last-Event-ID": bad})
        assert answer.status_code == 400, (bad, answer.text)
        answer = service.client.get(f"/events?from={bad}")
        assert answer.status_code == 422, (bad, answer.text)


def test_a_groups_stream_of_an_unknown_group_or_a_bad_last_event_id_is_refused(
    start: Starter, settings: Settings
) -> None:
    service = start(settings)
    unknown = service.client.get(f"/grouptasks/{ids.new_group_id()}/events")
    assert unknown.status_code == 404 and unknown.json()["error"] == "no such groupTaskId"
    gid = service.submit()["groupTaskId"]
    bad = service.client.get(f"/grouptasks/{gid}/events", headers={"Last-Event-ID": "x; y"})
    assert bad.status_code == 400 and "Last-Event-ID" in bad.json()["error"]


# -- the whole log ---------------------------------------------------------------------


def test_the_log_stream_sends_every_groups_events_from_a_point_then_live(
    start: Starter, settings: Settings
) -> None:
    service = start(settings)
    before = service.submit()["groupTaskId"]
    wait_until_sync(
        lambda: service.client.get(f"/grouptasks/{before}?wait=5").json()["grouptaskProcessed"],
        timeout=20,
        what="the first group",
    )
    seen: list[Message] = []
    later: list[str] = []
    with service.client.stream("GET", "/events?from=0") as answer:
        assert answer.status_code == 200
        for m in messages(answer.iter_lines()):
            if not isinstance(m, Message):
                continue
            seen.append(m)
            if m.event == "GroupFinished" and m.data["groupTaskId"] == before and not later:
                later.append(service.submit()["groupTaskId"])  # live from here on
            if later and m.event == "GroupFinished" and m.data["groupTaskId"] == later[0]:
                break
    finished = [m.data["groupTaskId"] for m in seen if m.event == "GroupFinished"]
    assert finished == [before, later[0]]
    order = [ids.entry_order(m.id or "") for m in seen]
    assert order == sorted(order) and len(set(order)) == len(order)
    raw = redis.Redis.from_url(settings.client_url, decode_responses=True)
    try:
        logged = [eid for eid, _ in entries(raw, Keys(settings.namespace).events)]
    finally:
        raw.close()
    assert [m.id for m in seen] == logged[: len(seen)]


def test_the_log_stream_merges_partitions_in_id_order(
    start: Starter, redis_url: str, settings: Settings
) -> None:
    three = replace(settings, partitions=3)
    try:
        service = start(three)
        gids = [service.submit()["groupTaskId"] for _ in range(9)]
        for gid in gids:
            status = service.client.get(f"/grouptasks/{gid}?wait=20").json()
            assert status["grouptaskProcessed"], status
        assert len({ids.partition_of(gid, 3) for gid in gids}) > 1
        seen: list[Message] = []
        with service.client.stream("GET", "/events?from=0") as answer:
            for m in messages(answer.iter_lines()):
                if isinstance(m, Message):
                    seen.append(m)
                    if sum(x.event == "GroupFinished" for x in seen) == len(gids):
                        break
        order = [ids.entry_order(m.id or "") for m in seen]
        assert order == sorted(order)
        assert {m.data["groupTaskId"] for m in seen} == set(gids)
    finally:
        drop_namespace(redis_url, three.namespace, partitions=3)


def test_a_hand_written_entry_goes_out_as_unreadable_and_the_stream_goes_on(
    start: Starter, settings: Settings
) -> None:
    service = start(settings)
    raw = redis.Redis.from_url(settings.client_url, decode_responses=True)
    try:
        bogus = raw.xadd(Keys(settings.namespace).events, {"type": "Bogus", "note": "by hand"})
    finally:
        raw.close()
    seen: list[Message] = []
    with service.client.stream("GET", "/events?from=0") as answer:
        for m in messages(answer.iter_lines()):
            if isinstance(m, Message):
                seen.append(m)
                if m.id == bogus:
                    service.submit()
                if m.event == "GroupFinished":
                    break
    assert seen[0].id == bogus and seen[0].event == "Unreadable"
    assert seen[0].data == {"type": "Bogus", "note": "by hand"}
    assert seen[-1].event == "GroupFinished"


def test_an_idle_stream_sends_heartbeats(start: Starter, settings: Settings) -> None:
    service = start(settings, SUMBATCH_SSE_HEARTBEAT="0.2")
    comments: list[str] = []
    with service.client.stream("GET", "/events") as answer:
        for m in messages(answer.iter_lines()):
            if isinstance(m, str):
                comments.append(m)
                if comments.count(": keepalive") == 2:
                    break
    assert comments[0] == ": open"


def test_streams_past_the_cap_get_503_and_a_closed_stream_frees_its_place(
    start: Starter, settings: Settings
) -> None:
    service = start(settings, SUMBATCH_MAX_STREAMS="1")
    with service.client.stream("GET", "/events") as first:
        assert first.status_code == 200
        lines = first.iter_lines()  # kept: a dropped generator closes the stream
        next(lines)  # it is open
        second = service.client.get("/events")
        assert second.status_code == 503 and second.json()["status"] == 503
        assert "Retry-After" in second.headers

    # The client left: its place is free again.
    def opens() -> bool:
        with service.client.stream("GET", "/events") as again:
            return bool(again.status_code == 200)

    wait_until_sync(opens, timeout=10, what="the stream's place to be freed")


def test_a_bad_from_is_a_422(start: Starter, settings: Settings) -> None:
    service = start(settings)
    answer = service.client.get("/events?from=yesterday")
    assert answer.status_code == 422 and "from" in answer.json()["error"]


def test_stopping_the_api_ends_its_streams_and_answers_its_long_polls(
    start: Starter, settings: Settings
) -> None:
    service = start(settings, workers=False)
    gid = service.submit()["groupTaskId"]
    outcomes: dict[str, Any] = {}
    opened: list[str] = []

    def stream(path: str) -> None:
        with service.client.stream("GET", path) as answer:
            lines = answer.iter_lines()
            first = [next(lines), next(lines)]  # `retry: ...`, `: open`
            opened.append(path)
            rest = [m for m in messages(iter([*first, *lines])) if isinstance(m, Message)]
            outcomes[path] = rest

    def poll() -> None:
        outcomes["poll"] = service.client.get(f"/grouptasks/{gid}?wait=60").json()

    threads = [
        threading.Thread(target=stream, args=("/events?from=0",)),
        threading.Thread(target=stream, args=(f"/grouptasks/{gid}/events",)),
        threading.Thread(target=poll),
    ]
    for thread in threads:
        thread.start()
    port = int(service.base.rsplit(":", 1)[1])
    wait_until_sync(
        lambda: len(opened) == 2 and accepted(port) == 3,
        timeout=10,
        what="both streams open and the long-poll's connection accepted",
    )
    raw_api = service.api
    raw_api.send_signal(signal.SIGTERM)
    # uvicorn re-raises the signal it caught once it has shut down.
    assert raw_api.wait(20) in (0, -signal.SIGTERM)
    for thread in threads:
        thread.join(20)
        assert not thread.is_alive()
    assert outcomes["poll"]["grouptaskProcessed"] is False
    assert outcomes[f"/grouptasks/{gid}/events"][0].event == "GroupSubmitted"
    assert "Traceback" not in service.procs.log_of(raw_api).read_text()
