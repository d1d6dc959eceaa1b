"""The paths of the OpenAPI document: every route the app serves, what each takes and
what it answers, built from the shared parts (``openapi_parts``).
tests/test_openapi.py checks that this names each route and method the app serves."""

from __future__ import annotations

from typing import Any

from sumbatch.config import Settings
from sumbatch.web.openapi_parts import Parts, answer, assets, json_body


def paths(settings: Settings) -> dict[str, Any]:
    parts = Parts(settings)
    return {
        "/grouptasks": {
            "post": {
                "summary": "Submit a group of tasks",
                "security": parts.security,
                "parameters": [parts.idempotency_key],
                "requestBody": {"required": True, "content": json_body("GroupIn")},
                "responses": {
                    "200": {
                        **answer("the group is in the log", "GroupCreated"),
                        "headers": {
                            "Idempotent-Replayed": {
                                "description": "present when this is the answer "
                                "to an earlier request with the same Idempotency-Key",
                                "schema": {"type": "string", "enum": ["true"]},
                            }
                        },
                    },
                    **parts.pick("400", *parts.guarded, "413", "415", "422"),
                    "503": parts.submit_unavailable,
                },
            }
        },
        "/grouptasks/{groupTaskId}": {
            "parameters": [{"name": "groupTaskId", **parts.uuid}],
            "get": {
                "summary": "Status and results of a group",
                "parameters": [parts.wait],
                "responses": {
                    "200": answer("the group", "GroupStatus"),
                    **parts.pick("404"),
                    "422": parts.bad_wait,
                    **parts.pick("503"),
                },
            },
            "delete": {
                "summary": "Cancel a group: every task not yet ended ends as REVOKED",
                "security": parts.security,
                "responses": {
                    "202": answer("cancelled (idempotent)", "Cancelled"),
                    **parts.pick(*parts.guarded, "404", "409", "503"),
                },
            },
        },
        "/tasks/{taskId}": {
            "parameters": [{"name": "taskId", **parts.uuid}],
            "get": {
                "summary": "Status and result of one task",
                "parameters": [parts.wait],
                "responses": {
                    "200": answer("the task", "TaskStatus"),
                    **parts.pick("404"),
                    "422": parts.bad_wait,
                    **parts.pick("503"),
                },
            },
        },
        "/grouptasks/{groupTaskId}/events": {
            "parameters": [{"name": "groupTaskId", **parts.uuid}],
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
                    "200": parts.event_stream,
                    "400": answer("Last-Event-ID is not an entry id", "ErrorBody"),
                    **parts.pick("404", "503"),
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
                    "200": parts.event_stream,
                    "422": answer("from is not an entry id, a time or $", "ErrorBody"),
                    **parts.pick("503"),
                },
            }
        },
        "/docs": {
            "get": {
                "summary": "This document, rendered (Swagger UI, served offline)",
                "responses": {"200": {"description": "the page", **parts.html}},
            }
        },
        "/docs/static/{path}": assets("Swagger UI's assets", "swagger-ui.css"),
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
                    **parts.pick("503"),
                },
            }
        },
        "/": {
            "get": {
                "summary": "To the dashboard",
                "responses": {
                    "307": {
                        "description": "to /dashboard",
                        "headers": {"Location": {"required": True, "schema": {"type": "string"}}},
                    }
                },
            }
        },
        "/dashboard": {
            "get": {
                "summary": "The dashboard: groups in flight, throughput, workers, the "
                "live event log",
                "responses": {"200": {"description": "the page", **parts.html}},
            }
        },
        "/dashboard/groups/{groupTaskId}": {
            "parameters": [{"name": "groupTaskId", **parts.uuid}],
            "get": {
                "summary": "A group's page: its tasks, its audit trail, a cancel button",
                "responses": {
                    "200": {"description": "the page", **parts.html},
                    "404": answer("not a group id", "ErrorBody"),
                },
            },
        },
        "/dashboard/static/{path}": assets("The dashboard's assets", "dashboard.css"),
        "/healthz": {
            "get": {
                "summary": "Liveness: answers while the process lives; touches no storage",
                "responses": {"200": answer("the process is alive", "Health")},
            }
        },
        "/readyz": {
            "get": {
                "summary": "Readiness: storage answers and the workers' consumer group exists",
                "responses": {
                    "200": answer("ready to take work", "Ready"),
                    "503": {
                        **answer(
                            "storage unavailable, or the workers' consumer group does "
                            "not exist yet; try again after Retry-After",
                            "ErrorBody",
                        ),
                        "headers": parts.retry_after,
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
    }
