"""The executor: runs one task, attempt after attempt, in hardened containers.

For each attempt: a workspace with the spec's files, a container with the design's labels
and hardening, the output streamed under a per-stream cap, the deadline enforced by the
supervisor itself, the evidence collected and classified, and cleanup that always runs —
even when the attempt is cancelled or an adapter raises. Every step is an event.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import msgspec

from schemas import (
    AttemptFinished,
    AttemptStarted,
    ContainerCreated,
    ContainerExited,
    ContainerStarted,
    ErrorRaised,
    Event,
    Evidence,
    ExecutionError,
    KillIssued,
    Result,
    RetryScheduled,
    TaskFailed,
    TaskRejected,
    TaskSpec,
    TaskSubmitted,
    TaskSucceeded,
    WorkspaceCreated,
    event_type,
)
from schemas.config import Config
from schemas.errors import ContainerVanished, ImageNotFound, SpecError, SupervisorError
from schemas.labels import container_labels
from schemas.lifecycle import LifecycleTracker
from supervisor.daemon.metrics import Metrics
from supervisor.docker.runtime import (
    ContainerRequest,
    DockerRuntime,
    Output,
    close_socket,
    raw_socket,
    read_output,
    write_stdin,
)
from supervisor.eventlog.emitter import Emitter, new_id
from supervisor.eventlog.ports import EventSink
from supervisor.execution.classify import Classification, catalogue_entry, classify
from supervisor.execution.cleanup import Cleaner
from supervisor.execution.observe import CgroupSampler, DockerEventWatcher
from supervisor.execution.retry import backoff_delay, should_retry
from supervisor.execution.workspace import create_workspace
from supervisor.intake.admission import admit

T = TypeVar("T")

_IO_DRAIN_S = 5.0
_FINISHED_KEPT = 100_000
_DIED_EVENT_WAIT_S = 1.0
_DESTROY_EVENT_WAIT_S = 0.5


log = logging.getLogger("supervisor.execution.executor")


@dataclass
class _Attempt:
    """What one attempt has created and observed so far (filled as it goes)."""

    workspace: Path | None = None
    container_id: str | None = None
    running: bool = False
    exit_code: int | None = None
    oom_killed: bool = False
    kills: list[str] = field(default_factory=list)
    output: Output = field(default_factory=Output)
    removed_out_of_band: bool = False
    adapter_error: SupervisorError | None = None
    cancelled: bool = False
    pids_events: int = 0
    oom_events: int = 0
    external_kills: tuple[str, ...] = ()
    cpu_time_ns: int | None = None
    peak_memory_bytes: int | None = None
    kill_tasks: list[asyncio.Task[None]] = field(default_factory=list)
    stdin_writer: asyncio.Future[None] | None = None
    # The attach socket and the reader draining it (which closes it at its end).
    stream: Any = None
    reader: asyncio.Future[Output] | None = None


@dataclass(frozen=True)
class KillClaim:
    """What `Executor.claim_kill` answered: `refused` (with `reason`), `recorded` or
    `not_ours`."""

    status: str
    reason: str = ""


@dataclass
class _Live:
    """A running attempt's container: its emitter, its state and its deadline (epoch s)."""

    em: Emitter
    st: _Attempt
    deadline: float


@dataclass
class AttemptOutcome:
    classification: Classification | None
    evidence: Evidence
    exit_code: int | None
    output: Output
    container_id: str | None
    duration_s: float
    cpu_time_s: float | None = None
    peak_memory_bytes: int | None = None


