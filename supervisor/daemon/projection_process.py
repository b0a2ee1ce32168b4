"""The daemon's projection, run in a child process: `ProjectionProcess`.

A `supervisor.daemon.extension.Part` and `ReadSide`. `start` spawns `python -m
supervisor.compose.projection_service` (see that module for the protocol), waits until it has caught up with
the stream, and returns; from then on `/v1/query`, `/v1/tasks/{id}` and the reconciler's
projected state (`state`) are requests to it, its readiness check is the daemon's
`projection` check, and its metrics are part of the daemon's `/metrics` (fetched at each
scrape).

Why a process: DuckDB and Arrow alone hold about 120 MB once loaded, and applying a batch
is CPU work that, in the daemon, took turns on the GIL with the event loop running the
tasks. This package imports neither: it only speaks HTTP to the child.

A child that exits is started again (after `restart_min_s`, doubling up to
`restart_max_s` while it keeps failing); meanwhile reads answer 503 and the readiness
check says why. Teardown closes the child's stdin (it applies the batch it gathers,
checkpoints and exits) and kills it after `stop_timeout_s`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import sys
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import aiohttp
import msgspec
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from schemas.config import Config
from schemas.errors import ApiError, SupervisorError, projection_unavailable
from schemas.http import Check
from schemas.projected import ProjectedState
from supervisor.daemon.projection_exec import start_service

if TYPE_CHECKING:
    from schemas.http import ReadHost

log = logging.getLogger("supervisor.projection")

READ_TIMEOUT_S = 30.0
"""How long a task lookup, the reconciler's state, a readiness check or a metrics fetch may
take before the service counts as not answering."""


class ProjectionProcessError(SupervisorError):
    """The projection's process exited before it served (`returncode`), or answered its
    start with something other than its ready line."""

    tag = "projection_process_error"

    def __init__(self, returncode: int | None, detail: str = "") -> None:
        self.returncode = returncode
        super().__init__(
            detail
            or f"the projection process exited with status {returncode} before serving "
            "(its log lines say why)"
        )


class _Child:
    """One running service: its process and a session on its port."""

    def __init__(self, proc: asyncio.subprocess.Process, session: aiohttp.ClientSession) -> None:
        self.proc = proc
        self.session = session


class ProjectionProcess:
    """`ProjectionProcess(config)`, handed to `Daemon` as a part and as its `read_side`;
    `state` is the reconciler's `StateSource`."""

    name = "projection"

    def __init__(
        self,
        config: Config,
        *,
        python: str = sys.executable,
        open_timeout_s: float = 30.0,
        stop_timeout_s: float = 30.0,
        restart_min_s: float = 0.5,
        restart_max_s: float = 10.0,
        interpreter: asyncio.subprocess.Process | None = None,
    ) -> None:
        """`interpreter`: the service's, started already (`start_service`), used at the
        first start."""
        self.config = config
        self.python = python
        self.open_timeout_s = open_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.restart_min_s = restart_min_s
        self.restart_max_s = restart_max_s
        self.state = _RemoteState(self)
        self.restarts = 0
        self._nats_url = ""
        self._data_dir = ""
        self._child: _Child | None = None
        self._down: str | None = "not started"
        self._closing = False
        self._supervise: asyncio.Task[None] | None = None
        self._families: list[Metric] = []
        self._early = interpreter

    # --- the part -----------------------------------------------------------------------

    async def start(self, ctx: ReadHost, stack: contextlib.AsyncExitStack) -> None:
        """Spawn the service and wait until it serves. Raises ProjectionProcessError."""
        self._nats_url = ctx.nats_url
        self._data_dir = str(ctx.data_dir.resolve())
        stack.push_async_callback(self.close)
        self._child = await self._spawn()
        self._down = None
        self._supervise = asyncio.create_task(self._watch(), name="projection-process")
        ctx.add_check("projection", self.check)
        ctx.registry.register(_Forwarded(self))
        ctx.add_scrape_hook(self.refresh_metrics)

    async def prepare(self, stack: contextlib.AsyncExitStack) -> None:
        """Start the service's interpreter now, unless it was handed one: its imports
        overlap the daemon's own start-up, and `start` hands it its setup line. Ended,
        unused, if the daemon fails before."""
        if self._early is None:
            self._early = await start_service(self.python)
        stack.push_async_callback(self._end_early)

    async def _end_early(self) -> None:
        early, self._early = self._early, None
        if early is not None:
            await _end(early, self.stop_timeout_s)

    @property
    def pid(self) -> int | None:
        """The service's process id while one runs."""
        return self._child.proc.pid if self._child is not None else None

    async def _spawn(self) -> _Child:
        token = secrets.token_urlsafe(32)
        proc, self._early = self._early, None  # the interpreter `prepare` started, once
        if proc is None or proc.returncode is not None:
            proc = await start_service(self.python)
        assert proc.stdin is not None and proc.stdout is not None
        config = msgspec.structs.replace(self.config, data_dir=self._data_dir)
        setup = {
            "config": config,
            "nats_url": self._nats_url,
            "token": token,
            "open_timeout_s": self.open_timeout_s,
        }
        try:
            proc.stdin.write(msgspec.json.encode(setup) + b"\n")
            await proc.stdin.drain()
            line = await proc.stdout.readline()
        except BaseException:
            await _end(proc, self.stop_timeout_s)
            raise
        if not line:
            raise ProjectionProcessError(await proc.wait())
        try:
            port = int(msgspec.json.decode(line)["port"])
        except (msgspec.DecodeError, KeyError, TypeError, ValueError):
            await _end(proc, self.stop_timeout_s)
            raise ProjectionProcessError(
                None, f"the projection process started with {line[:200]!r}, not its ready line"
            ) from None
        session = aiohttp.ClientSession(
            base_url=f"http://127.0.0.1:{port}",
            headers={"Authorization": f"Bearer {token}"},
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=5),
        )
        log.info("projection process %d serving on 127.0.0.1:%d", proc.pid, port)
        return _Child(proc, session)

    async def _watch(self) -> None:
        """Start the service again whenever it exits, until `close`."""
        delay = self.restart_min_s
        while not self._closing:
            child = self._child
            if child is not None:
                rc = await child.proc.wait()
                if self._closing:
                    return
                self._down = f"the projection process exited with status {rc}; restarting"
                self._child = None
                log.error("%s", self._down)
                await child.session.close()
                await _end(child.proc, self.stop_timeout_s)  # closes its pipes
            await asyncio.sleep(delay)
            try:
                self._child = await self._spawn()
            except (ProjectionProcessError, OSError) as e:
                self._down = f"{e}; restarting"
                log.error("%s", self._down)
                delay = min(delay * 2, self.restart_max_s)
                continue
            self.restarts += 1
            self._down = None
            delay = self.restart_min_s

    async def close(self) -> None:
        """Stop the service (it applies what it gathered and checkpoints the file)."""
        self._closing = True
        self._down = "the daemon is stopping"
        if self._supervise is not None:  # first: a restart under way ends with a child set
            self._supervise.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervise
        child, self._child = self._child, None
        if child is not None:
            await child.session.close()
            await _end(child.proc, self.stop_timeout_s)

    # --- requests -------------------------------------------------------------------------

    async def _call(
        self,
        method: str,
        path: str,
        *,
        body: bytes | None = None,
        params: Mapping[str, str] | None = None,
        timeout_s: float | None = READ_TIMEOUT_S,
    ) -> tuple[int, bytes]:
        """One request to the service: (status, body). Raises ApiError 503
        PROJECTION_UNAVAILABLE while it is down, or when it does not answer in time."""
        child = self._child
        if child is None:
            raise projection_unavailable(self._down or "the projection process is not running")
        timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=5)
        try:
            async with child.session.request(
                method, path, data=body, params=params, timeout=timeout
            ) as resp:
                return resp.status, await resp.read()
        except TimeoutError as e:
            raise projection_unavailable(
                f"the projection process did not answer within {timeout_s:g}s"
            ) from e
        except (aiohttp.ClientError, OSError) as e:
            raise projection_unavailable(f"the projection process did not answer: {e!r}") from e

    async def query(self, request: Mapping[str, Any]) -> Mapping[str, Any]:
        # No deadline of ours: the service holds each query to its own time limit.
        status, body = await self._call(
            "POST", "/query", body=msgspec.json.encode(request), timeout_s=None
        )
        if status != 200:
            raise _api_error(status, body)
        doc: dict[str, Any] = msgspec.json.decode(body)
        return doc

    async def tasks(self, params: Mapping[str, str]) -> Mapping[str, Any]:
        status, body = await self._call("GET", "/tasks", params=dict(params))
        if status != 200:
            raise _api_error(status, body)
        doc: dict[str, Any] = msgspec.json.decode(body)
        return doc

    async def task(self, task_id: str, wait_s: float = 0.0) -> Mapping[str, Any] | None:
        """The task's document; with `wait_s`, the service answers once the task has an
        outcome (right after the batch that applied it), or when `wait_s` passed."""
        params = {"wait": f"{wait_s:.3f}"} if wait_s > 0 else None
        status, body = await self._call(
            "GET", f"/tasks/{task_id}", params=params, timeout_s=READ_TIMEOUT_S + wait_s
        )
        if status == 404 and not body:
            return None
        if status != 200:
            raise _api_error(status, body)
        doc: dict[str, Any] = msgspec.json.decode(body)
        return doc

    async def projected(self, node_id: str, inventory_id: str) -> ProjectedState | None:
        status, body = await self._call(
            "GET", "/state", params={"node": node_id, "inventory": inventory_id}
        )
        if status == 204:
            return None
        if status != 200:
            raise _api_error(status, body)
        return msgspec.msgpack.decode(body, type=ProjectedState)

    async def check(self) -> Check:
        """The service's own `projection` check; not ok while it is down or restarting."""
        try:
            status, body = await self._call("GET", "/check")
        except ApiError as e:
            return Check(ok=False, reason=e.message)
        if status != 200:
            return Check(ok=False, reason=f"the projection process answered {status}")
        return msgspec.json.decode(body, type=Check)

    async def refresh_metrics(self) -> None:
        """Fetch the service's metrics for the scrape under way (none while it is down)."""
        try:
            status, body = await self._call("GET", "/metrics")
        except ApiError:
            status, body = 0, b""
        self._families = (
            list(text_string_to_metric_families(body.decode())) if status == 200 else []
        )


