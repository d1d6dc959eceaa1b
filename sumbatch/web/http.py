"""How the API is served: uvicorn, with its HTTP protocol hardened at the edges.

uvicorn's httptools protocol answers a request it cannot parse with a text/plain 400,
and bounds only the idle time *between* requests (keep-alive). A client that opens a
connection and then sends nothing, or half a request line, or headers a byte at a
time, or a body that stops half-way, holds the connection (and a parser, and for a
body a running handler) for as long as it likes; headers can also grow without limit,
as httptools sets none. ``GuardedHttpToolsProtocol`` closes those holes:

- headers must be complete within ``header_timeout`` seconds of the connection opening
  (first request) or of the request's first byte (later requests on a kept-alive
  connection); past it, 408 and close (a connection that sent nothing is closed
  without an answer, as uvicorn closes an idle kept-alive one);
- a body may pause at most ``body_timeout`` seconds between two pieces; past it, 408
  and close, and the handler waiting for the body sees the client disconnected;
- headers over ``max_header_bytes`` are refused with 431;
- every answer it writes itself (400 for a malformed request, 408, 431) is the API's
  JSON error body, ``{"error": ..., "status": ...}``.

It writes its answer, half-closes, and reads and drops whatever the client still
sends for a moment before closing (as nginx's lingering close does), so that a client
still sending gets the answer rather than a connection reset."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import msgspec
import uvicorn
from starlette.types import ASGIApp
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from sumbatch.config import Settings

# Time a refused client gets to stop sending before the socket is closed on it.
LINGER_SECONDS = 2.0


@dataclass(frozen=True)
class Limits:
    header_timeout: float = 10.0
    body_timeout: float = 10.0
    # Four times nginx's largest header buffer: far above any real client's headers.
    max_header_bytes: int = 64 * 1024

    @classmethod
    def of(cls, settings: Settings) -> Limits:
        return cls(header_timeout=settings.header_timeout, body_timeout=settings.body_timeout)


def error_response(status: int, message: str, default_headers: list[tuple[bytes, bytes]]) -> bytes:
    """A complete HTTP/1.1 response carrying the API's JSON error body, closing."""
    body = msgspec.json.encode({"error": message, "status": status})
    head = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n".encode()]
    head += [name + b": " + value + b"\r\n" for name, value in default_headers]
    head += [
        b"content-type: application/json\r\n",
        b"content-length: %d\r\n" % len(body),
        b"connection: close\r\n\r\n",
    ]
    return b"".join(head) + body


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    limits = Limits()

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._timer: asyncio.TimerHandle | None = None
        # Bytes of a request have arrived and its headers have not ended.
        self._in_headers = False
        self._header_bytes = 0
        self._head_bytes = 0
        self._messages_begun = 0
        self._refused = False

    # -- timers --------------------------------------------------------------------

    def _arm(self, seconds: float, callback: Callable[[], None]) -> None:
        self._disarm()
        self._timer = self.loop.call_later(seconds, callback)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _headers_overdue(self) -> None:
        self._timer = None
        if self.transport.is_closing() or self._refused:
            return
        if self.cycle is not None and not self.cycle.response_complete:
            # Still answering an earlier, pipelined request: not the client's delay.
            self._arm(self.limits.header_timeout, self._headers_overdue)
        elif self._in_headers:
            self._refuse(408, f"request headers not complete in {self.limits.header_timeout:g} s")
        else:
            self.transport.close()

    def _body_overdue(self) -> None:
        self._timer = None
        if self.transport.is_closing() or self._refused:
            return
        cycle = self.cycle
        if self.flow.read_paused or (cycle is not None and cycle.waiting_for_100_continue):
            # uvicorn stopped reading until the handler takes what came, or the client
            # waits for our 100 Continue: the wait is ours, not the client's.
            self._arm(self.limits.body_timeout, self._body_overdue)
        elif cycle is not None and cycle.response_complete:
            # Answered already; what is left is a body nobody will read.
            self.transport.close()
        else:
            self._refuse(408, f"request body paused for more than {self.limits.body_timeout:g} s")

    def _refuse(self, status: int, message: str) -> None:
        self._refused = True
        self._disarm()
        prefix = f"{self.client[0]}:{self.client[1]} - " if self.client else ""
        self.logger.info("%srefused a request with %d: %s", prefix, status, message)
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            if cycle.response_started:
                # An answer is going out: ours would land inside it.
                self.transport.close()
                return
            # Before the handler runs again: its receive() now reports a disconnect,
            # and whatever it sends is dropped instead of following our answer.
            cycle.disconnected = True
            cycle.message_event.set()
        self.transport.write(error_response(status, message, self.server_state.default_headers))
        if self.transport.can_write_eof():
            self.transport.write_eof()
            self.loop.call_later(LINGER_SECONDS, self.transport.close)
        else:
            self.transport.close()

    # -- uvicorn's protocol --------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # A connection that never sends a byte is bounded too.
        self._arm(self.limits.header_timeout, self._headers_overdue)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # lingering: dropped unread
        in_headers, begun = self._in_headers, self._messages_begun
        super().data_received(data)
        # The parser's callbacks count the head exactly (_count_head), but only once a
        # header line has ended; a line that never ends is bounded here, by the reads
        # wholly inside one request's headers (never more than the truth).
        counted = in_headers and self._in_headers and begun == self._messages_begun
        if counted and not self._refused:
            self._header_bytes += len(data)
            if self._header_bytes > self.limits.max_header_bytes:
                self._refuse(431, f"request headers over {self.limits.max_header_bytes} bytes")

    def send_400_response(self, msg: str) -> None:
        if self._head_bytes > self.limits.max_header_bytes:
            self._refuse(431, f"request headers over {self.limits.max_header_bytes} bytes")
        else:
            self._refuse(400, "malformed HTTP request")

    def on_url(self, url: bytes) -> None:
        self._count_head(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_head(len(name) + len(value) + 4)  # ": " and CRLF
        super().on_header(name, value)

    def _count_head(self, size: int) -> None:
        """The head's bytes as the parser hands them over: exact, whatever the reads
        were (a head in one write is counted too). Past the limit the parse stops here:
        httptools turns the error into a parser error, and send_400_response a 431."""
        self._head_bytes += size
        if self._head_bytes > self.limits.max_header_bytes:
            raise ValueError("request head over the limit")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._messages_begun += 1
        self._in_headers = True
        self._header_bytes = 0
        self._head_bytes = 0
        # The first request's clock started when the connection opened; a later
        # one's starts with its first byte (until then uvicorn's keep-alive runs).
        if self._timer is None:
            self._arm(self.limits.header_timeout, self._headers_overdue)

    def on_headers_complete(self) -> None:
        self._in_headers = False
        self._arm(self.limits.body_timeout, self._body_overdue)
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        self._arm(self.limits.body_timeout, self._body_overdue)
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()


def protocol(limits: Limits) -> type[GuardedHttpToolsProtocol]:
    """The protocol class for uvicorn's ``http=`` option, with these limits."""

    class Configured(GuardedHttpToolsProtocol):
        pass

    Configured.limits = limits
    return Configured


def config(app: ASGIApp, host: str, port: int, limits: Limits, log_level: str) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http=protocol(limits),
        log_level=log_level.lower(),
        access_log=False,
    )


class _Server(uvicorn.Server):
    """uvicorn's server, telling the app when it starts to stop: uvicorn waits for every
    open response to end before the app's lifespan hears of it, and an event stream
    or a long-poll would otherwise hold the shutdown."""

    def __init__(self, config: uvicorn.Config, stopping: Callable[[], Awaitable[None]]) -> None:
        super().__init__(config)
        self.stopping = stopping

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        await self.stopping()
        await super().shutdown(sockets)


def serve(
    app: ASGIApp,
    host: str,
    port: int,
    settings: Settings,
    stopping: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Serve ``app`` until SIGINT/SIGTERM, as ``sumbatch api`` does; ``stopping`` is
    awaited as the server starts to stop."""
    server_config = config(app, host, port, Limits.of(settings), settings.log_level)
    if stopping is None:
        uvicorn.Server(server_config).run()
    else:
        _Server(server_config, stopping).run()
