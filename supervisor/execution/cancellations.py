"""Following `task.cancel_requested` on a node that runs tasks: each request goes to the
executor (`Executor.cancel`), which kills a live attempt of the task and starts none after.

From the start of the stream (cancel requests are few, and the subject index hands over
only them), so a daemon started after a request still honours it for a task it pulls."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import msgspec
from nats.aio.msg import Msg
from nats.js.api import DeliverPolicy
from nats.js.client import JetStreamContext

from schemas import TaskCancelRequested, decode_event
from supervisor.execution.executor import Executor

log = logging.getLogger("supervisor.execution")

SUBJECT = "sup.task.cancel_requested.>"


@contextlib.asynccontextmanager
async def following_cancellations(js: JetStreamContext, executor: Executor) -> AsyncIterator[None]:
    """Hand every cancel request to `executor` while the context is open."""

    async def on_msg(msg: Msg) -> None:
        try:
            event = decode_event(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return
        running = isinstance(event, TaskCancelRequested) and await executor.cancel(event.task_id)
        if running:
            log.info("task %s cancelled: its attempt here is being killed", event.task_id)

    sub = await js.subscribe(
        SUBJECT, cb=on_msg, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL
    )
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            await asyncio.shield(sub.unsubscribe())
