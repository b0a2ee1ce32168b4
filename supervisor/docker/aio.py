"""A task container's own engine calls without a thread: create, attach, start, wait,
inspect, kill and remove, over the engine's Unix socket with aiohttp (the HTTP server's
library; an attach is upgraded by hand, see `EngineCalls.attach`).

Through docker-py each of these is a blocking call handed to a worker thread: about three
times the CPU of the same request made on the event loop (`bench/bench_http.py --burst`
prints what each process spends a task), and a thread held for each running container's
wait. docker-py still builds the request bodies (`create_container_config`) and decides
what an error answer is (`internals.api_error`), so the answers and their classes are the
same both ways; `DockerRuntime` translates them as it does docker-py's.

A long-lived process keeps one pool of connections for its loop (`pooled`, closed with
it: the daemon's node); elsewhere each call has a connection of its own, closed with its
answer, so that nothing is bound to a loop or left open whatever loop runs it, or when it
is cancelled (a connect more: still half the CPU of a docker-py call). An engine on another
transport than a Unix socket (`tcp://`, `ssh://`) has none of this, and every call goes
through docker-py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlencode

import aiohttp

from supervisor.docker.internals import api_error

__all__ = ["EngineCalls"]


class EngineCalls:
    """Requests to the engine's API over its Unix socket, each on the running loop."""

    def __init__(self, socket_path: str, api_version: str, timeout: float) -> None:
        self.socket_path = socket_path
        self.timeout = timeout
        self._version = f"/v{api_version}"
        self._prefix = f"http://docker/v{api_version}"
        # Made once: a call's own limit, and none for a container's wait.
        self._timeouts = (aiohttp.ClientTimeout(total=timeout), aiohttp.ClientTimeout(total=None))
        self._pool: tuple[asyncio.AbstractEventLoop, aiohttp.ClientSession] | None = None

    @contextlib.asynccontextmanager
    async def pooled(self) -> AsyncIterator[None]:
        """While open, calls made on this loop share one pool of keep-alive connections
        (no bound: each running container's wait holds one); closed on exit."""
        connector = aiohttp.UnixConnector(path=self.socket_path, limit=0)
        session = aiohttp.ClientSession(connector=connector)
        self._pool = (asyncio.get_running_loop(), session)
        try:
            yield
        finally:
            self._pool = None
            await session.close()

    async def call(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, str] | None = None,
        body: Any = None,
        wait: bool = False,
    ) -> Any:
        """The decoded JSON answer (None for an empty one). An error answer raises what
        docker-py raises for it (`docker.errors.*`); a broken connection raises
        aiohttp's errors, a timeout `TimeoutError`. `wait`: no time limit."""
        timeout = self._timeouts[wait]
        pool = self._pool
        if pool is not None and pool[0] is asyncio.get_running_loop():
            session = pool[1]
            data, status, reason, url = await self._send(
                session, method, path, params, body, timeout
            )
        else:
            connector = aiohttp.UnixConnector(path=self.socket_path, force_close=True)
            async with aiohttp.ClientSession(connector=connector) as session:
                data, status, reason, url = await self._send(
                    session, method, path, params, body, timeout
                )
        if status >= 400:
            raise api_error(status, reason, url, data)
        return json.loads(data) if data else None

    async def _send(
        self,
        session: aiohttp.ClientSession,
        method: str,
        path: str,
        params: dict[str, str] | None,
        body: Any,
        timeout: aiohttp.ClientTimeout,
    ) -> tuple[bytes, int, str, str]:
        url = self._prefix + path
        async with session.request(method, url, params=params, json=body, timeout=timeout) as resp:
            return await resp.read(), resp.status, resp.reason or "", str(resp.url)

    async def attach(self, path: str, params: dict[str, str]) -> socket.socket:
        """Open the attach stream of container path `path` (`/containers/<id>/attach`):
        the connection, once the engine answered the upgrade, as a blocking socket whose
        next byte is the stream's first (what docker-py's `attach_socket` gives, without
        its HTTP machinery: a connection of its own, as the stream holds it). An error
        answer raises what docker-py raises for it; no answer within the calls' time limit
        `TimeoutError`."""
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        target = f"{self._version}{path}?{urlencode(params)}"
        try:
            async with asyncio.timeout(self.timeout):
                await loop.sock_connect(sock, self.socket_path)
                await loop.sock_sendall(
                    sock,
                    f"POST {target} HTTP/1.1\r\nHost: docker\r\nContent-Length: 0\r\n"
                    "Connection: Upgrade\r\nUpgrade: tcp\r\n\r\n".encode(),
                )
                status, reason, length = _answer_head(await _head(loop, sock))
                if status >= 400:
                    body = b""
                    while len(body) < length and (more := await loop.sock_recv(sock, 65536)):
                        body += more
                    raise api_error(status, reason, f"http://docker{target}", body)
        except BaseException:
            sock.close()
            raise
        sock.setblocking(True)
        return sock


async def _head(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> bytes:
    """The answer's head, taken from `sock` to its blank line and not a byte further: what
    follows an upgrade is the stream, read by the output's reader."""
    while True:
        readable: asyncio.Future[None] = loop.create_future()
        # Called at each turn of the loop while readable, until removed: once is enough.
        loop.add_reader(sock.fileno(), _set_once, readable)
        try:
            await readable
        finally:
            loop.remove_reader(sock.fileno())
        try:
            seen = sock.recv(65536, socket.MSG_PEEK)
        except BlockingIOError:
            continue
        if not seen:
            raise ConnectionResetError("the engine closed the attach connection")
        end = seen.find(b"\r\n\r\n")
        if end >= 0:
            return sock.recv(end + 4)
        if len(seen) >= 65536:
            raise ConnectionError("the engine's attach answer has no end of head")
        await asyncio.sleep(0.001)  # the rest of the head is on its way


def _set_once(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _answer_head(head: bytes) -> tuple[int, str, int]:
    """Status, reason and Content-Length (0 when absent) of an HTTP answer's head."""
    status_line, *lines = head.decode("latin-1").split("\r\n")
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or not parts[1].isdigit():
        raise ConnectionError(f"not an HTTP answer from the engine: {status_line[:80]!r}")
    length = 0
    for line in lines:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length" and value.strip().isdigit():
            length = int(value.strip())
    return int(parts[1]), parts[2] if len(parts) > 2 else "", length
