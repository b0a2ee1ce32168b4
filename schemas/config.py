"""Configuration: bounds, security policy and node settings. Strictly decoded (a misspelt key
is an error), from a TOML or JSON file given with `--config`, with defaults for everything."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Annotated

import msgspec
from msgspec import Struct

from schemas.errors import ConfigError


class Bounds(Struct, forbid_unknown_fields=True, kw_only=True):
    """The largest limits a spec may ask for, and the size of what it may bring."""

    max_timeout_s: float = 600.0
    max_memory_mb: int = 4096
    max_cpus: float = float(os.cpu_count() or 1)
    max_pids: int = 4096
    max_output_bytes: int = 64 * 1024 * 1024
    max_files: int = 256
    max_files_bytes: int = 16 * 1024 * 1024
    max_command_args: int = 1024
    max_env: int = 256


class Policy(Struct, forbid_unknown_fields=True, kw_only=True):
    """What the security requests of a spec may have. Everything is refused by default."""

    allow_privileged: bool = False
    allowed_capabilities: list[str] = []
    allowed_networks: list[str] = msgspec.field(default_factory=lambda: ["none"])
    allow_mounts: bool = False


class Sandbox(Struct, forbid_unknown_fields=True, kw_only=True):
    """How every task container is hardened."""

    user: str = "65534:65534"
    tmpfs_size: str = "16m"
    workspace_mount: str = "/workspace"
    stop_timeout_s: float = 5.0


class Scheduling(Struct, forbid_unknown_fields=True, kw_only=True):
    """How much work this node pulls and how it hands it back."""

    concurrency: int = 8
    memory_budget_mb: int = 4096
    queue_bound_per_priority: int = 1000
    max_deliver: int = 5
    ack_wait_s: float = 30.0
    ack_progress_s: float = 10.0
    shutdown_grace_s: float = 30.0


class HttpConfig(Struct, forbid_unknown_fields=True, kw_only=True):
    """The daemon's HTTP endpoint. `token` (or the first line of `token_file`), when set,
    is required as a bearer token on `/v1/*`, compared in constant time. Readiness fails while more than `max_outbox_backlog` events wait on disk;
    each readiness check gets `check_timeout_s` to answer."""

    listen: str = "127.0.0.1:8787"
    token: str | None = None
    # A file holding the token (its first line), read at start; instead of `token`.
    token_file: str | None = None
    max_outbox_backlog: int = 10_000
    check_timeout_s: float = 2.0


class Thresholds(Struct, forbid_unknown_fields=True, kw_only=True):
    """Host pressure thresholds. A metric at or above its threshold is an alert; it recovers
    only once it is back under `threshold * (1 - hysteresis)`, so a value hovering at the
    line does not make an alert storm."""

    cpu_pct: float = 80.0
    memory_pct: float = 85.0
    disk_pct: float = 90.0
    # Under this much free space on the data dir's disk the node is DISK_FULL: it refuses
    # submissions and stops pulling until space is back.
    disk_min_free_mb: float = 64.0
    containers: int = 1000
    hysteresis: float = 0.05


class BreakerConfig(Struct, forbid_unknown_fields=True, kw_only=True):
    """The Docker circuit breaker: it opens after `failure_threshold` consecutive engine
    failures and lets one probe through once `open_interval_s` has passed; each failed
    probe doubles the interval, up to `max_open_interval_s`."""

    failure_threshold: int = 5
    open_interval_s: float = 10.0
    max_open_interval_s: float = 60.0


class MonitorConfig(Struct, forbid_unknown_fields=True, kw_only=True):
    """The resource monitor samples every `interval_s`; every `sample_event_every`-th sample
    is also published as a `resource.sample` event (the trend, once a minute by default)."""

    interval_s: float = 5.0
    sample_event_every: int = 12


class ReconcileConfig(Struct, forbid_unknown_fields=True, kw_only=True):
    """The reconciler: a pass every `interval_s` (and one at start-up), heartbeats every
    `heartbeat_s`. A daemon instance whose heartbeats stop for `heartbeat_timeout_s` is dead.
    A container or workspace younger than `creation_grace_s` is spared unless its instance
    is known dead; a running container is overdue `deadline_grace_s` after its deadline; an
    attempt whose instance is gone is closed once its task was quiet for
    `lost_attempt_grace_s` (longer than the task queue's ack wait, so a redelivery closes it
    first when there is one). A failed cleanup command is tried `command_attempts` times in
    all, `command_backoff_s` apart at first, doubling up to `command_backoff_max_s`."""

    enabled: bool = True
    interval_s: float = 10.0
    misfire_grace_s: float = 5.0
    heartbeat_s: float = 5.0
    heartbeat_timeout_s: float = 20.0
    creation_grace_s: float = 30.0
    deadline_grace_s: float = 10.0
    lost_attempt_grace_s: float = 60.0
    max_attempt_s: float = 1200.0
    max_commands_per_pass: int = 500
    projection_wait_s: float = 10.0
    command_attempts: int = 5
    command_backoff_s: float = 1.0
    command_backoff_max_s: float = 30.0
    command_concurrency: int = 8


class ProjectionConfig(Struct, forbid_unknown_fields=True, kw_only=True):
    """The daemon's live projection. A batch is applied at the latest `batch_age_s` after
    its first event arrived, once the batch before it is applied; the writer is busy at
    most `max_busy` of the time (each live batch costs about 50 ms of CPU: 1 gives the
    lowest lag, a lower share leaves more of a busy host to the tasks), but its rest never
    holds back a batch whose first event has waited `rest_lag_s`. Readiness fails
    while the oldest event not yet applied is older than `max_lag_s`. `threads` is DuckDB's
    worker threads for the projection and its queries: with one, a live batch takes about
    a fifth less CPU (waking other threads for a few rows costs more than it saves), while
    a large `/v1/query` runs on one core; none means one per core. `memory_limit` bounds
    DuckDB's memory in the projection process (the writer and the queries share it) and
    `temp_limit` what it may spill to disk."""

    # 0.2 s rather than 0.1: under 500 tasks at concurrency 8, a third fewer batches (a
    # batch costs about the same CPU whatever its size), the projection's CPU per task
    # 13-14 -> 8-11 ms and daemon throughput against raw docker-py 0.805 -> 0.84, for a
    # lag p99 of 287-310 ms instead of 218-272 (bench/bench_daemon.py --batch-age).
    batch_age_s: Annotated[float, msgspec.Meta(gt=0)] = 0.2
    max_busy: Annotated[float, msgspec.Meta(gt=0, le=1)] = 0.5
    rest_lag_s: Annotated[float, msgspec.Meta(gt=0)] = 0.3
    max_lag_s: Annotated[float, msgspec.Meta(gt=0)] = 5.0
    threads: Annotated[int, msgspec.Meta(ge=1)] | None = 1
    # DuckDB's memory for the live projection and every query over it (a query past it
    # fails as resource/QUERY_MEMORY), and the most it may spill to disk.
    memory_limit: Annotated[str, msgspec.Meta(pattern=r"^\d+(\.\d+)?\s*[KMGT]i?B$")] = "512MB"
    temp_limit: Annotated[str, msgspec.Meta(pattern=r"^\d+(\.\d+)?\s*[KMGT]i?B$")] = "1GB"


class Config(Struct, forbid_unknown_fields=True, kw_only=True):
    node_id: str = "n1"
    data_dir: str = ".supervisor"
    nats_url: str | None = None
    docker_url: str | None = None
    bounds: Bounds = msgspec.field(default_factory=Bounds)
    policy: Policy = msgspec.field(default_factory=Policy)
    sandbox: Sandbox = msgspec.field(default_factory=Sandbox)
    scheduling: Scheduling = msgspec.field(default_factory=Scheduling)
    http: HttpConfig = msgspec.field(default_factory=HttpConfig)
    # Output kept in a terminal event's Result (the full capped output is in the CLI result).
    event_output_bytes: int = 64 * 1024
    # How often the cgroup counters of running containers are sampled.
    cgroup_sample_s: float = 0.01
    thresholds: Thresholds = msgspec.field(default_factory=Thresholds)
    breaker: BreakerConfig = msgspec.field(default_factory=BreakerConfig)
    monitor: MonitorConfig = msgspec.field(default_factory=MonitorConfig)
    reconcile: ReconcileConfig = msgspec.field(default_factory=ReconcileConfig)
    projection: ProjectionConfig = msgspec.field(default_factory=ProjectionConfig)
    log_level: str = "INFO"


def load_config(path: str | Path | None) -> Config:
    """Read a TOML (`.toml`) or JSON file; None gives the defaults. Raises ConfigError."""
    if path is None:
        return Config()
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read config {p}: {e.strerror}") from e
    try:
        if p.suffix == ".toml":
            return msgspec.convert(tomllib.loads(raw.decode()), Config)
        return msgspec.json.decode(raw, type=Config)
    except (msgspec.ValidationError, msgspec.DecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"invalid config {p}: {e}") from e
