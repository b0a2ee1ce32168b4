"""Read back what landed in SUP_EVENTS (tests and benchmarks)."""

from __future__ import annotations

import asyncio
import contextlib

import nats
from nats.js.api import DeliverPolicy

from schemas import Event, decode_event, encode_event
from schemas.connection import connect_options
from schemas.streams import EVENTS_STREAM


async def stream_messages(
    url: str, subject: str = "sup.>", timeout: float = 10.0
) -> list[tuple[int, str, dict[str, str], Event]]:
    """Every message currently in SUP_EVENTS matching `subject`: (seq, subject, headers, event)."""
    nc = await nats.connect(**connect_options(url), connect_timeout=5)
    try:
        js = nc.jetstream()
        info = await js.stream_info(EVENTS_STREAM)
        if info.state.messages == 0:
            return []
        out: list[tuple[int, str, dict[str, str], Event]] = []
        done = asyncio.Event()

        async def cb(msg) -> None:  # type: ignore[no-untyped-def]
            out.append(
                (
                    msg.metadata.sequence.stream,
                    msg.subject,
                    dict(msg.headers or {}),
                    decode_event(msg.data),
                )
            )
            if msg.metadata.num_pending == 0:
                done.set()

        sub = await js.subscribe(
            subject, cb=cb, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL
        )
        with contextlib.suppress(TimeoutError):  # no message matched
            await asyncio.wait_for(done.wait(), timeout)
        await sub.unsubscribe()
        return out
    finally:
        await nc.close()


async def stream_events(url: str, subject: str = "sup.>") -> list[Event]:
    return [e for _, _, _, e in await stream_messages(url, subject)]


async def count_messages(url: str, subject: str) -> int:
    """How many messages of SUP_EVENTS match `subject` now (the stream's subject index: no
    waiting for messages that may never come)."""
    nc = await nats.connect(**connect_options(url), connect_timeout=5)
    try:
        info = await nc.jetstream().stream_info(EVENTS_STREAM, subjects_filter=subject)
        return sum((info.state.subjects or {}).values())
    finally:
        await nc.close()


async def publish_event(url: str, event: Event) -> None:
    """Publish `event` on its subject as anyone holding `url`'s credential could (forgeries
    in attack tests)."""
    nc = await nats.connect(**connect_options(url), connect_timeout=5)
    try:
        await nc.jetstream().publish(
            event.subject(), encode_event(event), headers={"Nats-Msg-Id": event.event_id}
        )
    finally:
        await nc.close()
