"""A TCP proxy between the service and its server that a test controls, so that "the
script ran but its reply was lost" is a test, not a hope.

Point the service at ``proxy.url`` instead of the server's; then, at any moment:

- ``stall()`` holds what arrives, in both directions, until ``resume()`` forwards it
  in order (a request held this way reaches the server late, after its caller has
  given up on it: the stalled-network case);
- ``drop_replies_of_next_call()``: the next connection to send a request has it
  forwarded, and every reply it gets from then on is thrown away (the call runs;
  its caller hears nothing and times out);
- ``cut()`` closes every connection open now at once, dropping what it held (a
  request held by ``stall()`` never reaches the server);
- ``delay(upstream=..., downstream=...)`` sleeps that many seconds before forwarding
  each chunk one way (toward the server, toward the client).

Counters (``requests``: chunks forwarded toward the server; ``dropped``: replies
thrown away; ``connections``) let a test wait on what happened, with a deadline,
instead of sleeping. ``running_proxy(port)`` runs one on a thread of its own for the
synchronous tests: its controls may be called from any thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

CHUNK = 1 << 16


@dataclass(eq=False)
class _Link:
    """One client connection and its connection to the server."""

    writers: list[asyncio.StreamWriter] = field(default_factory=list)
    dropping: bool = False

    def abort(self) -> None:
        for writer in self.writers:
            writer.transport.abort()


class FaultProxy:
    """Forwards 127.0.0.1:``port`` (a free one) to ``target_host``:``target_port``."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self.requests = 0
        self.dropped = 0
        self.connections = 0
        self._links: set[_Link] = set()
        self._server: asyncio.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._drop_next = False
        self._delay = {True: 0.0, False: 0.0}  # upstream (toward the server), downstream

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        self._flowing.set()
        for link in list(self._links):
            link.abort()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    # -- the controls: callable from any thread ----------------------------------------

    def _on_loop(self, action: Callable[[], None]) -> None:
        """Run ``action`` on the proxy's loop; from another thread, wait until it has
        run, so a control has taken effect when it returns."""
        loop = self._loop
        assert loop is not None, "the proxy is not started"
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            action()
            return
        done: concurrent.futures.Future[None] = concurrent.futures.Future()

        def run() -> None:
            action()
            done.set_result(None)

        loop.call_soon_threadsafe(run)
        done.result(10)

    def stall(self) -> None:
        self._on_loop(self._flowing.clear)

    def resume(self) -> None:
        self._on_loop(self._flowing.set)

    def drop_replies_of_next_call(self) -> None:
        def arm() -> None:
            self._drop_next = True

        self._on_loop(arm)

    def stop_dropping(self) -> None:
        def disarm() -> None:
            self._drop_next = False
            for link in self._links:
                link.dropping = False

        self._on_loop(disarm)

    def cut(self) -> None:
        def cut_all() -> None:
            for link in list(self._links):
                link.abort()

        self._on_loop(cut_all)

    def delay(self, *, upstream: float = 0.0, downstream: float = 0.0) -> None:
        def set_delays() -> None:
            self._delay = {True: upstream, False: downstream}

        self._on_loop(set_delays)

    # -- forwarding ----------------------------------------------------------------------

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        link = _Link([client_w])
        self._links.add(link)
        self.connections += 1
        try:
            server_r, server_w = await asyncio.open_connection(*self.target)
        except OSError:
            client_w.transport.abort()
            self._links.discard(link)
            return
        link.writers.append(server_w)
        try:
            await asyncio.gather(
                self._pump(link, client_r, server_w, upstream=True),
                self._pump(link, server_r, client_w, upstream=False),
            )
        finally:
            self._links.discard(link)
            link.abort()

    async def _pump(
        self,
        link: _Link,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        upstream: bool,
    ) -> None:
        try:
            while data := await reader.read(CHUNK):
                await self._flowing.wait()
                if self._delay[upstream]:
                    await asyncio.sleep(self._delay[upstream])  # the fault itself
                if upstream:
                    self.requests += 1
                    if self._drop_next:
                        self._drop_next, link.dropping = False, True
                elif link.dropping:
                    self.dropped += 1
                    continue
                writer.write(data)
                await writer.drain()
            await self._flowing.wait()
            if writer.can_write_eof() and not writer.is_closing():
                writer.write_eof()  # what was sent before the close still arrives
        except (ConnectionError, OSError):
            link.abort()


@contextlib.contextmanager
def running_proxy(target_port: int, target_host: str = "127.0.0.1") -> Iterator[FaultProxy]:
    """A FaultProxy to ``target_port``, served on a thread of its own until the end."""
    proxy = FaultProxy(target_port, target_host)
    loop = asyncio.new_event_loop()
    started = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(proxy.start())
        started.set()
        loop.run_forever()

    thread = threading.Thread(target=run, name="fault-proxy", daemon=True)
    thread.start()
    if not started.wait(10):
        raise RuntimeError("the fault proxy did not start")
    try:
        yield proxy
    finally:
        asyncio.run_coroutine_threadsafe(proxy.close(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
