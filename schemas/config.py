"""Configuration: bounds, security policy and node settings. Strictly decoded (a misspelt key
is an error), from a TOML or JSON file given with `--config`, with defaults for everything."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Annotated

import msgspec
from msgspec import Struct

from schemas import params
from schemas.connection import NatsConfig, SigningConfig
from schemas.errors import ConfigError
from schemas.spec import PoolConfig, Sandbox


def _doc(text: str) -> msgspec.Meta:
    """A key's meaning, for the configuration reference (`docs/configuration.md`)."""
    return msgspec.Meta(description=text)


class Bounds(Struct, forbid_unknown_fields=True, kw_only=True):
    """The largest limits a spec may ask for, and the size of what it may bring."""

    max_timeout_s: Annotated[
        float, _doc("Largest `limits.timeout_s` a spec may ask for (seconds).")
    ] = 600.0
    max_memory_mb: Annotated[int, _doc("Largest `limits.memory_mb`.")] = 4096
    max_cpus: Annotated[float, _doc("Largest `limits.cpus` (default: the host's CPU count).")] = (
        float(os.cpu_count() or 1)
    )
    max_pids: Annotated[int, _doc("Largest `limits.pids`.")] = 4096
    max_output_bytes: Annotated[int, _doc("Largest `limits.output_bytes` (per stream).")] = (
        64 * 1024 * 1024
    )
    max_files: Annotated[int, _doc("Most files a spec may bring.")] = 256
    max_files_bytes: Annotated[int, _doc("Most bytes the spec's files may hold in all.")] = (
        4 * 1024 * 1024
    )
    max_stdin_bytes: Annotated[int, _doc("Most bytes `stdin` / `stdin_base64` may hold.")] = (
        4 * 1024 * 1024
    )
    max_cpu_time_s: Annotated[float, _doc("Largest `limits.cpu_time_s` (CPU seconds).")] = 600.0
    max_spec_bytes: Annotated[
        int,
        _doc(
            "Most bytes a spec may take as JSON, all included (it travels whole in "
            "`task.submitted` and on the work queue, so it must stay under NATS's max_payload)."
        ),
    ] = 6 * 1024 * 1024
    max_retry_delay_s: Annotated[
        float, _doc("Largest `retry.base_delay_s` and `retry.max_delay_s` (seconds).")
    ] = 300.0
    max_command_args: Annotated[int, _doc("Most arguments in `command`.")] = 1024
    max_env: Annotated[int, _doc("Most variables in `env`.")] = 256


class Policy(Struct, forbid_unknown_fields=True, kw_only=True):
    """What the security requests of a spec may have. Everything is refused by default."""

    allow_privileged: Annotated[
        bool, _doc("Whether a spec may ask for a privileged container.")
    ] = False
    allowed_capabilities: Annotated[
        list[str], _doc("Capabilities a spec may add with `cap_add`.")
    ] = []
    allowed_networks: Annotated[
        list[str], _doc("Networks a spec may name (`none` is the sandbox's default).")
    ] = msgspec.field(default_factory=lambda: ["none"])
    allow_mounts: Annotated[bool, _doc("Whether a spec may bring `mounts`.")] = False


class Scheduling(Struct, forbid_unknown_fields=True, kw_only=True):
    """How much work this node pulls and how it hands it back."""

    concurrency: Annotated[int, _doc("Most tasks this node runs at once.")] = 8
    memory_budget_mb: Annotated[
        int,
        _doc(
            "The memory limits of running tasks plus the next one must fit this (a bigger task runs alone)."
        ),
    ] = 4096
    queue_bound_per_priority: Annotated[
        int,
        _doc("Most tasks (queued or running) per priority; past it a submission is `QUEUE_FULL`."),
    ] = 1000
    max_deliver: Annotated[
        int, _doc("Deliveries of a task message before it ends as `REDELIVERY_LIMIT`.")
    ] = 5
    ack_wait_s: Annotated[float, _doc("JetStream's ack wait for a task message.")] = 30.0
    ack_progress_s: Annotated[
        float, _doc("How often a running task's message is marked in progress.")
    ] = 10.0
    engine_wait_s: Annotated[
        float,
        _doc(
            "After a retry's backoff, how long it waits for the Docker engine (breaker closed, "
            "ping answered) before it runs anyway; it holds no slot meanwhile."
        ),
    ] = 300.0
    engine_settle_s: Annotated[
        float,
        _doc(
            "After an infrastructure failure, how long the engine must answer every ping "
            "before work is pulled or retried again."
        ),
    ] = 2.0
    shutdown_grace_s: Annotated[
        float, _doc("How long running tasks may finish after SIGTERM before they are killed.")
    ] = 30.0
    removal_wait_s: Annotated[
        float, _doc("Longest a finished task's removal waits for queued tasks (0: at once).")
    ] = 15.0
    removal_max_waiting: Annotated[int, _doc("Most removals that wait at once.")] = 256


