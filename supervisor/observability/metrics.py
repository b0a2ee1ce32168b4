"""Prometheus metrics of the execution path. One registry per process; the daemon's HTTP
endpoint exposes it (`prometheus_client.generate_latest(REGISTRY)`)."""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

HOST_GAUGES: dict[str, tuple[str, str]] = {
    "cpu_pressure_pct": (
        "supervisor_host_cpu_pressure_ratio",
        "Share of the last 10 s some task waited for a CPU (PSI), 0 to 1",
    ),
    "memory_pressure_pct": (
        "supervisor_host_memory_pressure_ratio",
        "Share of the last 10 s some task waited for memory (PSI), 0 to 1",
    ),
    "io_pressure_pct": (
        "supervisor_host_io_pressure_ratio",
        "Share of the last 10 s all tasks waited for I/O (PSI), 0 to 1",
    ),
    "cpu_pct": ("supervisor_host_cpu_ratio", "Host CPU busy, 0 to 1 (last sample)"),
    "memory_pct": ("supervisor_host_memory_ratio", "Host memory in use, 0 to 1 (last sample)"),
    "disk_pct": ("supervisor_host_disk_ratio", "Data dir's disk in use, 0 to 1 (last sample)"),
    "containers": (
        "supervisor_host_managed_containers",
        "Containers of this node on the engine (last sample)",
    ),
}
"""The monitor's metrics (`cpu_pct`, ... in events and thresholds) -> gauge name and help.
Percentages are exported as ratios, Prometheus's convention."""


def host_value(metric: str, value: float) -> float:
    """A monitor value in its gauge's unit (a percentage as a ratio)."""
    return value / 100 if metric.endswith("_pct") else value


def build_labels() -> tuple[str, str, str, str, str]:
    def of(dist: str) -> str:
        try:
            return version(dist)
        except PackageNotFoundError:
            return "unknown"

    return (
        of("container-supervisor"),
        platform.python_version(),
        of("nats-py"),
        of("docker"),
        of("duckdb"),
    )


_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_TASK_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.tasks = Counter("supervisor_tasks", "Tasks by outcome", ["outcome"], registry=r)
        self.attempts = Counter(
            "supervisor_attempts", "Attempts by outcome", ["outcome"], registry=r
        )
        self.errors = Counter(
            "supervisor_errors", "Classified errors", ["type", "code"], registry=r
        )
        self.cleanup_attempts = Counter(
            "supervisor_cleanup_attempts", "Cleanup steps attempted", ["step"], registry=r
        )
        self.cleanup_successes = Counter(
            "supervisor_cleanup_successes", "Cleanup steps that succeeded", ["step"], registry=r
        )
        self.cleanup_failures = Counter(
            "supervisor_cleanup_failures", "Cleanup steps that failed", ["step"], registry=r
        )
        self.cleanup_duration = Histogram(
            "supervisor_cleanup_duration_seconds",
            "Duration of each cleanup step",
            ["step"],
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.task_duration = Histogram(
            "supervisor_task_duration_seconds",
            "Wall time of a task, all attempts included",
            ["outcome"],
            buckets=_TASK_BUCKETS,
            registry=r,
        )
        self.running = Gauge("supervisor_running_containers", "Containers running now", registry=r)
        # --- the daemon ---------------------------------------------------------------
        self.queue_depth = Gauge(
            "supervisor_queue_depth", "Tasks waiting in SUP_TASKS", ["priority"], registry=r
        )
        self.breaker_state = Gauge(
            "supervisor_breaker_state",
            "Docker circuit breaker: 1 for the state it is in (closed, half_open, open), else 0",
            ["state"],
            registry=r,
        )
        self.breaker_transitions = Counter(
            "supervisor_breaker_transitions",
            "Docker circuit breaker transitions by target state",
            ["to_state"],
            registry=r,
        )
        self.outbox_backlog = Gauge(
            "supervisor_outbox_backlog",
            "Events on disk not yet acknowledged by JetStream",
            registry=r,
        )
        # One gauge per host metric, each in its own unit, with its alert threshold.
        self.host = {
            metric: (
                Gauge(name, help_text, registry=r),
                Gauge(f"{name}_threshold", f"Alert threshold of {name}", registry=r),
            )
            for metric, (name, help_text) in HOST_GAUGES.items()
        }
        self.resource_pressure = Gauge(
            "supervisor_host_pressure",
            "1 while the host metric is alerting",
            ["metric"],
            registry=r,
        )
        self.resource_alerts = Counter(
            "supervisor_resource_alerts", "resource.alert events by metric", ["metric"], registry=r
        )
        self.lifecycle_violations = Counter(
            "supervisor_lifecycle_violations",
            "Events emitted against the lifecycle state machine (a bug; see the logs)",
            ["machine"],
            registry=r,
        )
        self.ready = Gauge("supervisor_ready", "1 when the last readiness check passed", registry=r)
        self.disk_full = Gauge(
            "supervisor_disk_full",
            "1 while the data dir has no space to record (resource/DISK_FULL)",
            registry=r,
        )
        self.build_info = Gauge(
            "supervisor_build_info",
            "Always 1; the labels say which build runs",
            ["version", "python", "nats_py", "docker_py", "duckdb"],
            registry=r,
        )
        self.build_info.labels(*build_labels()).set(1)
        ProcessCollector(
            registry=r
        )  # process_cpu_seconds_total, process_resident_memory_bytes, ...
        self.pool_hits = Counter(
            "supervisor_pool_hits",
            "Attempts that adopted a parked container, by shape",
            ["shape"],
            registry=r,
        )
        self.pool_misses = Counter(
            "supervisor_pool_misses",
            "Attempts that started cold, by why: unfit (no shape may serve the spec), "
            "cold_shape (its shape was not warm yet), empty (none was parked), failed "
            "(the parked one could not be adopted)",
            ["reason"],
            registry=r,
        )
        self.pool_parked = Gauge(
            "supervisor_pool_parked", "Containers parked now, by shape", ["shape"], registry=r
        )
        self.pool_retired = Counter(
            "supervisor_pool_retired",
            "Parked containers removed without a task, by reason",
            ["reason"],
            registry=r,
        )
        self.pool_adopt_duration = Histogram(
            "supervisor_pool_adopt_seconds",
            "From taking a parked container to handing the task's command to it",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
            registry=r,
        )
        self.pool_park_duration = Histogram(
            "supervisor_pool_park_seconds",
            "Creating and starting one parked container",
            buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
            registry=r,
        )
        self.removals_waiting = Gauge(
            "supervisor_removals_waiting",
            "Removals of finished attempts' containers waiting while tasks wait for a slot",
            registry=r,
        )
        self.removals_deferred = Counter(
            "supervisor_removals_deferred",
            "Removals of finished attempts' containers that waited for queued tasks",
            registry=r,
        )
        self.ready_check = Gauge(
            "supervisor_ready_check",
            "1 when this readiness check passed last time",
            ["check"],
            registry=r,
        )
