"""One attempt of a task, from its workspace to its cleanup.

A workspace with the spec's files, a container with the design's labels and hardening, the
output streamed under a per-stream cap, the deadline and the CPU-time limit enforced by the
supervisor itself, the evidence read before removal and classified, and cleanup that always
runs — even when the attempt is cancelled or an adapter raises. Every step is an event.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Container
from pathlib import Path
from typing import Any, TypeVar

from schemas import (
    AttemptFinished,
    AttemptStarted,
    ContainerCreated,
    ContainerExited,
    ContainerStarted,
    Evidence,
    KillIssued,
    PoolAdopted,
    TaskSpec,
    WorkspaceCreated,
)
from schemas.config import Config
from schemas.errors import (
    ContainerVanished,
    DockerError,
    InternalError,
    SupervisorError,
)
from schemas.labels import container_labels
from schemas.spec import handoff
from supervisor.docker.gvisor import boot_logs, take_refused_forks
from supervisor.docker.internals import close_socket, stdin_socket
from supervisor.docker.observe import CgroupSampler, DockerEventWatcher
from supervisor.docker.runtime import (
    ContainerRequest,
    DockerRuntime,
    read_output,
    write_stdin,
)
from supervisor.eventlog.emitter import Emitter
from supervisor.eventlog.outcomes import emit_error
from supervisor.execution.cleanup import Cleaner, CleanupReport
from supervisor.execution.pool import Parked, WarmPool
from supervisor.execution.removals import RemovalGate
from supervisor.execution.state import AttemptOutcome, AttemptState, LiveAttempt
from supervisor.execution.workspace import create_workspace, fill_workspace
from supervisor.observability.metrics import Metrics
from supervisor.policy.classify import classify

T = TypeVar("T")

_IO_DRAIN_S = 5.0
_DIED_EVENT_WAIT_S = 1.0
_DESTROY_EVENT_WAIT_S = 0.5
_FORK_LOG_CHECK_S = 0.5


log = logging.getLogger("supervisor.execution.attempt")


class AttemptRunner:
    """Runs attempts (`run`) and knows the containers of those running now (`live`)."""

    def __init__(
        self,
        runtime: DockerRuntime,
        config: Config,
        metrics: Metrics,
        cleaner: Cleaner,
        *,
        watcher: DockerEventWatcher | None,
        sampler: CgroupSampler,
        data_dir: Path,
        cancelled: Container[str],
    ) -> None:
        self.runtime = runtime
        self.config = config
        self.metrics = metrics
        self.cleaner = cleaner
        self.watcher = watcher
        self.sampler = sampler
        self.data_dir = data_dir
        # The tasks whose cancellation was asked (the executor's): a container created for
        # one of them is killed as soon as it exists.
        self.cancelled = cancelled
        # The containers of the attempts this instance runs now, by container id.
        self.live: dict[str, LiveAttempt] = {}
        # The workspaces of the attempts this instance runs now (from their creation to
        # their removal), so that no command removes one under a running attempt.
        self.workspaces: set[str] = set()
        # The warm pool (set by the daemon): an attempt adopts a parked container of its
        # shape when there is one, and starts cold otherwise.
        self.pool: WarmPool | None = None
        # The removals that follow their attempt's outcome (`_defer_cleanup`), and what
        # makes them wait while tasks wait for a slot (the scheduler gives it its backlog).
        self.deferred: set[asyncio.Task[CleanupReport]] = set()
        self.removals = RemovalGate.configured(config, metrics)
        # When the last adoption began and the last container exited (perf_counter): what
        # `bench/bench_pool.py` reads as a pool hit's adopt-to-exit time.
        self.last_adopt_at = 0.0
        self.last_exit_at = 0.0

    async def kill_cancelled(self, container_id: str) -> None:
        """Kill a live attempt's container for its task's cancellation, the kill recorded
        as the attempt's own `kill_issued{cancelled}`."""
        live = self.live.get(container_id)
        if live is None or "cancelled" in live.st.kills:
            return
        live.st.kills.append("cancelled")
        live.em.emit(KillIssued, container_id=container_id, reason="cancelled")
        if self.watcher is not None:
            self.watcher.expect_kill(container_id)
        with contextlib.suppress(SupervisorError):
            await self.runtime.kill(container_id)

    async def run(self, em: Emitter, spec: TaskSpec, task_id: str, attempt: int) -> AttemptOutcome:
        """Run attempt `attempt` from `attempt.started` to `attempt.finished` and return its
        classified outcome. Cleanup has run whatever happened; a cancellation received
        meanwhile is re-raised once the attempt is closed."""
        em.emit(AttemptStarted, max_attempts=spec.retry.max_attempts)
        started = time.monotonic()
        st = AttemptState()
        try:
            await self._execute(em, spec, task_id, attempt, st)
        except ContainerVanished:
            st.removed_out_of_band = True
        except SupervisorError as e:
            st.adapter_error = e
        except asyncio.CancelledError:
            st.cancelled = True
        except Exception as e:  # a bug or a host refusal: classified now, never a lost attempt
            log.exception("attempt %d of %s: unexpected error", attempt, task_id)
            st.adapter_error = InternalError("attempt", e)
        # Run to completion, even when cancelled meanwhile (the cancellation is re-raised
        # once the attempt is closed): a removal left for later must not be lost.
        deferred, cancelled = await _settled(self._after(em, st))
        st.cancelled = st.cancelled or cancelled
        evidence = self._evidence(st)
        c = classify(evidence)
        if c is not None:
            emit_error(em, c, container_id=st.container_id, evidence=evidence)
            self.metrics.errors.labels(c.type, c.code).inc()
        duration = time.monotonic() - started
        em.emit(
            AttemptFinished,
            outcome="failed" if c else "succeeded",
            exit_code=st.exit_code,
            error_type=c.type if c else None,
            error_code=c.code if c else None,
            duration_s=duration,
            evidence=evidence,
        )
        self.metrics.attempts.labels("failed" if c else "succeeded").inc()
        log.info(
            "attempt %d %s%s",
            attempt,
            "failed" if c else "succeeded",
            f": {c.type}/{c.code}" if c else "",
            extra={
                "task_id": task_id,
                "attempt": attempt,
                "correlation_id": em.correlation_id,
                "exit_code": st.exit_code,
                "duration_s": round(duration, 3),
            },
        )
        if deferred:
            self._defer_cleanup(em, st)
        if st.cancelled:
            raise asyncio.CancelledError
        return AttemptOutcome(
            c,
            evidence,
            st.exit_code,
            st.output,
            st.container_id,
            duration,
            cpu_time_s=_seconds(st.cpu_time_ns),
            peak_memory_bytes=st.peak_memory_bytes,
        )

    async def _execute(
        self, em: Emitter, spec: TaskSpec, task_id: str, attempt: int, st: AttemptState
    ) -> None:
        rt = self.runtime
        parked = self.pool.take(spec) if self.pool is not None else None
        if parked is not None and await self._adopt(em, spec, task_id, attempt, st, parked):
            return
        # Creating steps run to completion even when the attempt is cancelled meanwhile, so
        # what they made is known to cleanup instead of leaking (a workspace, a container,
        # an open socket).
        (st.workspace, nbytes), cancelled = await _settled(
            asyncio.to_thread(
                create_workspace,
                self.data_dir,
                task_id,
                attempt,
                spec.file_bytes(),
                frozenset(spec.executables or ()),
            )
        )
        if cancelled:
            raise asyncio.CancelledError
        self.workspaces.add(str(st.workspace))
        files = len(spec.files) + len(spec.files_base64)
        em.emit(WorkspaceCreated, path=str(st.workspace), files=files, bytes=nbytes)
        deadline = time.time() + spec.limits.timeout_s
        labels = container_labels(
            node_id=em.node_id,
            instance_id=em.instance_id,
            task_id=task_id,
            attempt=attempt,
            deadline=deadline,
            workspace=str(st.workspace),
        )
        sb = self.config.sandbox
        stdin = spec.stdin_bytes()
        req = ContainerRequest(
            image=spec.image,
            command=spec.command,
            labels=labels,
            env={**spec.env, "SUPERVISOR_TASK_ID": task_id, "SUPERVISOR_ATTEMPT": str(attempt)},
            workspace=str(st.workspace),
            workspace_mount=sb.workspace_mount,
            user=sb.user,
            memory_mb=spec.limits.memory_mb,
            cpus=spec.limits.cpus,
            pids=spec.limits.pids,
            tmpfs_size=sb.tmpfs_size,
            network=spec.network,
            privileged=spec.privileged,
            cap_add=spec.cap_add,
            mounts=spec.mounts,
            stdin=stdin is not None,
            runtime=await rt.runtime_info(spec.runtime or sb.runtime),
        )
        st.fork_log_dir = req.runtime.fork_log_dir if req.runtime is not None else None
        st.argv_newlines = sum(a.count("\n") for a in spec.command)
        cid, cancelled = await _settled(rt.create(req))
        st.container_id = cid
        self.live[cid] = LiveAttempt(em, st, deadline)
        em.emit(
            ContainerCreated, container_id=cid, image=spec.image, labels=labels, deadline=deadline
        )
        if task_id in self.cancelled:  # asked while it was being created
            await self.kill_cancelled(cid)
        if cancelled:
            raise asyncio.CancelledError
        stream, cancelled = await _settled(rt.attach(cid, stdin=stdin is not None))
        try:
            if cancelled:
                raise asyncio.CancelledError
            self._track(em, cid, spec, st)
            _, cancelled = await _settled(rt.start(cid))
            self.sampler.sample(cid)
            if cancelled:
                # It runs: record it so, and cleanup kills it as cancelled.
                st.running = True
                em.emit(ContainerStarted, container_id=cid)
                raise asyncio.CancelledError
        except BaseException:
            close_socket(stream)  # not yet handed to the reader, which would close it
            raise
        st.running = True
        if stdin is not None:
            st.stdin_writer = rt.run_blocking(write_stdin, stdin_socket(stream), stdin)
        await self._started(em, spec, cid, stream, st)

    async def _adopt(
        self, em: Emitter, spec: TaskSpec, task_id: str, attempt: int, st: AttemptState, p: Parked
    ) -> bool:
        """Run the attempt in the parked container `p`: the spec's files into its workspace,
        its output attached, then the hand-off (`schemas.spec.handoff`) and the spec's
        stdin written to it. False when `p` cannot be adopted (it vanished meanwhile): it
        is given back to the pool to retire, and the attempt starts cold."""
        assert self.pool is not None
        t0 = time.monotonic()
        self.last_adopt_at = time.perf_counter()
        rt, cid = self.runtime, p.container_id
        try:
            nbytes, cancelled = await _settled(
                asyncio.to_thread(
                    fill_workspace,
                    p.workspace,
                    spec.file_bytes(),
                    frozenset(spec.executables or ()),
                )
            )
            stream, attached_cancel = await _settled(rt.attach(cid, stdin=True))
        except (DockerError, OSError):
            self.pool.discard(p, "vanished")
            return False
        if cancelled or attached_cancel:
            close_socket(stream)
            self.pool.discard(p, "shutdown")
            raise asyncio.CancelledError
        st.workspace, st.container_id, st.token = p.workspace, cid, secrets.token_hex(16)
        st.fork_log_dir = p.fork_log_dir
        self.workspaces.add(str(p.workspace))
        em.emit(
            PoolAdopted,
            container_id=cid,
            workspace=str(p.workspace),
            shape=p.key,
            parked_s=p.age_s(),
        )
        files = len(spec.files) + len(spec.files_base64)
        em.emit(WorkspaceCreated, path=str(p.workspace), files=files, bytes=nbytes)
        deadline = time.time() + spec.limits.timeout_s
        self.live[cid] = LiveAttempt(em, st, deadline)
        em.emit(
            ContainerCreated,
            container_id=cid,
            image=spec.image,
            labels=p.labels,
            deadline=deadline,
            adopted=True,
        )
        try:
            self._track(em, cid, spec, st)
            env = {**spec.env, "SUPERVISOR_TASK_ID": task_id, "SUPERVISOR_ATTEMPT": str(attempt)}
            data = handoff(st.token, env, spec.command) + (spec.stdin_bytes() or b"")
            st.stdin_writer = rt.run_blocking(write_stdin, stdin_socket(stream), data)
        except BaseException:
            close_socket(stream)
            raise
        self.sampler.sample(cid)
        st.running = True
        self.metrics.pool_adopt_duration.observe(time.monotonic() - t0)
        if task_id in self.cancelled:  # asked while it was being adopted
            await self.kill_cancelled(cid)
        await self._started(em, spec, cid, stream, st)
        return True

    async def _started(
        self, em: Emitter, spec: TaskSpec, cid: str, stream: Any, st: AttemptState
    ) -> None:
        """The container runs the task (started cold, or handed the task when adopted):
        recorded, counted, supervised to its end."""
        self.metrics.running.inc()
        try:
            em.emit(ContainerStarted, container_id=cid)
            await self._supervise(em, spec, cid, stream, st)
        finally:
            self.metrics.running.dec()

    async def _supervise(
        self, em: Emitter, spec: TaskSpec, cid: str, stream: Any, st: AttemptState
    ) -> None:
        io = self.runtime.run_blocking(
            read_output,
            stream,
            spec.limits.output_bytes,
            st.output,
            self._kill_from_thread(em, cid, "output_limit", st),
        )
        st.stream, st.reader = stream, io
        waiter = asyncio.ensure_future(self.runtime.wait(cid))
        guard = (
            asyncio.ensure_future(self._guard_fork_log(em, cid, st))
            if st.fork_log_dir is not None
            else None
        )
        try:
            done, _ = await asyncio.wait({waiter}, timeout=spec.limits.timeout_s)
            if not done:
                await self._kill(em, cid, "timeout", st)
            st.exit_code = await waiter
            self.last_exit_at = time.perf_counter()
        finally:
            if not waiter.done():
                waiter.cancel()
            if guard is not None:
                guard.cancel()
        st.running = False
        for t in st.kill_tasks:
            await t
        try:
            await asyncio.wait_for(asyncio.shield(io), _IO_DRAIN_S)
        except TimeoutError:
            close_socket(stream)
        if st.stdin_writer is not None:  # the socket is closed now: the write has ended
            await asyncio.wait([st.stdin_writer], timeout=_IO_DRAIN_S)
        if st.exit_code == 0 and not st.kills:
            return  # a clean exit: no kill, OOM or removal can have caused it
        state = await self.runtime.inspect(cid)
        st.oom_killed = state.oom_killed
        if state.exit_code is not None:
            st.exit_code = state.exit_code
        if self.watcher is not None:
            await self.watcher.wait_died(cid, _DIED_EVENT_WAIT_S)

    def _track(self, em: Emitter, cid: str, spec: TaskSpec, st: AttemptState) -> None:
        """Sample the container's cgroup from its start; past `limits.cpu_time_s` of CPU
        time it is killed as `cpu_time`."""
        limit = spec.limits.cpu_time_s
        self.sampler.track(
            cid,
            cpu_limit_ns=None if limit is None else int(limit * 1e9),
            on_cpu_limit=self._kill_from_thread(em, cid, "cpu_time", st),
        )

    async def _guard_fork_log(self, em: Emitter, cid: str, st: AttemptState) -> None:
        """Under gVisor, while the task runs: its boot log kept under the configured size;
        a task whose refused forks fill it is killed (`supervisor.docker.gvisor`)."""
        assert st.fork_log_dir is not None
        logs = boot_logs(st.fork_log_dir)
        cap = self.config.sandbox.gvisor_log_max_mb * 2**20
        while True:
            await asyncio.sleep(_FORK_LOG_CHECK_S)
            if await asyncio.to_thread(logs.guard, cid, cap):
                await self._kill(em, cid, "pids_limit", st)
                return

    def _kill_from_thread(
        self, em: Emitter, cid: str, reason: str, st: AttemptState
    ) -> Callable[..., None]:
        """A callback for another thread (the output reader, the cgroup sampler) that kills
        the container for `reason` in this loop; `_supervise` awaits the kill."""
        loop = asyncio.get_running_loop()

        def kill() -> None:
            st.kill_tasks.append(asyncio.ensure_future(self._kill(em, cid, reason, st)))

        def from_thread(*_: Any) -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(kill)

        return from_thread

    async def _kill(self, em: Emitter, cid: str, reason: str, st: AttemptState) -> None:
        if reason in st.kills:
            return
        st.kills.append(reason)
        em.emit(KillIssued, container_id=cid, reason=reason)  # type: ignore[arg-type]
        if self.watcher is not None:
            self.watcher.expect_kill(cid)
        # A failed kill is left to cleanup, which force-removes and records what happened.
        with contextlib.suppress(SupervisorError):
            await self.runtime.kill(cid)

    def _defer_cleanup(self, em: Emitter, st: AttemptState) -> None:
        """Remove an attempt's exited container and its workspace after its outcome is
        recorded (`_after`), in the background: the task's result does not wait for the
        removal, which waits its turn (`RemovalGate`). `drain` waits for every such removal."""

        async def removal() -> CleanupReport:
            await self.removals.turn()
            return await self._cleanup(em, st)

        task = asyncio.ensure_future(removal())
        self.deferred.add(task)
        task.add_done_callback(self.deferred.discard)

    async def drain(self) -> None:
        """Wait for the removals deferred so far (at shutdown: none may be left behind)."""
        await self.removals.close()
        while self.deferred:
            await asyncio.gather(*self.deferred, return_exceptions=True)

    def _deferrable(self, st: AttemptState) -> bool:
        """Whether the attempt's removal may follow its outcome: its container exited on
        its own (no kill from anyone, no adapter error, no cancellation, not removed), so
        the removal can add nothing to the evidence, and Docker's events are followed (an
        out-of-band removal is known without it)."""
        return (
            st.container_id is not None
            and not st.running
            and not st.kills
            and not st.external_kills
            and st.adapter_error is None
            and not st.cancelled
            and not st.removed_out_of_band
            and self.watcher is not None
        )

    async def _cleanup(self, em: Emitter, st: AttemptState) -> CleanupReport:
        cid = st.container_id
        report = await self.cleaner.clean(
            em, cid, st.workspace, running=st.running, gvisor=st.fork_log_dir is not None
        )
        self.workspaces.discard(str(st.workspace))
        await self._close_reader(st)
        if cid is not None and self.watcher is not None:
            self.watcher.forget(cid)
        return report

    async def _after(self, em: Emitter, st: AttemptState) -> bool:
        """Evidence that must be read before removal, then cleanup; True when the cleanup
        is left to run after the attempt's outcome is recorded (`_deferrable`)."""
        cid = st.container_id
        if cid is not None:
            self.live.pop(cid, None)
            counters = self.sampler.untrack(cid)
            st.pids_events = counters.pids_limit_events
            st.oom_events = counters.memory_oom_events
            st.cpu_time_ns = counters.cpu_time_ns
            st.peak_memory_bytes = counters.peak_memory_bytes
            if st.fork_log_dir is not None:
                refused = await asyncio.to_thread(
                    take_refused_forks, st.fork_log_dir, cid, st.argv_newlines
                )
                st.pids_events += refused
            if st.running:
                reason = "cancelled" if st.cancelled else "cleanup"
                st.kills.append(reason)
                em.emit(KillIssued, container_id=cid, reason=reason)  # type: ignore[arg-type]
            if self.watcher is not None:
                st.external_kills = self.watcher.external_kills(cid)
                # `docker rm -f` is a kill, then a removal once the container is dead: give
                # the removal a moment to show before deciding it was only a kill.
                if st.external_kills and not st.removed_out_of_band:
                    await self.watcher.wait_destroyed(cid, _DESTROY_EVENT_WAIT_S)
                if self.watcher.destroyed(cid):
                    st.removed_out_of_band = True
            if not st.removed_out_of_band:
                em.emit(
                    ContainerExited,
                    container_id=cid,
                    exit_code=st.exit_code,
                    evidence=self._evidence(st),
                    stdout_bytes=st.output.stdout_bytes,
                    stderr_bytes=st.output.stderr_bytes,
                    cpu_time_s=_seconds(st.cpu_time_ns),
                    peak_memory_bytes=st.peak_memory_bytes,
                )
        if self._deferrable(st):
            return True
        report = await self._cleanup(em, st)
        if report.container_already_gone and not st.adapter_error:
            st.removed_out_of_band = True
        return False

    async def _close_reader(self, st: AttemptState) -> None:
        """An attempt cancelled while it ran leaves its output reader behind: the container
        is gone now, so the reader ends (and closes the socket); if it does not within
        `_IO_DRAIN_S`, the socket is closed here. Either way no socket outlives the
        attempt."""
        reader = st.reader
        if reader is None or reader.done():
            return
        try:
            await asyncio.wait_for(asyncio.shield(reader), _IO_DRAIN_S)
        except TimeoutError:
            close_socket(st.stream)
        except Exception:  # the reader's own failure: the socket is closed by its finally
            return

    def _evidence(self, st: AttemptState) -> Evidence:
        return Evidence(
            exit_code=st.exit_code,
            oom_killed=st.oom_killed,
            memory_oom_events=st.oom_events,
            pids_limit_events=st.pids_events,
            kills_issued=tuple(st.kills),
            external_kills=st.external_kills,
            removed_out_of_band=st.removed_out_of_band,
            adapter_error=st.adapter_error.tag if st.adapter_error else None,
            adapter_message=str(st.adapter_error) if st.adapter_error else None,
            stdout_truncated=st.output.stdout_truncated,
            stderr_truncated=st.output.stderr_truncated,
            cancelled=st.cancelled,
            cpu_time_s=_seconds(st.cpu_time_ns),
        )


def _seconds(ns: int | None) -> float | None:
    return None if ns is None else round(ns / 1e9, 6)


async def _settled(aw: Awaitable[T]) -> tuple[T, bool]:
    """Run `aw` to completion even if the caller is cancelled meanwhile; return its result
    and whether a cancellation was received (the caller re-raises it once the result is
    safe)."""
    task = asyncio.ensure_future(aw)
    cancelled = False
    while not task.done():
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            cancelled = True
    if cancelled and task.exception() is not None:
        raise asyncio.CancelledError from task.exception()  # the failure is moot now
    return task.result(), cancelled
