"""`DELETE /v1/tasks/{id}`: recording that a task is to be cancelled.

The request is an event, `task.cancel_requested`, with a deterministic id (`cancel.<task>`),
so asking twice records it once. Every node that runs tasks follows these events
(`supervisor.execution.cancellations`): the one running an attempt of the task kills it,
and none starts another; the task then ends, once, as `infrastructure/CANCELLED`.
"""

from __future__ import annotations

from typing import Any

from nats.js.client import JetStreamContext

from schemas import TaskCancelRequested, TaskSubmitted
from schemas.errors import ApiError, NatsUnavailable
from schemas.lifecycle import Keyring
from supervisor.eventlog.emitter import Emitter
from supervisor.eventlog.history import read_task_events, summarize
from supervisor.eventlog.log import EventLog

__all__ = ["request_cancel"]


async def request_cancel(
    js: JetStreamContext,
    events: EventLog,
    emitter: Emitter,
    task_id: str,
    reason: str = "",
    *,
    keyring: Keyring | None = None,
) -> dict[str, Any]:
    """Record the cancellation of `task_id` once it is durable. Raises ApiError 404 for a
    task the stream does not know, 409 `TASK_ENDED` for one that has ended (naming how),
    NatsUnavailable when the request cannot be made durable."""
    history = await read_task_events(js, task_id, keyring=keyring)
    if not history:
        raise ApiError(404, "validation", "TASK_NOT_FOUND", f"no task {task_id!r}")
    ended = summarize(history).terminal
    if ended is not None:
        raise ApiError(
            409, "validation", "TASK_ENDED", f"task {task_id!r} has ended ({ended})", outcome=ended
        )
    submitted = next((e for e in history if isinstance(e, TaskSubmitted)), None)
    correlation = submitted.correlation_id if submitted is not None else ""
    emitter.for_task(task_id, correlation).emit(
        TaskCancelRequested, event_id=f"cancel.{task_id}", reason=reason
    )
    if not await events.flush(10):
        raise NatsUnavailable(events.nats_url, "the cancellation could not be recorded")
    return {"task_id": task_id, "status": "cancelling"}
