"""`GET /v1/tasks/{id}?wait` is answered as soon as the task's end is durable in a real
`SUP_EVENTS`, never after the projection's next batch, and by the same ownership rule the
projection applies: a forged end of a running attempt is never the answer. The read side
here is a stand-in that never shows the end (a projection that lags), so that only the
stream can answer."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import nats
import pytest

from schemas import AttemptStarted, Result, TaskSubmitted, TaskSucceeded
from schemas.connection import connect_options
from supervisor.intake.wait import following_ends, view_when_durable
from tests.test_tail import publish

pytestmark = pytest.mark.nats

T0 = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)


def _ev(cls: type, instance: str, n: int, task_id: str = "t-wait", **kw: Any) -> Any:
    return cls(
        event_id=f"w-{n}-{instance}-{task_id}",
        occurred_at=T0,
        node_id="n1",
        instance_id=instance,
        task_id=task_id,
        **kw,
    )


class _LaggingReadSide:
    """A read side whose view never shows the end: it answers a running row at once, and
    sleeps out a waiting read."""

    def __init__(self) -> None:
        self.calls: list[float] = []

    async def task(self, task_id: str, wait_s: float) -> Mapping[str, Any] | None:
        self.calls.append(wait_s)
        await asyncio.sleep(wait_s)
        return {"task_id": task_id, "state": "running", "outcome": None, "projection_seq": 2}


def _ok(attempt: int, task_id: str = "t-wait") -> Result:
    return Result(task_id=task_id, status="succeeded", attempts=attempt, exit_code=0, stdout="x\n")


async def test_the_end_is_answered_once_durable_and_a_forged_one_never(
    tmp_dir: Path, nats_url: str
) -> None:
    from schemas import TaskSpec

    spec = TaskSpec(image="supervisor-sandbox:busybox", command=["true"], task_id="t-wait")
    await publish(
        tmp_dir,
        nats_url,
        [
            _ev(TaskSubmitted, "owner", 1, spec=spec),
            _ev(AttemptStarted, "owner", 2, attempt=1),
        ],
        instance="owner",
    )
    nc = await nats.connect(**connect_options(nats_url))
    read = _LaggingReadSide()
    try:
        js = nc.jetstream()
        # A forged end from another instance while the owner's attempt runs: not the answer.
        forged = _ev(TaskSucceeded, "intruder", 3, attempt=1, result=_ok(1))
        waiting = asyncio.ensure_future(view_when_durable(js, read.task, "t-wait", 1.5))
        await asyncio.sleep(0.3)
        await publish(tmp_dir, nats_url, [forged], instance="intruder")
        view = await waiting
        assert view is not None and view["outcome"] is None  # the wait ran out: not ended

        # The owner's end: answered within moments of being durable, not after the wait.
        waiting = asyncio.ensure_future(view_when_durable(js, read.task, "t-wait", 20.0))
        await asyncio.sleep(0.3)
        real = _ev(TaskSucceeded, "owner", 4, attempt=1, result=_ok(1))
        t0 = time.monotonic()
        await publish(tmp_dir, nats_url, [real], instance="owner")
        view = await waiting
        took = time.monotonic() - t0
    finally:
        await nc.close()

    assert view is not None
    assert (view["state"], view["outcome"], view["attempts"], view["exit_code"]) == (
        "succeeded",
        "succeeded",
        1,
        0,
    )
    assert view["result"]["stdout"] == "x\n" and view["terminal_events"] == 1
    assert view["finished_seq"] == 4 and view["projection_seq"] == 2
    assert took < 5.0, took  # the stand-in read side would have answered after 20 s


async def test_an_id_that_is_not_a_task_id_never_becomes_a_wildcard(nats_url: str) -> None:
    read = _LaggingReadSide()
    nc = await nats.connect(**connect_options(nats_url))
    try:
        view = await view_when_durable(nc.jetstream(), read.task, ">", 0.2)
    finally:
        await nc.close()
    assert view is not None and read.calls == [0.2]  # the read side alone, no subscription


async def test_a_task_followed_from_its_submission_is_answered_by_the_shared_follower(
    tmp_dir: Path, nats_url: str
) -> None:
    """The daemon's one follower of ends (`EndWatcher`) answers a task tracked from before
    its first event by the same rule, without reading the read side while it waits; a task
    it does not follow (older than it, or forgotten past its capacity) is waited for as
    before, from its own history."""
    await publish(tmp_dir, nats_url, [_ev(AttemptStarted, "owner", 1, "t-old", attempt=1)])
    nc = await nats.connect(**connect_options(nats_url))
    read = _LaggingReadSide()
    try:
        js = nc.jetstream()
        async with following_ends(js) as ends:
            ends.capacity = 2
            for t in ("t-new", "t-gone", "t-kept", "t-kept"):  # t-new is forgotten
                ends.track(t)
            assert [ends.follows(t) for t in ("t-new", "t-gone", "t-kept", "t-old")] == [
                False,
                True,
                True,
                False,
            ]
            await publish(tmp_dir, nats_url, [_ev(AttemptStarted, "owner", 2, "t-kept", attempt=1)])
            forged = _ev(TaskSucceeded, "intruder", 3, "t-kept", attempt=1, result=_ok(1, "t-kept"))
            waiting = asyncio.ensure_future(
                view_when_durable(js, read.task, "t-kept", 1.0, ends=ends)
            )
            await asyncio.sleep(0.3)
            await publish(tmp_dir, nats_url, [forged], instance="intruder")
            view = await waiting
            assert view is not None and view["outcome"] is None  # the wait ran out
            assert read.calls == [0.0]  # read once, after the wait: not while waiting

            real = _ev(TaskSucceeded, "owner", 4, "t-kept", attempt=1, result=_ok(1, "t-kept"))
            await publish(tmp_dir, nats_url, [real])
            kept = await view_when_durable(js, read.task, "t-kept", 20.0, ends=ends)
            assert read.calls == [0.0]
            # The old task: its own history, read side first (no end yet: the wait runs out).
            old = await view_when_durable(js, read.task, "t-old", 0.5, ends=ends)
            assert read.calls == [0.0, 0.0, 0.0] and old is not None and old["outcome"] is None
    finally:
        await nc.close()
    assert kept is not None and kept["result"]["stdout"] == "x\n"
    assert (kept["task_id"], kept["outcome"], kept["attempts"], kept["finished_seq"]) == (
        "t-kept",
        "succeeded",
        1,
        4,
    )
    assert kept.get("projection_seq") is None  # laid over nothing of the read side's
