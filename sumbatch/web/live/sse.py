"""Server-sent events, and the query values of the live endpoints: plain functions."""

from __future__ import annotations

import math
import re

import msgspec

from sumbatch.model.events import from_fields

MAX_WAIT = 60.0
# What the client's EventSource waits before it reconnects, in ms.
RETRY_MS = 1000
HEARTBEAT = b": keepalive\n\n"
# An entry id as Redis writes it, or a millisecond time (its sequence taken as 0).
_ENTRY_ID = re.compile(r"[0-9]{1,20}(-[0-9]{1,20})?")  # ASCII: \d takes other scripts' digits
_U64 = 2**64 - 1
_encoder = msgspec.json.Encoder()


def parse_wait(text: str | None) -> float:
    """Seconds of ``?wait=``: 0 when absent; a ValueError unless 0 to 60."""
    if text is None or text == "":
        return 0.0
    value = float(text)
    if not math.isfinite(value) or not 0 <= value <= MAX_WAIT:
        raise ValueError(text)
    return value


def parse_entry_id(text: str) -> str:
    """An entry id or a millisecond time, as an exclusive XRANGE start; ValueError
    otherwise (a part past 2**64 - 1 too, which Redis refuses once the stream has
    started), so nothing else reaches Redis."""
    if not _ENTRY_ID.fullmatch(text) or any(int(part) > _U64 for part in text.split("-")):
        raise ValueError(text)
    return text if "-" in text else f"{text}-0"


def message(entry_id: str, fields: dict[str, str]) -> bytes:
    """One event: ``id`` the entry id, ``event`` its type, ``data`` the event as JSON with
    typed values. An entry that is no event (written by hand) goes out as its fields, as
    an ``Unreadable`` event, rather than stop the stream."""
    try:
        event = from_fields(fields)
    except (msgspec.ValidationError, msgspec.DecodeError):
        kind, data = "Unreadable", _encoder.encode(fields)
    else:
        kind, data = type(event).__name__, _encoder.encode(event)
    return b"id: %s\nevent: %s\ndata: %s\n\n" % (entry_id.encode(), kind.encode(), data)


def opening() -> bytes:
    """The first bytes of a stream: how soon to reconnect, and a comment, so that the
    client sees the stream open before any event."""
    return b"retry: %d\n: open\n\n" % RETRY_MS
