"""The executor: runs one task to its terminal state, attempt after attempt
(`supervisor.execution.attempt`), retrying with backoff what the classification allows.
It admits the spec first, records the task's end once, and answers for the attempts it
runs when a cancellation or a cleanup command asks to kill one. Every step is an event.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import msgspec

from schemas import (
    Event,
    Evidence,
    KillIssued,
    Result,
    RetryScheduled,
    TaskFailed,
    TaskSpec,
    TaskSubmitted,
    TaskSucceeded,
    event_type,
)
from schemas.config import Config
from schemas.errors import ImageNotFound, RuntimeUnavailable, SpecError, SupervisorError
from schemas.lifecycle import LifecycleTracker
from schemas.spec import public_spec
from supervisor.docker.observe import CgroupSampler, DockerEventWatcher
from supervisor.docker.runtime import DockerRuntime, Output
from supervisor.eventlog.emitter import Emitter, new_id
from supervisor.eventlog.outcomes import emit_error, execution_error, record_refusal
from supervisor.eventlog.ports import EventSink
from supervisor.execution.attempt import AttemptRunner
from supervisor.execution.cleanup import Cleaner
from supervisor.execution.state import AttemptOutcome
from supervisor.observability.metrics import Metrics
from supervisor.policy.admission import admit
from supervisor.policy.classify import Classification, catalogue_entry, classify
from supervisor.policy.retry import backoff_delay, should_retry

__all__ = ["Backoff", "Executor", "KillClaim"]

_FINISHED_KEPT = 100_000
_ENGINE_POLL_S = 0.25


log = logging.getLogger("supervisor.execution.executor")


@dataclass(frozen=True)
class Backoff:
    """What `Executor.run(park=True)` answers instead of sleeping before a retry: the retry
    is recorded (`task.retry_scheduled`); `next_attempt` is due in `delay_s` seconds. The
    caller waits without holding a slot, then calls `run(first_attempt=next_attempt)`."""

    next_attempt: int
    delay_s: float


@dataclass(frozen=True)
class KillClaim:
    """What `Executor.claim_kill` answered: `refused` (with `reason`), `recorded` or
    `not_ours`."""

    status: str
    reason: str = ""


class Executor:
    """Runs one task to its terminal state (`run`), attempt after attempt, and records
    every step as an event through its emitter (whose sink checks each against the
    lifecycle, so a second terminal event is refused before it is written).

    Promises: each attempt's container and workspace are cleaned up whatever happened
    (`Cleaner`); an attempt's outcome is classified from its evidence only
    (`supervisor.policy.classify`); a retry waits for its backoff and for the engine
    (`wait_for_engine`); a task ends with exactly one of `task.succeeded`, `task.failed`,
    `task.rejected`. `run_or_park` hands the backoff back instead of sleeping (the
    scheduler parks the task without a slot). `cancel` kills a live attempt of the task and
    ends it as `CANCELLED`. Raises nothing for a task's own failure: that is its `Result`.
    """

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
        # The tasks whose cancellation was asked (newest last, bounded): no attempt of one
        # starts here, and a live one is killed (`cancel`).
        self.cancelled: dict[str, None] = {}
        self.attempts = AttemptRunner(
            runtime,
            config,
            metrics,
            self.cleaner,
            watcher=watcher,
            sampler=self.sampler,
            data_dir=data_dir,
            cancelled=self.cancelled,
        )
        # The containers of the attempts this instance runs now, by container id.
        self.live = self.attempts.live
        # Set by the daemon's scheduler: ends a task parked between two attempts when it is
        # cancelled (returns whether it was parked there).
        self.on_cancel: Callable[[str], Awaitable[bool]] | None = None

    def claim_kill(self, container_id: str, reason: str) -> KillClaim:
        """Asked before a kill from outside the attempt (a cleanup command). `refused` (with
        the reason): the container runs an attempt of this instance before its deadline, and
        only that attempt's own supervision may end it then. `recorded`: an attempt of this
        instance past its deadline; the kill is recorded as that attempt's own
        (`kill_issued{reason}`), so it is classified as such, not as the script's signal.
        `not_ours`: no live attempt here runs it."""
        live = self.live.get(container_id)
        pool = self.attempts.pool
        if live is None and pool is not None and pool.owns(container_id):
            return KillClaim(
                "refused", f"container {container_id[:12]} is parked in this instance's warm pool"
            )
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

    def claim_workspace(self, path: str) -> str | None:
        """Asked before a cleanup command removes a workspace dir: the reason to refuse
        when an attempt of this instance runs in it (it is that attempt's to remove), else
        None."""
        if path in self.attempts.workspaces:
            return f"workspace {path} belongs to an attempt this instance runs"
        pool = self.attempts.pool
        if pool is not None and pool.owns_workspace(path):
            return f"workspace {path} belongs to a container parked in this instance's pool"
        return None

    async def cancel(self, task_id: str) -> bool:
        """Record that `task_id` was cancelled (`task.cancel_requested`): no attempt of it
        starts here any more, and a live one is killed now, the kill recorded as the
        attempt's own `kill_issued{cancelled}` (so it is classified `CANCELLED`, never
        retried); a task parked between two attempts here ends at once. Returns whether
        an attempt of it was running or parked here."""
        self.cancelled[task_id] = None
        if len(self.cancelled) > _FINISHED_KEPT:
            del self.cancelled[next(iter(self.cancelled))]
        found = [cid for cid, live in self.live.items() if live.em.task_id == task_id]
        for cid in found:
            await self.attempts.kill_cancelled(cid)
        parked = self.on_cancel is not None and await self.on_cancel(task_id)
        return bool(found) or parked

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
        """`run_or_park` without parking: waits between attempts, returns the Result."""
        result = await self.run_or_park(
            spec,
            announce=announce,
            first_attempt=first_attempt,
            terminal_on_cancel=terminal_on_cancel,
            park=False,
        )
        assert isinstance(result, Result)
        return result

    async def run_or_park(
        self,
        spec: TaskSpec,
        *,
        announce: bool = True,
        first_attempt: int = 1,
        terminal_on_cancel: bool = True,
        park: bool = True,
    ) -> Result | Backoff:
        """Run `spec` to a terminal state, publishing every step.

        `first_attempt` > 1 continues a task whose earlier attempts are in history (a
        redelivered message, or a retry whose backoff was waited out elsewhere).
        Cancellation always cleans up and closes the attempt; with `terminal_on_cancel` it
        also records the task as failed (`CANCELLED`) — the daemon turns that off at
        shutdown, leaving the message to be redelivered. Between attempts it waits out the
        backoff and then for the engine (`wait_for_engine`); with `park` it returns a
        `Backoff` instead, so the daemon waits without holding a slot (a Result only else).
        """
        task_id = spec.task_id or f"t-{new_id()[:16]}"
        em = self.emitter.for_task(task_id, spec.correlation_id or new_id())
        started = time.monotonic()
        if announce:
            em.emit(TaskSubmitted, spec=public_spec(spec), priority=spec.priority)
        try:
            admit(
                spec,
                self.config.bounds,
                self.config.policy,
                self.config.callbacks.allowed,
                self.config.sandbox.runtimes,
            )
            if not await self._image_present(spec.image):
                raise ImageNotFound("inspect_image", f"image {spec.image!r} is not present locally")
            await self._runtime_present(spec)
        except (SpecError, ImageNotFound, RuntimeUnavailable) as e:
            # A refused spec's callback_url is never called (it may be the refusal).
            callback = (
                spec.callback_url if isinstance(e, (ImageNotFound, RuntimeUnavailable)) else None
            )
            return self._reject(em, e, started, callback)
        attempt = first_attempt - 1
        while True:
            attempt += 1
            if task_id in self.cancelled:
                spec = msgspec.structs.replace(spec, task_id=task_id)
                return self.fail(spec, self.cancellation(), attempt - 1)
            aem = em.for_attempt(attempt)
            try:
                out = await self.attempts.run(aem, spec, task_id, attempt)
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
            if park:
                return Backoff(attempt + 1, delay)
            try:
                await self.sleep(delay)
                await self.wait_for_engine()
            except asyncio.CancelledError:
                if terminal_on_cancel:
                    self._finish(aem, spec, attempt, out, started, cancelled=True)
                raise

    async def wait_for_engine(self) -> bool:
        """Before a retry: wait until the Docker breaker lets work through and the engine
        has answered every ping for `scheduling.engine_settle_s` (an engine that is
        shutting down still answers while it stops its containers), so that an engine
        restart costs a task no attempt. At most `scheduling.engine_wait_s`; returns
        whether the engine is ready (if not, the attempt goes ahead and meets, and
        classifies, what is wrong)."""
        sc = self.config.scheduling
        now = time.monotonic()
        deadline, since = now + sc.engine_wait_s, None
        while True:
            try:
                if self.gate is not None:
                    self.gate()
                await self.runtime.ping()
                since = time.monotonic() if since is None else since
                if time.monotonic() - since >= sc.engine_settle_s:
                    return True
            except SupervisorError:
                since = None
                if time.monotonic() >= deadline:
                    return False
            await asyncio.sleep(_ENGINE_POLL_S)

    def schedule_retry(self, em: Emitter, spec: TaskSpec, attempt: int, c: Classification) -> float:
        """Record the retry after a failed `attempt`; returns the delay to wait, capped by
        `bounds.max_retry_delay_s` (a message queued under older bounds included)."""
        delay = min(
            backoff_delay(spec.retry, attempt, self.rand), self.config.bounds.max_retry_delay_s
        )
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
        a poison message, a cancellation between attempts). `recorded`: `c` is an error the
        log holds already (the closing of a lost attempt), repeated in the result but not
        raised again. The error is the task's own (attempt 0): attempt `attempts` has
        finished, and nothing of it may follow its end."""
        assert spec.task_id is not None
        task_em = self.emitter.for_task(spec.task_id, spec.correlation_id or "")
        em = task_em.for_attempt(attempts)
        error = execution_error(task_em, c, message)
        if not recorded:
            emit_error(task_em, c, error.message)
            self.metrics.errors.labels(c.type, c.code).inc()
        result = Result(task_id=spec.task_id, status="failed", attempts=attempts, error=error)
        em.emit(TaskFailed, result=result, callback_url=spec.callback_url)
        self._ended(spec.task_id)
        self.metrics.tasks.labels("failed").inc()
        return result

    async def _runtime_present(self, spec: TaskSpec) -> None:
        """Raises RuntimeUnavailable when the engine has no runtime of the name the task
        needs (`spec.runtime`, else `[sandbox] runtime`)."""
        try:
            await self.runtime.runtime_info(spec.runtime or self.config.sandbox.runtime)
        except RuntimeUnavailable:
            raise
        except SupervisorError:
            return  # the engine cannot say: the attempt meets what is wrong and classifies it

    async def _image_present(self, image: str) -> bool:
        try:
            return await self.runtime.image_exists(image)
        except SupervisorError:
            return True  # the daemon is unreachable: let the attempt meet and classify it

    def _reject(
        self, em: Emitter, e: SupervisorError, started: float, callback_url: str | None = None
    ) -> Result:
        ev = Evidence(adapter_error=e.tag, adapter_message=str(e))
        c = classify(ev)
        assert c is not None
        result = record_refusal(
            em,
            c,
            str(e),
            evidence=ev,
            callback_url=callback_url,
            duration_s=time.monotonic() - started,
        )
        self._ended(em.task_id)
        self.metrics.tasks.labels("rejected").inc()
        self.metrics.errors.labels(c.type, c.code).inc()
        return result

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
        error = (
            execution_error(em, c, container_id=out.container_id if out else None) if c else None
        )
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


def _fields(s: Any) -> dict[str, Any]:
    return {f: getattr(s, f) for f in s.__struct_fields__}
