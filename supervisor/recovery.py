"""What a daemon does with a redelivered task message: close the attempt its dead owner
left open as `infrastructure/SUPERVISOR_LOST` (removing that attempt's container and
workspace when they are on this node and carry our labels), then continue as the retry
policy says; and end a poison task as `infrastructure/REDELIVERY_LIMIT`."""

from __future__ import annotations

from pathlib import Path

from schemas import CATALOGUE, AttemptFinished, ErrorRaised, TaskSpec
from supervisor.classify import Classification
from supervisor.emitter import Emitter
from supervisor.errors import SupervisorError
from supervisor.executor import Executor
from supervisor.history import TaskHistory


def catalogue_entry(code: str, message: str, **details: object) -> Classification:
    etype, retryable = CATALOGUE[code]
    return Classification(
        type=etype, code=code, retryable=retryable, message=message, details=details
    )


def closing_event_id(task_id: str, attempt: int, what: str) -> str:
    """The event id of the `what` ("error", "finished") event that closes a lost attempt.
    Deterministic, so that two closers racing (a redelivery and the reconciler, each having
    read the attempt as open) record the closing once: JetStream drops the second by its
    Nats-Msg-Id and the projection counts each event id once."""
    return f"lost.{task_id}.{attempt}.{what}"


async def close_lost_attempt(
    executor: Executor, spec: TaskSpec, history: TaskHistory
) -> Classification:
    """Record the open attempt of `history` as lost and clean what it left on this node."""
    assert spec.task_id is not None and history.open_attempt is not None
    em = executor.emitter.for_task(spec.task_id, spec.correlation_id or "").for_attempt(
        history.open_attempt
    )
    c = catalogue_entry(
        "SUPERVISOR_LOST",
        "the supervisor that owned this attempt died during it",
        lost_instance=history.open_instance,
    )
    container = await _ours(executor, em, history.open_container)
    workspace = Path(history.open_workspace) if history.open_workspace else None
    if workspace is not None and not workspace.is_relative_to(executor.data_dir):
        workspace = None  # another node's disk: its own reconciler removes it
    await executor.cleaner.clean(em, container, workspace, running=container is not None)
    record_closing(em, spec.task_id, history.open_attempt, c)
    executor.metrics.errors.labels(c.type, c.code).inc()
    return c


def record_closing(em: Emitter, task_id: str, attempt: int, c: Classification) -> None:
    """Emit the closing of a lost attempt: its error and its `attempt.finished` as failed,
    under the ids of `closing_event_id`, whoever closes it (a redelivery or the
    reconciler)."""
    em.emit(ErrorRaised, event_id=closing_event_id(task_id, attempt, "error"),
            error_type=c.type, code=c.code, message=c.message, retryable=c.retryable,
            details=c.details)  # fmt: skip
    em.emit(AttemptFinished, event_id=closing_event_id(task_id, attempt, "finished"),
            outcome="failed", error_type=c.type, error_code=c.code)  # fmt: skip


async def _ours(executor: Executor, em: Emitter, container_id: str | None) -> str | None:
    """The container id if it still exists, is managed and belongs to this node."""
    if container_id is None:
        return None
    try:
        labels = await executor.runtime.labels(container_id)
    except SupervisorError:
        return None  # gone already, or Docker is unreachable: the reconciler will see it
    if labels.get("supervisor.managed") != "true" or labels.get("supervisor.node") != em.node_id:
        return None
    return container_id


def redelivery_limit(deliveries: int, max_deliver: int) -> Classification:
    return catalogue_entry(
        "REDELIVERY_LIMIT",
        f"the task was delivered {deliveries} times (limit {max_deliver}); it is poison",
        deliveries=deliveries,
        max_deliver=max_deliver,
    )
