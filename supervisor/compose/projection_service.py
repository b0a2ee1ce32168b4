"""The daemon's projection in a process of its own: `python -m supervisor.compose.projection_service`.

`supervisor serve` starts it (`supervisor.daemon.projection_process.ProjectionProcess`) so that
DuckDB, Arrow and the projector's batches neither sit in the daemon's memory nor take
turns with its event loop on one GIL. It runs a `ProjectionPart` (follow `SUP_EVENTS`
into `<data_dir>/projection.duckdb`, the lag metrics, the readiness check) and answers the
daemon over HTTP on a loopback port, each request carrying a bearer token only the
daemon knows:

- `POST /query`: `/v1/query`'s body; the result, or the catalogue-shaped error;
- `GET /tasks/{task_id}[?wait=S]`: `/v1/tasks/{id}`'s document (404 when unknown); with
  `wait`, once the task has an outcome (right after the batch that applied it), or at S;
- `GET /tasks`: `/v1/tasks`'s page (the filters as query parameters);
- `GET /state?node=N&inventory=I`: the reconciler's `ProjectedState`, msgpack (204: none);
- `GET /check`: the `projection` readiness check, as JSON;
- `GET /metrics`: the projection's Prometheus metrics, text format.

The protocol on its standard streams: the daemon writes one JSON line (`Setup`) and keeps
stdin open (it starts the interpreter first thing and writes the line once its node is
open, so that the imports overlap its own start-up; stdin closed before any line ends the
service with 0); the service answers one JSON line `{"port": P, "seq": N}` on stdout once it
has caught up with the stream. It stops (the batch being gathered is applied, the file
checkpointed) on SIGTERM or when stdin closes, so it never outlives its daemon, even one
killed with SIGKILL. It ignores SIGINT: a Ctrl-C in the daemon's terminal reaches the
daemon, which stops its projection last. A file still held by a previous service that is
finishing (its daemon was killed a moment ago) is opened again until `open_timeout_s`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import duckdb
import msgspec
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest

from projections.errors import ProjectionStoreError, is_damage
from projections.serve.live import ProjectionPart
from projections.serve.reconcile_state import DuckDBState
from schemas.config import Config
from schemas.errors import SupervisorError
from supervisor.daemon.api import error_response, json_response, query_body
from supervisor.eventlog.nats_client import close_quietly, connect_nats
from supervisor.observability.logs import configure, exit_at_once

log = logging.getLogger("supervisor.compose.projection_service")

OPEN_RETRY_S = 0.2
MAX_WAIT_S = 300.0


class Setup(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The daemon's first line on the service's stdin."""

    config: Config
    nats_url: str
    token: str
    open_timeout_s: float = 30.0


class Ready(msgspec.Struct, kw_only=True):
    """The service's line on stdout once it serves: its loopback port and the watermark."""

    port: int
    seq: int


async def serve(setup: Setup, stop: asyncio.Event, announce: Callable[[Ready], None]) -> None:
    """Run the service until `stop` is set. Raises what opening the projection raises
    (ProjectionStoreError after `open_timeout_s`, StreamUnavailable, NatsUnavailable)."""
    cfg = setup.config
    data_dir = Path(cfg.data_dir)
    nc = await connect_nats(
        setup.nats_url, reconnect=True, timeout=setup.open_timeout_s, name="supervisor-projection"
    )
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(close_quietly, nc)
        registry = CollectorRegistry()
        part = ProjectionPart(cfg)
        await _open(part, setup, data_dir, nc.jetstream(), registry, stack)
        runner = web.AppRunner(
            _app(part, registry, setup.token),
            access_log=None,
            handle_signals=False,
            shutdown_timeout=5.0,
        )
        await runner.setup()
        stack.push_async_callback(runner.cleanup)
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        announce(Ready(port=int(runner.addresses[0][1]), seq=part.last_seq))
        await stop.wait()
        log.info("projection service stopping at seq %d", part.last_seq)


