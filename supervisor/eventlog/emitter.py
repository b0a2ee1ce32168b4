"""Builds events with the common envelope and hands them to the event sink."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, TypeVar

from schemas import NO_TASK, Event
from supervisor.eventlog.ports import EventSink

__all__ = ["Emitter", "new_id", "utcnow"]

E = TypeVar("E", bound=Event)


def new_id() -> str:
    return uuid.uuid4().hex


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class Emitter:
    """The envelope of one scope (process, task, attempt). `for_task`/`for_attempt` narrow it."""

    sink: EventSink
    node_id: str
    instance_id: str
    task_id: str = NO_TASK
    attempt: int = 0
    correlation_id: str = ""
    clock: Callable[[], datetime] = utcnow

    def for_task(self, task_id: str, correlation_id: str) -> Emitter:
        return replace(self, task_id=task_id, correlation_id=correlation_id, attempt=0)

    def for_attempt(self, attempt: int) -> Emitter:
        return replace(self, attempt=attempt)

    def emit(self, cls: type[E], *, event_id: str | None = None, **fields: Any) -> E:
        """Build and hand over one event. `event_id` (else a new random one) lets a writer
        that may repeat itself (two reconcilers, a retried command) give a deterministic id,
        so JetStream's duplicate window keeps one copy."""
        event = cls(
            event_id=event_id or new_id(),
            occurred_at=self.clock(),
            node_id=self.node_id,
            instance_id=self.instance_id,
            task_id=self.task_id,
            attempt=self.attempt,
            correlation_id=self.correlation_id,
            **fields,
        )
        self.sink.emit(event)
        return event