class _RemoteState:
    """`supervisor.reconcile.reconciler.StateSource` over the service."""

    def __init__(self, owner: ProjectionProcess) -> None:
        self.owner = owner

    async def load(self, node_id: str, inventory_id: str) -> ProjectedState | None:
        return await self.owner.projected(node_id, inventory_id)


class _Forwarded(Collector):
    """The service's metrics of the last scrape, in the daemon's registry."""

    def __init__(self, owner: ProjectionProcess) -> None:
        self.owner = owner

    def collect(self) -> Iterator[Metric]:
        yield from self.owner._families

    def describe(self) -> list[Metric]:
        return []  # no fixed names: nothing to check for duplicates at registration


def _api_error(status: int, body: bytes) -> ApiError:
    """The service's catalogue-shaped error, as the daemon raises it."""
    try:
        err = dict(msgspec.json.decode(body)["error"])
        type_, code, message = err.pop("type"), err.pop("code"), err.pop("message")
    except (msgspec.DecodeError, KeyError, TypeError):
        return projection_unavailable(f"the projection process answered {status}: {body[:200]!r}")
    return ApiError(status, type_, code, message, **err)


async def _end(proc: asyncio.subprocess.Process, timeout_s: float) -> None:
    """Close the service's stdin (its signal to stop), then kill it after `timeout_s`."""
    if proc.stdin is not None:
        proc.stdin.close()
    try:
        await asyncio.wait_for(proc.wait(), timeout_s)
    except TimeoutError:
        log.warning("the projection process did not stop within %gs; killing it", timeout_s)
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
