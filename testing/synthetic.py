"""Event histories built from the real event Structs, in the order the executor emits them.

For tests, benchmarks and demos of the read side: `HistoryBuilder` appends events to
`events` with a deterministic clock (`tick` per event) and deterministic ids, so two builds
with the same calls give byte-identical histories. The order per task follows
`supervisor.execution.executor` (and `.attempt`): task.submitted; per attempt
attempt.started, workspace.created, container.created, container.started,
[container.kill_issued], container.exited, the cleanup steps, [error.raised], attempt.finished; then task.retry_scheduled (and the next
attempt) or task.succeeded / task.failed. A refused spec is task.submitted, error.raised,
task.rejected. Knobs (`leak_container`, `fail_cleanup`, ...) leave out or alter steps so a
test can build exactly the inconsistency it wants. Pure: no I/O.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from schemas import (
    CATALOGUE,
    NO_TASK,
    AttemptFinished,
    AttemptStarted,
    CleanupFailed,
    CleanupSucceeded,
    ContainerCreated,
    ContainerExited,
    ContainerStarted,
    ErrorRaised,
    Event,
    Evidence,
    ExecutionError,
    KillIssued,
    Result,
    RetryPolicy,
    RetryScheduled,
    TaskFailed,
    TaskRejected,
    TaskSpec,
    TaskSubmitted,
    TaskSucceeded,
    WorkspaceCreated,
)

E = TypeVar("E", bound=Event)

EPOCH = datetime(2026, 1, 1, tzinfo=UTC)
_SPEC_FILES = {"main.sh": "#!/bin/sh\necho hello from the sandbox\nexit 0\n"}


@dataclass(frozen=True)
class AttemptPlan:
    """How one attempt ends. `error` is a catalogue code (None: success)."""

    error: str | None = None
    exit_code: int | None = 0
    kill_reason: str | None = None
    leak_container: bool = False
    leak_workspace: bool = False
    fail_cleanup: tuple[str, ...] = ()
    resolve_failed_cleanup: bool = False


@dataclass
class HistoryBuilder:
    """Appends a history to `events`. Ids are `<prefix>-<n>`; container ids and workspace
    paths are derived from the task and attempt so tests can name them."""

    node_id: str = "n1"
    instance_id: str = "boot-1"
    start: datetime = EPOCH
    tick: timedelta = timedelta(milliseconds=10)
    id_prefix: str = "ev"
    events: list[Event] = field(default_factory=list)
    _n: int = 0

    # --- primitives -------------------------------------------------------------------------

    def now(self) -> datetime:
        return self.start + self.tick * self._n

    def emit(self, cls: type[E], task_id: str = NO_TASK, attempt: int = 0, **fields: Any) -> E:
        """One event with the next id and timestamp, appended and returned."""
        event = cls(
            event_id=f"{self.id_prefix}-{self._n:09d}",
            occurred_at=self.now(),
            node_id=self.node_id,
            instance_id=self.instance_id,
            task_id=task_id,
            attempt=attempt,
            correlation_id=f"corr-{task_id}" if task_id != NO_TASK else "",
            **fields,
        )
        self._n += 1
        self.events.append(event)
        return event

    def wait(self, delta: timedelta) -> None:
        """Advance the clock without an event (whole ticks)."""
        self._n += max(1, int(delta / self.tick))

    @staticmethod
    def container_id(task_id: str, attempt: int) -> str:
        return f"c-{task_id}-{attempt}"

    @staticmethod
    def workspace_path(task_id: str, attempt: int) -> str:
        return f"/data/workspaces/{task_id}.{attempt}.x"

    # --- task steps -------------------------------------------------------------------------

    def submit(self, task_id: str, *, priority: str = "normal", max_attempts: int = 3) -> None:
        spec = TaskSpec(
            image="supervisor-sandbox:busybox",
            command=["sh", "/workspace/main.sh"],
            task_id=task_id,
            files=dict(_SPEC_FILES),
            priority=priority,  # type: ignore[arg-type]
            retry=RetryPolicy(max_attempts=max_attempts),
        )
        self.emit(TaskSubmitted, task_id, spec=spec, priority=priority)

    def reject(self, task_id: str, code: str = "INVALID_SPEC") -> None:
        error = self._error(task_id, code, None)
        self.emit(
            ErrorRaised,
            task_id,
            error_type=error.type,
            code=code,
            message=error.message,
            retryable=error.retryable,
        )
        result = Result(task_id=task_id, status="rejected", attempts=0, error=error)
        self.emit(TaskRejected, task_id, error=error, result=result)

    def attempt(
        self,
        task_id: str,
        n: int,
        plan: AttemptPlan = AttemptPlan(),
        *,
        max_attempts: int = 3,
        finish: bool = True,
    ) -> None:
        """One attempt's events. `finish=False` stops before attempt.finished (in flight)."""
        cid = self.start_attempt(task_id, n, max_attempts=max_attempts)
        ws = self.workspace_path(task_id, n)
        kills: tuple[str, ...] = ()
        if plan.kill_reason is not None:
            kills = (plan.kill_reason,)
            self.emit(KillIssued, task_id, n, container_id=cid, reason=plan.kill_reason)  # type: ignore[arg-type]
        evidence = Evidence(
            exit_code=plan.exit_code, kills_issued=kills, oom_killed=plan.error == "OOM_KILLED"
        )
        self.emit(
            ContainerExited,
            task_id,
            n,
            container_id=cid,
            exit_code=plan.exit_code,
            evidence=evidence,
            stdout_bytes=24,
        )
        if not finish:
            return
        for step, resource, leak in (
            ("remove_container", cid, plan.leak_container),
            ("remove_workspace", ws, plan.leak_workspace),
        ):
            if leak:
                continue
            if step in plan.fail_cleanup:
                self.emit(
                    CleanupFailed,
                    task_id,
                    n,
                    step=step,
                    resource=resource,
                    duration_s=0.05,
                    reason="device or resource busy",
                    error_class="docker_api_error",
                )
                if not plan.resolve_failed_cleanup:
                    continue
            self.emit(CleanupSucceeded, task_id, n, step=step, resource=resource, duration_s=0.02)
        if plan.error is not None:
            etype, retryable = CATALOGUE[plan.error]
            self.emit(
                ErrorRaised,
                task_id,
                n,
                error_type=etype,
                code=plan.error,
                message=f"{plan.error.lower()} in attempt {n}",
                retryable=retryable,
                container_id=cid,
                evidence=evidence,
            )
        self.emit(
            AttemptFinished,
            task_id,
            n,
            outcome="failed" if plan.error else "succeeded",
            exit_code=plan.exit_code,
            error_type=CATALOGUE[plan.error][0] if plan.error else None,
            error_code=plan.error,
            duration_s=0.4,
            evidence=evidence,
        )

    def start_attempt(self, task_id: str, n: int, *, max_attempts: int = 3) -> str:
        """An attempt up to its container running (its owner may die here); the container
        id."""
        cid, ws = self.container_id(task_id, n), self.workspace_path(task_id, n)
        self.emit(AttemptStarted, task_id, n, max_attempts=max_attempts)
        self.emit(WorkspaceCreated, task_id, n, path=ws, files=1, bytes=48)
        self.emit(
            ContainerCreated,
            task_id,
            n,
            container_id=cid,
            image="supervisor-sandbox:busybox",
            labels={"supervisor.managed": "true", "supervisor.node": self.node_id},
            deadline=(self.now() + timedelta(seconds=10)).timestamp(),
        )
        self.emit(ContainerStarted, task_id, n, container_id=cid)
        return cid

    def retry(self, task_id: str, n: int, error_code: str, delay_s: float = 1.0) -> None:
        self.emit(
            RetryScheduled, task_id, n, next_attempt=n + 1, delay_s=delay_s, error_code=error_code
        )

    def succeed(self, task_id: str, attempts: int) -> None:
        result = Result(
            task_id=task_id,
            status="succeeded",
            attempts=attempts,
            exit_code=0,
            stdout="hello from the sandbox\n",
            duration_s=0.5 * attempts,
        )
        self.emit(TaskSucceeded, task_id, attempts, result=result)

    def fail(self, task_id: str, attempts: int, code: str, exit_code: int | None = None) -> None:
        result = Result(
            task_id=task_id,
            status="failed",
            attempts=attempts,
            exit_code=exit_code,
            duration_s=0.5 * attempts,
            error=self._error(task_id, code, None),
        )
        self.emit(TaskFailed, task_id, attempts, result=result)

    def run_task(self, task_id: str, *plans: AttemptPlan, max_attempts: int = 3) -> None:
        """A whole task: submitted, then one attempt per plan, retries between them, and the
        terminal event that the last plan implies."""
        self.submit(task_id, max_attempts=max_attempts)
        plans = plans or (AttemptPlan(),)
        for n, plan in enumerate(plans, start=1):
            self.attempt(task_id, n, plan, max_attempts=max_attempts)
            if n < len(plans):
                self.retry(task_id, n, plan.error or "NONZERO_EXIT")
        last = plans[-1]
        if last.error is None:
            self.succeed(task_id, len(plans))
        else:
            self.fail(task_id, len(plans), last.error, last.exit_code)

    def _error(self, task_id: str, code: str, container_id: str | None) -> ExecutionError:
        etype, retryable = CATALOGUE[code]
        return ExecutionError(
            type=etype,
            code=code,
            message=f"{code.lower()}",
            retryable=retryable,
            task_id=task_id,
            container_id=container_id,
            timestamp=self.now().isoformat(),
        )