class HttpConfig(Struct, forbid_unknown_fields=True, kw_only=True):
    """The daemon's HTTP endpoint. `token` (or the first line of `token_file`), when set,
    is required as a bearer token on `/v1/*`, compared in constant time. Readiness fails while more than `max_outbox_backlog` events wait on disk;
    each readiness check gets `check_timeout_s` to answer."""

    listen: Annotated[str, _doc("`host:port` of the HTTP endpoint (loopback by default).")] = (
        "127.0.0.1:8787"
    )
    token: Annotated[str | None, _doc("Bearer token required on `/v1/*` (none: open).")] = None
    # A file holding the token (its first line), read at start; instead of `token`.
    token_file: Annotated[
        str | None, _doc("A file whose first line is the token, read at start; instead of `token`.")
    ] = None
    max_outbox_backlog: Annotated[
        int, _doc("Readiness fails while more events than this wait in the outbox.")
    ] = 10_000
    check_timeout_s: Annotated[float, _doc("Time each readiness check gets to answer.")] = 2.0
    max_batch: Annotated[
        int, _doc("Most specs one `POST /v1/tasks/batch` takes."), msgspec.Meta(ge=1, le=10_000)
    ] = 100
    max_connections: Annotated[
        int, _doc("Most HTTP connections open at once; past it a new one is closed at once.")
    ] = 1024
    header_timeout_s: Annotated[
        float, _doc("Time a new connection gets to send its first request head.")
    ] = 10.0
    body_timeout_s: Annotated[float, _doc("Time a request gets to send its whole body.")] = 30.0
    max_wait_s: Annotated[
        float,
        _doc("Longest `GET /v1/tasks/{id}?wait=S` holds a request (seconds)."),
        msgspec.Meta(ge=0, le=3600),
    ] = 300.0


class Thresholds(Struct, forbid_unknown_fields=True, kw_only=True):
    """Host pressure thresholds. A metric at or above its threshold is an alert and stops
    pulling; it recovers only once it is back under `threshold * (1 - hysteresis)`, so a
    value hovering at the line does not make an alert storm. 0 turns a metric's brake off.

    The CPU, memory and I/O brakes read Linux's pressure stall information (PSI): the
    share of the last 10 s in which tasks waited for the resource (docs/running.md says
    what a node's own tasks reach). Without PSI they do nothing; `cpu_pct` can stand in."""

    cpu_pressure_pct: Annotated[
        float,
        _doc("CPU pressure (PSI `some avg10`, %) at which pulling stops and an alert is raised."),
    ] = 90.0
    memory_pressure_pct: Annotated[
        float, _doc("Memory pressure (PSI `some avg10`, %) at which pulling stops.")
    ] = 20.0
    io_pressure_pct: Annotated[
        float, _doc("I/O pressure (PSI `full avg10`, %) at which pulling stops.")
    ] = 50.0
    cpu_pct: Annotated[
        float,
        _doc("Host CPU use (%) at which pulling stops; 0, off, by default: use is not contention."),
    ] = 0.0
    memory_pct: Annotated[float, _doc("Host memory use (%) at which pulling stops.")] = 85.0
    disk_pct: Annotated[float, _doc("Data dir disk use (%) at which pulling stops.")] = 90.0
    # Under this much free space on the data dir's disk the node is DISK_FULL: it refuses
    # submissions and stops pulling until space is back.
    disk_min_free_mb: Annotated[
        float,
        _doc(
            "Under this much free space on the data dir's disk the node is `DISK_FULL`: it refuses submissions and pulls nothing."
        ),
    ] = 64.0
    containers: Annotated[int, _doc("Task containers on this node at which pulling stops.")] = 1000
    hysteresis: Annotated[
        float, _doc("An alert recovers once the value is under `threshold * (1 - hysteresis)`.")
    ] = 0.05


