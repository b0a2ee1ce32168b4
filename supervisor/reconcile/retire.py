"""Retiring a node for good (`supervisor node retire ID`): a `node.retired` event, and its
open attempts closed as `infrastructure/SUPERVISOR_LOST`.

A retired node's task messages are redelivered to the other nodes once their ack wait
passes; those find the attempt closed (or close it themselves: the retirement is evidence
of the owner's death, `supervisor.execution.recovery.owner_death`) and go on as the retry
policy says. The closings use the deterministic ids of
`supervisor.execution.recovery.closing_event_id`, so a redelivery racing the retirement
records each closing once. What the node left on its own engine is abandoned: only that
node can reach it, and `leaked_resources` lists it with `owner = 'retired'`.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from datetime import datetime

import msgspec
import nats.errors
from nats.aio.msg import Msg
from nats.js.api import DeliverPolicy
from nats.js.client import JetStreamContext

from schemas import (
    NO_TASK,
    AttemptFinished,
    AttemptStarted,
    NodeHeartbeat,
    NodeRetired,
    decode_event,
)
from schemas.errors import NatsUnavailable
from schemas.streams import EVENTS_STREAM
from supervisor.eventlog.emitter import Emitter
from supervisor.execution.recovery import last_event, record_closing
from supervisor.policy.classify import catalogue_entry


@dataclass(frozen=True)
class OpenAttempt:
    task_id: str
    attempt: int
    instance_id: str
    correlation_id: str


async def open_attempts(
    js: JetStreamContext, node_id: str, timeout: float = 30.0
) -> list[OpenAttempt]:
    """The attempts started on `node_id` that no `attempt.finished` closed, read from
    `SUP_EVENTS` (every `sup.attempt.>` event, in order). Raises `NatsUnavailable`."""
    started: dict[tuple[str, int], OpenAttempt] = {}
    finished: set[tuple[str, int]] = set()
    try:
        info = await js.stream_info(EVENTS_STREAM, subjects_filter="sup.attempt.>")
        if not sum((info.state.subjects or {}).values()):
            return []
        done = asyncio.Event()

        async def on_msg(msg: Msg) -> None:
            with contextlib.suppress(msgspec.DecodeError, msgspec.ValidationError):
                e = decode_event(msg.data)
                key = (e.task_id, e.attempt)
                if isinstance(e, AttemptStarted) and e.node_id == node_id:
                    started[key] = OpenAttempt(
                        e.task_id, e.attempt, e.instance_id, e.correlation_id
                    )
                elif isinstance(e, AttemptFinished):
                    finished.add(key)
            if msg.metadata.num_pending == 0:
                done.set()

        sub = await js.subscribe(
            "sup.attempt.>", cb=on_msg, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL
        )
        try:
            await asyncio.wait_for(done.wait(), timeout)
        finally:
            await sub.unsubscribe()
    except (nats.errors.Error, OSError, TimeoutError) as e:
        raise NatsUnavailable("jetstream", f"reading the attempts of node {node_id}: {e!r}") from e
    return [a for key, a in sorted(started.items()) if key not in finished]


async def heartbeat_age(
    js: JetStreamContext, node_id: str, now: datetime
) -> tuple[float, float] | None:
    """(seconds since the node's latest heartbeat, the timeout it declared), or None when
    it never sent one."""
    beat = await last_event(js, f"sup.node.heartbeat.{node_id}.{NO_TASK}")
    if not isinstance(beat, NodeHeartbeat):
        return None
    return (now - beat.occurred_at).total_seconds(), beat.timeout_s


def retire(emitter: Emitter, attempts: list[OpenAttempt], reason: str) -> None:
    """Emit the retirement of `emitter.node_id` (the node retired) and the closing of each of
    its open `attempts`. The caller flushes the event log."""
    emitter.emit(NodeRetired, reason=reason, open_attempts=len(attempts))
    for a in attempts:
        c = catalogue_entry(
            "SUPERVISOR_LOST",
            "the supervisor that owned this attempt died during it",
            lost_instance=a.instance_id,
            evidence=f"node {emitter.node_id} was retired: {reason}"
            if reason
            else f"node {emitter.node_id} was retired",
        )
        em = emitter.for_task(a.task_id, a.correlation_id).for_attempt(a.attempt)
        record_closing(em, a.task_id, a.attempt, c)
