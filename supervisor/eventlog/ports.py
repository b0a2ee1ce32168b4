"""The ports the services depend on. Each has one real adapter; fakes live in tests/."""

from __future__ import annotations

from typing import Protocol

from schemas import Event


class EventSink(Protocol):
    """Where events go. `emit` must make the event durable locally before it returns
    (an outbox append that survives the process), and must not block on the network."""

    def emit(self, event: Event) -> None: ...

    async def flush(self, timeout: float | None = None) -> bool:
        """Wait until every event emitted so far is acknowledged by JetStream; returns
        False if `timeout` passed first. Never raises for a down NATS."""
        ...