class BreakerConfig(Struct, forbid_unknown_fields=True, kw_only=True):
    """The Docker circuit breaker: it opens after `failure_threshold` consecutive engine
    failures and lets one probe through once `open_interval_s` has passed; each failed
    probe doubles the interval, up to `max_open_interval_s`."""

    failure_threshold: Annotated[
        int, _doc("Consecutive engine failures that open the Docker breaker.")
    ] = 5
    open_interval_s: Annotated[float, _doc("How long it stays open before one probe.")] = 10.0
    max_open_interval_s: Annotated[
        float, _doc("Each failed probe doubles the interval, up to this.")
    ] = 60.0


class MonitorConfig(Struct, forbid_unknown_fields=True, kw_only=True):
    """The resource monitor samples every `interval_s`; every `sample_event_every`-th sample
    is also published as a `resource.sample` event (the trend, once a minute by default)."""

    interval_s: Annotated[float, _doc("How often host and container resources are sampled.")] = 5.0
    sample_event_every: Annotated[
        int, _doc("Every n-th sample is also a `resource.sample` event.")
    ] = 12


class ReconcileConfig(Struct, forbid_unknown_fields=True, kw_only=True):
    """The reconciler: a pass every `interval_s` (and one at start-up), heartbeats every
    `heartbeat_s`. A daemon instance whose heartbeats stop for `heartbeat_timeout_s` is dead.
    A container or workspace younger than `creation_grace_s` is spared unless its instance
    is known dead; a running container is overdue `deadline_grace_s` after its deadline; an
    attempt whose instance is gone is closed once its task was quiet for
    `lost_attempt_grace_s` (longer than the task queue's ack wait, so a redelivery closes it
    first when there is one). A failed cleanup command is tried `command_attempts` times in
    all, `command_backoff_s` apart at first, doubling up to `command_backoff_max_s`."""

    enabled: Annotated[bool, _doc("Whether `serve` runs the reconciler.")] = True
    interval_s: Annotated[
        float, _doc("Time between reconcile passes (one also runs at start-up).")
    ] = 10.0
    misfire_grace_s: Annotated[
        float, _doc("A pass that could not start on time still runs within this.")
    ] = 5.0
    heartbeat_s: Annotated[float, _doc("How often the node publishes `node.heartbeat`.")] = 5.0
    heartbeat_timeout_s: Annotated[
        float, _doc("An instance silent this long is dead; its leftovers are orphans.")
    ] = 20.0
    creation_grace_s: Annotated[
        float, _doc("A resource younger than this is spared unless its instance is known dead.")
    ] = 30.0
    deadline_grace_s: Annotated[
        float, _doc("A running container is overdue this long after its deadline.")
    ] = 10.0
    lost_attempt_grace_s: Annotated[
        float, _doc("An attempt of a dead instance is closed once its task was quiet this long.")
    ] = 60.0
    max_attempt_s: Annotated[
        float, _doc("An attempt with no deadline known is overdue after this.")
    ] = 1200.0
    max_commands_per_pass: Annotated[int, _doc("Most cleanup commands one pass orders.")] = 500
    projection_wait_s: Annotated[
        float, _doc("How long a pass waits for the projection to show its inventory.")
    ] = 10.0
    command_attempts: Annotated[int, _doc("Tries of a failing cleanup command, in all.")] = 5
    command_backoff_s: Annotated[
        float, _doc("First wait between tries of a cleanup command (doubling).")
    ] = 1.0
    command_backoff_max_s: Annotated[float, _doc("Longest wait between tries.")] = 30.0
    command_concurrency: Annotated[int, _doc("Cleanup commands carried out at once.")] = 8


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
    # `max_busy` 0.1 and `rest_lag_s` 1 s rather than 0.5 and 0.3: a live batch costs
    # about the same CPU whatever its size, so a burst is cheaper in fewer, larger batches
    # (120 tasks at once: the projection's CPU per task 21-24 -> 13-14 ms). A lone task's
    # events still wait only `batch_age_s`; `?wait` answers from the stream, not from
    # the read side.
    batch_age_s: Annotated[
        float,
        msgspec.Meta(
            description="A live batch is applied at the latest this long after its first event arrived.",
            gt=0,
        ),
    ] = 0.2
    max_busy: Annotated[
        float,
        msgspec.Meta(
            description="Share of time the projection may spend applying batches (1: lowest lag).",
            gt=0,
            le=1,
        ),
    ] = 0.1
    rest_lag_s: Annotated[
        float,
        msgspec.Meta(
            description="Its rest never holds back a batch whose first event waited this long.",
            gt=0,
        ),
    ] = 1.0
    max_lag_s: Annotated[
        float,
        msgspec.Meta(
            description="Readiness fails while the oldest event not yet applied is older than this.",
            gt=0,
        ),
    ] = 5.0
    threads: (
        Annotated[
            int,
            msgspec.Meta(
                description="DuckDB worker threads for the projection and its queries (none: one per core).",
                ge=1,
            ),
        ]
        | None
    ) = 1
    # DuckDB's memory for the live projection and every query over it (a query past it
    # fails as resource/QUERY_MEMORY), and the most it may spill to disk.
    memory_limit: Annotated[
        str,
        msgspec.Meta(
            description="DuckDB's memory in the projection process; a query past it fails as `QUERY_MEMORY`.",
            pattern=r"^\d+(\.\d+)?\s*[KMGT]i?B$",
        ),
    ] = "512MB"
    temp_limit: Annotated[
        str,
        msgspec.Meta(
            description="The most DuckDB may spill to disk.", pattern=r"^\d+(\.\d+)?\s*[KMGT]i?B$"
        ),
    ] = "1GB"


