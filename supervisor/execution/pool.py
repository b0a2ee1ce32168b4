"""The warm pool: containers created and started ahead of demand, per shape, parked doing
nothing until an attempt adopts one (`supervisor.execution.attempt`). One container serves
exactly one task and is removed after it, as a cold one is. Every park, adoption and
retirement is an event (`pool.parked`, `pool.adopted`, `pool.retired`); a parked container
is the parking instance's until then, and the reconciler removes those a dead instance
left. The contract (shapes, the hand-off) is `schemas.spec`; `docs/running.md` the design.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import time
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from schemas import PoolParked, PoolRetired, TaskSpec
from schemas.config import Config
from schemas.errors import SupervisorError
from schemas.events import PoolRetireReason
from schemas.labels import parked_labels
from schemas.spec import WAITER, Shape, pool_shape
from supervisor.docker.observe import DockerEventWatcher
from supervisor.docker.runtime import ContainerRequest, DockerRuntime
from supervisor.eventlog.emitter import Emitter
from supervisor.execution.workspace import WORKSPACES, remove_workspace
from supervisor.observability.metrics import Metrics

__all__ = ["Parked", "WarmPool"]

log = logging.getLogger("supervisor.execution.pool")

_MAX_FAILURE_WAIT_S = 60.0
_PARKS_AT_ONCE = 2
_REFILL_AFTER_HIT_S = 0.15


@dataclass
class Parked:
    """One parked container: its id, its (empty) workspace dir, its shape and labels."""

    container_id: str
    workspace: Path
    shape: Shape
    labels: dict[str, str]
    parked_at: float = field(default_factory=time.monotonic)
    fork_log_dir: str | None = None
    """Under gVisor, where the Sentry's boot log (the evidence of refused forks) is."""

    @property
    def key(self) -> str:
        return self.shape.key()

    def age_s(self) -> float:
        return time.monotonic() - self.parked_at


@dataclass
class _ShapeState:
    shape: Shape
    configured: bool
    last_used: float = field(default_factory=time.monotonic)
    failures: int = 0
    retry_at: float = 0.0
    parking: int = 0


