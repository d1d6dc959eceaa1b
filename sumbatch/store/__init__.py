"""The only package that talks to Redis about the log, a module per role:
``producer`` (submit, cancel), ``claims`` (the work stream's consumer group: read,
claim, renew, hand back, dead-letter, trim), ``work`` (the workers' steps on their
tasks: begin, progress, completion through the fence), ``log`` (reads and trimming of
the event log), ``views`` (the views and the projector's position: its loads and
commit, the API's reads), ``inspect`` (what /metrics and /system read), on ``base``
(the connection, the keys, the scripts) and ``entries`` (how a task key names its work
entry). ``Store`` has every role on one connection pool; ``partitions`` holds a store
per partition. Every step that must be atomic (submission, start, completion,
cancellation, projection commit) is one Lua script from the ``scripts`` package (a
module per role too), run from here, so the rules that keep work from being lost or
doubled live in these two packages.

Streams, in brief: the event log is append-only; the work stream is read by the
``workers`` consumer group, whose pending-entries list (PEL) holds what was handed out
and not yet acknowledged. A work entry holds a slice of a group's tasks; it leaves the
PEL inside the completion script that records the outcome of its last unended task
(or in the begin script when all its tasks have already ended), so a crash at any
point leaves it pending for XAUTOCLAIM, never lost; the one that claims it runs only
the tasks that have not ended.

May import ``model``, ``config``, ``outage`` and ``scripts``; nothing that serves or
runs processes.
"""

from __future__ import annotations

from typing import Any

from sumbatch.config import Settings
from sumbatch.model.keys import Keys
from sumbatch.store.base import DurableMode, Entry, Retention, StoreBase, connect
from sumbatch.store.claims import HANDED_BACK_MS, Claims, Pending
from sumbatch.store.entries import entry_id_of, task_key
from sumbatch.store.inspect import Inspector
from sumbatch.store.log import EventLog
from sumbatch.store.producer import (
    CancelOutcome,
    NotDurable,
    OutcomeUnknown,
    Producer,
    Submitted,
    _durable_mode,
)
from sumbatch.store.views import REJECTED_KEPT, StoredViews
from sumbatch.store.work import Begun, Completed, Outcome, TaskSteps

__all__ = [
    "HANDED_BACK_MS",
    "REJECTED_KEPT",
    "Begun",
    "CancelOutcome",
    "Claims",
    "Completed",
    "DurableMode",
    "Entry",
    "EventLog",
    "Inspector",
    "NotDurable",
    "OutcomeUnknown",
    "Outcome",
    "Pending",
    "Producer",
    "Retention",
    "Store",
    "StoreBase",
    "StoredViews",
    "Submitted",
    "TaskSteps",
    "_durable_mode",
    "connect",
    "entry_id_of",
    "open_store",
    "task_key",
]


class Store(Producer, Claims, TaskSteps, EventLog, StoredViews, Inspector):
    """Log, work and view I/O for one namespace: every role on one connection pool."""


def open_store(settings: Settings, **options: Any) -> Store:
    """A store on its own connection pool, configured by ``settings``."""
    retention = Retention(
        results=settings.result_ttl, cache=settings.cache_ttl, log=settings.log_retention
    )
    options.setdefault("max_connections", settings.redis_connections)
    return Store(connect(settings.client_url, **options), Keys(settings.namespace), retention)
