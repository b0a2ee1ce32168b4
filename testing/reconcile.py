"""A reconciler rig on a real dockerd and nats-server (tests only): a node, a live projector
following SUP_EVENTS into a DuckDB file, the reconciler and the node's command executor,
each node with an id of its own so that tests sharing the Docker engine never see each
other's containers. Histories of supervisors that "died" are written with their own
instance id and a clock in the past."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import docker.errors
import msgspec
from nats.js.client import JetStreamContext

from projections.serve.projector import Projector
from projections.serve.reconcile_state import DuckDBState, OnCursor, cursor_runner
from schemas import (
    AttemptStarted,
    ContainerCreated,
    ContainerStarted,
    NodeHeartbeat,
    SupervisorStarted,
    TaskSpec,
    TaskSubmitted,
    WorkspaceCreated,
)
from schemas.config import Config, ReconcileConfig
from supervisor.daemon.node import Node, open_node
from supervisor.eventlog.emitter import Emitter
from supervisor.eventlog.nats_client import ensure_streams
from supervisor.eventlog.streams import commands_stream_config
from supervisor.execution.workspace import create_workspace
from supervisor.reconcile.command_executor import CommandExecutor, JetStreamCommands
from supervisor.reconcile.reconciler import ReconcileMetrics, Reconciler
from testing.daemon import SANDBOX_IMAGE

FAST = {
    "creation_grace_s": 0.0,
    "lost_attempt_grace_s": 0.0,
    "command_backoff_s": 0.2,
    "command_backoff_max_s": 1.0,
    "heartbeat_timeout_s": 3.0,
}


def new_node_id() -> str:
    return f"rt{uuid.uuid4().hex[:10]}"


def labels(
    node_id: str,
    task_id: str,
    attempt: int = 1,
    instance: str = "boot-x",
    deadline: float | None = None,
    managed: bool = True,
) -> dict[str, str]:
    out = {
        "supervisor.node": node_id,
        "supervisor.task": task_id,
        "supervisor.attempt": str(attempt),
        "supervisor.instance": instance,
    }
    if managed:
        out["supervisor.managed"] = "true"
    if deadline is not None:
        out["supervisor.deadline"] = f"{deadline:.3f}"
    return out


@dataclass
class Rig:
    node: Node
    js: JetStreamContext
    projector: Projector
    on_cursor: OnCursor
    state: DuckDBState
    reconciler: Reconciler
    executor: CommandExecutor
    metrics: ReconcileMetrics
    docker: Any
    created: list[str] = field(default_factory=list)

    @property
    def node_id(self) -> str:
        return self.node.config.node_id

    def container(self, lbl: dict[str, str], *, running: bool = True) -> str:
        c = self.docker.containers.create(
            SANDBOX_IMAGE, ["sleep", "300"], labels=lbl, network_mode="none"
        )
        self.created.append(c.id)
        if running:
            c.start()
        return str(c.id)

    def exists(self, cid: str) -> bool:
        try:
            self.docker.api.inspect_container(cid)
        except docker.errors.NotFound:
            return False
        return True

    def remove_leftovers(self) -> None:
        for cid in self.created:
            with contextlib.suppress(docker.errors.NotFound):
                self.docker.api.remove_container(cid, force=True)

    def dead_instance(self, instance: str, seconds_ago: float = 120.0) -> Emitter:
        """An emitter of a serve instance that heartbeated `seconds_ago` and then died."""
        at = datetime.now(UTC) - timedelta(seconds=seconds_ago)
        em = Emitter(self.node.events, self.node_id, instance, clock=lambda: at)
        em.emit(SupervisorStarted, role="serve", pid=1)
        em.emit(NodeHeartbeat, interval_s=1.0, timeout_s=3.0)
        return em

    def running_attempt(
        self, em: Emitter, task_id: str, *, container: bool = True, deadline: float | None = None
    ) -> tuple[str | None, Path]:
        """History (and reality) of attempt 1 of `task_id` running under `em`'s instance:
        a workspace dir and, with `container`, a running container."""
        spec = TaskSpec(image=SANDBOX_IMAGE, command=["sleep", "300"], task_id=task_id)
        tem = em.for_task(task_id, f"corr-{task_id}")
        tem.emit(TaskSubmitted, spec=spec)
        aem = tem.for_attempt(1)
        aem.emit(AttemptStarted, max_attempts=3)
        path, _ = create_workspace(self.node.data_dir, task_id, 1, {"main.sh": b"sleep 300"})
        aem.emit(WorkspaceCreated, path=str(path), files=1)
        cid = None
        if container:
            lbl = labels(
                self.node_id,
                task_id,
                instance=em.instance_id,
                deadline=deadline or time.time() + 300,
            )
            cid = self.container(lbl)
            aem.emit(ContainerCreated, container_id=cid, image=SANDBOX_IMAGE, labels=lbl)
            aem.emit(ContainerStarted, container_id=cid)
        return cid, path

    async def query(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        rows: list[tuple[Any, ...]] = await self.on_cursor(
            lambda cur: cur.execute(sql, list(params)).fetchall()
        )
        return rows

    async def outcomes(self, ids: list[str], timeout: float = 30.0) -> dict[str, str]:
        """command id -> final outcome, once every one of `ids` has one."""
        deadline = time.monotonic() + timeout
        while True:
            rows = await self.query(
                "SELECT command_id, outcome FROM reconcile_outcomes WHERE final "
                "AND command_id IN (SELECT unnest($1::VARCHAR[]))",
                ids,
            )
            found = dict(rows)
            if len(found) == len(set(ids)) or time.monotonic() > deadline:
                return found
            await asyncio.sleep(0.1)


@contextlib.asynccontextmanager
async def rig(
    nats_url: str, tmp_dir: Path, docker_client: Any, *, background: bool = True, **reconcile: Any
) -> AsyncIterator[Rig]:
    rc = msgspec.structs.replace(ReconcileConfig(), **{**FAST, **reconcile})
    cfg = Config(node_id=new_node_id(), data_dir=str(tmp_dir / "data"), reconcile=rc)
    async with open_node(cfg, nats_url=nats_url, role="serve") as node:
        assert await node.events.wait_connected(10)
        js = node.events.js
        await ensure_streams(js, [commands_stream_config()], url=nats_url)
        projector = Projector(tmp_dir / "projection.duckdb", nats_url, batch_age_s=0.02)
        on_cursor, close = cursor_runner(projector.store.con)
        stop = asyncio.Event()
        follow = asyncio.create_task(projector.run(stop))
        metrics = ReconcileMetrics(node.metrics.registry)
        executor = CommandExecutor(
            js=js,
            runtime=node.runtime,
            cleaner=node.executor.cleaner,
            emitter=node.emitter,
            data_dir=node.data_dir,
            config=rc,
            metrics=node.metrics,
            reconcile_metrics=metrics,
        )
        state = DuckDBState(on_cursor)
        reconciler = Reconciler(
            emitter=node.emitter,
            observer=node.runtime,
            state=state,
            bus=JetStreamCommands(js),
            data_dir=node.data_dir,
            config=rc,
            metrics=metrics,
        )
        r = Rig(node, js, projector, on_cursor, state, reconciler, executor, metrics, docker_client)
        await executor.start(background=background)
        try:
            yield r
        finally:
            r.remove_leftovers()
            await executor.stop()
            stop.set()
            await follow
            close()
            projector.close()
