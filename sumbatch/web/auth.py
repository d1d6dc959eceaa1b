"""The API token check: with SUMBATCH_API_TOKEN set, a write (submitting or cancelling
a group) must carry it as a bearer token; reads need none."""

from __future__ import annotations

import hmac

from starlette.requests import Request

from sumbatch.config import Settings
from sumbatch.web.responses import JSONResponse, error


def authorised(request: Request, settings: Settings) -> bool:
    if not settings.api_token:
        return True
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    # Constant time: how long the comparison takes says nothing of the token.
    return scheme.lower() == "bearer" and hmac.compare_digest(
        token.strip().encode(), settings.api_token.encode()
    )


def unauthorised() -> JSONResponse:
    return error(401, "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"})
