"""The resource monitor: host pressure (Linux PSI: how long tasks waited for CPU, memory
and I/O), host CPU, memory and disk use (psutil) and the count of this node's managed
containers (Docker), sampled on an interval.

The threshold decision (`assess`) is pure: given the metrics alerting now and a new sample
it returns the new alerting set and the changes. A metric alerts once when it reaches its
threshold and recovers once when it goes back under `threshold * (1 - hysteresis)`; between
the two nothing is published, so a value hovering at the line makes no alert storm. A
metric that could not be measured (Docker unreachable) keeps its state.

`ResourceMonitor` is the service: each tick samples, assesses, publishes `resource.alert` /
`resource.recovered` on changes and every `sample_event_every`-th sample as
`resource.sample`, and updates the gauges. The host is under pressure while any metric
alerts; the scheduler pulls nothing then.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, get_args

import msgspec
import psutil
from msgspec import Struct

from schemas import ResourceAlert, ResourceMetric, ResourceRecovered, ResourceSample
from schemas.config import MonitorConfig, Thresholds
from schemas.errors import DockerError, DockerUnavailable
from supervisor.observability.metrics import host_value

if TYPE_CHECKING:
    from supervisor.eventlog.emitter import Emitter
    from supervisor.observability.metrics import Metrics

log = logging.getLogger("supervisor.daemon.monitor")

METRICS: tuple[ResourceMetric, ...] = get_args(ResourceMetric)  # the contract's order
PSI_ROOT = Path("/proc/pressure")
# Which PSI line each pressure metric reads: CPU and memory `some` (a task waited), I/O
# `full` (every task waited: the device, not one slow reader, is the bottleneck).
_PSI: dict[ResourceMetric, tuple[str, str]] = {
    "cpu_pressure_pct": ("cpu", "some"),
    "memory_pressure_pct": ("memory", "some"),
    "io_pressure_pct": ("io", "full"),
}


class HostSample(Struct, frozen=True, kw_only=True):
    """One sample; percentages are 0-100. A metric not measured is None: `containers`
    when Docker did not answer, the pressures where the kernel has no PSI."""

    cpu_pct: float
    memory_pct: float
    disk_pct: float
    containers: int | None = None
    cpu_pressure_pct: float | None = None
    memory_pressure_pct: float | None = None
    io_pressure_pct: float | None = None

    def value(self, metric: ResourceMetric) -> float | None:
        v: float | int | None = getattr(self, metric)
        return None if v is None else float(v)


class Alert(Struct, frozen=True, kw_only=True):
    metric: ResourceMetric
    value: float
    threshold: float


class Recovery(Struct, frozen=True, kw_only=True):
    metric: ResourceMetric
    value: float
    threshold: float
    recover_below: float


Change = Alert | Recovery


def threshold_of(metric: ResourceMetric, thresholds: Thresholds) -> float:
    return float(getattr(thresholds, metric))


def recover_below(metric: ResourceMetric, thresholds: Thresholds) -> float:
    return threshold_of(metric, thresholds) * (1.0 - thresholds.hysteresis)


def assess(
    alerting: frozenset[ResourceMetric], sample: HostSample, thresholds: Thresholds
) -> tuple[frozenset[ResourceMetric], list[Change]]:
    """Pure. The metrics alerting after `sample`, and the alerts/recoveries it caused (in
    the order of `METRICS`)."""
    now = set(alerting)
    changes: list[Change] = []
    for metric in METRICS:
        value = sample.value(metric)
        limit = threshold_of(metric, thresholds)
        if value is None:
            continue
        if limit <= 0:  # its brake is off (a metric alerting when it was turned off recovers)
            if metric in now:
                now.discard(metric)
                changes.append(
                    Recovery(metric=metric, value=value, threshold=limit, recover_below=limit)
                )
            continue
        if metric not in now and value >= limit:
            now.add(metric)
            changes.append(Alert(metric=metric, value=value, threshold=limit))
        elif metric in now and value < recover_below(metric, thresholds):
            now.discard(metric)
            changes.append(
                Recovery(
                    metric=metric,
                    value=value,
                    threshold=limit,
                    recover_below=recover_below(metric, thresholds),
                )
            )
    return frozenset(now), changes


def describe(metric: ResourceMetric, sample: HostSample | None, thresholds: Thresholds) -> str:
    """Why an alerting metric still counts as pressure, e.g. `memory_pct 91.2 >= 85`, or
    `cpu_pct 78 has not gone under 76 since it reached 80` inside the hysteresis band."""
    value = None if sample is None else sample.value(metric)
    limit = threshold_of(metric, thresholds)
    if value is None:
        return f"{metric} unknown, last seen >= {limit:g}"
    if value >= limit:
        return f"{metric} {value:g} >= {limit:g}"
    below = recover_below(metric, thresholds)
    return f"{metric} {value:g} has not gone under {below:g} since it reached {limit:g}"


# --- sampling --------------------------------------------------------------------------------


class HostSampler(Protocol):
    """Measures CPU, memory and disk (blocking; run off the loop). `containers` stays None."""

    def sample(self) -> HostSample: ...


class ManagedLister(Protocol):
    async def list_managed(self, node_id: str) -> list[dict[str, Any]]: ...


def read_psi(text: str, line: str) -> float | None:
    """`avg10` of the `line` ("some" or "full") of a `/proc/pressure/*` file; None when it
    has no such line."""
    for row in text.splitlines():
        kind, _, fields = row.partition(" ")
        if kind == line:
            for field in fields.split():
                key, _, value = field.partition("=")
                if key == "avg10":
                    return float(value)
    return None


class PsutilSampler:
    """The real sampler: the PSI pressures (`/proc/pressure/{cpu,memory,io}`, None where
    the kernel has none), CPU % since the previous sample (system-wide), virtual-memory %
    in use, and disk % used of the filesystem that holds `path` (the data dir)."""

    def __init__(self, path: Path, psi_root: Path = PSI_ROOT) -> None:
        self.path = Path(path)
        self.psi_root = psi_root
        psutil.cpu_percent(interval=None)  # the first reading is meaningless: prime it

    def pressure(self, metric: ResourceMetric) -> float | None:
        resource, line = _PSI[metric]
        try:
            return read_psi((self.psi_root / resource).read_text(), line)
        except (OSError, ValueError):
            return None

    def sample(self) -> HostSample:
        return HostSample(
            cpu_pct=float(psutil.cpu_percent(interval=None)),
            memory_pct=float(psutil.virtual_memory().percent),
            disk_pct=float(psutil.disk_usage(str(self.path)).percent),
            cpu_pressure_pct=self.pressure("cpu_pressure_pct"),
            memory_pressure_pct=self.pressure("memory_pressure_pct"),
            io_pressure_pct=self.pressure("io_pressure_pct"),
        )


class ResourceMonitor:
    """Samples on an interval and publishes threshold crossings. `on_change` is called when
    the pressure flips; `on_docker` with each outcome of asking Docker (None for success,
    the project's error otherwise) so the breaker sees a dead engine even when idle."""

    def __init__(
        self,
        emitter: Emitter,
        sampler: HostSampler,
        *,
        runtime: ManagedLister | None = None,
        thresholds: Thresholds | None = None,
        config: MonitorConfig | None = None,
        metrics: Metrics | None = None,
        on_change: Callable[[bool], None] | None = None,
        on_docker: Callable[[DockerError | None], None] | None = None,
        docker_timeout_s: float = 5.0,
    ) -> None:
        self.emitter = emitter
        self.sampler = sampler
        self.runtime = runtime
        self.thresholds = thresholds or Thresholds()
        self.config = config or MonitorConfig()
        self.metrics = metrics
        self.on_change = on_change
        self.on_docker = on_docker
        self.docker_timeout_s = docker_timeout_s
        self.alerting: frozenset[ResourceMetric] = frozenset()
        self.last: HostSample | None = None
        self.ticks = 0
        self._docker_failing = False  # log the first failure and the recovery, not each tick
        # How many of the node's managed containers wait idle in its warm pool (set by the
        # daemon): they are not work, and do not count against `thresholds.containers`.
        self.idle_containers: Callable[[], int] = lambda: 0
        if metrics is not None:
            for m in METRICS:
                metrics.host[m][1].set(host_value(m, threshold_of(m, self.thresholds)))
                metrics.resource_pressure.labels(m).set(0)

    @property
    def under_pressure(self) -> bool:
        return bool(self.alerting)

    @property
    def reasons(self) -> list[str]:
        """One line per alerting metric, in the order of `METRICS`."""
        return [describe(m, self.last, self.thresholds) for m in METRICS if m in self.alerting]

    async def tick(self) -> list[Change]:
        """Sample once, publish what changed, and return the changes."""
        host = await asyncio.to_thread(self.sampler.sample)
        sample = msgspec.structs.replace(host, containers=await self._count())
        was = self.under_pressure
        self.alerting, changes = assess(self.alerting, sample, self.thresholds)
        self.last = sample
        for c in changes:
            if isinstance(c, Alert):
                log.warning("resource alert: %s %g >= %g", c.metric, c.value, c.threshold)
                self.emitter.emit(
                    ResourceAlert, metric=c.metric, value=c.value, threshold=c.threshold
                )
            else:
                log.info("resource recovered: %s %g < %g", c.metric, c.value, c.recover_below)
                self.emitter.emit(
                    ResourceRecovered,
                    metric=c.metric,
                    value=c.value,
                    threshold=c.threshold,
                    recover_below=c.recover_below,
                )
        if self.ticks % max(self.config.sample_event_every, 1) == 0:
            self.emitter.emit(
                ResourceSample,
                cpu_pct=sample.cpu_pct,
                memory_pct=sample.memory_pct,
                disk_pct=sample.disk_pct,
                containers=sample.containers,
                under_pressure=self.under_pressure,
                cpu_pressure_pct=sample.cpu_pressure_pct,
                memory_pressure_pct=sample.memory_pressure_pct,
                io_pressure_pct=sample.io_pressure_pct,
            )
        self.ticks += 1
        self._gauges(sample, changes)
        if was != self.under_pressure and self.on_change is not None:
            self.on_change(self.under_pressure)
        return changes

    async def run(self, sleep: Callable[[float], Awaitable[object]] = asyncio.sleep) -> None:
        """Tick every `interval_s` until cancelled. A failed tick is logged, never fatal."""
        while True:
            try:
                await self.tick()
            except Exception:
                log.exception("resource monitor: the sample failed")
            await sleep(self.config.interval_s)

    async def _count(self) -> int | None:
        if self.runtime is None:
            return None
        error: DockerError | None = None
        count: int | None = None
        try:
            async with asyncio.timeout(self.docker_timeout_s):
                listed = len(await self.runtime.list_managed(self.emitter.node_id))
                count = max(listed - self.idle_containers(), 0)
        except TimeoutError:
            error = DockerUnavailable("list", f"no answer in {self.docker_timeout_s:g}s")
        except DockerError as e:
            error = e
        if error is not None and not self._docker_failing:
            log.warning("resource monitor: cannot count containers: %s", error)
        elif error is None and self._docker_failing:
            log.info("resource monitor: Docker answers again")
        self._docker_failing = error is not None
        if self.on_docker is not None:
            self.on_docker(error)
        return count

    def _gauges(self, sample: HostSample, changes: list[Change]) -> None:
        if self.metrics is None:
            return
        for m in METRICS:
            value = sample.value(m)
            if value is not None:
                self.metrics.host[m][0].set(host_value(m, value))
            self.metrics.resource_pressure.labels(m).set(1 if m in self.alerting else 0)
        for c in changes:
            if isinstance(c, Alert):
                self.metrics.resource_alerts.labels(c.metric).inc()
