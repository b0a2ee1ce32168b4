"""The Docker circuit breaker: the pure transitions exhaustively, then the service against
the real Docker engine for the probe that closes, and against a socket that hangs up on
every request for the probe that fails (a missing socket would do as well, but docker-py
leaks the socket of a refused connect and the suite treats that warning as an error)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas import BreakerTransition, ExecutionError
from schemas.config import BreakerConfig
from schemas.errors import (
    ContainerVanished,
    DockerApiError,
    DockerUnavailable,
    ImageNotFound,
    InvalidSpec,
    NatsUnavailable,
)
from supervisor.docker.engine_breaker import DockerBreaker
from supervisor.docker.runtime import DockerRuntime
from supervisor.eventlog.emitter import Emitter
from supervisor.observability.metrics import Metrics
from supervisor.policy.breaker import (
    BreakerState,
    CircuitOpen,
    Decision,
    Step,
    Transition,
    allow,
    counts,
    on_failure,
    on_success,
    open_interval,
)
from supervisor.policy.classify import Classification
from tests.fakes import ListSink

CFG = BreakerConfig(failure_threshold=3, open_interval_s=10.0)
DOWN = DockerUnavailable("create", "ConnectionError")
USER = Classification(type="user_code", code="NONZERO_EXIT", retryable=False, message="exit 1")


@contextlib.asynccontextmanager
async def hangup_engine(directory: Path) -> AsyncIterator[str]:
    """A unix socket where every connection is closed unanswered: a Docker URL whose
    engine is unreachable (docker-py raises a ConnectionError -> DockerUnavailable)."""

    async def hang_up(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    path = directory / "dead-docker.sock"
    server = await asyncio.start_unix_server(hang_up, path)
    try:
        yield f"unix://{path}"
    finally:
        server.close()
        await server.wait_closed()
        path.unlink(missing_ok=True)


def _cls(type_: str, code: str) -> Classification:
    return Classification(type=type_, code=code, retryable=True, message="m")  # type: ignore[arg-type]


# --- what counts --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (DockerUnavailable("ping"), True),
        (DockerApiError("create", "HTTP 500: boom", status=500), True),
        (ImageNotFound("create", "no such image"), False),
        (ContainerVanished("inspect"), False),
        (InvalidSpec("image", "empty"), False),
        (NatsUnavailable("nats://x"), False),
        (CircuitOpen("open", 3, 1.0), False),
        (ValueError("not ours"), False),
        (_cls("infrastructure", "DOCKER_UNAVAILABLE"), True),
        (_cls("infrastructure", "DOCKER_API_ERROR"), True),
        (_cls("infrastructure", "KILLED_EXTERNALLY"), False),
        (_cls("infrastructure", "CIRCUIT_OPEN"), False),
        (_cls("infrastructure", "SUPERVISOR_LOST"), False),
        (_cls("user_code", "NONZERO_EXIT"), False),
        (_cls("resource", "OOM_KILLED"), False),
        (_cls("timeout", "EXECUTION_TIMEOUT"), False),
        (
            ExecutionError(
                type="infrastructure", code="DOCKER_API_ERROR", message="m", retryable=True
            ),
            True,
        ),
    ],
)
def test_only_engine_failures_count(error: object, expected: bool) -> None:
    assert counts(error) is expected  # type: ignore[arg-type]


# --- closed ---------------------------------------------------------------------------------


def test_failures_below_the_threshold_keep_it_closed_and_counted() -> None:
    s = BreakerState()

    s, t1 = on_failure(s, 1.0, DOWN, config=CFG)
    s, t2 = on_failure(s, 2.0, DOWN, config=CFG)

    assert s == BreakerState(status="closed", failures=2)
    assert (t1, t2) == (None, None)
    assert allow(s, 3.0, config=CFG) == (Decision(kind="allow"), s)


def test_the_threshold_opens_it_with_an_event_ready_transition() -> None:
    s = BreakerState(failures=2)

    step = on_failure(s, 5.0, DockerApiError("start", "HTTP 500: x", status=500), config=CFG)

    assert step == Step(
        BreakerState(status="open", failures=3, opened_at=5.0),
        Transition(
            from_state="closed",
            to_state="open",
            reason="3 consecutive engine failures, last docker_api_error: docker start failed: HTTP 500: x",
            failures=3,
        ),
    )


def test_a_success_resets_the_count() -> None:
    assert on_success(BreakerState(failures=2), 1.0, config=CFG) == Step(BreakerState())
    assert on_success(BreakerState(), 1.0, config=CFG) == Step(BreakerState())


def test_user_errors_never_count_even_at_the_threshold() -> None:
    s = BreakerState(failures=2)

    for now in range(100):
        step = on_failure(s, float(now), USER, config=CFG)
        assert step == Step(s)


# --- open -----------------------------------------------------------------------------------


def test_open_rejects_until_the_interval_then_hands_out_one_probe() -> None:
    s = BreakerState(status="open", failures=3, opened_at=100.0)

    early = allow(s, 104.0, config=CFG)
    due = allow(s, 110.0, config=CFG)

    assert early == (Decision(kind="reject", retry_in_s=6.0), s)
    assert due == (
        Decision(
            kind="probe",
            transition=Transition(
                from_state="open",
                to_state="half_open",
                reason="open for 10s: probing Docker",
                failures=3,
            ),
        ),
        BreakerState(status="half_open", failures=3, opened_at=100.0, probe_at=110.0),
    )


def test_open_counts_late_failures_without_moving_the_interval_and_ignores_late_successes() -> None:
    s = BreakerState(status="open", failures=3, opened_at=100.0)

    assert on_failure(s, 105.0, DOWN, config=CFG) == Step(
        BreakerState(status="open", failures=4, opened_at=100.0)
    )
    assert on_success(s, 105.0, config=CFG) == Step(s)


# --- half-open ------------------------------------------------------------------------------

HALF = BreakerState(status="half_open", failures=3, opened_at=100.0, probe_at=110.0)


def test_half_open_allows_no_second_probe_while_one_is_out() -> None:
    assert allow(HALF, 115.0, config=CFG) == (Decision(kind="reject", retry_in_s=5.0), HALF)


def test_a_lost_probe_is_replaced_after_another_interval() -> None:
    decision, s = allow(HALF, 120.0, config=CFG)

    assert decision == Decision(kind="probe")
    assert s == BreakerState(status="half_open", failures=3, opened_at=100.0, probe_at=120.0)


def test_the_probe_succeeding_closes_it() -> None:
    assert on_success(HALF, 111.0, config=CFG) == Step(
        BreakerState(),
        Transition(
            from_state="half_open",
            to_state="closed",
            reason="probe succeeded: Docker answered",
            failures=0,
        ),
    )


def test_the_probe_failing_reopens_it_and_restarts_the_interval() -> None:
    step = on_failure(HALF, 111.0, DOWN, config=CFG)

    assert step == Step(
        BreakerState(status="open", failures=4, opened_at=111.0, reopens=1),
        Transition(
            from_state="half_open",
            to_state="open",
            reason="probe failed: docker_unavailable: docker create failed: ConnectionError",
            failures=4,
        ),
    )
    assert allow(step.state, 130.0, config=CFG)[0].kind == "reject"  # 20 s now
    assert allow(step.state, 131.0, config=CFG)[0].kind == "probe"


def test_each_failed_probe_doubles_the_interval_up_to_the_cap_and_closing_resets_it() -> None:
    cfg = BreakerConfig(failure_threshold=1, open_interval_s=10.0, max_open_interval_s=35.0)
    s, now = on_failure(BreakerState(), 0.0, DOWN, config=cfg).state, 0.0
    waits = []
    for _ in range(4):
        decision, _ = allow(s, now, config=cfg)
        waits.append(decision.retry_in_s)
        now += open_interval(s, cfg)
        decision, s = allow(s, now, config=cfg)
        assert decision.kind == "probe"
        s = on_failure(s, now, DOWN, config=cfg).state
    assert waits == [10.0, 20.0, 35.0, 35.0]
    decision, s = allow(s, now + 35.0, config=cfg)
    s = on_success(s, now + 35.0, config=cfg).state
    assert s == BreakerState()
    s = on_failure(s, now + 40.0, DOWN, config=cfg).state
    assert open_interval(s, cfg) == 10.0
    # a cap below the first interval never shortens it
    assert open_interval(s, BreakerConfig(open_interval_s=10.0, max_open_interval_s=1.0)) == 10.0


def test_a_user_error_of_the_probe_leaves_it_half_open() -> None:
    assert on_failure(HALF, 111.0, USER, config=CFG) == Step(HALF)


# --- properties -----------------------------------------------------------------------------

_configs = st.builds(
    BreakerConfig,
    failure_threshold=st.integers(1, 6),
    open_interval_s=st.floats(0.5, 30.0, allow_nan=False),
    max_open_interval_s=st.floats(0.5, 120.0, allow_nan=False),
)
_ops = st.lists(
    st.tuples(
        st.sampled_from(["success", "engine", "user", "allow"]),
        st.floats(0.0, 20.0, allow_nan=False),
    ),
    max_size=60,
)


@given(_configs, _ops)
def test_any_sequence_keeps_the_invariants(
    cfg: BreakerConfig, ops: list[tuple[str, float]]
) -> None:
    s, now = BreakerState(), 0.0
    streak = 0  # engine failures since the last success, as the caller saw them
    for op, dt in ops:
        now += dt
        before = s
        transition: Transition | None
        if op == "success":
            s, transition = on_success(s, now, config=cfg)
            streak = 0
        elif op == "engine":
            s, transition = on_failure(s, now, DOWN, config=cfg)
            streak += 1
        elif op == "user":
            s, transition = on_failure(s, now, USER, config=cfg)
            assert s == before
        else:
            decision, s = allow(s, now, config=cfg)
            transition = decision.transition
            if before.status == "closed":
                assert decision.kind == "allow"
            if before.status == "open" and before.opened_at is not None:
                due = before.opened_at + open_interval(before, cfg)
                assert (decision.kind == "probe") == (now >= due)
                assert cfg.open_interval_s <= open_interval(before, cfg)
            if decision.kind == "probe":
                assert s.status == "half_open" and s.probe_at == now
        # status and timestamps agree
        assert (s.status == "closed") == (s.opened_at is None)
        assert (s.status == "half_open") == (s.probe_at is not None)
        assert s.failures >= 0
        assert s.status != "closed" or s.reopens == 0  # closing resets the back-off
        # a transition is reported exactly when the status changes, and says so truly
        if transition is None:
            assert s.status == before.status
        else:
            assert (transition.from_state, transition.to_state) == (before.status, s.status)
            assert transition.failures == s.failures
        # it opens from closed only after `threshold` consecutive engine failures
        if before.status == "closed" and s.status == "open":
            assert streak >= cfg.failure_threshold
            assert s.failures == cfg.failure_threshold
        # half-open is reached only through `allow`
        if s.status == "half_open" and before.status != "half_open":
            assert op == "allow"


@given(_configs, st.integers(0, 50), st.floats(0.0, 1000.0, allow_nan=False))
def test_no_probe_goes_before_the_interval(
    cfg: BreakerConfig, failures: int, opened: float
) -> None:
    s = BreakerState(status="open", failures=failures, opened_at=opened)

    decision, after = allow(s, opened + open_interval(s, cfg) * 0.999, config=cfg)

    assert decision.kind == "reject" and after == s
    assert decision.retry_in_s is not None and decision.retry_in_s > 0


# --- the service ----------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _breaker(clock: Clock, **kw: object) -> tuple[DockerBreaker, ListSink, Metrics]:
    sink, metrics = ListSink(), Metrics()
    emitter = Emitter(sink, "n1", "i1", clock=lambda: datetime(2026, 1, 1, tzinfo=UTC))
    return DockerBreaker(emitter, CFG, clock=clock, metrics=metrics, **kw), sink, metrics  # type: ignore[arg-type]


def _transitions(sink: ListSink) -> list[tuple[str, str, str, int]]:
    return [
        (e.from_state, e.to_state, e.reason, e.failures)
        for e in sink.events
        if isinstance(e, BreakerTransition)
    ]


async def test_the_service_emits_one_event_per_transition_and_tracks_the_gauge() -> None:
    clock = Clock()
    changes: list[Transition] = []
    breaker, sink, metrics = _breaker(clock, on_change=changes.append)

    for _ in range(5):
        breaker.record(DOWN)
    breaker.record(USER)

    assert breaker.state == BreakerState(status="open", failures=5, opened_at=1000.0)
    assert not breaker.allows_work
    assert _transitions(sink) == [
        (
            "closed",
            "open",
            "3 consecutive engine failures, last docker_unavailable: docker create failed: ConnectionError",
            3,
        )
    ]
    ev = sink.events[0]
    assert ev.subject() == "sup.breaker.transition.n1._"
    assert [t.to_state for t in changes] == ["open"]
    state = metrics.registry.get_sample_value
    assert [
        state("supervisor_breaker_state", {"state": s}) for s in ("closed", "half_open", "open")
    ] == [0, 0, 1]
    assert (
        metrics.registry.get_sample_value(
            "supervisor_breaker_transitions_total", {"to_state": "open"}
        )
        == 1.0
    )


async def test_check_raises_circuit_open_with_the_time_to_the_next_probe() -> None:
    clock = Clock()
    breaker, _, _ = _breaker(clock)
    breaker.check()
    for _ in range(3):
        breaker.record(DOWN)
    clock.now += 4

    with pytest.raises(CircuitOpen) as err:
        breaker.check()

    assert (err.value.status, err.value.failures, err.value.retry_in_s) == ("open", 3, 6.0)
    assert err.value.tag == "circuit_open"
    assert (
        str(err.value)
        == "the Docker circuit breaker is open after 3 engine failures; next probe in 6.0s"
    )


async def test_a_probe_against_the_live_engine_closes_it(docker_client: object) -> None:
    clock = Clock()
    breaker, sink, metrics = _breaker(clock)
    runtime = DockerRuntime()
    try:
        for _ in range(3):
            breaker.record(DOWN)

        too_early = await breaker.probe(runtime)
        clock.now += 10
        closed = await breaker.probe(runtime)
    finally:
        runtime.close()

    assert (too_early, closed) == (False, True)
    assert breaker.state == BreakerState()
    assert [(f, t) for f, t, _, _ in _transitions(sink)] == [
        ("closed", "open"),
        ("open", "half_open"),
        ("half_open", "closed"),
    ]
    assert metrics.registry.get_sample_value("supervisor_breaker_state", {"state": "closed"}) == 1


async def test_a_probe_against_an_unreachable_engine_reopens_it(tmp_dir: Path) -> None:
    clock = Clock()
    breaker, sink, _ = _breaker(clock)
    async with hangup_engine(tmp_dir) as url:
        runtime = DockerRuntime(url, timeout=2)
        try:
            for _ in range(3):
                breaker.record(DOWN)
            clock.now += 10

            closed = await breaker.probe(runtime)
        finally:
            runtime.close()

    assert closed is False
    assert breaker.state == BreakerState(status="open", failures=4, opened_at=1010.0, reopens=1)
    assert _transitions(sink)[-1] == (
        "half_open",
        "open",
        "probe failed: docker_unavailable: docker ping failed: ConnectionError",
        4,
    )


async def test_watch_probes_when_due_and_closes_on_a_live_engine(docker_client: object) -> None:
    clock = Clock()
    breaker, sink, _ = _breaker(clock)
    slept: list[float] = []

    async def sleep(s: float) -> None:
        slept.append(s)
        clock.now += s
        await asyncio.sleep(0)

    runtime = DockerRuntime()
    watcher = asyncio.create_task(breaker.watch(runtime, sleep=sleep))
    try:
        await asyncio.sleep(0)
        for _ in range(3):
            breaker.record(DOWN)
        async with asyncio.timeout(10):
            while not breaker.allows_work:
                await asyncio.sleep(0.01)
    finally:
        watcher.cancel()
        with pytest.raises(asyncio.CancelledError):
            await watcher
        runtime.close()

    assert slept == [10.0]
    assert [(f, t) for f, t, _, _ in _transitions(sink)] == [
        ("closed", "open"),
        ("open", "half_open"),
        ("half_open", "closed"),
    ]
