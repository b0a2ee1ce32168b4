"""The reconciler inside the daemon: `ReconcilerPart`, a `supervisor.daemon.extension.Part`.

`start` (before the daemon pulls any work): publishes a first `node.heartbeat`, starts the
node's command executor (`supervisor.reconcile.command_executor`), runs one reconcile pass, then schedules
passes every `reconcile.interval_s` and heartbeats every `reconcile.heartbeat_s` on an
APScheduler `AsyncIOScheduler` (coalescing missed runs, one pass at a time, a misfire
grace), and adds the `reconciler` readiness check. Teardown, in reverse: the scheduler
stops and a pass under way is cancelled, then the executor finishes the commands it holds.

A failed pass (the projection lagging, NATS or Docker unreachable) is logged and counted;
the next one starts afresh. Readiness turns false after `FAILED_PASSES_NOT_READY` failed
passes in a row; commands failing and being retried are listed in its details.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from datetime import UTC
from typing import Any

from apscheduler.schedulers.asyncio import AsyncIOScheduler

from schemas import NodeHeartbeat
from schemas.config import Config
from schemas.errors import SupervisorError
from schemas.http import Check
from supervisor.daemon.extension import DaemonContext
from supervisor.reconcile.command_executor import CommandExecutor, JetStreamCommands
from supervisor.reconcile.reconciler import PassReport, ReconcileMetrics, Reconciler, StateSource

log = logging.getLogger("supervisor.reconcile.reconciler")

FAILED_PASSES_NOT_READY = 3


class ReconcilerPart:
    """`ReconcilerPart(config, state=...)`: `state` reads the projection (in the daemon,
    `projections.serve.reconcile_state.DuckDBState` on the projection part's read cursors)."""

    name = "reconciler"

    def __init__(self, config: Config, *, state: StateSource, role: str = "serve") -> None:
        self.config = config
        self.settings = config.reconcile
        self.state = state
        self.role = role
        self.reconciler: Reconciler | None = None
        self.executor: CommandExecutor | None = None
        self.metrics: ReconcileMetrics | None = None
        self._ctx: DaemonContext | None = None
        self._scheduler: AsyncIOScheduler | None = None
        self._current: asyncio.Task[Any] | None = None
        self._last_pass_at: float | None = None

    async def start(self, ctx: DaemonContext, stack: contextlib.AsyncExitStack) -> None:
        """Raises CommandBusError when `SUP_COMMANDS` cannot be consumed."""
        node, cfg = ctx.node, self.settings
        self._ctx = ctx
        self.metrics = ReconcileMetrics(node.metrics.registry)
        self.heartbeat()
        self.executor = CommandExecutor(
            js=ctx.js,
            runtime=node.runtime,
            cleaner=node.executor.cleaner,
            emitter=node.emitter,
            data_dir=node.data_dir,
            config=cfg,
            metrics=node.metrics,
            reconcile_metrics=self.metrics,
            claim_kill=node.executor.claim_kill,
            claim_workspace=node.executor.claim_workspace,
            keyring=node.keyring,
        )
        await self.executor.start()
        stack.push_async_callback(self.executor.stop)
        self.reconciler = Reconciler(
            emitter=node.emitter,
            observer=node.runtime,
            state=self.state,
            bus=JetStreamCommands(ctx.js),
            data_dir=node.data_dir,
            config=cfg,
            metrics=self.metrics,
        )
        await self.run_pass()
        scheduler = AsyncIOScheduler(timezone=UTC)
        scheduler.add_job(
            self.run_pass,
            "interval",
            seconds=cfg.interval_s,
            id="reconcile",
            coalesce=True,
            max_instances=1,
            misfire_grace_time=max(int(cfg.misfire_grace_s), 1),
        )
        scheduler.add_job(
            self._heartbeat,
            "interval",
            seconds=cfg.heartbeat_s,
            id="heartbeat",
            coalesce=True,
            max_instances=1,
            misfire_grace_time=max(int(cfg.heartbeat_s), 1),
        )
        scheduler.start()
        self._scheduler = scheduler
        stack.push_async_callback(self._stop_scheduling)
        ctx.add_check("reconciler", self.check)
        log.info(
            "reconciler: a pass every %gs, heartbeats every %gs", cfg.interval_s, cfg.heartbeat_s
        )

    async def _heartbeat(self) -> None:
        # A coroutine: APScheduler runs plain functions in a thread, and the event log's
        # emit belongs to the loop.
        self.heartbeat()

    def heartbeat(self) -> None:
        assert self._ctx is not None
        cfg = self.settings
        self._ctx.node.emitter.emit(
            NodeHeartbeat,
            role=self.role,
            interval_s=cfg.heartbeat_s,
            timeout_s=cfg.heartbeat_timeout_s,
        )

    async def run_pass(self, *, dry_run: bool = False) -> PassReport | None:
        """One pass now; None when it failed (logged, counted, in the readiness check)."""
        assert self.reconciler is not None
        self._current = asyncio.current_task()
        try:
            report = await self.reconciler.run_pass(dry_run=dry_run)
        except SupervisorError as e:
            log.warning("reconcile pass failed: %s", e)
            return None
        except Exception:
            log.exception("reconcile pass crashed")
            return None
        finally:
            self._current = None
        self._last_pass_at = time.time()
        if report.decided:
            log.info(
                "reconcile: %d divergence(s) decided, %d command(s) issued",
                len(report.decided),
                report.issued,
            )
        return report

    async def _stop_scheduling(self) -> None:
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=False)
            self._scheduler = None
        current = self._current
        if current is not None and current is not asyncio.current_task():
            current.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await current

    async def check(self) -> Check:
        """The `reconciler` readiness check (see the module docstring)."""
        r, ex = self.reconciler, self.executor
        assert r is not None and ex is not None
        failing = [
            {
                "command_id": f.command_id,
                "action": f.action,
                "resource": f.resource,
                "deliveries": f.deliveries,
                "detail": f.detail,
            }
            for f in ex.failing.values()
        ]
        last = r.last
        details: dict[str, Any] = {
            "failed_passes_in_row": r.failures_in_row,
            "last_pass_at": self._last_pass_at,
            "divergences": len(last.planned) if last else None,
            "oldest_leak_s": round(last.oldest_leak_s, 3) if last else None,
            "failing_commands": failing,
        }
        if r.failures_in_row >= FAILED_PASSES_NOT_READY:
            return Check(
                ok=False,
                reason=f"the last {r.failures_in_row} reconcile passes failed: {r.last_error}",
                details=details,
            )
        reason = (
            f"last pass found {len(last.planned)} divergence(s)"
            if last
            else f"no pass completed yet ({r.last_error or 'starting'})"
        )
        if failing:
            reason += f"; {len(failing)} cleanup command(s) failing, retried with backoff"
        return Check(ok=True, reason=reason, details=details)
