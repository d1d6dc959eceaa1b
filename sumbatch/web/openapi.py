"""The OpenAPI 3.1 document the API serves at /openapi.json, assembled: its version,
its schemas, its paths (``openapi_paths``) and its security scheme.

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
    Cancelled,
    ErrorBody,
    GroupCreated,
    GroupIn,
    GroupStatus,
    TaskStatus,
)
from sumbatch.web.openapi_parts import REF
from sumbatch.web.openapi_paths import paths

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


def schemas(settings: Settings) -> dict[str, Any]:
    """The bodies' schemas, by name: the wire types', with the settings' limits."""
    _, components = msgspec.json.schema_components(
        [GroupIn, GroupCreated, GroupStatus, TaskStatus, Cancelled, ErrorBody], ref_template=REF
    )
    group_in = components["GroupIn"]
    group_in["properties"]["tasks"]["maxItems"] = settings.max_tasks_per_group
    components["OutcomeUnknown"] = {
        "title": "OutcomeUnknown",
        "type": "object",
        "properties": {
            **components["ErrorBody"]["properties"],
            "groupTaskId": {"type": "string", "format": "uuid"},
        },
        "required": ["error", "status", "groupTaskId"],
    }
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
    return components


def openapi_schema(settings: Settings) -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {"title": "sumbatch", "version": package_version()},
        "paths": paths(settings),
        "components": {
            "schemas": schemas(settings),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