def inline_or_file(value: str | None, path: str | None, key: str) -> str | None:
    """A secret given inline (`value`) or as the first line of the file `path` (`key` names
    the pair in errors, e.g. `http.token`). None when neither is set. Raises ConfigError
    when both are, or the file cannot be read or is empty."""
    if value and path:
        name = key.rsplit(".", 1)[-1]
        raise ConfigError(f"{key}: set {name} or {name}_file, not both")
    if not path:
        return value or None
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise ConfigError(f"{key}_file {path}: {e.strerror}") from e
    first = lines[0].strip() if lines else ""
    if not first:
        raise ConfigError(f"{key}_file {path} is empty")
    return first


class EventsConfig(Struct, forbid_unknown_fields=True, kw_only=True):
    """How long `SUP_EVENTS` keeps history. Unset: a new stream keeps everything and an
    existing one keeps its limits, so a client without this table never changes them."""

    max_age: Annotated[
        str | None,
        _doc(
            "Drop events older than this (`90d`, `12h`, `30m`, `45s`; `0` for no limit). The"
            " projection keeps what it applied; replay and audit then start later."
        ),
    ] = None
    max_bytes: Annotated[
        int | None,
        _doc("Drop the oldest events past this size of the stream in bytes (`-1` for no limit)."),
    ] = None

    def max_age_s(self) -> float | None:
        """`max_age` in seconds (None: unset). Raises ConfigError for a bad duration."""
        if self.max_age is None:
            return None
        return duration_s(self.max_age, "events.max_age")


def duration_s(text: str, key: str) -> float:
    """`90d`, `12h`, `30m`, `45s` or bare seconds. Raises ConfigError naming `key`."""
    try:
        return params.duration_s(key, text)
    except ValueError as e:
        raise ConfigError(str(e)) from None


