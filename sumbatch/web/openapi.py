"""The OpenAPI 3.1 document the API serves at /openapi.json.

Bodies come from the wire types, the limits from the settings and the API's own
constants, the version from the installed package: nothing here restates a value the
code already holds. tests/test_openapi.py checks that every route the app serves is
described, method by method, and that the document is valid OpenAPI 3.1."""

from __future__ import annotations

import importlib.metadata
import tomllib
from pathlib import Path
from typing import Any

import msgspec

from sumbatch.config import Settings
from sumbatch.model.wire import (
    MAX_IDEMPOTENCY_KEY,
    Cancelled,
    ErrorBody,
    GroupCreated,
    GroupIn,
    GroupStatus,
    TaskStatus,
)
from sumbatch.web.live.sse import MAX_WAIT

_REF = "#/components/schemas/{name}"
_PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def package_version() -> str:
    """The installed distribution's version; from a source tree that was never
    installed (PYTHONPATH=.), the pyproject.toml beside the package, which is where
    the installed version comes from too."""
    try:
        return importlib.metadata.version("sumbatch")
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        project = tomllib.loads(_PYPROJECT.read_text(encoding="utf-8"))["project"]
        return str(project["version"])
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        # A version the spec accepts, and that says plainly it is not known.
        return "0+unknown"


def _json(name: str) -> dict[str, Any]:
    return {"application/json": {"schema": {"$ref": _REF.format(name=name)}}}


def _answer(description: str, name: str) -> dict[str, Any]:
    return {"description": description, "content": _json(name)}


def _assets(summary: str, example: str) -> dict[str, Any]:
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


