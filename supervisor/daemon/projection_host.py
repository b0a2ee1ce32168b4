"""`supervisor serve --roles projection`: a host that serves the projection of the whole
fleet and its read API, and nothing else.

It runs the projection process (`supervisor.daemon.projection_process`) and the HTTP
endpoint: `GET /v1/tasks/{id}`, `POST /v1/query`, `GET /v1/errors`, `/metrics`,
`/healthz`, `/readyz`. It has no executor, no Docker engine and no outbox, and publishes
nothing, so the `reader` credential is all it needs: it only reads `SUP_EVENTS` (which
the nodes create). `POST /v1/tasks` answers 503 `ROLE_UNAVAILABLE`: submissions go to a
node.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from schemas import TaskSpec
from schemas.config import Config
from schemas.errors import ApiError
from schemas.http import Check, CheckFn
from supervisor.daemon.api import Submission, create_app
from supervisor.daemon.datadir import DataDirLock, publish
from supervisor.daemon.http_server import HttpServer, start_http
from supervisor.daemon.nats_target import nats_for
from supervisor.daemon.projection_process import ProjectionProcess
from supervisor.eventlog.emitter import new_id
from supervisor.eventlog.follow import follow_errors
from supervisor.eventlog.nats_auth import redact
from supervisor.eventlog.nats_server import url_file
from supervisor.observability.metrics import Metrics

log = logging.getLogger("supervisor.daemon")


@dataclass
class _Host:
    """The `ReadHost` of a projection-only host."""

    nats_url: str
    data_dir: Path
    registry: CollectorRegistry
    checks: dict[str, CheckFn] = field(default_factory=dict)
    scrape_hooks: list[Callable[[], Awaitable[None]]] = field(default_factory=list)

    def add_check(self, name: str, check: CheckFn) -> None:
        self.checks[name] = check

    def add_scrape_hook(self, hook: Callable[[], Awaitable[None]]) -> None:
        self.scrape_hooks.append(hook)


class _ReadApi:
    def __init__(self, projection: ProjectionProcess, nats_url: str) -> None:
        self.projection = projection
        self.nats_url = nats_url

    async def submit(self, spec: TaskSpec) -> Submission:
        raise ApiError(
            503,
            "infrastructure",
            "ROLE_UNAVAILABLE",
            "this host serves only the projection (serve --roles projection): submit to a node",
        )

    async def cancel(self, task_id: str) -> Mapping[str, Any]:
        raise ApiError(
            503,
            "infrastructure",
            "ROLE_UNAVAILABLE",
            "this host serves only the projection (serve --roles projection): cancel on a node",
        )

    async def task(self, task_id: str, wait_s: float = 0.0) -> Mapping[str, Any] | None:
        return await self.projection.task(task_id, wait_s)

    def errors(self, params: Mapping[str, str]) -> AsyncIterator[bytes]:
        return follow_errors(self.nats_url, params)

    async def query(self, request: Mapping[str, Any]) -> Mapping[str, Any]:
        return await self.projection.query(request)

    async def tasks(self, params: Mapping[str, str]) -> Mapping[str, Any]:
        return await self.projection.tasks(params)


class ProjectionHost:
    """`run(stop)` serves until `stop` is set; the data dir is locked as a daemon's is (it
    holds the projection's file)."""

    def __init__(self, config: Config, *, nats_url: str | None, token: str | None) -> None:
        self.config = config
        self.nats_url = nats_url
        self.token = token
        self.http: HttpServer | None = None

    async def run(self, stop: asyncio.Event) -> int:
        cfg = self.config
        data_dir = Path(cfg.data_dir).resolve()
        data_dir.mkdir(parents=True, exist_ok=True)
        lock = DataDirLock.acquire(data_dir, instance_id=new_id()[:16], node_id=cfg.node_id)
        try:
            async with (
                nats_for(self.nats_url or cfg.nats_target, data_dir) as url,
                contextlib.AsyncExitStack() as stack,
            ):
                metrics = Metrics()
                host = _Host(url, data_dir, metrics.registry)
                projection = ProjectionProcess(cfg)
                await projection.start(host, stack)
                started = asyncio.Event()

                async def started_check() -> Check:
                    ok = started.is_set()
                    return Check(ok=ok, reason="serving the projection" if ok else "starting")

                host.add_check("started", started_check)

                async def before_scrape() -> None:
                    await asyncio.gather(*(hook() for hook in host.scrape_hooks))

                app = create_app(
                    metrics=metrics,
                    readiness=host.checks,
                    handlers=_ReadApi(projection, url),
                    token=self.token,
                    check_timeout_s=cfg.http.check_timeout_s,
                    max_batch=cfg.http.max_batch,
                    on_scrape=before_scrape,
                )
                self.http = http = await start_http(stack, app, cfg.http.listen, data_dir)
                # As a daemon does: the commands run on this data dir find its NATS.
                publish(stack, url_file(data_dir), redact(url))
                started.set()
                log.info("serving the projection only (NATS %s, HTTP %s)", redact(url), http.url)
                await stop.wait()
                started.clear()
        finally:
            lock.release()
        return 0
