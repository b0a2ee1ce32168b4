"""What a daemon does with a redelivered task message: close the attempt its dead owner
left open as `infrastructure/SUPERVISOR_LOST` (removing that attempt's container and
workspace when they are on this node and carry our labels), then continue as the retry
policy says; and end a poison task as `infrastructure/REDELIVERY_LIMIT`."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

import msgspec
import nats.errors
import nats.js.errors
from nats.js.client import JetStreamContext

from schemas import (
    NO_TASK,
    AttemptFinished,
    Event,
    NodeHeartbeat,
    NodeRetired,
    SupervisorSuperseded,
    TaskSpec,
    decode_event,
)
from schemas.errors import NatsUnavailable, SupervisorError
from schemas.labels import is_ours
from schemas.streams import EVENTS_STREAM
from supervisor.eventlog.emitter import Emitter
from supervisor.eventlog.history import TaskHistory
from supervisor.eventlog.outcomes import emit_error
from supervisor.execution.executor import Executor
from supervisor.policy.classify import Classification, catalogue_entry


def closing_event_id(task_id: str, attempt: int, what: str) -> str:
    """The event id of the `what` ("error", "finished") event that closes a lost attempt.
    Deterministic, so that two closers racing (a redelivery and the reconciler, each having
    read the attempt as open) record the closing once: JetStream drops the second by its
    Nats-Msg-Id and the projection counts each event id once."""
    return f"lost.{task_id}.{attempt}.{what}"


async def close_lost_attempt(
    executor: Executor, spec: TaskSpec, history: TaskHistory, death: str
) -> Classification:
    """Record the open attempt of `history` as lost (`death` says how its owner is known
    to be dead) and clean what it left on this node."""
    assert spec.task_id is not None and history.open_attempt is not None
    em = executor.emitter.for_task(spec.task_id, spec.correlation_id or "").for_attempt(
        history.open_attempt
    )
    c = catalogue_entry(
        "SUPERVISOR_LOST",
        "the supervisor that owned this attempt died during it",
        lost_instance=history.open_instance,
        evidence=death,
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
    emit_error(em, c, event_id=closing_event_id(task_id, attempt, "error"))
    em.emit(
        AttemptFinished,
        event_id=closing_event_id(task_id, attempt, "finished"),
        outcome="failed",
        error_type=c.type,
        error_code=c.code,
    )


async def _ours(executor: Executor, em: Emitter, container_id: str | None) -> str | None:
    """The container id if it still exists, is managed and belongs to this node."""
    if container_id is None:
        return None
    try:
        labels = await executor.runtime.labels(container_id)
    except SupervisorError:
        return None  # gone already, or Docker is unreachable: the reconciler will see it
    if not is_ours(labels, em.node_id):
        return None
    return container_id


def redelivery_limit(
    deliveries: int, max_deliver: int, unknown_fields: Sequence[str] = ()
) -> Classification:
    """`unknown_fields`: the spec's fields this node does not know, which is why it handed
    the task back each time (a newer node's spec, and no newer node took it)."""
    message = f"the task was delivered {deliveries} times (limit {max_deliver}); it is poison"
    extra: dict[str, object] = {}
    if unknown_fields:
        message = (
            f"the task was delivered {deliveries} times (limit {max_deliver}) and no node "
            f"that knows its spec's fields ({', '.join(unknown_fields)}) took it"
        )
        extra["unknown_fields"] = list(unknown_fields)
    return catalogue_entry(
        "REDELIVERY_LIMIT", message, deliveries=deliveries, max_deliver=max_deliver, **extra
    )


async def owner_death(
    js: JetStreamContext,
    *,
    node_id: str,
    instance_id: str,
    self_instance: str,
    superseded: frozenset[str],
    heartbeat_timeout_s: float,
    now: datetime,
) -> str | None:
    """Why the instance that owns an open attempt is dead, or None when nothing proves it
    (it may be alive, only slow to ack: its attempt must not be closed then).

    Evidence, each read from the stream's last message on a subject (two direct gets):
    this instance superseded it (it held this data dir's lock); a `supervisor.superseded`
    names it; its node was retired (`node.retired`) and has sent no heartbeat since; its
    node's latest heartbeat comes from another instance (one daemon per node), or from it
    but older than its timeout. Raises `NatsUnavailable`."""
    if instance_id == self_instance:
        raise ValueError("the own instance's attempts are known without evidence")
    if instance_id in superseded:
        return f"instance {instance_id} was superseded by this one (it held the data dir)"
    last = await last_event(js, f"sup.supervisor.superseded.{node_id}.{NO_TASK}")
    if isinstance(last, SupervisorSuperseded) and last.superseded_instance == instance_id:
        return f"instance {instance_id} was superseded by {last.instance_id}"
    beat = await last_event(js, f"sup.node.heartbeat.{node_id}.{NO_TASK}")
    retired = await last_event(js, f"sup.node.retired.{node_id}.{NO_TASK}")
    if isinstance(retired, NodeRetired) and (
        not isinstance(beat, NodeHeartbeat) or beat.occurred_at <= retired.occurred_at
    ):
        return f"node {node_id} was retired at {retired.occurred_at.isoformat()}"
    if isinstance(beat, NodeHeartbeat):
        if beat.instance_id != instance_id:
            return f"node {node_id} is now run by instance {beat.instance_id}"
        timeout = beat.timeout_s or heartbeat_timeout_s
        silent = (now - beat.occurred_at).total_seconds()
        if silent > timeout:
            return f"instance {instance_id} sent no heartbeat for {silent:.0f}s"
    return None


async def last_event(js: JetStreamContext, subject: str) -> Event | None:
    try:
        msg = await js.get_last_msg(EVENTS_STREAM, subject)
    except nats.js.errors.NotFoundError:
        return None
    except (nats.errors.Error, OSError) as e:
        raise NatsUnavailable("jetstream", f"last message on {subject}: {e!r}") from e
    try:
        return decode_event(msg.data or b"")
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
