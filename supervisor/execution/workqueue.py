"""The executor's side of `SUP_TASKS`: one durable pull consumer per priority, shared by
every node (a node pulls only when it has capacity), fetched without waiting, and
acknowledged only after the task's terminal event is durable.

Priority order would cost a round trip per empty queue at every pull: a queue found empty
is not asked again until a task is published to it (the core subscription that wakes the
scheduler sees every publish, from any node) or `RECHECK_S` has passed (what no publish
announces: a redelivery after another node's ack wait, a message handed back). A publish
reaches that subscription before the stream has stored it (JetStream fsyncs it first): a
queue found empty after a publish to it is asked again `RETRY_S` later, then twice as late,
up to `RETRY_MAX_S`, before it is marked empty (a task another node took meanwhile costs
this node four more pulls)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.client import JetStreamContext

from schemas import PRIORITIES
from schemas.errors import NatsUnavailable
from schemas.http import Check
from schemas.streams import TASKS_STREAM

log = logging.getLogger("supervisor.execution.workqueue")
_NO_WAIT = json.dumps({"batch": 1, "no_wait": True}).encode()
RECHECK_S = 1.0
RETRY_S = 0.02
RETRY_MAX_S = 0.16


def consumer_name(priority: str) -> str:
    return f"exec-{priority}"


def _consumer(priority: str, ack_wait_s: float, max_deliveries: int) -> ConsumerConfig:
    return ConsumerConfig(
        durable_name=consumer_name(priority),
        filter_subject=f"suptask.{priority}",
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.ALL,
        ack_wait=ack_wait_s,
        max_deliver=max_deliveries,
        max_ack_pending=-1,
    )


async def ensure_consumers(js: JetStreamContext, *, ack_wait_s: float, max_deliveries: int) -> None:
    """Create or update the three durable consumers. `max_deliveries` is what JetStream
    enforces; the daemon uses one more than its configured `max_deliver` so that it sees
    the poison delivery and can close the task as REDELIVERY_LIMIT instead of losing it."""
    for prio in PRIORITIES:
        await js.add_consumer(TASKS_STREAM, _consumer(prio, ack_wait_s, max_deliveries))


class WorkQueue:
    """Pulls from the three consumers. One that has gone (deleted by someone who may) is
    made again at the next pull that meets its absence; `missing` names those not yet back,
    for readiness."""

    def __init__(
        self, nc: NATS, js: JetStreamContext, *, ack_wait_s: float = 30.0, max_deliveries: int = 6
    ) -> None:
        self.nc = nc
        self.js = js
        self.ack_wait_s = ack_wait_s
        self.max_deliveries = max_deliveries
        self.wakeup = asyncio.Event()
        self.missing: set[str] = set()
        self._sub: object | None = None
        self._empty_at: dict[str, float] = {}  # priority -> when a pull last found it empty
        self._retry: dict[str, float] = {}  # priority -> next delay to ask again after a 404
        # priority -> the messages left after the last one pulled (0: found empty)
        self.left: dict[str, int] = {}

    async def start(self) -> None:
        """Wake the scheduler whenever a task is published (a core subscription sees the
        same subjects the stream stores); the queue published to is worth a pull again."""

        self._sub = await self.nc.subscribe("suptask.>", cb=self._published)

    async def _published(self, msg: Msg) -> None:
        priority = msg.subject.rpartition(".")[2]
        self.left[priority] = self.left.get(priority, 0) + 1  # until the next pull says
        self._retry[priority] = RETRY_S
        self._empty_at.pop(priority, None)
        self.wakeup.set()

    async def stop(self) -> None:
        sub = self._sub
        self._sub = None
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()  # type: ignore[attr-defined]

    async def next(self, priority: str) -> Msg | None:
        """The next message of `priority`, or None at once when there is none (without
        asking, for a queue found empty since which nothing was published to it and less
        than `RECHECK_S` ago)."""
        empty_at = self._empty_at.get(priority)
        if empty_at is not None and time.monotonic() - empty_at < RECHECK_S:
            return None
        subject = f"$JS.API.CONSUMER.MSG.NEXT.{TASKS_STREAM}.{consumer_name(priority)}"
        try:
            msg = await self.nc.request(subject, _NO_WAIT, timeout=5, old_style=True)
        except nats.errors.NoRespondersError as e:
            # No consumer answers: it may have been deleted. Make it again.
            await self._recreate(priority)
            raise NatsUnavailable("jetstream", f"pull from {priority}: {e!r}") from e
        except nats.errors.TimeoutError as e:
            raise NatsUnavailable("jetstream", f"pull from {priority}: {e!r}") from e
        except nats.errors.ConnectionClosedError as e:
            raise NatsUnavailable("jetstream", "connection closed") from e
        self.missing.discard(priority)
        if (msg.headers and msg.headers.get("Status")) or not msg.reply:
            # 404 no messages / 408 expired: empty, unless a task published to it may
            # not be stored yet (then the scheduler is woken again to ask)
            delay = self._retry.pop(priority, None)
            if delay is not None and delay <= RETRY_MAX_S:
                self._retry[priority] = delay * 2
                asyncio.get_running_loop().call_later(delay, self.wakeup.set)
            else:
                self._empty_at[priority] = time.monotonic()
            self.left[priority] = 0
            return None
        self._empty_at.pop(priority, None)
        with contextlib.suppress(ValueError, IndexError):
            self.left[priority] = msg.metadata.num_pending
        return msg

    def waiting(self) -> bool:
        """Whether the last pull of some priority left messages behind it (tasks that wait
        for a slot here, unless another node takes them first)."""
        return any(self.left.values())

    async def _recreate(self, priority: str) -> None:
        try:
            await self.js.consumer_info(TASKS_STREAM, consumer_name(priority))
            return
        except nats.js.errors.NotFoundError:
            pass
        except (nats.errors.Error, OSError):
            return
        self.missing.add(priority)
        log.warning("the %s consumer is missing; making it again", consumer_name(priority))
        with contextlib.suppress(nats.errors.Error, OSError):
            cfg = _consumer(priority, self.ack_wait_s, self.max_deliveries)
            await self.js.add_consumer(TASKS_STREAM, cfg)

    async def check(self) -> Check:
        """Readiness: every consumer answers."""
        gone = []
        for prio in PRIORITIES:
            try:
                await self.js.consumer_info(TASKS_STREAM, consumer_name(prio))
            except nats.js.errors.NotFoundError:
                gone.append(consumer_name(prio))
        if gone:
            return Check(
                ok=False, reason=f"consumer(s) {', '.join(gone)} missing; being made again"
            )
        return Check(ok=True, reason="the work queue's consumers answer")

    async def depth(self) -> dict[str, int]:
        """Messages waiting per priority (not yet delivered to the shared consumer)."""
        out: dict[str, int] = {}
        for prio in PRIORITIES:
            info = await self.js.consumer_info(TASKS_STREAM, consumer_name(prio))
            out[prio] = int(info.num_pending or 0) + int(info.num_ack_pending or 0)
        return out