_TIMEOUT = AttemptPlan(error="EXECUTION_TIMEOUT", exit_code=137, kill_reason="timeout")
_MIX: tuple[tuple[float, tuple[AttemptPlan, ...] | None], ...] = (
    (0.70, (AttemptPlan(),)),
    (0.10, (AttemptPlan(error="NONZERO_EXIT", exit_code=1),)),
    (0.08, (_TIMEOUT, AttemptPlan())),
    (0.04, (_TIMEOUT, _TIMEOUT, _TIMEOUT)),
    (0.04, (AttemptPlan(error="OOM_KILLED", exit_code=137),)),
    (0.04, None),  # rejected
)


def mixed_history(
    n_events: int,
    *,
    seed: int = 7,
    node_id: str = "n1",
    start: datetime = EPOCH,
    id_prefix: str = "ev",
) -> list[Event]:
    """About `n_events` events (whole tasks, cut to exactly `n_events`) of a realistic mix:
    70 % first-attempt successes, user errors, timeouts retried to success or to failure,
    OOM kills and rejected specs. Deterministic for a given seed."""
    rnd = random.Random(seed)
    b = HistoryBuilder(node_id=node_id, start=start, id_prefix=id_prefix)
    weights = [w for w, _ in _MIX]
    i = 0
    while len(b.events) < n_events:
        i += 1
        task_id = f"t-{id_prefix}-{i:07d}"
        plans = rnd.choices(_MIX, weights)[0][1]
        if plans is None:
            b.submit(task_id)
            b.reject(task_id, "POLICY_VIOLATION" if i % 2 else "INVALID_SPEC")
        else:
            b.run_task(task_id, *plans)
    return b.events[:n_events]
