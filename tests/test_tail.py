"""`tail`: option parsing, subject filters, and live reading from a real SUP_EVENTS."""

from __future__ import annotations

import asyncio
import io
import socket
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import nats
import pytest

from schemas import AttemptStarted, ErrorRaised, Event, SupervisorStarted, encode_event
from schemas.errors import NatsUnavailable
from schemas.streams import EVENTS_STREAM
from supervisor.eventlog.follow import subject_filter, tail
from supervisor.eventlog.log import EventLog

T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def _attempt(eid: str, task: str) -> AttemptStarted:
    return AttemptStarted(
        event_id=eid, occurred_at=T0, node_id="n1", instance_id="i1", task_id=task
    )


def _error(eid: str, task: str, error_type: Any, code: str) -> ErrorRaised:
    return ErrorRaised(
        event_id=eid,
        occurred_at=T0,
        node_id="n1",
        instance_id="i1",
        task_id=task,
        error_type=error_type,
        code=code,
        message=code.lower(),
        retryable=False,
    )


E1 = _attempt("e1", "t-1")
E2 = _error("e2", "t-1", "timeout", "EXECUTION_TIMEOUT")
E3 = _attempt("e3", "t-2")
E4 = _error("e4", "t-2", "resource", "OOM_KILLED")
E5 = _error("e5", "t-3", "resource", "PIDS_LIMIT")
E6 = SupervisorStarted(event_id="e6", occurred_at=T0, node_id="n1", instance_id="i1", pid=7)
E7 = _error("e7", "t-2", "timeout", "EXECUTION_TIMEOUT")
E8 = _attempt("e8", "t-1")
HISTORY = [E1, E2, E3, E4, E5, E6, E7, E8]


def lines(*events: Event) -> list[str]:
    return [encode_event(e).decode() for e in events]


async def publish(tmp_dir: Path, url: str, events: list[Event], instance: str = "i1") -> None:
    log = EventLog(tmp_dir / "data", url, instance_id=instance)
    await log.start()
    try:
        for e in events:
            log.emit(e)
        assert await log.flush(10)
    finally:
        await log.close()


async def wait_for_consumer(url: str, timeout: float = 10.0) -> None:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        deadline = time.monotonic() + timeout
        while (await js.stream_info(EVENTS_STREAM)).state.consumer_count == 0:
            assert time.monotonic() < deadline, "tail never subscribed"
            await asyncio.sleep(0.01)
    finally:
        await nc.close()


# --- parsing ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "subject"),
    [
        ({}, "sup.>"),
        ({"errors": True}, "sup.error.>"),
        ({"type_": "timeout"}, "sup.error.timeout.>"),
        ({"errors": True, "type_": "timeout"}, "sup.error.timeout.>"),
        ({"task": "t-1"}, "sup.*.*.*.t-1"),
        ({"errors": True, "task": "t-1"}, "sup.error.*.*.t-1"),
        ({"type_": "resource", "task": "t-1"}, "sup.error.resource.*.t-1"),
    ],
)
def test_subject_filter_narrows_by_tokens(options: dict[str, Any], subject: str) -> None:
    assert subject_filter(**options) == subject


@pytest.mark.parametrize(
    "options", [{"task": "a.b"}, {"task": "*"}, {"type_": ">"}, {"task": "a b"}]
)
def test_subject_filter_refuses_what_is_not_one_token(options: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="is not a single subject token"):
        subject_filter(**options)


# --- live ---------------------------------------------------------------------------------


async def test_filters_select_exactly_the_matching_events(tmp_dir: Path, nats_url: str) -> None:
    await publish(tmp_dir, nats_url, HISTORY)
    cases: list[tuple[dict[str, Any], list[Event]]] = [
        ({}, HISTORY),
        ({"errors": True}, [E2, E4, E5, E7]),
        ({"type_": "timeout"}, [E2, E7]),
        ({"type_": "resource"}, [E4, E5]),
        ({"code": "OOM_KILLED"}, [E4]),
        ({"code": "EXECUTION_TIMEOUT"}, [E2, E7]),
        ({"task": "t-2"}, [E3, E4, E7]),
        ({"task": "t-2", "errors": True}, [E4, E7]),
        ({"task": "t-1", "type_": "timeout"}, [E2]),
        ({"task": "t-9"}, []),
    ]
    outs = [io.StringIO() for _ in cases]
    stop = asyncio.Event()

    async def _stop_when_all_arrived() -> None:
        deadline = time.monotonic() + 10
        while any(
            len(o.getvalue().splitlines()) < len(want)
            for o, (_, want) in zip(outs, cases, strict=True)
        ):
            assert time.monotonic() < deadline, "events did not arrive"
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.3)  # room for anything that should not have matched
        stop.set()

    counts = await asyncio.gather(
        *(
            tail(nats_url, **opts, since=datetime.now(UTC) - timedelta(hours=1), out=out, stop=stop)
            for out, (opts, _) in zip(outs, cases, strict=True)
        ),
        _stop_when_all_arrived(),
    )

    assert [o.getvalue().splitlines() for o in outs] == [lines(*want) for _, want in cases]
    assert counts[:-1] == [len(want) for _, want in cases]


async def test_since_a_time_skips_what_came_before(tmp_dir: Path, nats_url: str) -> None:
    await publish(tmp_dir, nats_url, [E1, E2])
    await asyncio.sleep(0.05)
    cut = datetime.now(UTC)
    await asyncio.sleep(0.05)
    await publish(tmp_dir, nats_url, [E3, E4], instance="i2")
    out = io.StringIO()

    written = await tail(nats_url, since=cut, out=out, limit=2)

    assert written == 2
    assert out.getvalue().splitlines() == lines(E3, E4)


async def test_without_since_only_new_events_are_shown(tmp_dir: Path, nats_url: str) -> None:
    await publish(tmp_dir, nats_url, [E1, E2])
    out = io.StringIO()
    follower = asyncio.create_task(tail(nats_url, out=out, limit=2))
    await wait_for_consumer(nats_url)

    await publish(tmp_dir, nats_url, [E7, E8], instance="i2")

    assert await asyncio.wait_for(follower, 10) == 2
    assert out.getvalue().splitlines() == lines(E7, E8)


async def test_stop_ends_a_quiet_tail(tmp_dir: Path, nats_url: str) -> None:
    await publish(tmp_dir, nats_url, [E1])
    stop = asyncio.Event()
    out = io.StringIO()
    follower = asyncio.create_task(tail(nats_url, errors=True, out=out, stop=stop))
    await wait_for_consumer(nats_url)

    stop.set()

    assert await asyncio.wait_for(follower, 5) == 0
    assert out.getvalue() == ""


async def test_unreachable_nats_is_reported() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    with pytest.raises(NatsUnavailable, match=f"127.0.0.1:{port}"):
        await tail(f"nats://127.0.0.1:{port}", out=io.StringIO(), connect_timeout=0.3)


async def test_a_missing_stream_is_reported(nats_url: str) -> None:
    with pytest.raises(NatsUnavailable, match="cannot follow SUP_EVENTS"):
        await tail(nats_url, out=io.StringIO(), limit=1)
