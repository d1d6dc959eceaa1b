"""The OpenAPI 3.1 document the API serves at /openapi.json, built from the wire types
so that it cannot drift from what the API validates."""

from __future__ import annotations

from typing import Any

import msgspec

from sumbatch.config import Settings
from sumbatch.wire import Cancelled, ErrorBody, GroupCreated, GroupIn, GroupStatus, TaskStatus

_REF = "#/components/schemas/{name}"


def _json(name: str) -> dict[str, Any]:
    return {"application/json": {"schema": {"$ref": _REF.format(name=name)}}}


def _answer(description: str, name: str) -> dict[str, Any]:
    return {"description": description, "content": _json(name)}


def openapi_schema(settings: Settings) -> dict[str, Any]:
    _, components = msgspec.json.schema_components(
        [GroupIn, GroupCreated, GroupStatus, TaskStatus, Cancelled, ErrorBody], ref_template=_REF
    )
    group_in = components["GroupIn"]
    group_in["properties"]["tasks"]["maxItems"] = settings.max_tasks_per_group
    errors = {
        code: _answer(text, "ErrorBody")
        for code, text in [
            ("400", "not JSON"),
            ("404", "unknown or malformed id"),
            ("409", "the group has already finished"),
            ("413", "body or group too large"),
            ("415", "not application/json"),
            ("422", "JSON of the wrong shape"),
            ("503", "storage unavailable; see Retry-After"),
        ]
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
        "info": {"title": "sumbatch", "version": "0.1.0"},
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
                            "schema": {"type": "string", "minLength": 1, "maxLength": 255},
                        }
                    ],
                    "requestBody": {"required": True, "content": _json("GroupIn")},
                    "responses": {
                        "200": _answer("the group is in the log", "GroupCreated"),
                        **pick("400", *guarded, "413", "415", "422", "503"),
                    },
                }
            },
            "/grouptasks/{groupTaskId}": {
                "parameters": [{"name": "groupTaskId", **uuid_param}],
                "get": {
                    "summary": "Status and results of a group",
                    "responses": {
                        "200": _answer("the group", "GroupStatus"),
                        **pick("404", "503"),
                    },
                },
                "delete": {
                    "summary": "Cancel a group: tasks not yet started end as REVOKED",
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
                    "responses": {
                        "200": _answer("the task", "TaskStatus"),
                        **pick("404", "503"),
                    },
                },
            },
        },
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
