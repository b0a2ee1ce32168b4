"""Waiting for a task's outcome from the stream (`supervisor submit --wait`)."""

from __future__ import annotations

import asyncio
import contextlib

from nats.js.api import DeliverPolicy
from nats.js.client import JetStreamContext

from schemas import (
    AttemptFinished,
    AttemptStarted,
    Result,
    TaskFailed,
    TaskRejected,
    TaskSucceeded,
    decode_event,
)
from schemas.lifecycle import attempt_finish_applies, terminal_applies


class ResultWaiter:
    """Subscribed before the task is queued, so its terminal event cannot be missed.

    The outcome is the first terminal event that the lifecycle lets end the task
    (`schemas.lifecycle.terminal_applies`), as the projection decides it: one sent by the
    instance that started the attempt it names, or after that attempt was closed. A
    `task.succeeded` published by anyone else while the task runs is never the result."""

    def __init__(self) -> None:
        self._future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._sub: object | None = None
        self._starters: dict[int, str] = {}
        self._finished: dict[int, int] = {}

    def _offer(self, data: bytes, seq: int) -> None:
        with contextlib.suppress(Exception):
            event = decode_event(data)
            a = event.attempt
            if isinstance(event, AttemptStarted):
                self._starters.setdefault(a, event.instance_id)
            elif isinstance(event, AttemptFinished) and attempt_finish_applies(
                event.instance_id, self._starters.get(a), event.error_type
            ):
                self._finished.setdefault(a, seq)
            elif isinstance(event, TaskSucceeded | TaskFailed | TaskRejected):
                if self._future.done() or not terminal_applies(
                    a, event.instance_id, seq, self._starters.get(a), self._finished.get(a)
                ):
                    return
                if isinstance(event, TaskRejected):
                    self._future.set_result(
                        event.result
                        or Result(
                            task_id=event.task_id, status="rejected", attempts=0, error=event.error
                        )
                    )
                else:
                    self._future.set_result(event.result)

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
        waiter._offer(msg.data, msg.metadata.sequence.stream)

    # The whole history of the task: whether an end applies depends on its attempts.
    waiter._sub = await js.subscribe(
        f"sup.*.*.*.{task_id}", cb=cb, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL
    )
    return waiter