class Executor:
    def __init__(
        self,
        runtime: DockerRuntime,
        emitter: Emitter,
        config: Config,
        metrics: Metrics,
        *,
        watcher: DockerEventWatcher | None = None,
        sampler: CgroupSampler | None = None,
        data_dir: Path,
        rand: Callable[[], float] = random.random,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
        on_attempt: Callable[[Classification | None], None] | None = None,
        gate: Callable[[], None] | None = None,
    ) -> None:
        self.runtime = runtime
        self.lifecycle = LifecycleTracker()
        self.emitter = replace(emitter, sink=_CheckedSink(emitter.sink, self.lifecycle, metrics))
        self.config = config
        self.metrics = metrics
        self.watcher = watcher
        self.sampler = sampler or CgroupSampler(config.cgroup_sample_s)
        self.data_dir = data_dir
        self.rand = rand
        self.sleep = sleep
        self.cleaner = Cleaner(
            runtime, watcher, metrics, kill_timeout_s=config.sandbox.stop_timeout_s * 2
        )
        # From the daemon: `on_attempt` sees each attempt's classification (None for an
        # attempt Docker carried out, whatever the task's fate) so the breaker learns from
        # real work; `gate` raises (CircuitOpen) before a retry that Docker cannot serve, so
        # the task goes back to the queue instead of burning its attempts.
        self.on_attempt = on_attempt
        self.gate = gate
        # The tasks this instance ended (newest last, bounded): a redelivered message of one
        # of them is only acked, even before its terminal event reached the stream.
        self.finished: dict[str, None] = {}
        # The containers of the attempts this instance runs now, by container id.
        self.live: dict[str, _Live] = {}
        # The tasks whose cancellation was asked (newest last, bounded): no attempt of one
        # starts here, and a live one is killed (`cancel`).
        self.cancelled: dict[str, None] = {}

    def claim_kill(self, container_id: str, reason: str) -> KillClaim:
        """Asked before a kill from outside the attempt (a cleanup command). `refused` (with
        the reason): the container runs an attempt of this instance before its deadline, and
        only that attempt's own supervision may end it then. `recorded`: an attempt of this
        instance past its deadline; the kill is recorded as that attempt's own
        (`kill_issued{reason}`), so it is classified as such, not as the script's signal.
        `not_ours`: no live attempt here runs it."""
        live = self.live.get(container_id)
        if live is None:
            return KillClaim("not_ours")
        if time.time() < live.deadline:
            return KillClaim(
                "refused",
                f"container {container_id[:12]} runs attempt "
                f"{live.em.attempt} of {live.em.task_id} on this instance, "
                "before its deadline",
            )
        if reason not in live.st.kills:
            live.st.kills.append(reason)
            live.em.emit(KillIssued, container_id=container_id, reason=reason)  # type: ignore[arg-type]
        if self.watcher is not None:
            self.watcher.expect_kill(container_id)
        return KillClaim("recorded")

    async def cancel(self, task_id: str) -> bool:
        """Record that `task_id` was cancelled (`task.cancel_requested`): no attempt of it
        starts here any more, and a live one is killed now, the kill recorded as the
        attempt's own `kill_issued{cancelled}` (so it is classified `CANCELLED`, never
        retried). Returns whether an attempt of it was running here."""
        self.cancelled[task_id] = None
        if len(self.cancelled) > _FINISHED_KEPT:
            del self.cancelled[next(iter(self.cancelled))]
        found = [cid for cid, live in self.live.items() if live.em.task_id == task_id]
        for cid in found:
            await self._kill_cancelled(cid)
        return bool(found)

    async def _kill_cancelled(self, container_id: str) -> None:
        live = self.live.get(container_id)
        if live is None or "cancelled" in live.st.kills:
            return
        live.st.kills.append("cancelled")
        live.em.emit(KillIssued, container_id=container_id, reason="cancelled")
        if self.watcher is not None:
            self.watcher.expect_kill(container_id)
        with contextlib.suppress(SupervisorError):
            await self.runtime.kill(container_id)

    def cancellation(self) -> Classification:
        """What a task cancelled before its attempt started ends with."""
        return catalogue_entry("CANCELLED", "the task was cancelled by its submitter")

    def _ended(self, task_id: str) -> None:
        self.finished[task_id] = None
        if len(self.finished) > _FINISHED_KEPT:
            del self.finished[next(iter(self.finished))]

    # --- task -----------------------------------------------------------------------------

    async def run(
        self,
        spec: TaskSpec,
        *,
        announce: bool = True,
        first_attempt: int = 1,
        terminal_on_cancel: bool = True,
    ) -> Result:
        """Run `spec` to a terminal state, publishing every step.

        `first_attempt` > 1 continues a task whose earlier attempts are in history (a
        redelivered message). Cancellation always cleans up and closes the attempt; with
        `terminal_on_cancel` it also records the task as failed (`CANCELLED`) — the daemon
        turns that off at shutdown, leaving the message to be redelivered.
        """
        task_id = spec.task_id or f"t-{new_id()[:16]}"
        em = self.emitter.for_task(task_id, spec.correlation_id or new_id())
        started = time.monotonic()
        if announce:
            em.emit(TaskSubmitted, spec=spec, priority=spec.priority)
        try:
            admit(spec, self.config.bounds, self.config.policy, self.config.callbacks.allowed)
            if not await self._image_present(spec.image):
                raise ImageNotFound("inspect_image", f"image {spec.image!r} is not present locally")
        except (SpecError, ImageNotFound) as e:
            # A refused spec's callback_url is never called (it may be the refusal).
            callback = spec.callback_url if isinstance(e, ImageNotFound) else None
            return self._reject(em, task_id, e, started, callback)
        attempt = first_attempt - 1
        while True:
            attempt += 1
            if task_id in self.cancelled:
                spec = msgspec.structs.replace(spec, task_id=task_id)
                return self.fail(spec, self.cancellation(), attempt - 1)
            aem = em.for_attempt(attempt)
            try:
                out = await self._attempt(aem, spec, task_id, attempt)
            except asyncio.CancelledError:
                if terminal_on_cancel:
                    self._finish(aem, spec, attempt, None, started, cancelled=True)
                raise
            if self.on_attempt is not None:
                self.on_attempt(out.classification)
            if out.classification is None:
                return self._finish(aem, spec, attempt, out, started)
            if not should_retry(spec.retry, attempt, out.classification.retryable):
                return self._finish(aem, spec, attempt, out, started)
            delay = self.schedule_retry(aem, spec, attempt, out.classification)
            if self.gate is not None:
                self.gate()
            try:
                await self.sleep(delay)
            except asyncio.CancelledError:
                if terminal_on_cancel:
                    self._finish(aem, spec, attempt, out, started, cancelled=True)
                raise

    def schedule_retry(self, em: Emitter, spec: TaskSpec, attempt: int, c: Classification) -> float:
        """Record the retry after a failed `attempt`; returns the delay to wait."""
        delay = backoff_delay(spec.retry, attempt, self.rand)
        em.emit(RetryScheduled, next_attempt=attempt + 1, delay_s=delay, error_code=c.code)
        return delay

    def fail(
        self,
        spec: TaskSpec,
        c: Classification,
        attempts: int,
        message: str | None = None,
        *,
        recorded: bool = False,
    ) -> Result:
        """Close a task as failed with `c` without running anything (a lost last attempt,
        a poison message). `recorded`: `c` is an error the log holds already (the closing
        of a lost attempt), repeated in the result but not raised again."""
        assert spec.task_id is not None
        em = self.emitter.for_task(spec.task_id, spec.correlation_id or "").for_attempt(attempts)
        error = self._error(spec.task_id, c, None, message=message)
        if not recorded:
            em.emit(
                ErrorRaised,
                error_type=c.type,
                code=c.code,
                message=error.message,
                retryable=c.retryable,
                details=c.details,
            )
            self.metrics.errors.labels(c.type, c.code).inc()
        result = Result(task_id=spec.task_id, status="failed", attempts=attempts, error=error)
        em.emit(TaskFailed, result=result, callback_url=spec.callback_url)
        self._ended(spec.task_id)
        self.metrics.tasks.labels("failed").inc()
        return result

    async def _image_present(self, image: str) -> bool:
        try:
            return await self.runtime.image_exists(image)
        except SupervisorError:
            return True  # the daemon is unreachable: let the attempt meet and classify it

    def _reject(
        self,
        em: Emitter,
        task_id: str,
        e: SupervisorError,
        started: float,
        callback_url: str | None = None,
    ) -> Result:
        ev = Evidence(adapter_error=e.tag, adapter_message=str(e))
        c = classify(ev)
        assert c is not None
        error = self._error(task_id, c, None, message=str(e))
        em.emit(
            ErrorRaised,
            error_type=c.type,
            code=c.code,
            message=str(e),
            retryable=c.retryable,
            details=c.details,
            evidence=ev,
        )
        result = Result(
            task_id=task_id,
            status="rejected",
            attempts=0,
            error=error,
            duration_s=time.monotonic() - started,
        )
        em.emit(TaskRejected, error=error, result=result, callback_url=callback_url)
        self._ended(task_id)
        self.metrics.tasks.labels("rejected").inc()
        self.metrics.errors.labels(c.type, c.code).inc()
        return result

    def _error(
        self, task_id: str, c: Classification, container_id: str | None, message: str | None = None
    ) -> ExecutionError:
        return ExecutionError(
            type=c.type,
            code=c.code,
            message=message or c.message,
            retryable=c.retryable,
            details=c.details,
            task_id=task_id,
            container_id=container_id,
            timestamp=self.emitter.clock().isoformat(),
        )

    def _finish(
        self,
        em: Emitter,
        spec: TaskSpec,
        attempts: int,
        out: AttemptOutcome | None,
        started: float,
        *,
        cancelled: bool = False,
    ) -> Result:
        task_id = em.task_id
        duration = time.monotonic() - started
        c = out.classification if out else None
        if cancelled:
            c = classify(Evidence(cancelled=True))
        output = out.output if out else Output()
        error = self._error(task_id, c, out.container_id if out else None) if c else None
        result = Result(
            task_id=task_id,
            status="failed" if c else "succeeded",
            attempts=attempts,
            exit_code=out.exit_code if out else None,
            stdout=output.stdout.decode(errors="replace"),
            stderr=output.stderr.decode(errors="replace"),
            stdout_truncated=output.stdout_truncated,
            stderr_truncated=output.stderr_truncated,
            duration_s=duration,
            error=error,
            cpu_time_s=out.cpu_time_s if out else None,
            peak_memory_bytes=out.peak_memory_bytes if out else None,
        )
        cap = self.config.event_output_bytes
        capped = len(output.stdout) > cap or len(output.stderr) > cap
        in_event = result
        if capped:
            in_event = Result(
                **{
                    **_fields(result),
                    "stdout": bytes(output.stdout[:cap]).decode(errors="replace"),
                    "stderr": bytes(output.stderr[:cap]).decode(errors="replace"),
                }
            )
        em.emit(
            TaskFailed if c else TaskSucceeded,
            result=in_event,
            output_capped=capped,
            callback_url=spec.callback_url,
        )
        self._ended(task_id)
        outcome = "failed" if c else "succeeded"
        log.info(
            "task %s %s after %d attempt(s)%s",
            task_id,
            outcome,
            attempts,
            f": {c.type}/{c.code}" if c else "",
            extra={
                "task_id": task_id,
                "correlation_id": em.correlation_id,
                "duration_s": round(duration, 3),
            },
        )
        self.metrics.tasks.labels(outcome).inc()
        self.metrics.task_duration.labels(outcome).observe(duration)
        return result

    # --- attempt --------------------------------------------------------------------------

    async def _attempt(
        self, em: Emitter, spec: TaskSpec, task_id: str, attempt: int
    ) -> AttemptOutcome:
        em.emit(AttemptStarted, max_attempts=spec.retry.max_attempts)
        started = time.monotonic()
        st = _Attempt()
        try:
            await self._execute(em, spec, task_id, attempt, st)
        except ContainerVanished:
            st.removed_out_of_band = True
        except SupervisorError as e:
            st.adapter_error = e
        except asyncio.CancelledError:
            st.cancelled = True
        try:
            await _uncancellable(self._after(em, st))
        except asyncio.CancelledError:
            st.cancelled = True
        evidence = self._evidence(st)
        c = classify(evidence)
        if c is not None:
            em.emit(
                ErrorRaised,
                error_type=c.type,
                code=c.code,
                message=c.message,
                retryable=c.retryable,
                details=c.details,
                container_id=st.container_id,
                evidence=evidence,
            )
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
        self, em: Emitter, spec: TaskSpec, task_id: str, attempt: int, st: _Attempt
    ) -> None:
        rt = self.runtime
        # Creating steps run to completion even when the attempt is cancelled meanwhile, so
        # what they made is known to cleanup instead of leaking (a workspace, a container,
        # an open socket).
        (st.workspace, nbytes), cancelled = await _settled(
            asyncio.to_thread(create_workspace, self.data_dir, task_id, attempt, spec.file_bytes())
        )
        if cancelled:
            raise asyncio.CancelledError
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
        )
        cid, cancelled = await _settled(rt.create(req))
        st.container_id = cid
        self.live[cid] = _Live(em, st, deadline)
        em.emit(
            ContainerCreated, container_id=cid, image=spec.image, labels=labels, deadline=deadline
        )
        if task_id in self.cancelled:  # asked while it was being created
            await self._kill_cancelled(cid)
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
            st.stdin_writer = rt.run_blocking(write_stdin, raw_socket(stream), stdin)
        self.metrics.running.inc()
        try:
            em.emit(ContainerStarted, container_id=cid)
            await self._supervise(em, spec, cid, stream, st)
        finally:
            self.metrics.running.dec()

    async def _supervise(
        self, em: Emitter, spec: TaskSpec, cid: str, stream: Any, st: _Attempt
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
        try:
            done, _ = await asyncio.wait({waiter}, timeout=spec.limits.timeout_s)
            if not done:
                await self._kill(em, cid, "timeout", st)
            st.exit_code = await waiter
        finally:
            if not waiter.done():
                waiter.cancel()
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

    def _track(self, em: Emitter, cid: str, spec: TaskSpec, st: _Attempt) -> None:
        """Sample the container's cgroup from its start; past `limits.cpu_time_s` of CPU
        time it is killed as `cpu_time`."""
        limit = spec.limits.cpu_time_s
        self.sampler.track(
            cid,
            cpu_limit_ns=None if limit is None else int(limit * 1e9),
            on_cpu_limit=self._kill_from_thread(em, cid, "cpu_time", st),
        )

    def _kill_from_thread(
        self, em: Emitter, cid: str, reason: str, st: _Attempt
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

    async def _kill(self, em: Emitter, cid: str, reason: str, st: _Attempt) -> None:
        if reason in st.kills:
            return
        st.kills.append(reason)
        em.emit(KillIssued, container_id=cid, reason=reason)  # type: ignore[arg-type]
        if self.watcher is not None:
            self.watcher.expect_kill(cid)
        # A failed kill is left to cleanup, which force-removes and records what happened.
        with contextlib.suppress(SupervisorError):
            await self.runtime.kill(cid)

    async def _after(self, em: Emitter, st: _Attempt) -> None:
        """Evidence that must be read before removal, then cleanup."""
        cid = st.container_id
        if cid is not None:
            self.live.pop(cid, None)
            counters = self.sampler.untrack(cid)
            st.pids_events = counters.pids_limit_events
            st.oom_events = counters.memory_oom_events
            st.cpu_time_ns = counters.cpu_time_ns
            st.peak_memory_bytes = counters.peak_memory_bytes
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
        report = await self.cleaner.clean(em, cid, st.workspace, running=st.running)
        if report.container_already_gone and not st.adapter_error:
            st.removed_out_of_band = True
        await self._close_reader(st)
        if cid is not None and self.watcher is not None:
            self.watcher.forget(cid)

    async def _close_reader(self, st: _Attempt) -> None:
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

    def _evidence(self, st: _Attempt) -> Evidence:
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


class _CheckedSink:
    """The executor's sink: each event is checked against the lifecycle state machine as it
    is emitted, then handed on. A transition the machine does not allow is a bug of ours:
    it is logged and counted (`supervisor_lifecycle_violations_total`), and the event is
    still published, since it records what happened."""

    def __init__(self, sink: EventSink, tracker: LifecycleTracker, metrics: Metrics) -> None:
        self.sink = sink
        self.tracker = tracker
        self.metrics = metrics

    def emit(self, event: Event) -> None:
        step = getattr(event, "step", None)
        container_id = getattr(event, "container_id", None)
        if step == "remove_container":
            container_id = getattr(event, "resource", None)
        violation = self.tracker.observe(
            event_type(event), event.task_id, container_id=container_id, step=step
        )
        if violation is not None:
            log.error(
                "lifecycle violation: %s",
                violation,
                extra={"task_id": event.task_id, "attempt": event.attempt},
            )
            self.metrics.lifecycle_violations.labels(violation.machine).inc()
        self.sink.emit(event)

    async def flush(self, timeout: float | None = None) -> bool:
        return await self.sink.flush(timeout)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sink, name)


def _seconds(ns: int | None) -> float | None:
    return None if ns is None else round(ns / 1e9, 6)


def _fields(s: Any) -> dict[str, Any]:
    return {f: getattr(s, f) for f in s.__struct_fields__}


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


async def _uncancellable(coro: Awaitable[None]) -> None:
    """Run `coro` to completion (cleanup must finish); a cancellation received meanwhile
    is re-raised afterwards."""
    _, cancelled = await _settled(coro)
    if cancelled:
        raise asyncio.CancelledError
