from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, settings as hsettings
from schemathesis.python import asgi
from starlette.applications import Starlette

from sumbatch.api import create_app
from sumbatch.config import Settings
from sumbatch.openapi import openapi_schema

schema = schemathesis.openapi.from_dict(openapi_schema(Settings()))


@pytest.fixture
def app(settings: Settings) -> Iterator[Starlette]:
    application = create_app(settings)
    yield application
    asgi.shutdown_lifespans()


@schema.parametrize()
@hsettings(
    max_examples=50, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck)
)
def test_api(case: schemathesis.Case, app: Starlette) -> None:
    case.call_and_validate(app=app)
