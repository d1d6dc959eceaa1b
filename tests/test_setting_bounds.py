"""Settings at the far end of their ranges run the whole pipeline (issue 17, item 6):
every script that is given a setting (the submission with its idempotency key, the
completion with its cache, the cancellation, the projector's commit) and the log's
trim succeed with the longest kept times allowed, so none can fail after its first
write for an accepted value. The ranges themselves are walked in test_config.py."""

from __future__ import annotations

import time

import msgspec
import redis
from starlette.testclient import TestClient

from sumbatch.config import KEPT, Settings
from sumbatch.model.keys import Keys
from sumbatch.store import Store
from sumbatch.web.api import create_app
from tests.support import entry_ms, project, run_with_store, work

GROUP = {"tasks": [{"paramA": 1, "paramB": 2}, {"paramA": 3, "paramB": 4}]}
# What a key's TTL may have lost between its write and the test's look at it.
LOST = 600


def test_the_longest_kept_times_run_every_script_and_the_trim(
    settings: Settings, raw: redis.Redis
) -> None:
    longest = KEPT.high
    settings = msgspec.structs.replace(
        settings, result_ttl=longest, cache_ttl=longest, log_retention=longest
    )
    with TestClient(create_app(settings)) as api:
        posted = api.post("/grouptasks", json=GROUP, headers={"Idempotency-Key": "k1"})
        assert posted.status_code == 200, posted.text
        done = posted.json()["groupTaskId"]
        cancelled = api.post("/grouptasks", json=GROUP).json()["groupTaskId"]
        assert api.delete(f"/grouptasks/{cancelled}").status_code == 202
        work(settings)
        assert project(settings) == 0  # nothing set aside: the commit went through
        finished = api.get(f"/grouptasks/{done}").json()
        assert finished["grouptaskProcessed"] and finished["results"] == [3, 7], finished
        revoked = api.get(f"/grouptasks/{cancelled}").json()
        assert revoked["grouptaskProcessed"] and not revoked["grouptaskSucceeded"], revoked

    keys = Keys(settings.namespace)
    kept = {
        "the finished group's view": keys.group_view(done),
        "the cancelled group's view": keys.group_view(cancelled),
        "the finished group's ledger": keys.ledger(done),
        "the cancelled group's ledger": keys.ledger(cancelled),
        "a cached sum": keys.cache(1, 2),
    }
    (kept["the idempotency record"],) = raw.scan_iter(match=_escaped(keys.idempotency("*")))
    for what, key in kept.items():
        assert longest - LOST < raw.ttl(key) <= longest, what

    async def trim(store: Store) -> None:
        position = await store.position()
        assert position is not None
        await store.trim_events(position, int(time.time() * 1000))  # raises on a bad id
        assert entry_ms(store.expired_before(time.time())) > 0

    run_with_store(settings, trim)


def _escaped(pattern: str) -> str:
    """A key name with glob characters of its own (the hash tag's braces) as a SCAN
    pattern, its trailing * kept as a glob."""
    return pattern[:-1].replace("{", "\\{").replace("}", "\\}") + "*"