async def _open(
    part: ProjectionPart,
    setup: Setup,
    data_dir: Path,
    js: Any,
    registry: CollectorRegistry,
    stack: contextlib.AsyncExitStack,
) -> None:
    """`part.open`, again while the file is held (DuckDB's lock: an I/O error) by a
    service that is still closing, until `open_timeout_s`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + setup.open_timeout_s
    while True:
        try:
            await part.open(
                data_dir=data_dir, nats_url=setup.nats_url, js=js, registry=registry, stack=stack
            )
            return
        except ProjectionStoreError as e:
            busy = isinstance(e.__cause__, duckdb.IOException) and not is_damage(e)
            if not busy or loop.time() > deadline:
                raise
            log.info("projection file busy (%s); trying again", e.detail)
            await asyncio.sleep(OPEN_RETRY_S)


def _app(part: ProjectionPart, registry: CollectorRegistry, token: str) -> web.Application:
    expected = f"Bearer {token}".encode()
    state = DuckDBState(part.on_cursor)

    @web.middleware
    async def guard(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if not hmac.compare_digest(request.headers.get("Authorization", "").encode(), expected):
            return web.Response(status=401, text="unauthorized")
        try:
            return await handler(request)
        except SupervisorError as e:
            return error_response(e)

    async def query(request: web.Request) -> web.Response:
        return json_response(await part.query(await query_body(request)))

    async def task(request: web.Request) -> web.Response:
        try:
            wait_s = min(max(float(request.query.get("wait", "0")), 0.0), MAX_WAIT_S)
        except ValueError:
            wait_s = 0.0
        doc = await part.task(request.match_info["task_id"], wait_s)
        return web.Response(status=404) if doc is None else json_response(doc)

    async def tasks(request: web.Request) -> web.Response:
        return json_response(await part.tasks(dict(request.query)))

    async def projected(request: web.Request) -> web.Response:
        found = await state.load(request.query["node"], request.query["inventory"])
        if found is None:
            return web.Response(status=204)
        return web.Response(body=msgspec.msgpack.encode(found), content_type="application/msgpack")

    async def check(_: web.Request) -> web.Response:
        return json_response(await part.check())

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry), content_type="text/plain")

    app = web.Application(middlewares=[guard], client_max_size=1 << 20)
    app.router.add_post("/query", query)
    app.router.add_get("/tasks", tasks)
    app.router.add_get("/tasks/{task_id}", task)
    app.router.add_get("/state", projected)
    app.router.add_get("/check", check)
    app.router.add_get("/metrics", metrics)
    return app


STOP_WHILE_OPENING_S = 5.0
"""How long an opening interrupted by `stop` may take to wind down before the process exits."""


async def _main_async(setup: Setup) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    # stdin closing (the daemon gone, however it went) stops the service.
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    async def watch_stdin() -> None:
        while await reader.read(4096):
            pass
        stop.set()

    serving = asyncio.Event()

    def announce(ready: Ready) -> None:
        sys.stdout.buffer.write(msgspec.json.encode(ready) + b"\n")
        sys.stdout.flush()
        serving.set()

    watcher = asyncio.create_task(watch_stdin())
    service = asyncio.create_task(serve(setup, stop, announce))
    stopped = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait([service, stopped], return_when=asyncio.FIRST_COMPLETED)
        if not service.done() and not serving.is_set():
            # Stopped while opening (the daemon gone mid-start, the stream perhaps away):
            # opening may wait on NATS for a long time, and the service must never outlive
            # its daemon nor keep holding the file. Committed batches are safe in the file.
            log.info("projection service stopping while it opens")
            service.cancel()
            done, _ = await asyncio.wait([service], timeout=STOP_WHILE_OPENING_S)
            if not done:
                log.error("the projection did not close in %gs; exiting", STOP_WHILE_OPENING_S)
                sys.stderr.flush()
                os._exit(1)
        await asyncio.gather(service, return_exceptions=service.cancelled())
    finally:
        for task in (watcher, stopped):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    return 0


def main() -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    line = sys.stdin.buffer.readline()
    if not line:  # the daemon went before handing a setup (it failed to start): nothing to do
        return 0
    try:
        setup = msgspec.json.decode(line, type=Setup)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        print(f"projection service: bad setup line: {e}", file=sys.stderr)
        return 2
    configure(setup.config.node_id, setup.config.log_level)
    try:
        rc = asyncio.run(_main_async(setup))
    except SupervisorError as e:
        log.error("projection service failed: %s", e)
        return 1
    # Stopped cleanly: the file is checkpointed and closed, NATS closed, nothing is left
    # to run; its daemon's stop waits for this exit.
    exit_at_once(rc)


if __name__ == "__main__":
    sys.exit(main())