class CallbacksConfig(Struct, forbid_unknown_fields=True, kw_only=True):
    """Where a spec's `callback_url` may point, and how its Result is delivered there."""

    allowed: Annotated[
        list[str],
        _doc(
            "URL prefixes a `callback_url` may start with (scheme, host and port equal, path"
            " under it), e.g. `https://judge.internal:8443/hooks/`. None by default: every"
            " `callback_url` is refused as `security/POLICY_VIOLATION`."
        ),
    ] = []
    secret: Annotated[
        str | None, _doc("The HMAC-SHA256 key of the `X-Supervisor-Signature` header.")
    ] = None
    secret_file: Annotated[
        str | None, _doc("A file whose first line is the key (instead of `secret`).")
    ] = None
    max_attempts: Annotated[
        int, _doc("Deliveries of one Result before giving up."), msgspec.Meta(ge=1)
    ] = 5
    base_delay_s: Annotated[
        float,
        _doc("Delay after the first failed delivery; doubled after each."),
        msgspec.Meta(ge=0),
    ] = 1.0
    max_delay_s: Annotated[float, _doc("Longest delay between deliveries."), msgspec.Meta(ge=0)] = (
        60.0
    )
    timeout_s: Annotated[
        float, _doc("How long one delivery waits for the receiver's answer."), msgspec.Meta(gt=0)
    ] = 10.0


class Config(Struct, forbid_unknown_fields=True, kw_only=True):
    node_id: Annotated[
        str,
        _doc(
            "This node's id, in every event and container label (empty: the id kept in the "
            "data dir, `n-<8 hex>` made at its first use)."
        ),
    ] = ""
    data_dir: Annotated[
        str, _doc("The data dir: outbox, workspaces, projection, embedded NATS store, credentials.")
    ] = ".supervisor"
    nats_url: Annotated[
        str | None,
        _doc(
            "NATS to use, one URL or a comma-separated list (none: `[nats] servers`, else the URL"
            " a daemon wrote into the data dir, else the embedded server)."
        ),
    ] = None
    nats: NatsConfig = msgspec.field(default_factory=NatsConfig)
    docker_url: Annotated[
        str | None, _doc("The Docker engine (none: `DOCKER_HOST` or the local socket).")
    ] = None
    bounds: Bounds = msgspec.field(default_factory=Bounds)
    policy: Policy = msgspec.field(default_factory=Policy)
    sandbox: Sandbox = msgspec.field(default_factory=Sandbox)
    scheduling: Scheduling = msgspec.field(default_factory=Scheduling)
    http: HttpConfig = msgspec.field(default_factory=HttpConfig)
    # Output kept in a terminal event's Result (the full capped output is in the CLI result).
    event_output_bytes: Annotated[
        int, _doc("Output kept in a terminal event's Result, per stream.")
    ] = 64 * 1024
    # How often the cgroup counters of running containers are sampled. 20 ms rather than
    # 10: each wake of the sampling thread costs about 35 us here and each container 25 us
    # more, 2.8 % of a core for 8 running containers at 10 ms (bench: 2.5 ms of CPU a task
    # in a burst of 120). What a sample misses is only what happens in a container's last
    # interval before its cgroup is gone (Docker's own OOM flag is read regardless).
    cgroup_sample_s: Annotated[
        float, _doc("How often the cgroup counters of running containers are sampled.")
    ] = 0.02
    thresholds: Thresholds = msgspec.field(default_factory=Thresholds)
    breaker: BreakerConfig = msgspec.field(default_factory=BreakerConfig)
    monitor: MonitorConfig = msgspec.field(default_factory=MonitorConfig)
    reconcile: ReconcileConfig = msgspec.field(default_factory=ReconcileConfig)
    projection: ProjectionConfig = msgspec.field(default_factory=ProjectionConfig)
    callbacks: CallbacksConfig = msgspec.field(default_factory=CallbacksConfig)
    events: EventsConfig = msgspec.field(default_factory=EventsConfig)
    pool: PoolConfig = msgspec.field(default_factory=PoolConfig)
    signing: SigningConfig = msgspec.field(default_factory=SigningConfig)
    log_level: Annotated[str, _doc("Log level of `serve` (DEBUG, INFO, WARNING, ERROR).")] = "INFO"

    @property
    def nats_target(self) -> str | None:
        """The NATS this configuration names: `nats_url`, else `[nats] servers` with its
        credentials; None when it names none."""
        return self.nats_url or self.nats.url()


