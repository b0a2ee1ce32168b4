"""Serving the daemon's HTTP app (`supervisor.daemon.api`): the listener, and what one
client may hold of it (connections, time to send its request's head and its body).

aiohttp has no header or body timeout of its own: a client that opens connections and never
finishes a request would hold them (and their buffers) for as long as it likes. So:
- `GuardedProtocol` wraps each connection's aiohttp handler: past `max_connections` open
  connections a new one is closed at once; a connection that has not sent the end of its
  first request head (`\\r\\n\\r\\n`) within `header_timeout_s` is closed (between requests,
  aiohttp's own keep-alive timeout applies);
- `body_deadline` (a middleware) answers 413 at once for a declared `Content-Length` over
  the limit, reads the body within `body_timeout_s` (else 408), and treats a client that
  went away in the middle of its body as gone (logged at info, not as an error).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from schemas.errors import ConfigError, SupervisorError
from supervisor.daemon.datadir import publish

log = logging.getLogger("supervisor.daemon.api")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_HEAD_END = b"\r\n\r\n"


class ConnectionGuard:
    """The limits, and the count of open connections they apply to."""

    def __init__(self, *, max_connections: int, header_timeout_s: float) -> None:
        self.max_connections = max_connections
        self.header_timeout_s = header_timeout_s
        self.open = 0
        self.refused = 0
        self.timed_out = 0

    def protocol(self, inner: asyncio.Protocol) -> GuardedProtocol:
        return GuardedProtocol(inner, self)


class GuardedProtocol(asyncio.Protocol):
    """Delegates every call to aiohttp's handler, with the guard's limits around it."""

    def __init__(self, inner: asyncio.Protocol, guard: ConnectionGuard) -> None:
        self.inner = inner
        self.guard = guard
        self.transport: asyncio.Transport | None = None
        self.admitted = False
        self.timer: asyncio.TimerHandle | None = None
        self.tail = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        if self.guard.open >= self.guard.max_connections:
            self.guard.refused += 1
            transport.abort()
            return
        self.admitted = True
        self.guard.open += 1
        self.timer = asyncio.get_running_loop().call_later(
            self.guard.header_timeout_s, self._too_slow
        )
        self.inner.connection_made(transport)

    def _too_slow(self) -> None:
        self.guard.timed_out += 1
        log.info("closing a connection that sent no request head within its time")
        if self.transport is not None:
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        if not self.admitted:
            return
        if self.timer is not None:
            seen = self.tail + data
            if _HEAD_END in seen:
                self.timer.cancel()
                self.timer = None
            else:
                self.tail = seen[-3:]
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received() if self.admitted else None

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.admitted:
            return
        self.admitted = False
        self.guard.open -= 1
        if self.timer is not None:
            self.timer.cancel()
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


def body_deadline(max_body: int, body_timeout_s: float) -> Any:
    """The middleware described in the module docstring."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        declared = request.content_length
        if declared is not None and declared > max_body:
            raise web.HTTPRequestEntityTooLarge(max_size=max_body, actual_size=declared)
        if request.can_read_body:
            try:
                await asyncio.wait_for(request.read(), body_timeout_s)
            except TimeoutError:
                raise web.HTTPRequestTimeout(
                    reason=f"the request body did not arrive within {body_timeout_s:g}s"
                ) from None
            except (ConnectionResetError, aiohttp.ClientPayloadError) as e:
                log.info(
                    "%s %s: the client went away during its body (%s)",
                    request.method,
                    request.path,
                    e,
                )
                raise web.HTTPBadRequest(reason="the request body ended early") from e
        return await handler(request)

    return middleware


class HttpServerError(SupervisorError):
    """The HTTP endpoint could not be bound."""

    tag = "http_server_error"


# --- serving ---------------------------------------------------------------------------------


def parse_listen(listen: str) -> tuple[str, int]:
    """`host:port` (`[v6]:port` for IPv6) -> (host, port). Raises ConfigError."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ConfigError(f"http listen address {listen!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


class HttpServer:
    """Runs an app on `listen` in the current loop. `start` binds (port 0 picks a free one,
    see `port`); `stop` closes the listener and waits for in-flight requests (bounded)."""

    def __init__(
        self,
        app: web.Application,
        listen: str,
        *,
        shutdown_timeout_s: float = 5.0,
        guard: ConnectionGuard | None = None,
        keepalive_timeout_s: float = 15.0,
    ) -> None:
        self.app = app
        self.host, self._port = parse_listen(listen)
        self.shutdown_timeout_s = shutdown_timeout_s
        self.guard = guard or ConnectionGuard(max_connections=1024, header_timeout_s=10.0)
        self.keepalive_timeout_s = keepalive_timeout_s
        self._runner: web.AppRunner | None = None
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        """Listen, each connection behind the guard (`supervisor.daemon.http_limits`)."""
        runner = web.AppRunner(
            self.app,
            access_log=None,
            handle_signals=False,
            shutdown_timeout=self.shutdown_timeout_s,
            keepalive_timeout=self.keepalive_timeout_s,
        )
        await runner.setup()
        factory = runner.server
        assert factory is not None
        try:
            server = await asyncio.get_running_loop().create_server(
                lambda: self.guard.protocol(factory()),
                self.host,
                self._port,
                reuse_address=True,
            )
        except OSError as e:
            await runner.cleanup()
            raise HttpServerError(f"cannot listen on {self.host}:{self._port}: {e.strerror}") from e
        self._runner, self._server = runner, server
        self._port = int(server.sockets[0].getsockname()[1])

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self._port}"

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()


async def start_http(
    stack: contextlib.AsyncExitStack,
    app: web.Application,
    listen: str,
    data_dir: Path,
    guard: ConnectionGuard | None = None,
) -> HttpServer:
    """Serve `app` on `listen` until `stack` closes, its URL published in the data dir
    (`http_url_file`) meanwhile. Raises HttpServerError."""
    http = HttpServer(app, listen, guard=guard)
    await http.start()
    stack.push_async_callback(http.stop)
    publish(stack, http_url_file(data_dir), http.url)
    return http


def http_url_file(data_dir: Path) -> Path:
    """Where a running daemon writes the base URL of its HTTP endpoint."""
    return data_dir / "http.url"