class WarmPool:
    """Keeps `[pool] size` containers parked per shape (configured and learnt ones).

    `take(spec)` hands a parked container of the spec's shape to an attempt (None: start
    cold), and wakes the refill; the attempt gives back one it could not adopt with
    `discard`. `start` runs the refill loop; `close` stops it and retires every parked
    container (`pool.retired{shutdown}`). A park that fails backs its shape off
    (exponentially, at most a minute); a parked container that died or vanished is retired
    as `vanished` and never handed out. Asks `gate` (the breaker) before parking: a pool
    never adds load to an engine the breaker has given up on, nor while tasks wait for a
    slot (`busy`): they start cold as slots free, and a park would take the engine from them."""

    def __init__(
        self,
        runtime: DockerRuntime,
        emitter: Emitter,
        config: Config,
        metrics: Metrics,
        *,
        data_dir: Path,
        watcher: DockerEventWatcher | None = None,
        gate: Callable[[], None] | None = None,
        busy: Callable[[], bool] | None = None,
    ) -> None:
        self.runtime = runtime
        self.emitter = emitter
        self.config = config
        self.cfg = config.pool
        self.metrics = metrics
        self.data_dir = data_dir
        self.watcher = watcher
        self.gate = gate
        self.busy = busy or (lambda: False)
        self._shapes: dict[str, _ShapeState] = {}
        self._parked: dict[str, deque[Parked]] = {}
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._work: set[asyncio.Task[None]] = set()
        self._closing = False
        for s in self.cfg.shapes:
            self.keep(s)

    @property
    def enabled(self) -> bool:
        return self.cfg.size > 0

    def parked(self) -> dict[str, int]:
        """Parked containers by shape key."""
        return {k: len(q) for k, q in self._parked.items() if q}

    def shapes(self) -> list[str]:
        return sorted(self._shapes)

    def owns(self, container_id: str) -> bool:
        """Whether `container_id` is parked here now (no command may touch it)."""
        return any(p.container_id == container_id for q in self._parked.values() for p in q)

    def keep(self, shape: Shape) -> None:
        """Keep `shape` warm from now on, as if it were configured."""
        if shape.runtime is None:
            shape = msgspec.structs.replace(shape, runtime=self.config.sandbox.runtime)
        st = self._shapes.get(shape.key())
        if st is None:
            self._shapes[shape.key()] = _ShapeState(shape, configured=True)
        else:
            st.configured = True
        self._wake.set()

    def owns_workspace(self, path: str) -> bool:
        """Whether `path` is the workspace of a container parked here now."""
        return any(str(p.workspace) == path for q in self._parked.values() for p in q)

    # --- adoption ------------------------------------------------------------------------

    def take(self, spec: TaskSpec) -> Parked | None:
        """A parked container for `spec`, removed from the pool; None: start cold (the miss
        is counted by why, and a learnt shape starts being kept warm)."""
        if not self.enabled or self._closing:
            return None
        shape = pool_shape(spec, self.config.sandbox.runtime)
        if shape is None:
            self.metrics.pool_misses.labels("unfit").inc()
            return None
        key = shape.key()
        st = self._shapes.get(key)
        if st is None:
            if self.cfg.learn and len(self._shapes) < self.cfg.max_shapes:
                self._shapes[key] = _ShapeState(shape, configured=False)
                self._wake.set()
            self.metrics.pool_misses.labels("cold_shape").inc()
            return None
        st.last_used = time.monotonic()
        queue = self._parked.get(key)
        while queue:
            p = queue.popleft()
            self._gauge(key)
            if self._dead(p.container_id):
                self._spawn(self._retire(p, "vanished"))
                continue
            self.metrics.pool_hits.labels(key).inc()
            st.failures = 0
            # Refill a moment later: making a container now would compete with this one's
            # hand-off for the engine and the CPU.
            asyncio.get_running_loop().call_later(_REFILL_AFTER_HIT_S, self._wake.set)
            return p
        self._wake.set()
        self.metrics.pool_misses.labels("empty").inc()
        return None

    def discard(self, p: Parked, reason: PoolRetireReason) -> None:
        """An attempt could not adopt `p` (it vanished meanwhile): retire it."""
        self.metrics.pool_misses.labels("failed").inc()
        self._spawn(self._retire(p, reason))

    # --- the refill loop -----------------------------------------------------------------

    def start(self) -> None:
        if self.enabled and self._loop_task is None:
            self._loop_task = asyncio.ensure_future(self._run())

    async def close(self) -> None:
        """Stop refilling, wait for parks in flight, retire every parked container."""
        self._closing = True
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        while self._work:
            await asyncio.gather(*self._work, return_exceptions=True)
        parked = [p for q in self._parked.values() for p in q]
        self._parked.clear()
        await asyncio.gather(*(self._retire(p, "shutdown") for p in parked))
        for key in list(self._shapes):
            self._gauge(key)

    async def _run(self) -> None:
        while True:
            try:
                await self._tick()
            except Exception:  # the loop must outlive any one failure
                log.exception("warm pool: the refill failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.cfg.refill_interval_s)
            self._wake.clear()

    async def _tick(self) -> None:
        now = time.monotonic()
        for key, st in list(self._shapes.items()):
            queue = self._parked.setdefault(key, deque())
            for p in list(queue):
                reason: PoolRetireReason | None = None
                if self._dead(p.container_id):
                    reason = "vanished"
                elif p.age_s() > self.cfg.max_age_s:
                    reason = "aged"
                if reason is not None:
                    queue.remove(p)
                    self._spawn(self._retire(p, reason))
                if reason == "vanished":  # one that dies idle (no /bin/sh?) backs its shape off
                    self._backoff(st)
            if not st.configured and now - st.last_used > self.cfg.idle_s:
                del self._shapes[key]
                for p in self._parked.pop(key, deque()):
                    self._spawn(self._retire(p, "idle"))
                self._gauge(key)
                continue
            want = self.cfg.size - len(queue) - st.parking
            if want <= 0 or now < st.retry_at or self.busy():
                continue  # (tasks waiting for a slot start cold: a park would slow them)
            if self.gate is not None:
                try:
                    self.gate()
                except SupervisorError:
                    return
            for _ in range(min(want, _PARKS_AT_ONCE)):
                st.parking += 1
                self._spawn(self._park(key, st))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._work.add(task)
        task.add_done_callback(self._work.discard)

    def _dead(self, container_id: str) -> bool:
        if self.watcher is None:
            return False
        act = self.watcher.activity(container_id)
        return act.died.is_set() or any(a in ("kill", "stop") for a, _ in act.actions)

    @staticmethod
    def _backoff(st: _ShapeState) -> None:
        """A park that failed, or a parked container that died idle: the shape waits
        2, 4, 8... seconds (at most a minute) before the next; an adoption resets it."""
        st.failures += 1
        st.retry_at = time.monotonic() + min(2.0**st.failures, _MAX_FAILURE_WAIT_S)

    def _gauge(self, key: str) -> None:
        self.metrics.pool_parked.labels(key).set(len(self._parked.get(key, ())))

    async def _park(self, key: str, st: _ShapeState) -> None:
        t0 = time.monotonic()
        shape = st.shape
        sb = self.config.sandbox
        cid: str | None = None
        ws: Path | None = None
        try:
            ws = await asyncio.to_thread(_make_workspace, self.data_dir)
            labels = parked_labels(
                node_id=self.emitter.node_id,
                instance_id=self.emitter.instance_id,
                workspace=str(ws),
                shape=key,
            )
            req = ContainerRequest(
                image=shape.image,
                command=["/bin/sh", "-c", WAITER],
                labels=labels,
                env={},
                workspace=str(ws),
                workspace_mount=sb.workspace_mount,
                user=sb.user,
                memory_mb=shape.memory_mb,
                cpus=shape.cpus,
                pids=shape.pids,
                tmpfs_size=sb.tmpfs_size,
                stdin=True,
            )
            req.runtime = await self.runtime.runtime_info(shape.runtime or sb.runtime)
            cid = await self.runtime.create(req)
            await self.runtime.start(cid)
        except (SupervisorError, OSError) as e:
            self._backoff(st)
            log.warning("warm pool: cannot park a container of %s: %s", key, e)
            if cid is not None and ws is not None:
                self.emitter.emit(
                    PoolParked,
                    container_id=cid,
                    workspace=str(ws),
                    shape=key,
                    image=shape.image,
                    duration_s=time.monotonic() - t0,
                )
                logs = req.runtime.fork_log_dir if req.runtime is not None else None
                await self._retire(Parked(cid, ws, shape, {}, fork_log_dir=logs), "failed")
            elif ws is not None:
                with contextlib.suppress(OSError):
                    await asyncio.to_thread(remove_workspace, ws)
            return
        finally:
            st.parking -= 1
        took = time.monotonic() - t0
        self.metrics.pool_park_duration.observe(took)
        self.emitter.emit(
            PoolParked,
            container_id=cid,
            workspace=str(ws),
            shape=key,
            image=shape.image,
            duration_s=took,
        )
        p = Parked(cid, ws, shape, labels, fork_log_dir=req.runtime.fork_log_dir)
        if self._closing or key not in self._shapes:
            await self._retire(p, "shutdown" if self._closing else "idle")
            return
        self._parked.setdefault(key, deque()).append(p)
        self._gauge(key)

    async def _retire(self, p: Parked, reason: PoolRetireReason) -> None:
        """Remove a container that no task adopted, and its workspace; recorded as
        `pool.retired` (with `removed` false and the error when the removal failed: a leak
        the reconciler removes once this instance is gone)."""
        error: str | None = None
        if self.watcher is not None:
            self.watcher.expect_kill(p.container_id)
        try:
            await self.runtime.remove(p.container_id, gvisor=p.fork_log_dir is not None)
        except SupervisorError as e:
            error = str(e) or type(e).__name__
        with contextlib.suppress(OSError):
            await asyncio.to_thread(remove_workspace, p.workspace)
        self.emitter.emit(
            PoolRetired,
            container_id=p.container_id,
            workspace=str(p.workspace),
            shape=p.key,
            reason=reason,
            removed=error is None,
            error=error,
        )
        self.metrics.pool_retired.labels(reason).inc()
        if self.watcher is not None:
            self.watcher.forget(p.container_id)


def _make_workspace(root: Path) -> Path:
    """An empty workspace dir for a parked container: `pool-<random>` under the workspaces
    root (no task in its name: the adopting attempt records it as its own)."""
    base = root / WORKSPACES
    base.mkdir(parents=True, exist_ok=True)
    path = base / f"pool-{secrets.token_hex(8)}"
    path.mkdir(mode=0o755)
    os.chmod(path, 0o755)
    return path
