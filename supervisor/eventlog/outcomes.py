"""How an error and a refusal are recorded, written once for every path that records them
(the intake, the executor, `supervisor run`): the catalogue entry as an `error.raised`,
the `ExecutionError` a `Result` carries, and a refusal as that error followed by
`task.rejected` (for good) or `task.refused` (a passing reason: the id stays free)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from schemas import ErrorRaised, ExecutionError, Result, TaskRefused, TaskRejected
from supervisor.eventlog.emitter import Emitter
from supervisor.policy.classify import Classification

__all__ = ["emit_error", "execution_error", "record_refusal", "refusal_result"]


def emit_error(em: Emitter, c: Classification, message: str | None = None, **extra: Any) -> None:
    """Record the catalogue entry `c` as an `error.raised` (`extra`: the event's other
    fields, e.g. `evidence`, `container_id`, `event_id`)."""
    em.emit(
        ErrorRaised,
        error_type=c.type,
        code=c.code,
        message=message or c.message,
        retryable=c.retryable,
        details=c.details,
        **extra,
    )


def execution_error(
    em: Emitter, c: Classification, message: str | None = None, container_id: str | None = None
) -> ExecutionError:
    """The `ExecutionError` of `c` for `em`'s task, stamped with `em`'s clock."""
    return _error(em.task_id, c, message, container_id, em.clock())


def refusal_result(
    task_id: str, c: Classification, message: str | None, when: datetime, duration_s: float = 0.0
) -> Result:
    """The `Result` of a task refused before any attempt (status `rejected`)."""
    error = _error(task_id, c, message, None, when)
    return Result(
        task_id=task_id, status="rejected", attempts=0, error=error, duration_s=duration_s
    )


def _error(
    task_id: str, c: Classification, message: str | None, container_id: str | None, when: datetime
) -> ExecutionError:
    return ExecutionError(
        type=c.type,
        code=c.code,
        message=message or c.message,
        retryable=c.retryable,
        details=c.details,
        task_id=task_id,
        container_id=container_id,
        timestamp=when.isoformat(),
    )


def record_refusal(
    em: Emitter,
    c: Classification,
    message: str | None = None,
    *,
    kind: type[TaskRejected] | type[TaskRefused] = TaskRejected,
    duration_s: float = 0.0,
    **extra: Any,
) -> Result:
    """Refuse `em`'s task before any attempt: its `error.raised` (attempt 0; `extra` goes
    on it, e.g. `evidence`), then `kind` with the `Result` the submitter gets (status
    `rejected`, no attempt), which is returned. `task.rejected` also carries the spec's
    `callback_url` when `extra` names one."""
    callback_url = extra.pop("callback_url", None)
    result = refusal_result(em.task_id, c, message, em.clock(), duration_s)
    error = result.error
    assert error is not None
    emit_error(em, c, error.message, **extra)
    if kind is TaskRejected:
        em.emit(TaskRejected, error=error, result=result, callback_url=callback_url)
    else:
        em.emit(kind, error=error, result=result)
    return result
