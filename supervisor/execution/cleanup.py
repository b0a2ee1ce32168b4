"""Cleanup that always runs: kill if still running, force-remove with volumes, remove the
workspace. Each step is measured, counted and recorded as an event; a failed step is a
`cleanup.failed` naming what is left, and never replaces the task's own outcome."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path

from schemas import CleanupFailed, CleanupSucceeded
from schemas.errors import SupervisorError
from supervisor.docker.observe import DockerEventWatcher
from supervisor.docker.runtime import DockerRuntime
from supervisor.eventlog.emitter import Emitter
from supervisor.execution.workspace import remove_workspace
from supervisor.observability.metrics import Metrics


@dataclass
class CleanupReport:
    ok: bool = True
    # The container was gone before cleanup removed it: somebody else removed it.
    container_already_gone: bool = False


class Cleaner:
    def __init__(
        self,
        runtime: DockerRuntime,
        watcher: DockerEventWatcher | None,
        metrics: Metrics,
        *,
        kill_timeout_s: float = 10.0,
    ) -> None:
        self.runtime = runtime
        self.watcher = watcher
        self.metrics = metrics
        self.kill_timeout_s = kill_timeout_s

    async def clean(
        self,
        em: Emitter,
        container_id: str | None,
        workspace: Path | None,
        *,
        running: bool,
        gvisor: bool = True,
    ) -> CleanupReport:
        """Run every step that applies, each even if an earlier one failed. `gvisor=False`:
        the container is known to have run under another runtime (`DockerRuntime.remove`)."""
        report = CleanupReport()
        if container_id is not None:
            if running:
                ok, _ = await self._step(em, "kill", container_id, self._kill(container_id))
                report.ok &= ok
            ok, gone = await self._step(
                em,
                "remove_container",
                container_id,
                self.runtime.remove(container_id, gvisor=gvisor),
            )
            report.ok &= ok
            report.container_already_gone = gone
        if workspace is not None:
            ok, _ = await self._step(
                em,
                "remove_workspace",
                str(workspace),
                asyncio.to_thread(remove_workspace, workspace),
            )
            report.ok &= ok
        return report

    async def _kill(self, container_id: str) -> bool:
        if self.watcher is not None:
            self.watcher.expect_kill(container_id)
        killed = await asyncio.wait_for(self.runtime.kill(container_id), self.kill_timeout_s)
        return not killed

    async def _step(
        self, em: Emitter, step: str, resource: str, action: Awaitable[bool]
    ) -> tuple[bool, bool]:
        """(succeeded, the resource was already gone)."""
        self.metrics.cleanup_attempts.labels(step).inc()
        t0 = time.perf_counter()
        try:
            already_gone = bool(await action)
        except (SupervisorError, OSError, TimeoutError) as e:
            took = time.perf_counter() - t0
            self.metrics.cleanup_failures.labels(step).inc()
            self.metrics.cleanup_duration.labels(step).observe(took)
            em.emit(
                CleanupFailed,
                step=step,
                resource=resource,
                duration_s=took,
                reason=str(e) or type(e).__name__,
                error_class=getattr(e, "tag", type(e).__name__),
            )
            return False, False
        took = time.perf_counter() - t0
        self.metrics.cleanup_successes.labels(step).inc()
        self.metrics.cleanup_duration.labels(step).observe(took)
        em.emit(
            CleanupSucceeded,
            step=step,
            resource=resource,
            duration_s=took,
            already_gone=already_gone,
        )
        return True, already_gone
