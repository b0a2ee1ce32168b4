"""The resource monitor: the pure threshold logic with scripted samples, the service with
a scripted host sampler and the real Docker engine, and the psutil sampler for real."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil
import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas import BreakerTransition, ResourceAlert, ResourceRecovered, ResourceSample
from schemas.config import BreakerConfig, MonitorConfig, Thresholds
from schemas.errors import DockerError
from supervisor.daemon.monitor import (
    METRICS,
    Alert,
    HostSample,
    PsutilSampler,
    Recovery,
    ResourceMonitor,
    assess,
    read_psi,
)
from supervisor.docker.engine_breaker import DockerBreaker
from supervisor.docker.runtime import DockerRuntime
from supervisor.eventlog.emitter import Emitter
from supervisor.observability.metrics import Metrics
from tests.conftest import SANDBOX_IMAGE
from tests.fakes import ListSink
from tests.test_breaker import hangup_engine

T = Thresholds(cpu_pct=80.0)  # 80 / 85 / 90 / 1000, hysteresis 5 %; PSI 90 / 20 / 50


def _s(
    cpu: float = 10.0,
    mem: float = 20.0,
    disk: float = 30.0,
    containers: int | None = 0,
    **pressure: float | None,
) -> HostSample:
    return HostSample(cpu_pct=cpu, memory_pct=mem, disk_pct=disk, containers=containers, **pressure)


# --- the pure threshold logic ---------------------------------------------------------------


def test_below_every_threshold_nothing_happens() -> None:
    assert assess(frozenset(), _s(), T) == (frozenset(), [])


def test_crossing_alerts_once_and_staying_above_is_silent() -> None:
    alerting, first = assess(frozenset(), _s(cpu=80.0), T)
    again, second = assess(alerting, _s(cpu=99.0), T)

    assert first == [Alert(metric="cpu_pct", value=80.0, threshold=80.0)]
    assert alerting == again == frozenset({"cpu_pct"})
    assert second == []


def test_recovery_needs_the_hysteresis_margin() -> None:
    alerting: frozenset[Any] = frozenset({"memory_pct"})

    hovering = assess(alerting, _s(mem=81.0), T)  # under 85 but not under 80.75
    back = assess(alerting, _s(mem=80.0), T)

    assert hovering == (alerting, [])
    assert back == (
        frozenset(),
        [Recovery(metric="memory_pct", value=80.0, threshold=85.0, recover_below=80.75)],
    )


def test_each_metric_has_its_own_threshold_and_changes_come_in_metric_order() -> None:
    alerting, changes = assess(
        frozenset({"disk_pct"}), _s(cpu=85, mem=90, disk=10, containers=1000), T
    )

    assert alerting == frozenset({"cpu_pct", "memory_pct", "containers"})
    assert changes == [
        Alert(metric="cpu_pct", value=85.0, threshold=80.0),
        Alert(metric="memory_pct", value=90.0, threshold=85.0),
        Recovery(metric="disk_pct", value=10.0, threshold=90.0, recover_below=85.5),
        Alert(metric="containers", value=1000.0, threshold=1000.0),
    ]


def test_an_unmeasured_metric_keeps_its_state() -> None:
    assert assess(frozenset({"containers"}), _s(containers=None), T) == (
        frozenset({"containers"}),
        [],
    )
    assert assess(frozenset(), _s(containers=None), T) == (frozenset(), [])


def test_the_brakes_on_contention_are_on_and_the_one_on_cpu_use_is_off_by_default() -> None:
    defaults = Thresholds()
    busy = _s(cpu=100.0, cpu_pressure_pct=75.0, memory_pressure_pct=0.0, io_pressure_pct=1.0)
    starved = _s(cpu=100.0, cpu_pressure_pct=97.0, io_pressure_pct=50.0)

    assert assess(frozenset(), busy, defaults) == (frozenset(), [])
    assert assess(frozenset(), starved, defaults) == (
        frozenset({"cpu_pressure_pct", "io_pressure_pct"}),
        [
            Alert(metric="cpu_pressure_pct", value=97.0, threshold=90.0),
            Alert(metric="io_pressure_pct", value=50.0, threshold=50.0),
        ],
    )


def test_a_kernel_without_psi_keeps_the_pressures_unknown() -> None:
    assert assess(frozenset({"cpu_pressure_pct"}), _s(), Thresholds()) == (
        frozenset({"cpu_pressure_pct"}),
        [],
    )


def test_a_brake_turned_off_recovers() -> None:
    off = Thresholds(cpu_pressure_pct=0.0)

    assert assess(frozenset({"cpu_pressure_pct"}), _s(cpu_pressure_pct=90.0), off) == (
        frozenset(),
        [Recovery(metric="cpu_pressure_pct", value=90.0, threshold=0.0, recover_below=0.0)],
    )
    assert assess(frozenset(), _s(cpu_pressure_pct=90.0), off) == (frozenset(), [])


def test_the_psi_files_are_read_by_line_and_field() -> None:
    text = (
        "some avg10=12.50 avg60=4.70 avg300=5.45 total=724778964\n"
        "full avg10=3.25 avg60=0.00 avg300=0.00 total=0\n"
    )
    assert (read_psi(text, "some"), read_psi(text, "full")) == (12.5, 3.25)
    assert read_psi("some avg10=1.00 avg60=0 avg300=0 total=1\n", "full") is None


def test_thresholds_are_configurable() -> None:
    low = Thresholds(cpu_pct=5.0, containers=2, hysteresis=0.0)

    alerting, changes = assess(frozenset(), _s(cpu=5.0, containers=1), low)

    assert alerting == frozenset({"cpu_pct"})
    assert changes == [Alert(metric="cpu_pct", value=5.0, threshold=5.0)]
    assert assess(alerting, _s(cpu=4.99), low)[0] == frozenset()


@given(st.lists(st.floats(0.0, 100.0, allow_nan=False), max_size=80))
def test_alerts_and_recoveries_alternate_and_the_state_follows_the_last_one(
    values: list[float],
) -> None:
    alerting: frozenset[str] = frozenset()
    seen: list[Alert | Recovery] = []
    for v in values:
        alerting, changes = assess(alerting, _s(cpu=v), T)  # type: ignore[arg-type]
        seen += changes
        assert len(changes) <= 1
        assert ("cpu_pct" in alerting) == (bool(seen) and isinstance(seen[-1], Alert))
    kinds = [type(c) for c in seen]
    assert kinds == [Alert, Recovery] * (len(kinds) // 2) + [Alert] * (len(kinds) % 2)


@given(st.lists(st.floats(76.0, 100.0, allow_nan=False), min_size=1, max_size=80))
def test_a_value_hovering_at_the_line_alerts_at_most_once(values: list[float]) -> None:
    alerting: frozenset[str] = frozenset()
    total = 0
    for v in values:
        alerting, changes = assess(alerting, _s(cpu=v), T)  # type: ignore[arg-type]
        total += len(changes)

    assert total <= 1


# --- the service -------------------------------------------------------------------------------


class ScriptedHost:
    """A host sampler that returns the given CPU/memory/disk readings in turn."""

    def __init__(self, *samples: HostSample) -> None:
        self.samples = list(samples)

    def sample(self) -> HostSample:
        return self.samples.pop(0)


def _emitter(sink: ListSink, node: str = "n1") -> Emitter:
    return Emitter(sink, node, "i1", clock=lambda: datetime(2026, 1, 1, tzinfo=UTC))


def _facts(sink: ListSink) -> list[tuple[str, ...]]:
    out: list[tuple[str, ...]] = []
    for e in sink.events:
        match e:
            case ResourceAlert():
                out.append(("alert", e.metric, f"{e.value:g}", f"{e.threshold:g}"))
            case ResourceRecovered():
                out.append(("recovered", e.metric, f"{e.value:g}", f"{e.recover_below:g}"))
            case ResourceSample():
                out.append(("sample", f"{e.cpu_pct:g}", str(e.containers), str(e.under_pressure)))
    return out


async def test_ticks_publish_alerts_recoveries_and_periodic_samples(docker_client: object) -> None:
    sink, metrics = ListSink(), Metrics()
    flips: list[bool] = []
    docker_outcomes: list[DockerError | None] = []
    host = ScriptedHost(_s(cpu=50), _s(cpu=95), _s(cpu=97), _s(cpu=78), _s(cpu=60))
    runtime = DockerRuntime()
    monitor = ResourceMonitor(
        _emitter(sink, f"n-{uuid.uuid4().hex[:8]}"),
        host,
        runtime=runtime,
        thresholds=T,
        config=MonitorConfig(interval_s=5, sample_event_every=2),
        metrics=metrics,
        on_change=flips.append,
        on_docker=docker_outcomes.append,
    )
    try:
        pressure = []
        for _ in range(5):
            await monitor.tick()
            pressure.append((monitor.under_pressure, monitor.reasons))
    finally:
        runtime.close()

    assert _facts(sink) == [
        ("sample", "50", "0", "False"),
        ("alert", "cpu_pct", "95", "80"),
        ("sample", "97", "0", "True"),
        ("recovered", "cpu_pct", "60", "76"),
        ("sample", "60", "0", "False"),
    ]
    assert pressure == [
        (False, []),
        (True, ["cpu_pct 95 >= 80"]),
        (True, ["cpu_pct 97 >= 80"]),
        (True, ["cpu_pct 78 has not gone under 76 since it reached 80"]),
        (False, []),
    ]
    assert flips == [True, False]
    assert docker_outcomes == [None] * 5
    assert {e.subject().rsplit(".", 2)[0] for e in sink.events} == {
        "sup.resource.sample",
        "sup.resource.alert",
        "sup.resource.recovered",
    }
    assert all(e.subject().endswith("._") for e in sink.events)
    r = metrics.registry
    # One gauge per unit: ratios for percentages, a count for containers.
    assert r.get_sample_value("supervisor_host_cpu_ratio") == 0.6
    assert r.get_sample_value("supervisor_host_managed_containers") == 0.0
    assert r.get_sample_value("supervisor_host_disk_ratio_threshold") == 0.9
    assert r.get_sample_value("supervisor_host_pressure", {"metric": "cpu_pct"}) == 0.0
    assert r.get_sample_value("supervisor_resource_alerts_total", {"metric": "cpu_pct"}) == 1.0


async def test_the_container_count_is_this_nodes_managed_containers(docker_client) -> None:  # type: ignore[no-untyped-def]
    node = f"n-{uuid.uuid4().hex[:8]}"
    labels = {"supervisor.managed": "true", "supervisor.node": node}
    containers = [
        docker_client.containers.create(SANDBOX_IMAGE, ["true"], labels=labels) for _ in range(2)
    ]
    other = docker_client.containers.create(
        SANDBOX_IMAGE, ["true"], labels={"supervisor.node": node}
    )
    sink = ListSink()
    runtime = DockerRuntime()
    monitor = ResourceMonitor(
        _emitter(sink, node),
        ScriptedHost(_s()),
        runtime=runtime,
        thresholds=Thresholds(containers=2),
        config=MonitorConfig(sample_event_every=1),
    )
    try:
        changes = await monitor.tick()
    finally:
        runtime.close()
        for c in [*containers, other]:
            c.remove(force=True)

    assert changes == [Alert(metric="containers", value=2.0, threshold=2.0)]
    assert _facts(sink) == [("alert", "containers", "2", "2"), ("sample", "10", "2", "True")]
    assert monitor.reasons == ["containers 2 >= 2"]


async def test_an_unreachable_engine_leaves_the_count_unknown_and_opens_the_breaker(
    tmp_dir: Path,
) -> None:
    sink = ListSink()
    now = [0.0]
    breaker = DockerBreaker(
        _emitter(sink), BreakerConfig(failure_threshold=2), clock=lambda: now[0]
    )
    async with hangup_engine(tmp_dir) as url:
        runtime = DockerRuntime(url, timeout=2)
        monitor = ResourceMonitor(
            _emitter(sink),
            ScriptedHost(_s(), _s()),
            runtime=runtime,
            thresholds=Thresholds(containers=1),
            on_docker=breaker.record,
        )
        monitor.alerting = frozenset({"containers"})
        try:
            await monitor.tick()
            await monitor.tick()
        finally:
            runtime.close()

    assert monitor.last == _s(containers=None)
    assert monitor.alerting == frozenset({"containers"})
    assert monitor.reasons == ["containers unknown, last seen >= 1"]
    assert not breaker.allows_work
    transitions = [e for e in sink.events if isinstance(e, BreakerTransition)]
    assert [(t.from_state, t.to_state, t.failures) for t in transitions] == [("closed", "open", 2)]
    assert transitions[0].reason == (
        "2 consecutive engine failures, last docker_unavailable: docker list failed: ConnectionError"
    )


async def test_run_ticks_on_the_interval_and_survives_a_failed_sample() -> None:
    class Flaky:
        calls = 0

        def sample(self) -> HostSample:
            self.calls += 1
            if self.calls == 1:
                raise OSError("the disk went away")
            return _s()

    sink = ListSink()
    slept: list[float] = []

    async def sleep(s: float) -> None:
        slept.append(s)
        if len(slept) == 3:
            raise _Stop

    monitor = ResourceMonitor(_emitter(sink), Flaky(), config=MonitorConfig(interval_s=2.5))
    with pytest.raises(_Stop):
        await monitor.run(sleep=sleep)

    assert slept == [2.5, 2.5, 2.5]
    assert monitor.ticks == 2
    assert _facts(sink) == [("sample", "10", "None", "False")]


class _Stop(Exception):
    pass


# --- psutil, for real ------------------------------------------------------------------------


def test_the_psutil_sampler_reads_the_host(tmp_dir: Path) -> None:
    sampler = PsutilSampler(tmp_dir)

    sample = sampler.sample()

    assert 0.0 <= sample.cpu_pct <= 100.0
    assert 0.0 < sample.memory_pct <= 100.0
    assert sample.disk_pct == pytest.approx(psutil.disk_usage(str(tmp_dir)).percent, abs=1.0)
    assert sample.containers is None
    assert [m for m in METRICS if sample.value(m) is None] == ["containers"]
    for metric in ("cpu_pressure_pct", "memory_pressure_pct", "io_pressure_pct"):
        value = sample.value(metric)  # this kernel has PSI
        assert value is not None and 0.0 <= value <= 100.0, metric


def test_a_host_starved_by_other_work_is_under_pressure(tmp_dir: Path) -> None:
    """Twice as many busy processes as CPUs, none of them ours: the CPU pressure (PSI)
    rises until the monitor's brake (here at 10 %) alerts; when they stop it recovers."""
    sampler = PsutilSampler(tmp_dir)
    before = sampler.pressure("cpu_pressure_pct")
    hogs = [
        subprocess.Popen([sys.executable, "-c", "while True: pass"])
        for _ in range(2 * (os.cpu_count() or 1))
    ]
    try:
        deadline = time.monotonic() + 30
        alerting: frozenset[Any] = frozenset()
        while not alerting and time.monotonic() < deadline:
            time.sleep(0.5)
            alerting, _ = assess(frozenset(), sampler.sample(), Thresholds(cpu_pressure_pct=10.0))
        starved = sampler.pressure("cpu_pressure_pct")
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    assert "cpu_pressure_pct" in alerting, (before, starved)
    assert starved is not None and starved >= 10.0
