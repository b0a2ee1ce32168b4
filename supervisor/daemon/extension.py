"""How parts outside the execution path join the daemon without `supervisor` importing them.

`supervisor serve` is composed in `supervisor/cli/main.py`: it builds the read side (the
projector and its query endpoint, in `projections`) and the reconciler, and hands them to
`Daemon` as `Part`s. The daemon starts each part after NATS, the streams, the executor,
the breaker and the monitor are up and before it pulls any work, in the order given; a
part registers its own teardown on the stack it is given, so shutdown runs in reverse.

A part that serves the HTTP API implements `ReadSide`; the daemon routes
`GET /v1/tasks/{id}` and `POST /v1/query` to it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from pathlib import Path

    from nats.aio.client import Client as NATS
    from nats.js import JetStreamContext
    from prometheus_client import CollectorRegistry

    from schemas.http import CheckFn
    from supervisor.daemon.monitor import ResourceMonitor
    from supervisor.daemon.node import Node
    from supervisor.docker.engine_breaker import DockerBreaker
    from supervisor.execution.task_loop import Scheduler

__all__ = ["DaemonContext", "Part", "ReadSide"]


@dataclass
class DaemonContext:
    """What a part may use: a `schemas.http.PartHost`, and more. `node` holds the config,
    data dir, emitter, event log, Docker runtime, executor and metrics; `nc`/`js` are the
    event log's NATS connection (it reconnects on its own); `add_check` adds a readiness
    check to `/readyz`, `add_scrape_hook` a refresh before each `/metrics`."""

    node: Node
    nc: NATS
    js: JetStreamContext
    breaker: DockerBreaker
    monitor: ResourceMonitor
    scheduler: Scheduler
    checks: dict[str, CheckFn] = field(default_factory=dict)
    scrape_hooks: list[Callable[[], Awaitable[None]]] = field(default_factory=list)

    @property
    def nats_url(self) -> str:
        return self.node.nats_url

    @property
    def data_dir(self) -> Path:
        return self.node.data_dir

    @property
    def registry(self) -> CollectorRegistry:
        return self.node.metrics.registry

    def add_check(self, name: str, check: CheckFn) -> None:
        self.checks[name] = check

    def add_scrape_hook(self, hook: Callable[[], Awaitable[None]]) -> None:
        """Await `hook` before each `/metrics` answer (to fetch metrics kept elsewhere)."""
        self.scrape_hooks.append(hook)


class Part(Protocol):
    """A component the daemon runs. `start` returns once the part is ready (e.g. the
    projection caught up, the first reconcile pass done) and pushes its teardown on
    `stack`. Raising from `start` aborts the daemon's start-up with that error."""

    name: str

    async def start(self, ctx: DaemonContext, stack: contextlib.AsyncExitStack) -> None: ...


@runtime_checkable
class Prepares(Protocol):
    """A part with slow work that needs nothing from the node (a child interpreter's
    imports): `prepare` begins it before the node opens, so that it overlaps the daemon's
    own start-up, and pushes on `stack` what undoes it should `start` never come."""

    async def prepare(self, stack: contextlib.AsyncExitStack) -> None: ...


class ReadSide(Protocol):
    """The `/v1` read API. Both may raise the project's exceptions (`schemas.errors`
    or the read side's own, recognised by their `tag`)."""

    async def task(self, task_id: str, wait_s: float = 0.0) -> Mapping[str, Any] | None:
        """The task's current state as JSON-able values; None when it is unknown. With
        `wait_s`, it may answer once the task has an outcome, or when `wait_s` passed."""
        ...

    async def query(self, request: Mapping[str, Any]) -> Mapping[str, Any]:
        """Run the read-only query described by the request body (`{"sql": ...}`)."""
        ...

    async def tasks(self, params: Mapping[str, str]) -> Mapping[str, Any]:
        """One page of tasks matching the filters in `params` (`GET /v1/tasks`)."""
        ...
