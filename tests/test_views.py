"""A stored group view, on a real server: the projector reads and rewrites only the
chunks a batch touches, a refold from the log writes every view whole, and the status
reads read what they need."""

from __future__ import annotations

import json

import msgspec

from consumers.projector import Projector
from sumbatch.config import Settings
from sumbatch.model import chunks, ids
from sumbatch.model.views import CHUNK_TASKS
from sumbatch.replay import differences
from sumbatch.store import Store
from sumbatch.testing.groups import submit
from sumbatch.testing.monitor import Monitor
from tests.support import run_with_store

TOTAL = 2 * CHUNK_TASKS + 452  # three chunks


def completed(gid: str, index: int) -> dict[str, str]:
    return {
        "type": "TaskCompleted",
        "taskId": ids.task_id(gid, index),
        "groupTaskId": gid,
        "index": str(index),
        "result": str(index),
        "fromCache": "false",
        "attempt": "1",
        "worker": "a-hand",
    }


async def field(store: Store, key: str, name: str) -> str:
    value = await store.redis.hget(key, name)
    assert isinstance(value, str), f"{key} has no field {name}"
    return value


def test_the_projector_rewrites_only_the_chunks_its_events_touch(settings: Settings) -> None:
    async def scenario(store: Store) -> None:
        gid, tids = await submit(store, [(1, 1)] * TOTAL)
        await Projector(store).run_until_idle()
        key = store.keys.group_view(gid)
        # Marks no write of the projector would leave: chunk 0 spelled with spaces
        # (the same tasks), and a field no view has.
        spaced = json.dumps(json.loads(await field(store, key, "0")))
        assert spaced.encode() != await store.redis.hget(key, "0")
        await store.redis.hset(key, mapping={"0": spaced, "mark": "kept"})
        for index in (2 * CHUNK_TASKS, 2 * CHUNK_TASKS + 1):
            await store.redis.xadd(store.keys.events, completed(gid, index))  # type: ignore[arg-type]

        with Monitor(settings.client_url) as monitor:
            await Projector(store).run_until_idle()
            assert (await store.task_view(tids[2 * CHUNK_TASKS])).result == 2 * CHUNK_TASKS  # type: ignore[union-attr]
            monitor.settle()
        seen = [c for c in monitor.commands() if key in c]
        # The projector's load, the task read: each the summary and chunk 2 alone.
        reads = [c for c in seen if not c.startswith("EVALSHA")]
        assert reads == [f"HMGET {key} summary 2"] * 2, reads
        # The commit (its JSON has no spaces): ttl none, in part, summary and chunk 2.
        [commit] = [c.split(" ") for c in seen if c.startswith("EVALSHA")]
        # (EVALSHA sha 4, then its keys: position, rejected, the call's, the view.)
        assert commit[11:16] == ["0", "0", "4", "summary", commit[15]]
        assert commit[16] == "2" and len(commit) == 18
        assert await store.redis.hget(key, "0") == spaced
        assert await store.redis.hget(key, "mark") == "kept"
        counts = chunks.decode_counts(gid, await field(store, key, "summary"))
        assert counts.tasks_completed == 2 and await store.redis.ttl(key) == -1
        # A whole read sees the field no view has: no view.
        assert await store.group_summary(gid) is None

        # A refold from the log's start: the submission writes the view whole again.
        await store.forget_position()
        await Projector(store).run_until_idle()
        assert sorted(await store.redis.hkeys(key)) == ["0", "1", "2", "summary"]
        assert await store.redis.hget(key, "0") != spaced
        view = await store.group_view(gid)
        assert view is not None and view.tasks_completed == 2
        assert view.results[2 * CHUNK_TASKS + 1] == 2 * CHUNK_TASKS + 1
        assert (await differences(store)).differences == []

    run_with_store(settings, scenario)


def test_a_processed_view_expires_and_a_wrong_type_view_never_fails_a_commit(
    settings: Settings,
) -> None:
    async def scenario(store: Store) -> None:
        gid, _ = await submit(store, [(1, 2)])
        spoiled, _ = await submit(store, [(3, 4)])
        await Projector(store).run_until_idle()
        await store.redis.delete(store.keys.group_view(spoiled))
        await store.redis.rpush(store.keys.group_view(spoiled), "by hand")
        for group in (gid, spoiled):
            await store.redis.xadd(store.keys.events, completed(group, 0))  # type: ignore[arg-type]
            finished = {"type": "GroupFinished", "groupTaskId": group, "tasksTotal": "1",
                        "tasksFailed": "0", "tasksRevoked": "0", "succeeded": "true"}  # fmt: skip
            await store.redis.xadd(store.keys.events, finished)  # type: ignore[arg-type]
        projector = Projector(store)
        await projector.run_until_idle()
        assert projector.set_aside == 2  # the spoiled group's two events
        assert (await store.group_summary(gid)).processed  # type: ignore[union-attr]
        assert 0 < await store.redis.ttl(store.keys.group_view(gid)) <= store.retention.results
        assert await store.redis.type(store.keys.group_view(spoiled)) == "list"
        assert await store.group_summary(spoiled) is None
        assert await store.task_view(ids.task_id(spoiled, 0)) is None

    run_with_store(settings, scenario)


def test_a_view_of_the_old_layout_reads_as_it_is_and_its_next_commit_makes_it_a_hash(
    settings: Settings,
) -> None:
    """A view stored as one JSON string (before views were hashes) reads as it is, for
    the group and its tasks; the projector folds the group's next event into it and
    writes it whole, as a hash, so an upgrade needs no step of its own. A refold from
    the log agrees."""

    async def scenario(store: Store) -> None:
        gid, tids = await submit(store, [(1, 2), (3, 4)])
        await store.redis.xadd(store.keys.events, completed(gid, 0))  # type: ignore[arg-type]
        await Projector(store).run_until_idle()
        view = await store.group_view(gid)
        assert view is not None and view.results == [0, None]  # results as written by hand
        key = store.keys.group_view(gid)
        await store.redis.delete(key)
        await store.redis.set(key, msgspec.json.encode(view))
        assert await store.group_view(gid) == view
        summary = await store.group_summary(gid)
        assert summary is not None and summary.results == [0, None]
        task = await store.task_view(tids[0])
        assert task is not None and (task.state, task.result) == ("SUCCESS", 0)

        await store.redis.xadd(store.keys.events, completed(gid, 1))  # type: ignore[arg-type]
        await Projector(store).run_until_idle()
        assert await store.redis.type(key) == "hash"
        after = await store.group_view(gid)
        assert after is not None and after.results == [0, 1]
        assert (await differences(store)).differences == []

    run_with_store(settings, scenario)
