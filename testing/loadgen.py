"""Publishing histories to `SUP_EVENTS` (tests, benchmarks, demos).

Events are published as the event log publishes them: on their subject, with
`Nats-Msg-Id = event_id`, pipelined with `publish_async`. Raw payloads (for poison
messages) go the same way with an id of their own.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterable
from typing import Any

import nats
from nats.js.client import JetStreamContext

from schemas import Event, encode_event
from schemas.streams import EVENTS_STREAM
from supervisor.eventlog.streams import events_stream_config

Item = Event | tuple[str, bytes]
"""An event, or a raw message: (subject, payload)."""


async def ensure_events_stream(js: JetStreamContext) -> None:
    """Create `SUP_EVENTS` unless it exists."""
    try:
        await js.stream_info(EVENTS_STREAM)
    except nats.js.errors.NotFoundError:
        await js.add_stream(events_stream_config())


async def publish(url: str, items: Iterable[Item], *, max_pending: int = 20_000) -> int:
    """Publish `items` in order; returns the stream's last sequence once all are acked.
    Raises RuntimeError if JetStream refused any of them."""
    nc = await nats.connect(url)
    failures: list[BaseException] = []

    def _check(f: asyncio.Future[Any]) -> None:
        if not f.cancelled() and f.exception() is not None:
            failures.append(f.exception())  # type: ignore[arg-type]

    try:
        js = nc.jetstream(publish_async_max_pending=max_pending)
        await ensure_events_stream(js)
        for item in items:
            if isinstance(item, Event):
                subject, data, msg_id = item.subject(), encode_event(item), item.event_id
            else:
                subject, data = item
                msg_id = f"raw-{uuid.uuid4().hex}"
            future = await js.publish_async(subject, data, headers={"Nats-Msg-Id": msg_id})
            future.add_done_callback(_check)
        await js.publish_async_completed()
        if failures:
            raise RuntimeError(f"{len(failures)} publish(es) failed, first: {failures[0]!r}")
        info = await js.stream_info(EVENTS_STREAM)
        return int(info.state.last_seq)
    finally:
        await nc.close()
