"""POST /grouptasks, the one way work comes in: the submission is checked (token,
media type, size, shape, no key given twice), appended to the log as one event with
its group's first view, and answered once written (in durable mode, once the write is
confirmed durable). An Idempotency-Key makes a retry answer the first answer again."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import random
import time
from typing import Any

import msgspec
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from sumbatch.config import Settings
from sumbatch.model.submission import Submission
from sumbatch.model.views import GroupView
from sumbatch.model.wire import MAX_IDEMPOTENCY_KEY, GroupCreated, GroupIn
from sumbatch.outage import is_transient, reconnect_delay
from sumbatch.store import NotDurable, OutcomeUnknown, Store, Submitted
from sumbatch.web import state
from sumbatch.web.auth import authorised, unauthorised
from sumbatch.web.responses import JSONResponse, error

log = logging.getLogger("sumbatch.api")

_encoder = msgspec.json.Encoder()
_group_decoder = msgspec.json.Decoder(GroupIn)
_created_decoder = msgspec.json.Decoder(GroupCreated)

# How long durable mode waits for the fsync; the socket timeout is raised above it, so
# a slow fsync answers "not confirmed", never a timeout.
FSYNC_TIMEOUT_MS = 2000
# Seconds a POST may spend resending its submit after a call timed out or lost its
# connection (the same call, the same ids: a resend finds the first run, if it ran),
# before it answers 503 with the outcome unknown. The script costs about 1 us per task
# (ops/bench/submit_time.py): 100,000 tasks hold the server about 0.1 s.
SUBMIT_BUDGET = 5.0


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"body larger than {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise HTTPException(413, f"body larger than {limit} bytes")
    return bytes(body)


class _Duplicate(Exception):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise _Duplicate(key)
        seen[key] = value
    return seen


def _duplicate_key(body: bytes, tasks: int) -> str | None:
    """A key given twice in one object (msgspec, like most parsers, keeps the last one
    silently; an ambiguous body is refused instead). The body already decoded to a
    valid submission, so its only keys are ``tasks``, ``paramA`` and ``paramB``: with
    no escapes in it, counting them is exact and cheap; otherwise parse it again."""
    if (
        b"\\" not in body
        and body.count(b'"tasks"') == 1
        and body.count(b'"paramA"') == tasks
        and body.count(b'"paramB"') == tasks
    ):
        return None
    try:
        json.loads(body, object_pairs_hook=_no_duplicates)
    except _Duplicate as exc:
        return str(exc)
    return None


async def create_group(request: Request) -> Response:
    settings: Settings = request.state.settings
    if not authorised(request, settings):
        return unauthorised()
    content_type = request.headers.get("content-type", "")
    if content_type.split(";")[0].strip().lower() != "application/json":
        return error(415, "Content-Type must be application/json")
    idem_key = request.headers.get("idempotency-key")
    if idem_key is not None and not 0 < len(idem_key) <= MAX_IDEMPOTENCY_KEY:
        return error(400, f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} characters")
    body = await _read_body(request, settings.max_body_bytes)
    try:
        submitted = _group_decoder.decode(body)
    except msgspec.ValidationError as exc:
        return error(422, f"invalid request: {exc}")
    except msgspec.DecodeError as exc:
        return error(400, f"malformed JSON: {exc}")
    duplicate = _duplicate_key(body, len(submitted.tasks))
    if duplicate is not None:
        return error(400, f"malformed JSON: duplicate key `{duplicate}`")
    if len(submitted.tasks) > settings.max_tasks_per_group:
        return error(413, f"at most {settings.max_tasks_per_group} tasks per group - at `$.tasks`")
    # Hashed: a client's header never becomes part of a key name as it is.
    key_hash = None if idem_key is None else hashlib.sha256(idem_key.encode()).hexdigest()
    partitions = await state.partitions(request)
    partition = partitions.for_new_group(key_hash)
    submission = Submission.of(submitted.tasks, partition)
    created = submission.created
    answer = _encoder.encode(created)
    idempotency = None
    if key_hash is not None:
        idempotency = (key_hash, f"{hashlib.sha256(body).hexdigest()} {answer.decode()}")
    store = partitions.stores[partition]
    if settings.durable and store.durable is None:
        try:  # Redis was away when the API started
            await store.check_durable()
        except NotDurable as exc:
            log.error("%s", exc)
            return error(503, f"{exc}", {"Retry-After": "60"})
    gid = created.group_task_id
    group = GroupView.submitted(gid, len(submitted.tasks))
    fsync_ms = FSYNC_TIMEOUT_MS if settings.durable else None
    try:
        written = await _submit(store, submission, group, idempotency, fsync_ms)
    except OutcomeUnknown as exc:
        log.warning("POST answered 503 with group %s's outcome unknown: %s", gid, exc)
        return _unknown(gid, "storage did not answer in time; the outcome is unknown")
    replay = None
    # A resend meeting this request's own first run answers as that run did; else the
    # key's first request wrote the group.
    if idempotency is not None and written.earlier not in (None, idempotency[1]):
        earlier_hash, _, earlier_answer = str(written.earlier).partition(" ")
        if earlier_hash != idempotency[1].partition(" ")[0]:
            return error(422, "Idempotency-Key was used before with a different body")
        replay = _created_decoder.decode(earlier_answer)
        gid = replay.group_task_id
    if written.fsynced is False:
        # Written and queued, but a crash of the server now could still lose it.
        where = "by a replica" if store.durable == "replica" else "on disk"
        return _unknown(gid, f"written but not confirmed {where} in time")
    if replay is None:
        return Response(answer, media_type="application/json")
    return JSONResponse(replay, headers={"Idempotent-Replayed": "true"})


def _unknown(gid: str, why: str) -> JSONResponse:
    """503 for a group whose fate the API cannot promise: it names the group, so the
    client can look (``Location``) or retry with the same Idempotency-Key."""
    message = f"{why}: GET /grouptasks/{gid}, or retry with the same Idempotency-Key"
    return JSONResponse(
        {"error": message, "status": 503, "groupTaskId": gid},
        status_code=503,
        headers={"Retry-After": "1", "Location": f"/grouptasks/{gid}"},
    )


async def _submit(
    store: Store,
    submission: Submission,
    group: GroupView,
    idempotency: tuple[str, str] | None,
    fsync_ms: int | None,
) -> Submitted:
    """The submit, resent while its outcome is unknown (a call sent and never answered)
    and SUBMIT_BUDGET lasts: the same ids each time, so a resend that meets the first
    run writes nothing more and answers as it would have. An error before any call was
    sent (a refusal, no connection) is raised at once: the script did not run. Raises
    OutcomeUnknown when the budget runs out with the outcome still unknown."""
    deadline = time.monotonic() + SUBMIT_BUDGET
    rng = random.Random()
    failures = 0
    try:
        return await store.submit(submission.event, group, idempotency, fsync_ms)
    except OutcomeUnknown as exc:
        unknown: BaseException = exc
    while True:
        failures += 1
        pause = reconnect_delay(failures, rng, base=0.05, cap=0.5)
        if time.monotonic() + pause >= deadline:
            raise OutcomeUnknown(f"{failures} tries in {SUBMIT_BUDGET:g} s") from unknown
        await asyncio.sleep(pause)
        try:
            async with asyncio.timeout(deadline - time.monotonic()):
                return await store.submit(submission.event, group, idempotency, fsync_ms)
        except (OutcomeUnknown, TimeoutError) as exc:
            unknown = exc
        except Exception as exc:
            # Refused or not sent: this resend did not run, and the first may have.
            if not is_transient(exc):
                raise
            unknown = exc
