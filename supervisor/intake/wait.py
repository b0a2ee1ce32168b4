"""Waiting for a task's outcome from the stream: `supervisor submit --wait`, and the HTTP
`?wait`, answered as soon as the end is durable (`view_when_durable`). A daemon follows the
ends of every task once (`EndWatcher`), so that waiting for a task submitted through it
costs no consumer and no read of the read side."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from datetime import UTC
from typing import Any

import msgspec
from nats.js.api import ConsumerConfig, DeliverPolicy
from nats.js.client import JetStreamContext

from schemas import (
    AttemptFinished,
    AttemptStarted,
    Event,
    NodeHeartbeat,
    Result,
    TaskFailed,
    TaskRejected,
    TaskSucceeded,
    decode_event,
)
from schemas.connection import SigningConfig
from schemas.lifecycle import Keyring, attempt_finish_applies, terminal_applies
from schemas.streams import EVENTS_STREAM, EventSigner
from supervisor.eventlog.history import end_proof


class ResultWaiter:
    """Subscribed before the task is queued, so its terminal event cannot be missed.

    The outcome is the first terminal event that the lifecycle lets end the task
    (`schemas.lifecycle.terminal_applies`), as the projection decides it: one sent by the
    instance that started the attempt it names, or after that attempt was closed. A
    `task.succeeded` published by anyone else while the task runs is never the result."""

    def __init__(self, keyring: Keyring | None = None) -> None:
        self._keyring = keyring
        self._future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._sub: object | None = None
        self._starters: dict[int, str] = {}
        self._finished: dict[int, int] = {}
        # The terminal event that is the outcome, and its stream sequence.
        self.end: tuple[Event, int] | None = None

    def _offer(self, data: bytes, seq: int) -> None:
        with contextlib.suppress(Exception):
            event = decode_event(data)
            a = event.attempt
            proof = end_proof(self._keyring, event, data)
            if isinstance(event, AttemptStarted):
                self._starters.setdefault(a, event.instance_id)
            elif isinstance(event, AttemptFinished) and attempt_finish_applies(
                event.instance_id, self._starters.get(a), event.error_type, proof
            ):
                self._finished.setdefault(a, seq)
            elif isinstance(event, TaskSucceeded | TaskFailed | TaskRejected):
                if self._future.done() or not terminal_applies(
                    a, event.instance_id, seq, self._starters.get(a), self._finished.get(a), proof
                ):
                    return
                self.end = (event, seq)
                if isinstance(event, TaskRejected):
                    self._future.set_result(
                        event.result
                        or Result(
                            task_id=event.task_id, status="rejected", attempts=0, error=event.error
                        )
                    )
                else:
                    self._future.set_result(event.result)

    async def ended(self, timeout: float | None) -> Result | None:
        """The outcome, once it is known (None if `timeout` passes first)."""
        try:
            return await asyncio.wait_for(asyncio.shield(self._future), timeout)
        except TimeoutError:
            return None

    async def result(self, timeout: float | None) -> Result | None:
        try:
            return await self.ended(timeout)
        finally:
            await self.cancel()

    async def cancel(self) -> None:
        sub, self._sub = self._sub, None
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()  # type: ignore[attr-defined]


async def wait_for_result(
    js: JetStreamContext, task_id: str, keyring: Keyring | None = None
) -> ResultWaiter:
    """Follow the task's terminal event and return the waiter. From the start of the
    task's history: a task submitted again (the same spec under a known id) may have ended
    already; its first terminal event is its outcome. With `keyring`, an end its node did
    not sign never is (the keyring learns a node's key on first use)."""
    waiter = ResultWaiter(keyring)

    async def cb(msg) -> None:  # type: ignore[no-untyped-def]
        waiter._offer(msg.data, msg.metadata.sequence.stream)

    # The whole history of the task: whether an end applies depends on its attempts.
    waiter._sub = await js.subscribe(
        f"sup.*.*.*.{task_id}", cb=cb, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL
    )
    return waiter


# What a `ResultWaiter` judges an end by: the attempts' starts and finishes, and the ends.
_END_EVIDENCE = (AttemptStarted, AttemptFinished, TaskSucceeded, TaskFailed, TaskRejected)
_HEARTBEAT_S = 2.0


class EndWatcher:
    """The daemon's one follower of every task's ends: an ordered consumer on the events a
    `ResultWaiter` judges by, from the moment it opens. A task `track`ed (its id never seen
    in the stream when the intake looked, after this follower had opened) has its whole
    history here, so its `?wait` is answered from this follower alone: no consumer of its
    own, no read of the read side. The last `capacity` tracked tasks are kept; a task
    not tracked, or forgotten, is waited for as before (`view_when_durable`)."""

    def __init__(self, keyring: Keyring | None = None, capacity: int = 10_000) -> None:
        self._keyring = keyring
        self.capacity = capacity
        self._tasks: OrderedDict[str, ResultWaiter] = OrderedDict()
        self._sub: object | None = None
        self._floor = 0

    async def open(self, js: JetStreamContext) -> None:
        self._floor = (await js.stream_info(EVENTS_STREAM)).state.last_seq
        subjects = [f"sup.{kind.category}.{kind.name}.*.*" for kind in _END_EVIDENCE]
        # And the nodes' heartbeats, which nothing here waits for: nats-py replaces a lost
        # ordered consumer from the last sequence it delivered, or from the stream's start
        # if none yet. A heartbeat every few seconds keeps that window short on a node
        # where no task ends for hours.
        subjects.append(f"sup.{NodeHeartbeat.category}.{NodeHeartbeat.name}.*.*")
        self._sub = await js.subscribe(
            "sup.>",
            stream=EVENTS_STREAM,
            cb=self._on_msg,
            ordered_consumer=True,
            deliver_policy=DeliverPolicy.NEW,
            # Two heartbeats missed (the server restarted, the consumer lost): nats-py
            # makes a new consumer from the last sequence seen, again until one is made.
            idle_heartbeat=_HEARTBEAT_S,
            config=ConsumerConfig(filter_subjects=subjects),
        )

    async def close(self) -> None:
        sub, self._sub = self._sub, None
        if sub is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(sub.unsubscribe())  # type: ignore[attr-defined]
        self._tasks.clear()

    def track(self, task_id: str) -> None:
        """Follow `task_id`'s end from here on: call it only when the stream held no event
        of the task after this follower opened (nothing of it came before)."""
        if self._sub is None or task_id in self._tasks:
            return
        self._tasks[task_id] = ResultWaiter(self._keyring)
        while len(self._tasks) > self.capacity:
            self._tasks.popitem(last=False)

    def follows(self, task_id: str) -> bool:
        return task_id in self._tasks

    async def end(self, task_id: str, wait_s: float) -> tuple[Event, int] | None:
        """The tracked task's end and its sequence, once durable and applying (None if
        `wait_s` passes first)."""
        waiter = self._tasks[task_id]
        await waiter.ended(wait_s)
        return waiter.end

    async def _on_msg(self, msg) -> None:  # type: ignore[no-untyped-def]
        seq = msg.metadata.sequence.stream
        # A consumer replaced before its first message restarts from the stream's start.
        if seq > self._floor and (waiter := self._tasks.get(msg.subject.rpartition(".")[2])):
            waiter._offer(msg.data, seq)


@contextlib.asynccontextmanager
async def following_ends(
    js: JetStreamContext, keyring: Keyring | None = None
) -> AsyncIterator[EndWatcher]:
    """An `EndWatcher` open while the context is."""
    watcher = EndWatcher(keyring)
    await watcher.open(js)
    try:
        yield watcher
    finally:
        await watcher.close()


def own_keyring(signing: SigningConfig, node_id: str, signer: EventSigner | None) -> Keyring:
    """The keyring a process waiting for results judges ends with: the pinned keys, and its
    own node's key (`signer`'s, the data dir's), which it knows without being told."""
    keyring = signing.keyring()
    if signer is not None and node_id not in keyring.pinned:
        keyring.learned[node_id] = signer.public_key
    return keyring


_TASK_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")  # the spec's `Token`
ReadTask = Callable[[str, float], Awaitable[Mapping[str, Any] | None]]


async def view_when_durable(
    js: JetStreamContext,
    read: ReadTask,
    task_id: str,
    wait_s: float,
    keyring: Keyring | None = None,
    ends: EndWatcher | None = None,
) -> Mapping[str, Any] | None:
    """`GET /v1/tasks/{id}?wait`: the read side's view with the task's end laid over it as
    soon as that end is durable in `SUP_EVENTS` and applies (`ResultWaiter`: the same
    ownership rule as the projection's; `projection_seq` says how far the projection itself
    had got), or the read side's view at once when it already shows the end. The read side
    is not asked to wait (a waiting read would have the projection apply a batch for each
    task awaited: under a burst, one batch per task); it is read again when the wait runs
    out. The read side's own wait if NATS cannot be followed. A task that `ends` follows
    is answered from it alone: its end laid over a row of nothing else (the read side
    has the rest once the projection has applied it), or the read side's view if the wait
    runs out."""
    if wait_s <= 0 or not _TASK_ID.fullmatch(task_id):  # never a wildcard subject
        return await read(task_id, wait_s)
    if ends is not None and ends.follows(task_id):
        end = await ends.end(task_id, wait_s)
        return overlay_end({"task_id": task_id}, *end) if end else await read(task_id, 0.0)
    # The row as it is now (an ended task is answered at once); the end is laid over it.
    base = await read(task_id, 0.0)
    if base is not None and base.get("outcome") is not None:
        return base
    try:
        waiter = await wait_for_result(js, task_id, keyring)
    except Exception:  # NATS away: the projection's own wait
        return await read(task_id, wait_s)
    try:
        if await waiter.result(wait_s) is None or waiter.end is None:
            return await read(task_id, 0.0)  # not ended within the wait (or NATS went away)
        return overlay_end(base or {"task_id": task_id}, *waiter.end)
    finally:
        await waiter.cancel()


def overlay_end(view: Mapping[str, Any], event: Event, seq: int) -> dict[str, Any]:
    """A task's view (a `schemas.http.TaskView` document) with its terminal `event`, durable
    at stream sequence `seq`, laid over it: what the projection will show once it applies
    it."""
    if isinstance(event, TaskRejected):
        result = event.result or Result(
            task_id=event.task_id, status="rejected", attempts=0, error=event.error
        )
    else:
        assert isinstance(event, TaskSucceeded | TaskFailed)
        result = event.result
    at = event.occurred_at.astimezone(UTC).replace(tzinfo=None).isoformat()
    doc = dict(view)
    doc.update(
        state=result.status,
        outcome=result.status,
        attempts=result.attempts,
        exit_code=result.exit_code,
        error_type=result.error.type if result.error else None,
        error_code=result.error.code if result.error else None,
        duration_s=result.duration_s,
        finished_at=at,
        finished_seq=seq,
        terminal_events=max(int(doc.get("terminal_events") or 0), 1),
        last_seq=max(int(doc.get("last_seq") or 0), seq),
        last_event_at=at,
        result=msgspec.to_builtins(result),
    )
    return doc
