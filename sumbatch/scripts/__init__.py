"""The Lua scripts behind every atomic step, by the role of the store that runs them
(``store/producer.py``, ``store/work.py``, ``store/claims.py``, ``store/views.py``,
``store/inspect.py``); only the store runs them. The scripts that append events also
count them in the partition's stats hash (``stats.py``), in the same step.

Every key has the namespace's hash tag, so all of them live in one cluster slot. The
scripts that run per task (begin, append, complete) name a group's keys themselves from
prefixes that ``keys.Keys`` sends, instead of passing five keys per task: on a cluster
that is fine, as every key they touch is in the slot of their declared keys.

Events are built in Python (``events.to_flat``) and come in as one JSON argument
(decoded with the server's cjson, all values strings); the only events built here are
GroupFinished and TaskRevoked, whose field lists ``lib.py`` generates from their
definitions in ``events.py`` and the task-id layout in ``ids.py``.

Per group, the write side is three keys: the ledger hash (counters), the ``ended``
bitmap (the completion fence: one bit per task) and the ``attempts`` string (one byte
per task, BITFIELD u8).

Every script that changes state runs once per call: a resend of the same call (a
client's retry after a timeout, whose first run did happen) changes nothing more and
gets the first reply. SUBMIT is keyed by its group id; RELEASE_ENDED only
acknowledges what has ended; DEAD_LETTER copies an entry only when its own XACK took
it; the others (BEGIN, NEXT_ATTEMPT, APPEND, COMPLETE, CANCEL, COMMIT) take the key
of a token the store makes per call (``Keys.call``), under which they keep their
reply for ``lib.CALL_TTL`` s (``first_reply``, ``keep_reply``); BEGIN keeps a mark
only, and a resend of it reads the attempts its first run counted.

Every script checks all it can before its first write, and nothing after that can
fail: a script that errors half-way keeps what it wrote (no rollback), which could
log an outcome without counting it. Shared streams are checked with ``is_or_none``,
group keys with ``group_state``; items that fail a check are refused, not half-done.

May import ``model`` and ``config``: it holds script text, never a connection.
"""

from sumbatch.scripts.claims import DEAD_LETTER, FORGET_CONSUMER, RENEW, TRIM_WORK
from sumbatch.scripts.dispatch import TAKE
from sumbatch.scripts.inspect import INSPECT
from sumbatch.scripts.log import COMMIT, READ_SINCE
from sumbatch.scripts.producer import CANCEL, SUBMIT
from sumbatch.scripts.work import APPEND, BEGIN, COMPLETE, NEXT_ATTEMPT, RELEASE_ENDED

__all__ = [
    "APPEND",
    "BEGIN",
    "CANCEL",
    "COMMIT",
    "COMPLETE",
    "DEAD_LETTER",
    "FORGET_CONSUMER",
    "INSPECT",
    "NEXT_ATTEMPT",
    "READ_SINCE",
    "RELEASE_ENDED",
    "RENEW",
    "SUBMIT",
    "TAKE",
    "TRIM_WORK",
]
