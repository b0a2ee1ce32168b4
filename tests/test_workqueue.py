"""The work queue's pulls against a real nats-server: a queue found empty is not asked again
until a task is published to it or `RECHECK_S` has passed, and no task is missed for it
(one published meanwhile is pulled at once; one no publish announces, within RECHECK_S;
one whose publish was seen before the stream stored it, at the next tries)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.client import JetStreamContext

from schemas.streams import TASKS_STREAM
from supervisor.eventlog.nats_client import close_quietly, connect_nats, ensure_streams
from supervisor.execution import workqueue
from supervisor.execution.workqueue import WorkQueue, ensure_consumers

pytestmark = pytest.mark.nats


Body = Callable[[WorkQueue, JetStreamContext, list[str], NATS], Awaitable[None]]


async def _pulls_of(url: str, body: Body) -> None:
    nc = await connect_nats(url, reconnect=False, timeout=10.0, name="test-workqueue")
    spy = await connect_nats(url, reconnect=False, timeout=10.0, name="test-workqueue-spy")
    asked: list[str] = []

    async def count(msg: Msg) -> None:
        asked.append(msg.subject.rpartition(".")[2])

    try:
        await spy.subscribe(f"$JS.API.CONSUMER.MSG.NEXT.{TASKS_STREAM}.>", cb=count)
        await spy.flush()
        js = nc.jetstream()
        await ensure_streams(js, url=url)
        await ensure_consumers(js, ack_wait_s=30, max_deliveries=6)
        wq = WorkQueue(nc, js)
        await wq.start()
        await body(wq, js, asked, spy)
        await wq.stop()
    finally:
        await close_quietly(spy)
        await close_quietly(nc)


async def _settle(spy: NATS) -> None:
    await spy.flush()
    await asyncio.sleep(0.05)


def test_an_empty_queue_is_asked_once_until_a_task_is_published_to_it(nats_url: str) -> None:
    async def body(wq: WorkQueue, js: JetStreamContext, asked: list[str], spy: NATS) -> None:
        for _ in range(5):
            assert await wq.next("high") is None
        await _settle(spy)
        assert asked.count("exec-high") == 1  # the other four did not ask
        await js.publish("suptask.high", b"{}")
        for _ in range(50):  # the wake-up comes on the core subscription
            msg = await wq.next("high")
            if msg is not None:
                break
            await asyncio.sleep(0.01)
        assert msg is not None and msg.data == b"{}"
        await msg.ack_sync()
        # A publish to another queue leaves this one known empty.
        assert await wq.next("low") is None
        await js.publish("suptask.normal", b"{}")
        await _settle(spy)
        before = asked.count("exec-low")
        assert await wq.next("low") is None
        await _settle(spy)
        assert asked.count("exec-low") == before

    asyncio.run(_pulls_of(nats_url, body))


def test_a_task_no_publish_announces_is_pulled_within_the_recheck(nats_url: str) -> None:
    async def body(wq: WorkQueue, js: JetStreamContext, asked: list[str], spy: NATS) -> None:
        await wq.stop()  # its wake-ups are lost from here: as over a reconnect
        assert await wq.next("normal") is None
        await js.publish("suptask.normal", b"{}")
        assert await wq.next("normal") is None  # known empty, not asked
        t = time.monotonic()
        msg = None
        while msg is None and time.monotonic() - t < 5:
            await asyncio.sleep(0.05)
            msg = await wq.next("normal")
        assert msg is not None and msg.data == b"{}"
        assert workqueue.RECHECK_S <= time.monotonic() - t + 0.1 < workqueue.RECHECK_S + 1
        await msg.ack_sync()

    asyncio.run(_pulls_of(nats_url, body))


def test_a_queue_published_to_is_asked_again_before_it_is_marked_empty(nats_url: str) -> None:
    """The publish reaches the subscription before the stream stores the task: a pull right
    after it may find the queue empty. It is asked again 20, 40, 80 and 160 ms later, then
    marked empty."""

    async def body(wq: WorkQueue, js: JetStreamContext, asked: list[str], spy: NATS) -> None:
        await wq._published(Msg(wq.nc, subject="suptask.high"))  # seen, not stored (yet)
        for retry in range(5):
            wq.wakeup.clear()
            assert await wq.next("high") is None
            if retry < 4:  # the scheduler is woken to ask again
                await asyncio.wait_for(wq.wakeup.wait(), 1.0)
        assert await wq.next("high") is None  # marked empty now: not asked
        await _settle(spy)
        assert asked.count("exec-high") == 5

    asyncio.run(_pulls_of(nats_url, body))
