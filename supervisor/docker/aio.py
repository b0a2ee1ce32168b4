"""A task container's own engine calls without a thread: create, start, wait, inspect, kill
and remove, over the engine's Unix socket with aiohttp (the HTTP server's library).

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
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from supervisor.docker.internals import api_error

__all__ = ["EngineCalls"]


class EngineCalls:
    """Requests to the engine's API over its Unix socket, each on the running loop."""

    def __init__(self, socket_path: str, api_version: str, timeout: float) -> None:
        self.socket_path = socket_path
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
