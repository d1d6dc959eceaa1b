"""How the API answers: JSON bodies, and every error as JSON ``{"error", "status"}``
with its status: 4xx for what the client sent, 503 with Retry-After while Redis is
away or refusing or every connection to it is in use, 500 (logged with its traceback)
for anything else."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from sumbatch.outage import BUSY, REDIS_DOWN, refusal

log = logging.getLogger("sumbatch.api")

_encoder = msgspec.json.Encoder()


class JSONResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return _encoder.encode(content)


def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "status": status}, status_code=status, headers=headers)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return error(exc.status_code, exc.detail, dict(exc.headers or {}))


async def _redis_error(request: Request, exc: Exception) -> Response:
    """Redis away, or refusing for now (out of memory, read-only, loading, busy, a
    failover), or this process busy (every connection to Redis in use): not the client's
    fault, so 503 and try again. Anything else is ours."""
    if isinstance(exc, BUSY):
        return error(503, "busy: every connection to storage is in use; retry later",
                     {"Retry-After": "1"})  # fmt: skip
    name = refusal(exc)
    if name is not None:
        return error(503, f"storage refused the request ({name}); retry later",
                     {"Retry-After": "1"})  # fmt: skip
    if isinstance(exc, REDIS_DOWN):
        return error(503, "storage unavailable, retry later", {"Retry-After": "1"})
    return await _internal(request, exc)


async def _client_gone(request: Request, exc: Exception) -> Response:
    # The client left mid-body, or the server's body timeout cut it off: nothing was
    # appended, and it is not a server error.
    return error(408, "the request body did not arrive in time")


async def _internal(request: Request, exc: Exception) -> Response:
    log.exception("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
    return error(500, "internal error")


EXCEPTION_HANDLERS: dict[Any, Callable[[Request, Exception], Awaitable[Response]]] = {
    HTTPException: _http_error,
    RedisError: _redis_error,
    ClientDisconnect: _client_gone,
    Exception: _internal,
}
