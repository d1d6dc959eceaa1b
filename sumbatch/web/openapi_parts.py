"""The parts the OpenAPI document's paths are built from: the answers and parameters
more than one route shares, the error answers by status code, the bodies by schema
name. What they say of limits (the Idempotency-Key's length, the body's size, the
long-poll's wait) is read from where each limit lives, when the document is built."""

from __future__ import annotations

from typing import Any

from sumbatch.config import Settings
from sumbatch.model.wire import MAX_IDEMPOTENCY_KEY
from sumbatch.web.live.sse import MAX_WAIT

REF = "#/components/schemas/{name}"


def json_body(name: str) -> dict[str, Any]:
    return {"application/json": {"schema": {"$ref": REF.format(name=name)}}}


def answer(description: str, name: str) -> dict[str, Any]:
    return {"description": description, "content": json_body(name)}


def assets(summary: str, example: str) -> dict[str, Any]:
    """Static files served from a package directory."""
    return {
        "parameters": [
            {
                "name": "path",
                "in": "path",
                "required": True,
                "schema": {"type": "string"},
                "example": example,
            }
        ],
        "get": {
            "summary": summary,
            "responses": {
                "200": {
                    "description": "the asset",
                    "content": {"*/*": {"schema": {"type": "string"}}},
                },
                "404": {"description": "no such asset"},
            },
        },
    }


class Parts:
    """The shared parts of one document, for ``settings``. Made afresh for each
    document, so that no two documents share a dict a caller might change."""

    def __init__(self, settings: Settings) -> None:
        self.retry_after: dict[str, Any] = {
            "Retry-After": {
                "description": "seconds to wait before trying again",
                "required": True,
                "schema": {"type": "integer", "minimum": 0},
            }
        }
        self.errors: dict[str, dict[str, Any]] = {
            code: answer(text, "ErrorBody")
            for code, text in [
                (
                    "400",
                    "not JSON, or JSON with a key twice in one object; an Idempotency-Key "
                    f"that is empty or longer than {MAX_IDEMPOTENCY_KEY} characters",
                ),
                ("404", "unknown or malformed id"),
                ("409", "the group has already finished"),
                (
                    "413",
                    f"body over {settings.max_body_bytes} bytes, or more than "
                    f"{settings.max_tasks_per_group} tasks",
                ),
                ("415", "not application/json"),
                ("422", "JSON of the wrong shape, or an Idempotency-Key reused with another body"),
            ]
        }
        self.errors["503"] = {
            **answer(
                "storage unavailable or refusing for now (or, in durable mode, a write not "
                "confirmed on disk in time); try again after Retry-After",
                "ErrorBody",
            ),
            "headers": self.retry_after,
        }
        # A POST's 503: as any route's, or with the outcome unknown (the submit was
        # sent and never answered): then the body names the group and Location its URL.
        self.submit_unavailable: dict[str, Any] = {
            "description": "storage unavailable or refusing for now: nothing was written; "
            "or the outcome is unknown (the body has groupTaskId, and Location its URL): "
            "GET it, or retry with the same Idempotency-Key; or, in durable mode, a write "
            "not confirmed on disk in time. Try again after Retry-After",
            "content": {
                "application/json": {
                    "schema": {
                        "anyOf": [
                            {"$ref": REF.format(name="ErrorBody")},
                            {"$ref": REF.format(name="OutcomeUnknown")},
                        ]
                    }
                }
            },
            "headers": {
                **self.retry_after,
                "Location": {
                    "description": "with the outcome unknown: the group's URL",
                    "schema": {"type": "string"},
                },
            },
        }
        if settings.api_token:
            self.errors["401"] = {
                **answer("missing or wrong bearer token", "ErrorBody"),
                "headers": {"WWW-Authenticate": {"schema": {"type": "string"}}},
            }
        # The 401 a write answers, listed only when a token is required.
        self.guarded: tuple[str, ...] = ("401",) if settings.api_token else ()
        self.security: list[dict[str, list[str]]] = [{"bearer": []}] if settings.api_token else []
        self.idempotency_key: dict[str, Any] = {
            "name": "Idempotency-Key",
            "in": "header",
            "required": False,
            "description": "the same key with the same body answers the first answer "
            "again and creates nothing",
            "schema": {"type": "string", "minLength": 1, "maxLength": MAX_IDEMPOTENCY_KEY},
        }
        self.wait: dict[str, Any] = {
            "name": "wait",
            "in": "query",
            "required": False,
            "description": "long-poll: answer as soon as this has ended, or after this many "
            "seconds with the current status",
            "schema": {"type": "number", "minimum": 0, "maximum": MAX_WAIT},
        }
        self.bad_wait = answer(
            f"wait is not a number of seconds from 0 to {MAX_WAIT:g}", "ErrorBody"
        )
        self.event_stream: dict[str, Any] = {
            "description": "server-sent events: `id` the log entry id, `event` the event "
            "type, `data` the event as JSON; `: keepalive` comments while nothing happens",
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
        }
        self.html: dict[str, Any] = {"content": {"text/html": {"schema": {"type": "string"}}}}
        self.uuid: dict[str, Any] = {
            "schema": {"type": "string", "format": "uuid"},
            "in": "path",
            "required": True,
        }

    def pick(self, *codes: str) -> dict[str, Any]:
        """The error answers of these status codes."""
        return {code: self.errors[code] for code in codes}
