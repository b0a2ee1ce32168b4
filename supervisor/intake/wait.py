"""Waiting for a task's terminal event (`submit --wait`, `GET /v1/tasks/{id}?wait=`)."""

from __future__ import annotations

import asyncio
import contextlib

from nats.js.api import DeliverPolicy
from nats.js.client import JetStreamContext

from schemas import Result, TaskFailed, TaskRejected, TaskSucceeded, decode_event


class ResultWaiter:
    """Subscribed before the task is queued, so its terminal event cannot be missed."""

    def __init__(self) -> None:
        self._future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._sub: object | None = None

    def _offer(self, data: bytes) -> None:
        with contextlib.suppress(Exception):
            event = decode_event(data)
            if isinstance(event, TaskSucceeded | TaskFailed) and not self._future.done():
                self._future.set_result(event.result)
            elif isinstance(event, TaskRejected) and not self._future.done():
                self._future.set_result(
                    event.result
                    or Result(
                        task_id=event.task_id, status="rejected", attempts=0, error=event.error
                    )
                )

    async def result(self, timeout: float | None) -> Result | None:
        try:
            return await asyncio.wait_for(asyncio.shield(self._future), timeout)
        except TimeoutError:
            return None
        finally:
            await self.cancel()

    async def cancel(self) -> None:
        sub, self._sub = self._sub, None
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()  # type: ignore[attr-defined]


async def wait_for_result(js: JetStreamContext, task_id: str) -> ResultWaiter:
    """Follow the task's terminal event and return the waiter. From the start of the
    task's history: a task submitted again (the same spec under a known id) may have ended
    already; its first terminal event is its outcome."""
    waiter = ResultWaiter()

    async def cb(msg) -> None:  # type: ignore[no-untyped-def]
        waiter._offer(msg.data)

    waiter._sub = await js.subscribe(
        f"sup.task.*.*.{task_id}", cb=cb, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL
    )
    return waiter
