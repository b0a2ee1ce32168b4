"""A task's own history, read back from `SUP_EVENTS` when its message is redelivered, and
the pure summary the daemon needs: which attempt ran last, whether it finished, whether
the task already reached its terminal state."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from datetime import datetime, timedelta

from nats.js.api import DeliverPolicy
from nats.js.client import JetStreamContext

from schemas import (
    AttemptFinished,
    AttemptStarted,
    ContainerCreated,
    Event,
    RetryScheduled,
    TaskCancelRequested,
    TaskFailed,
    TaskRejected,
    TaskSucceeded,
    WorkspaceCreated,
    decode_event,
)
from schemas.lifecycle import Keyring, attempt_finish_applies, proven, terminal_applies
from schemas.streams import EVENTS_STREAM, payload_signer

ENDS = (AttemptFinished, TaskSucceeded, TaskFailed, TaskRejected)
"""The events whose signature decides whether they count (`schemas.lifecycle.proven`)."""


def end_proof(keyring: Keyring | None, event: Event, data: bytes) -> str | None:
    """How `event` (its payload `data`) is proven when it is an end judged by `keyring`
    (`schemas.lifecycle.PROVEN` or a refusal); None when it is not judged (no keyring, or
    not an end)."""
    if keyring is None or not isinstance(event, ENDS):
        return None
    return keyring.judge(event.node_id, payload_signer(data))[0]


@dataclass(frozen=True)
class TaskHistory:
    last_attempt: int = 0
    # The attempt that started but never finished (its supervisor died), if any.
    open_attempt: int | None = None
    open_instance: str | None = None
    open_node: str | None = None
    open_container: str | None = None
    open_workspace: str | None = None
    terminal: str | None = None
    # The attempt a `retry.scheduled` announced after the last attempt (the delivery that
    # scheduled it ended before running it: a shutdown, or the Docker breaker opening).
    retry_pending: int | None = None
    # When that retry is due (the `retry.scheduled`'s time plus its delay).
    retry_due: datetime | None = None
    # Someone asked to cancel the task (`task.cancel_requested`).
    cancel_requested: bool = False


def summarize(events: list[Event]) -> TaskHistory:
    """Pure: fold a task's events (in stream order) into what a redelivery must know."""
    last = 0
    started: dict[int, str] = {}
    nodes: dict[int, str] = {}
    finished: set[int] = set()
    containers: dict[int, str] = {}
    workspaces: dict[int, str] = {}
    terminal: str | None = None
    pending: int | None = None
    due: datetime | None = None
    cancel = False
    for e in events:
        match e:
            case RetryScheduled():
                pending = e.next_attempt
                due = e.occurred_at + timedelta(seconds=e.delay_s)
            case TaskCancelRequested():
                cancel = True
            case AttemptStarted():
                started[e.attempt] = e.instance_id
                nodes[e.attempt] = e.node_id
                last = max(last, e.attempt)
            case AttemptFinished():
                finished.add(e.attempt)
            case ContainerCreated():
                containers[e.attempt] = e.container_id
            case WorkspaceCreated():
                workspaces[e.attempt] = e.path
            case TaskSucceeded():
                terminal = "succeeded"
            case TaskFailed():
                terminal = "failed"
            case TaskRejected():
                terminal = "rejected"
    if pending is not None and pending <= last:
        pending, due = None, None
    open_attempts = sorted(set(started) - finished)
    if not open_attempts:
        return TaskHistory(
            last_attempt=last,
            terminal=terminal,
            retry_pending=pending,
            retry_due=due,
            cancel_requested=cancel,
        )
    a = open_attempts[-1]
    return TaskHistory(
        last_attempt=last,
        open_attempt=a,
        open_instance=started[a],
        open_node=nodes[a],
        open_container=containers.get(a),
        open_workspace=workspaces.get(a),
        terminal=terminal,
        cancel_requested=cancel,
    )


def applied_terminal(messages: list[tuple[int, Event]]) -> Event | None:
    """The terminal event that ends the task, of its history as (seq, event) in stream
    order: the first one `terminal_applies` lets end it, as the projection decides it (a
    duplicate, or a forgery by an instance that did not run the attempt, never is)."""
    starters: dict[int, str] = {}
    finished: dict[int, int] = {}
    for seq, e in messages:
        a = e.attempt
        if isinstance(e, AttemptStarted):
            starters.setdefault(a, e.instance_id)
        elif isinstance(e, AttemptFinished):
            if attempt_finish_applies(e.instance_id, starters.get(a), e.error_type):
                finished.setdefault(a, seq)
        elif isinstance(e, TaskSucceeded | TaskFailed | TaskRejected) and terminal_applies(
            a, e.instance_id, seq, starters.get(a), finished.get(a)
        ):
            return e
    return None


async def read_task_events(
    js: JetStreamContext, task_id: str, timeout: float = 10.0, keyring: Keyring | None = None
) -> list[Event]:
    """Every event of `task_id` now in the stream, in order (see `read_task_messages`)."""
    return [e for _, e in await read_task_messages(js, task_id, timeout, keyring)]


async def read_task_messages(
    js: JetStreamContext, task_id: str, timeout: float = 10.0, keyring: Keyring | None = None
) -> list[tuple[int, Event]]:
    """Every event of `task_id` now in the stream with its sequence, in order (an ordered
    consumer filtered on `sup.*.*.*.<task>`; the stream's subject index keeps this cheap).
    With `keyring`, an end its node did not sign is left out: it never counts
    (`schemas.lifecycle.proven`)."""
    subject = f"sup.*.*.*.{task_id}"
    info = await js.stream_info(EVENTS_STREAM, subjects_filter=subject)
    count = sum((info.state.subjects or {}).values()) if info.state.subjects else 0
    if count == 0:
        return []
    out: list[tuple[int, Event]] = []
    done = asyncio.Event()

    async def on_msg(msg) -> None:  # type: ignore[no-untyped-def]
        with contextlib.suppress(Exception):  # an undecodable event is the projector's business
            event = decode_event(msg.data)
            if proven(end_proof(keyring, event, msg.data)):
                out.append((msg.metadata.sequence.stream, event))
        if msg.metadata.num_pending == 0:
            done.set()

    sub = await js.subscribe(
        subject, cb=on_msg, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL
    )
    try:
        await asyncio.wait_for(done.wait(), timeout)
    finally:
        await sub.unsubscribe()
    return out
