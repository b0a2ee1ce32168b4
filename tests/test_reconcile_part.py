"""`ReconcilerPart` as the daemon starts it (a `DaemonContext` and an exit stack), against a
real dockerd and nats-server: the start-up pass, passes on the APScheduler interval,
heartbeats, the readiness check and the metrics, and a clean teardown."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from prometheus_client import generate_latest

from projections.serve.projector import Projector
from projections.serve.reconcile_state import DuckDBState, cursor_runner
from schemas.config import Config, ReconcileConfig
from schemas.errors import ProjectionLagging
from schemas.projected import ProjectedState
from supervisor.daemon.extension import DaemonContext
from supervisor.daemon.node import Node, open_node
from supervisor.eventlog.nats_client import ensure_streams
from supervisor.eventlog.streams import commands_stream_config
from supervisor.reconcile.part import ReconcilerPart
from testing.reconcile import FAST, SANDBOX_IMAGE, labels, new_node_id

pytestmark = [pytest.mark.docker, pytest.mark.nats]


@contextlib.asynccontextmanager
async def daemon_context(
    nats_url: str, tmp_dir: Path, **reconcile: Any
) -> AsyncIterator[tuple[Node, DaemonContext, DuckDBState]]:
    rc = msgspec.structs.replace(ReconcileConfig(), **{**FAST, **reconcile})
    cfg = Config(node_id=new_node_id(), data_dir=str(tmp_dir / "data"), reconcile=rc)
    async with open_node(cfg, nats_url=nats_url, role="serve") as node:
        assert await node.events.wait_connected(10)
        await ensure_streams(node.events.js, [commands_stream_config()], url=nats_url)
        projector = Projector(tmp_dir / "projection.duckdb", nats_url, batch_age_s=0.02)
        on_cursor, close = cursor_runner(projector.store.con)
        stop = asyncio.Event()
        follow = asyncio.create_task(projector.run(stop))
        ctx = DaemonContext(
            node=node,
            nc=node.events.nc,
            js=node.events.js,
            breaker=None,  # type: ignore[arg-type]
            monitor=None,  # type: ignore[arg-type]
            scheduler=None,  # type: ignore[arg-type]
        )  # type: ignore[arg-type]
        try:
            yield node, ctx, DuckDBState(on_cursor)
        finally:
            stop.set()
            await follow
            close()
            projector.close()


async def _until(cond: Any, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await asyncio.to_thread(cond):
            return True
        await asyncio.sleep(0.1)
    return False


async def test_the_part_reconciles_at_start_up_then_on_its_interval(
    nats_url: str, tmp_dir: Path, docker_client
) -> None:  # type: ignore[no-untyped-def]
    created: list[str] = []

    def leak(task_id: str, node_id: str) -> str:
        c = docker_client.containers.create(
            SANDBOX_IMAGE, ["sleep", "300"], labels=labels(node_id, task_id), network_mode="none"
        )
        created.append(c.id)
        c.start()
        return str(c.id)

    def gone(cid: str) -> bool:
        # The raw list: containers.list() inspects each hit and 404s if it goes meanwhile.
        return docker_client.api.containers(all=True, filters={"id": cid}) == []

    try:
        async with daemon_context(nats_url, tmp_dir, interval_s=0.5, heartbeat_s=0.2) as (
            node,
            ctx,
            state,
        ):
            before = leak("t-before", node.config.node_id)
            part = ReconcilerPart(node.config, state=state)
            async with contextlib.AsyncExitStack() as stack:
                started = time.monotonic()
                await part.start(ctx, stack)
                start_up = part.reconciler.last if part.reconciler else None
                assert await _until(lambda: gone(before))
                after = leak("t-after", node.config.node_id)
                t0 = time.monotonic()
                assert await _until(lambda: gone(after))
                took = time.monotonic() - t0
                check = await ctx.checks["reconciler"]()
                metrics = generate_latest(node.metrics.registry).decode()
                await asyncio.sleep(0.5)
            heartbeats = await state.on_cursor(
                lambda cur: cur.execute(
                    "SELECT heartbeats FROM instances WHERE instance_id = $1", [node.instance_id]
                ).fetchall()
            )
            assert part._scheduler is None  # shut down with the stack
    finally:
        for cid in created:
            with contextlib.suppress(Exception):
                docker_client.api.remove_container(cid, force=True)

    assert start_up is not None and [p.divergence.resource for p in start_up.planned] == [before]
    assert took < 10.0, took  # a pass every 0.5 s, then the command (a busy host: slack)
    assert check.ok and check.details["failing_commands"] == []
    assert check.details["failed_passes_in_row"] == 0
    assert 'supervisor_reconcile_passes_total{outcome="ok"}' in metrics
    assert 'supervisor_reconcile_commands_issued_total{action="remove_container"} 2.0' in metrics
    assert "supervisor_reconcile_oldest_leak_seconds" in metrics
    elapsed = time.monotonic() - started
    assert heartbeats and heartbeats[0][0] >= 3, (heartbeats, elapsed)


class _Lagging:
    async def load(self, node_id: str, inventory_id: str) -> ProjectedState | None:
        raise ProjectionLagging(inventory_id, 0.0)


async def test_readiness_fails_after_three_failed_passes_and_says_why(
    nats_url: str, tmp_dir: Path
) -> None:
    async with daemon_context(nats_url, tmp_dir, interval_s=3600) as (node, ctx, _):
        part = ReconcilerPart(node.config, state=_Lagging())
        async with contextlib.AsyncExitStack() as stack:
            await part.start(ctx, stack)  # the start-up pass fails; start-up goes on
            first = await ctx.checks["reconciler"]()
            assert await part.run_pass() is None
            assert await part.run_pass() is None
            third = await ctx.checks["reconciler"]()

    assert first.ok and first.reason.startswith("no pass completed yet (ProjectionLagging")
    assert not third.ok
    assert third.reason.startswith("the last 3 reconcile passes failed: ProjectionLagging")
