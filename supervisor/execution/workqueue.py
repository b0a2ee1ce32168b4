"""The executor's side of `SUP_TASKS`: one durable pull consumer per priority, shared by
every node (a node pulls only when it has capacity), fetched without waiting so that
priority order costs one round trip per empty queue, and acknowledged only after the
task's terminal event is durable."""

from __future__ import annotations

import asyncio
import contextlib
import json

import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.client import JetStreamContext

from schemas import PRIORITIES
from schemas.errors import NatsUnavailable
from schemas.streams import TASKS_STREAM

_NO_WAIT = json.dumps({"batch": 1, "no_wait": True}).encode()


def consumer_name(priority: str) -> str:
    return f"exec-{priority}"


async def ensure_consumers(js: JetStreamContext, *, ack_wait_s: float, max_deliveries: int) -> None:
    """Create or update the three durable consumers. `max_deliveries` is what JetStream
    enforces; the daemon uses one more than its configured `max_deliver` so that it sees
    the poison delivery and can close the task as REDELIVERY_LIMIT instead of losing it."""
    for prio in PRIORITIES:
        cfg = ConsumerConfig(
            durable_name=consumer_name(prio),
            filter_subject=f"suptask.{prio}",
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=ack_wait_s,
            max_deliver=max_deliveries,
            max_ack_pending=-1,
        )
        await js.add_consumer(TASKS_STREAM, cfg)


class WorkQueue:
    def __init__(self, nc: NATS, js: JetStreamContext) -> None:
        self.nc = nc
        self.js = js
        self.wakeup = asyncio.Event()
        self._sub: object | None = None

    async def start(self) -> None:
        """Wake the scheduler whenever a task is published (a core subscription sees the
        same subjects the stream stores)."""

        async def _wake(_: Msg) -> None:
            self.wakeup.set()

        self._sub = await self.nc.subscribe("suptask.>", cb=_wake)

    async def stop(self) -> None:
        sub = self._sub
        self._sub = None
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()  # type: ignore[attr-defined]

    async def next(self, priority: str) -> Msg | None:
        """The next message of `priority`, or None at once when there is none."""
        subject = f"$JS.API.CONSUMER.MSG.NEXT.{TASKS_STREAM}.{consumer_name(priority)}"
        try:
            msg = await self.nc.request(subject, _NO_WAIT, timeout=5, old_style=True)
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError) as e:
            raise NatsUnavailable("jetstream", f"pull from {priority}: {e!r}") from e
        except nats.errors.ConnectionClosedError as e:
            raise NatsUnavailable("jetstream", "connection closed") from e
        if msg.headers and msg.headers.get("Status"):
            return None  # 404 no messages / 408 request expired
        if not msg.reply:
            return None
        return msg

    async def depth(self) -> dict[str, int]:
        """Messages waiting per priority (not yet delivered to the shared consumer)."""
        out: dict[str, int] = {}
        for prio in PRIORITIES:
            info = await self.js.consumer_info(TASKS_STREAM, consumer_name(prio))
            out[prio] = int(info.num_pending or 0) + int(info.num_ack_pending or 0)
        return out
