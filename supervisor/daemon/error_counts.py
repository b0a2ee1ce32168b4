"""`supervisor_errors_total` counts every error of this node, not only those this process
raised: a refusal recorded by a `supervisor submit` on the node's data dir (a full queue, a
bad spec) is an error of the node too. The daemon counts its own as it raises them; this
follower adds the `error.raised` events that other processes of the same node publish
(same `node_id`, another `instance_id`), from the moment it starts."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import msgspec
from nats.aio.msg import Msg
from nats.js.api import DeliverPolicy
from nats.js.client import JetStreamContext

from schemas import ErrorRaised, decode_event
from supervisor.observability.metrics import Metrics


@contextlib.asynccontextmanager
async def counting_node_errors(
    js: JetStreamContext, metrics: Metrics, node_id: str, instance_id: str
) -> AsyncIterator[None]:
    """Count the node's errors raised by other processes while the context is open."""

    async def on_msg(msg: Msg) -> None:
        try:
            event = decode_event(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return
        if isinstance(event, ErrorRaised) and event.instance_id != instance_id:
            metrics.errors.labels(event.error_type, event.code).inc()

    sub = await js.subscribe(
        f"sup.error.*.{node_id}.*",
        cb=on_msg,
        ordered_consumer=True,
        deliver_policy=DeliverPolicy.NEW,
    )
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            await asyncio.shield(sub.unsubscribe())
