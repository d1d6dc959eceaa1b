"""A small HTTP client of the API for the command line (``sumbatch submit``, ``status``,
``top``): JSON requests and the server-sent event streams, over the standard library
only, so the commands need nothing the service does not."""

from __future__ import annotations

import http.client
import json
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit

from sumbatch.config import Settings

# Seconds a plain request may take; a long poll gets its wait on top.
TIMEOUT = 15.0
# Seconds an event stream may stay silent: the server sends a keepalive every 15 s.
STREAM_SILENCE = 40.0
WILDCARD_HOSTS = ("", "0.0.0.0", "::", "[::]")


class Unreachable(Exception):
    """No answer from the API: refused, reset, timed out, or not HTTP."""


class ApiError(Exception):
    """The API answered with an error status; ``message`` is its ``error`` text."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{message} ({status})")
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Message:
    """One server-sent event: its ``event`` type, ``data`` and ``id``."""

    event: str
    data: str
    id: str | None = None


def default_url(settings: Settings) -> str:
    """Where ``sumbatch api``/``up`` listens with these settings: its host (the
    loopback address when it listens on every interface) and port."""
    host = "127.0.0.1" if settings.host in WILDCARD_HOSTS else settings.host
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{settings.port}"


def check_url(url: str) -> str:
    """``url`` without a trailing slash; ValueError unless it is an http(s) URL."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{url!r} is not an http:// or https:// URL")
    return url.rstrip("/")


def parse_sse(lines: Iterable[str]) -> Iterator[Message]:
    """The messages of an event stream, given its lines (as the text/event-stream
    format says: fields until a blank line, ``:`` comments skipped, ``data`` lines
    joined with newlines)."""
    event, last_id = "", None
    data: list[str] = []
    for raw in lines:
        line = raw.rstrip("\r\n")
        if not line:
            if data:
                yield Message(event or "message", "\n".join(data), last_id)
            event, data = "", []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            event = value
        elif name == "data":
            data.append(value)
        elif name == "id":
            last_id = value


class Api:
    """The API at ``base`` (``http://host:port``); ``token`` is sent as a bearer token
    when set (POST and DELETE need it when the API has one)."""

    def __init__(self, base: str, token: str = "") -> None:
        self.base = base
        self.token = token

    def get(self, path: str, *, wait: float | None = None) -> Any:
        """GET ``path`` and its JSON; with ``wait``, as a long poll (``?wait=``)."""
        if wait is not None:
            path = f"{path}?wait={format(wait, 'f').rstrip('0').rstrip('.') or '0'}"
        timeout = TIMEOUT + (wait or 0)
        with self._open(self._request(path), timeout) as answer:
            return _json(answer.read())

    def post(self, path: str, body: bytes, headers: Mapping[str, str] | None = None) -> Any:
        request = self._request(path, {"Content-Type": "application/json", **(headers or {})})
        request.data = body
        request.method = "POST"
        with self._open(request, TIMEOUT) as answer:
            return _json(answer.read())

    def events(self, path: str) -> Iterator[Message]:
        """The messages of the event stream at ``path``, as they come. ApiError if the
        API answers an error (404 where it has no such stream), Unreachable if it
        cannot be reached, answers something else, or the stream breaks or falls
        silent."""
        answer = self._open(self._request(path, {"Accept": "text/event-stream"}), STREAM_SILENCE)
        with answer:
            kind = answer.headers.get_content_type()
            if kind != "text/event-stream":
                raise Unreachable(f"{self.base}{path} answered {kind}, not an event stream")
            try:
                yield from parse_sse(line.decode("utf-8") for line in answer)
            except (OSError, http.client.HTTPException) as exc:
                raise Unreachable(f"the event stream broke: {_why(exc)}") from exc

    def _request(
        self, path: str, headers: Mapping[str, str] | None = None
    ) -> urllib.request.Request:
        request = urllib.request.Request(self.base + path, headers=dict(headers or {}))
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        return request

    def _open(self, request: urllib.request.Request, timeout: float) -> http.client.HTTPResponse:
        try:
            answer: http.client.HTTPResponse = urllib.request.urlopen(request, timeout=timeout)
        except urllib.error.HTTPError as refused:
            with refused:
                raise ApiError(refused.code, _error_text(refused.read(), refused.reason)) from None
        except (OSError, http.client.HTTPException) as exc:
            raise Unreachable(f"cannot reach the API at {self.base}: {_why(exc)}") from None
        return answer


def path_of(kind: str, id_: str) -> str:
    """``/grouptasks/<id>`` or ``/tasks/<id>``, the id quoted."""
    return f"/{kind}/{quote(id_, safe='')}"


def _json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError as exc:
        raise Unreachable(f"the API answered something that is not JSON: {exc}") from None


def _error_text(body: bytes, reason: object) -> str:
    """The ``error`` of a JSON error body, else the status line's reason."""
    try:
        found = json.loads(body)
    except ValueError:
        found = None
    if isinstance(found, dict) and isinstance(found.get("error"), str):
        return str(found["error"])
    return str(reason)


def _why(exc: BaseException) -> str:
    """What went wrong, in a few words: the reason inside a URLError, a timeout."""
    if isinstance(exc, urllib.error.URLError) and isinstance(exc.reason, BaseException):
        exc = exc.reason
    if isinstance(exc, TimeoutError):
        return "no answer in time"
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return str(text)