def openapi_schema(settings: Settings) -> dict[str, Any]:

    _, components = msgspec.json.schema_components(
        [GroupIn, GroupCreated, GroupStatus, TaskStatus, Cancelled, ErrorBody], ref_template=_REF
    )
    group_in = components["GroupIn"]
    group_in["properties"]["tasks"]["maxItems"] = settings.max_tasks_per_group
    components["Health"] = {
        "title": "Health",
        "type": "object",
        "properties": {"status": {"type": "string", "enum": ["ok"]}},
        "required": ["status"],
    }
    components["Ready"] = {
        "title": "Ready",
        "type": "object",
        "properties": {"status": {"type": "string", "enum": ["ready"]}},
        "required": ["status"],
    }
    retry_after = {
        "Retry-After": {
            "description": "seconds to wait before trying again",
            "required": True,
            "schema": {"type": "integer", "minimum": 0},
        }
    }
    errors = {
        code: _answer(text, "ErrorBody")
        for code, text in [
            (
                "400",
                "not JSON, or JSON with a key twice in one object; an Idempotency-Key that "
                f"is empty or longer than {MAX_IDEMPOTENCY_KEY} characters",
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
    wait_param = {
        "name": "wait",
        "in": "query",
        "required": False,
        "description": "long-poll: answer as soon as this has ended, or after this many "
        "seconds with the current status",
        "schema": {"type": "number", "minimum": 0, "maximum": MAX_WAIT},
    }
    bad_wait = _answer(f"wait is not a number of seconds from 0 to {MAX_WAIT:g}", "ErrorBody")
    event_stream = {
        "description": "server-sent events: `id` the log entry id, `event` the event type, "
        "`data` the event as JSON; `: keepalive` comments while nothing happens",
        "content": {"text/event-stream": {"schema": {"type": "string"}}},
    }
    html = {"content": {"text/html": {"schema": {"type": "string"}}}}
    errors["503"] = {
        **_answer(
            "storage unavailable or refusing for now (or, in durable mode, a write not "
            "confirmed on disk in time); try again after Retry-After",
            "ErrorBody",
        ),
        "headers": retry_after,
    }

    if settings.api_token:
        errors["401"] = {
            **_answer("missing or wrong bearer token", "ErrorBody"),
            "headers": {"WWW-Authenticate": {"schema": {"type": "string"}}},
        }
    guarded = ("401",) if settings.api_token else ()

    def pick(*codes: str) -> dict[str, Any]:
        return {code: errors[code] for code in codes}

    uuid_param = {"schema": {"type": "string", "format": "uuid"}, "in": "path", "required": True}
    security: list[dict[str, list[str]]] = [{"bearer": []}] if settings.api_token else []
    return {
        "openapi": "3.1.0",
        "info": {"title": "sumbatch", "version": package_version()},
        "paths": {
            "/grouptasks": {
                "post": {
                    "summary": "Submit a group of tasks",
                    "security": security,
                    "parameters": [
                        {
                            "name": "Idempotency-Key",
                            "in": "header",
                            "required": False,
                            "description": "the same key with the same body answers the "
                            "first answer again and creates nothing",
                            "schema": {
                                "type": "string",
                                "minLength": 1,
                                "maxLength": MAX_IDEMPOTENCY_KEY,
                            },
                        }
                    ],
                    "requestBody": {"required": True, "content": _json("GroupIn")},
                    "responses": {
                        "200": {
                            **_answer("the group is in the log", "GroupCreated"),
                            "headers": {
                                "Idempotent-Replayed": {
                                    "description": "present when this is the answer "
                                    "to an earlier request with the same Idempotency-Key",
                                    "schema": {"type": "string", "enum": ["true"]},
                                }
                            },
                        },
                        **pick("400", *guarded, "413", "415", "422", "503"),
                    },
                }
            },
            "/grouptasks/{groupTaskId}": {
                "parameters": [{"name": "groupTaskId", **uuid_param}],
                "get": {
                    "summary": "Status and results of a group",
                    "parameters": [wait_param],
                    "responses": {
                        "200": _answer("the group", "GroupStatus"),
                        **pick("404"),
                        "422": bad_wait,
                        **pick("503"),
                    },
                },
                "delete": {
                    "summary": "Cancel a group: every task not yet ended ends as REVOKED",
                    "security": security,
                    "responses": {
                        "202": _answer("cancelled (idempotent)", "Cancelled"),
                        **pick(*guarded, "404", "409", "503"),
                    },
                },
            },
            "/tasks/{taskId}": {
                "parameters": [{"name": "taskId", **uuid_param}],
                "get": {
                    "summary": "Status and result of one task",
                    "parameters": [wait_param],
                    "responses": {
                        "200": _answer("the task", "TaskStatus"),
                        **pick("404"),
                        "422": bad_wait,
                        **pick("503"),
                    },
                },
            },
            "/grouptasks/{groupTaskId}/events": {
                "parameters": [{"name": "groupTaskId", **uuid_param}],
                "get": {
                    "summary": "A group's events: its history, then live; ends after GroupFinished",
                    "parameters": [
                        {
                            "name": "Last-Event-ID",
                            "in": "header",
                            "required": False,
                            "description": "resume after this entry id",
                            "schema": {"type": "string"},
                        }
                    ],
                    "responses": {
                        "200": event_stream,
                        "400": _answer("Last-Event-ID is not an entry id", "ErrorBody"),
                        **pick("404", "503"),
                    },
                },
            },
            "/events": {
                "get": {
                    "summary": "Every group's events: from a point of the log, then live",
                    "parameters": [
                        {
                            "name": "from",
                            "in": "query",
                            "required": False,
                            "description": "an entry id or a time in ms to start after "
                            "(0: everything kept); omitted or $: only new events. "
                            "Last-Event-ID overrides it.",
                            "schema": {"type": "string"},
                        }
                    ],
                    "responses": {
                        "200": event_stream,
                        "422": _answer("from is not an entry id, a time or $", "ErrorBody"),
                        **pick("503"),
                    },
                }
            },
            "/docs": {
                "get": {
                    "summary": "This document, rendered (Swagger UI, served offline)",
                    "responses": {"200": {"description": "the page", **html}},
                }
            },
            "/docs/static/{path}": _assets("Swagger UI's assets", "swagger-ui.css"),
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics: the service's counters and histograms "
                    "(kept in Redis), its streams and workers read at scrape time, and "
                    "this process's request latency; with Redis away, sumbatch_redis_up 0",
                    "responses": {
                        "200": {
                            "description": "Prometheus text exposition format",
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        }
                    },
                }
            },
            "/system": {
                "get": {
                    "summary": "An overview as JSON: counters, work-stream lag and pending, "
                    "projector lag, dead letters, workers, Redis memory",
                    "responses": {
                        "200": {
                            "description": "the overview",
                            "content": {"application/json": {"schema": {"type": "object"}}},
                        },
                        **pick("503"),
                    },
                }
            },
            "/": {
                "get": {
                    "summary": "To the dashboard",
                    "responses": {
                        "307": {
                            "description": "to /dashboard",
                            "headers": {
                                "Location": {"required": True, "schema": {"type": "string"}}
                            },
                        }
                    },
                }
            },
            "/dashboard": {
                "get": {
                    "summary": "The dashboard: groups in flight, throughput, workers, the "
                    "live event log",
                    "responses": {"200": {"description": "the page", **html}},
                }
            },
            "/dashboard/groups/{groupTaskId}": {
                "parameters": [{"name": "groupTaskId", **uuid_param}],
                "get": {
                    "summary": "A group's page: its tasks, its audit trail, a cancel button",
                    "responses": {
                        "200": {"description": "the page", **html},
                        "404": _answer("not a group id", "ErrorBody"),
                    },
                },
            },
            "/dashboard/static/{path}": _assets("The dashboard's assets", "dashboard.css"),
            "/healthz": {
                "get": {
                    "summary": "Liveness: answers while the process lives; touches no storage",
                    "responses": {"200": _answer("the process is alive", "Health")},
                }
            },
            "/readyz": {
                "get": {
                    "summary": "Readiness: storage answers and the workers' consumer group exists",
                    "responses": {
                        "200": _answer("ready to take work", "Ready"),
                        "503": {
                            **_answer(
                                "storage unavailable, or the workers' consumer group does "
                                "not exist yet; try again after Retry-After",
                                "ErrorBody",
                            ),
                            "headers": retry_after,
                        },
                    },
                }
            },
            "/openapi.json": {
                "get": {
                    "summary": "This document",
                    "responses": {
                        "200": {
                            "description": "the OpenAPI 3.1 description of this API",
                            "content": {"application/json": {"schema": {"type": "object"}}},
                        }
                    },
                }
            },
        },
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
