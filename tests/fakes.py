"""In-memory fakes for unit tests of pure logic only (never for Docker/NATS behaviour)."""

from __future__ import annotations

from schemas import Event


class ListSink:
    """An EventSink that keeps events in a list."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def emit(self, event: Event) -> None:
        self.events.append(event)

    async def flush(self, timeout: float | None = None) -> bool:
        return True