def load_config(path: str | Path | None) -> Config:
    """Read a configuration file; None gives the defaults. A `.toml` file is TOML and a
    `.json` file JSON; any other is read by its content (JSON when it starts with `{`,
    TOML otherwise). Raises ConfigError, naming the file and the format it was read as."""
    if path is None:
        return Config()
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read config {p}: {e.strerror}") from e
    if p.suffix in (".toml", ".json"):
        as_json = p.suffix == ".json"
    else:
        as_json = raw.lstrip().startswith(b"{")
    try:
        if as_json:
            return msgspec.json.decode(raw, type=Config)
        return msgspec.convert(tomllib.loads(raw.decode()), Config)
    except (
        msgspec.ValidationError,
        msgspec.DecodeError,
        tomllib.TOMLDecodeError,
        UnicodeDecodeError,
    ) as e:
        kind = "JSON" if as_json else "TOML"
        raise ConfigError(f"invalid config {p} (read as {kind}): {e}") from e


def reference() -> str:
    """The configuration reference (`docs/configuration.md`): every key of `Config`, its
    type, its default and its meaning, generated from the Structs above."""
    info = msgspec.inspect.type_info(Config)
    assert isinstance(info, msgspec.inspect.StructType)
    lines = [
        "# Configuration reference",
        "",
        "`supervisor --config FILE` reads TOML (or JSON: a file that does not end in `.toml`",
        "is read as JSON when it starts with `{`, as TOML otherwise). Every key is optional;",
        "an unknown key is an error. Generated from `schemas/config.py`",
        "(`.venv/bin/python -m schemas.config > docs/configuration.md`); a test fails when",
        "the two differ.",
        "",
    ]
    tables: list[tuple[str, msgspec.inspect.StructType, str]] = [("", info, "")]
    top: list[msgspec.inspect.Field] = []
    for f in info.fields:
        if isinstance(f.type, msgspec.inspect.StructType):
            tables.append((f.name, f.type, (f.type.cls.__doc__ or "").strip()))
        else:
            top.append(f)
    for name, struct, doc in tables:
        fields = top if not name else list(struct.fields)
        lines += [f"## `[{name}]`" if name else "## Top level", ""]
        if doc:
            lines += [" ".join(doc.split()), ""]
        lines += ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
        for f in fields:
            lines.append(
                f"| `{f.name}` | {_type_name(f.type)} | {_default(f)} | {_description(f.type)} |"
            )
        lines.append("")
    return "\n".join(lines)


def _parts(t: msgspec.inspect.Type) -> tuple[msgspec.inspect.Type, bool, str]:
    """The bare type, whether none is allowed, and the description of a field's type."""
    optional, description = False, ""
    while isinstance(t, msgspec.inspect.UnionType | msgspec.inspect.Metadata):
        if isinstance(t, msgspec.inspect.Metadata):
            description = description or str((t.extra_json_schema or {}).get("description", ""))
            t = t.type
            continue
        rest = [x for x in t.types if not isinstance(x, msgspec.inspect.NoneType)]
        optional = optional or len(rest) < len(t.types)
        if len(rest) != 1:
            break
        t = rest[0]
    return t, optional, description


_NAMES: dict[type, str] = {
    msgspec.inspect.StrType: "string",
    msgspec.inspect.IntType: "integer",
    msgspec.inspect.FloatType: "number",
    msgspec.inspect.BoolType: "boolean",
    msgspec.inspect.StructType: "table",
}


def _type_name(t: msgspec.inspect.Type) -> str:
    bare, optional, _ = _parts(t)
    if isinstance(bare, msgspec.inspect.ListType):
        name = f"list of {_type_name(bare.item_type)}s"
    else:
        name = _NAMES.get(type(bare), type(bare).__name__)
    return f"{name} or none" if optional else name


def _description(t: msgspec.inspect.Type) -> str:
    return _parts(t)[2]


def _default(f: msgspec.inspect.Field) -> str:
    if f.default is not msgspec.NODEFAULT:
        value = f.default
    elif f.default_factory is not msgspec.NODEFAULT:
        value = f.default_factory()
    else:
        return "(required)"
    if value is None:
        return "none"
    if f.name == "max_cpus":
        return "the host's CPU count"
    return f"`{msgspec.json.encode(value).decode()}`"


if __name__ == "__main__":
    print(reference(), end="")
