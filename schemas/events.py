"""Every event of the `SUP_EVENTS` stream, as one tagged union.

Each event is a frozen Struct whose `type` tag is stable and whose subject is
`sup.<category>.<name>.<node>.<task>` (`_` for "no task"). The envelope fields are common to
all. Events evolve by adding fields with defaults; a field never changes type, and unknown
fields (a spec's too) are ignored on decode so old readers survive new writers."""

from __future__ import annotations

from datetime import datetime
from typing import Any, ClassVar, Literal

import msgspec
from msgspec import Struct

from schemas.spec import ErrorType, ExecutionError, Result, TaskSpec, spec_fields_known

SCHEMA_VERSION = 1
NO_TASK = "_"


class Evidence(Struct, kw_only=True, frozen=True):
    """What was observed about one attempt, recorded so classification can be re-run.
    `adapter_error` is the class tag of the project's exception an adapter raised
    (`docker_unavailable`, `docker_api_error`, `image_not_found`, `container_vanished`,
    `circuit_open`, ...). `kills_issued` are the reasons of the supervisor's own kills;
    `external_kills` the signals of `kill`/`stop` actions Docker reported that the
    supervisor did not issue."""

    exit_code: int | None = None
    oom_killed: bool = False
    memory_oom_events: int = 0
    pids_limit_events: int = 0
    kills_issued: tuple[str, ...] = ()
    external_kills: tuple[str, ...] = ()
    removed_out_of_band: bool = False
    adapter_error: str | None = None
    adapter_message: str | None = None
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    cancelled: bool = False
    cpu_time_s: float | None = None


class Event(Struct, frozen=True, kw_only=True, tag_field="type"):
    """The envelope. `event_id` is also the message's `Nats-Msg-Id`."""

    category: ClassVar[str] = ""
    name: ClassVar[str] = ""

    event_id: str
    occurred_at: datetime
    node_id: str
    instance_id: str
    task_id: str = NO_TASK
    attempt: int = 0
    correlation_id: str = ""
    schema_version: int = SCHEMA_VERSION

    def subject(self) -> str:
        return f"sup.{self.category}.{self.subject_name()}.{self.node_id}.{self.task_id or NO_TASK}"

    def subject_name(self) -> str:
        return self.name


# --- process -----------------------------------------------------------------------------


class SupervisorStarted(Event, frozen=True, tag="supervisor.started"):
    category = "supervisor"
    name = "started"
    version: str = ""
    pid: int = 0
    role: str = "run"


class SupervisorStopped(Event, frozen=True, tag="supervisor.stopped"):
    category = "supervisor"
    name = "stopped"
    reason: str = ""


class SupervisorSuperseded(Event, frozen=True, tag="supervisor.superseded"):
    """This instance took the data dir's lock that `superseded_instance` held: that
    instance is dead for certain (the lock dies with its process), so what it left running
    is orphaned now, without waiting for its heartbeats to time out."""

    category = "supervisor"
    name = "superseded"
    superseded_instance: str
    superseded_pid: int = 0


class EmbeddedNatsRestarted(Event, frozen=True, tag="supervisor.nats_restarted"):
    """The daemon's embedded nats-server died (`exit_code`, negative for a signal) and was
    started again on the same port and store, `down_s` after it was found dead; `restarts`
    counts them in this instance's life."""

    category = "supervisor"
    name = "nats_restarted"
    exit_code: int | None = None
    restarts: int = 0
    down_s: float = 0.0


# --- task ------------------------------------------------------------------------------


class TaskSubmitted(Event, frozen=True, tag="task.submitted"):
    category = "task"
    name = "submitted"
    spec: TaskSpec
    priority: str = "normal"


class TaskRejected(Event, frozen=True, tag="task.rejected"):
    """The task never ran: validation, policy or admission refused it."""

    category = "task"
    name = "rejected"
    error: ExecutionError
    result: Result | None = None
    callback_url: str | None = None


class TaskRefused(Event, frozen=True, tag="task.refused"):
    """A submission refused for a passing reason (`retryable`: the queue was full, the data
    dir had no space, NATS did not answer). Not terminal: the task was not queued, and the
    same id may be submitted again; it then runs once and ends once. `result` is what the
    refused submitter was answered."""

    category = "task"
    name = "refused"
    error: ExecutionError
    result: Result | None = None


class TaskSucceeded(Event, frozen=True, tag="task.succeeded"):
    """Terminal. The output in `result` is cut to the configured event output cap
    (64 KiB by default); `output_capped` says it was cut here, not by the task's own cap."""

    category = "task"
    name = "succeeded"
    result: Result
    output_capped: bool = False
    callback_url: str | None = None
    """The spec's `callback_url`, where the Result is delivered (`callback.attempted`)."""


class TaskFailed(Event, frozen=True, tag="task.failed"):
    """Terminal. `output_capped` as for task.succeeded."""

    category = "task"
    name = "failed"
    result: Result
    output_capped: bool = False
    callback_url: str | None = None


class TaskCancelRequested(Event, frozen=True, tag="task.cancel_requested"):
    """Someone asked to cancel the task (`DELETE /v1/tasks/{id}`); `node_id` is the node
    that recorded the request. A node running an attempt of it kills that attempt
    (`kill_issued{cancelled}`), and no node starts one after it: the task ends `failed`
    with `infrastructure/CANCELLED`, once. Too late for a task that has ended."""

    category = "task"
    name = "cancel_requested"
    reason: str = ""


class RetryScheduled(Event, frozen=True, tag="task.retry_scheduled"):
    category = "task"
    name = "retry_scheduled"
    next_attempt: int
    delay_s: float
    error_code: str


# --- attempt ---------------------------------------------------------------------------


class AttemptStarted(Event, frozen=True, tag="attempt.started"):
    category = "attempt"
    name = "started"
    max_attempts: int = 1


class AttemptFinished(Event, frozen=True, tag="attempt.finished"):
    category = "attempt"
    name = "finished"
    outcome: Literal["succeeded", "failed"]
    exit_code: int | None = None
    error_type: str | None = None
    error_code: str | None = None
    duration_s: float = 0.0
    evidence: Evidence = Evidence()


# --- container and workspace -----------------------------------------------------------


class WorkspaceCreated(Event, frozen=True, tag="workspace.created"):
    category = "workspace"
    name = "created"
    path: str
    files: int = 0
    bytes: int = 0


class ContainerCreated(Event, frozen=True, tag="container.created"):
    category = "container"
    name = "created"
    container_id: str
    image: str
    labels: dict[str, str] = {}
    deadline: float = 0.0
    adopted: bool = False
    """A warm pool's parked container the attempt adopted (`pool.adopted` precedes it; its
    labels name no task); from here on it is the attempt's like any other."""


class ContainerStarted(Event, frozen=True, tag="container.started"):
    category = "container"
    name = "started"
    container_id: str


class KillIssued(Event, frozen=True, tag="container.kill_issued"):
    """The supervisor is about to kill the container; recorded before the kill is sent."""

    category = "container"
    name = "kill_issued"
    container_id: str
    reason: Literal[
        "timeout", "cpu_time", "output_limit", "cancelled", "cleanup", "reconcile", "pids_limit"
    ]
    signal: str = "SIGKILL"


class ContainerExited(Event, frozen=True, tag="container.exited"):
    category = "container"
    name = "exited"
    container_id: str
    exit_code: int | None = None
    evidence: Evidence = Evidence()
    stdout_bytes: int = 0
    stderr_bytes: int = 0
    cpu_time_s: float | None = None  # CPU seconds of its processes (its cgroup); None: unread
    peak_memory_bytes: int | None = None  # its cgroup's memory high-water mark; None: unread


# --- errors ----------------------------------------------------------------------------


class ErrorRaised(Event, frozen=True, tag="error.raised"):
    """One classified error. Its subject's name token is the error type, so
    `sup.error.timeout.>` is every timeout."""

    category = "error"
    error_type: ErrorType
    code: str
    message: str
    retryable: bool
    details: dict[str, Any] = {}
    container_id: str | None = None
    evidence: Evidence | None = None

    def subject_name(self) -> str:
        return self.error_type


# --- cleanup ---------------------------------------------------------------------------

CleanupStep = Literal["kill", "remove_container", "remove_workspace"]


class CleanupSucceeded(Event, frozen=True, tag="cleanup.succeeded"):
    """One cleanup step done (or found already done: `already_gone`)."""

    category = "cleanup"
    name = "succeeded"
    step: CleanupStep
    resource: str
    duration_s: float
    already_gone: bool = False


class CleanupFailed(Event, frozen=True, tag="cleanup.failed"):
    """A cleanup step failed; `resource` names what is left behind."""

    category = "cleanup"
    name = "failed"
    step: CleanupStep
    resource: str
    duration_s: float
    reason: str
    error_class: str = ""


# --- daemon health -----------------------------------------------------------------------

BreakerStatus = Literal["closed", "open", "half_open"]
ResourceMetric = Literal[
    "cpu_pressure_pct",
    "memory_pressure_pct",
    "io_pressure_pct",
    "cpu_pct",
    "memory_pct",
    "disk_pct",
    "containers",
]
"""The `*_pressure_pct` metrics are Linux's pressure stall information (PSI, last 10 s):
the share of time tasks waited for the CPU, for memory (reclaim), for I/O. They measure
contention, not use; they are None where the kernel has no PSI."""


class BreakerTransition(Event, frozen=True, tag="breaker.transition"):
    """The Docker circuit breaker changed state. `failures` is the count of consecutive
    engine failures when it changed; `reason` says what decided it."""

    category = "breaker"
    name = "transition"
    from_state: BreakerStatus
    to_state: BreakerStatus
    reason: str
    failures: int = 0


class ResourceAlert(Event, frozen=True, tag="resource.alert"):
    """A host metric reached its threshold (published once per crossing)."""

    category = "resource"
    name = "alert"
    metric: ResourceMetric
    value: float
    threshold: float


class ResourceRecovered(Event, frozen=True, tag="resource.recovered"):
    """A host metric that was alerting went back under its threshold (less the hysteresis);
    `threshold` is the alert threshold, `recover_below` the value it had to go under."""

    category = "resource"
    name = "recovered"
    metric: ResourceMetric
    value: float
    threshold: float
    recover_below: float = 0.0


class ResourceSample(Event, frozen=True, tag="resource.sample"):
    """A periodic sample of every host metric, for the trend. `containers` is None when
    Docker could not be asked."""

    category = "resource"
    name = "sample"
    cpu_pct: float
    memory_pct: float
    disk_pct: float
    containers: int | None = None
    under_pressure: bool = False
    cpu_pressure_pct: float | None = None
    memory_pressure_pct: float | None = None
    io_pressure_pct: float | None = None


# --- node and reconciler -----------------------------------------------------------------


class ObservedContainer(Struct, kw_only=True, frozen=True):
    """One container as Docker listed it: its `supervisor.*` labels, Docker's state
    (created, running, paused, restarting, exited, dead, removing) and its creation time in
    epoch seconds."""

    container_id: str
    state: str
    created: float
    labels: dict[str, str] = {}


class ObservedWorkspace(Struct, kw_only=True, frozen=True):
    """One workspace dir on disk; `created` is its modification time in epoch seconds."""

    path: str
    created: float


class NodeInventory(Event, frozen=True, tag="node.inventory"):
    """What the node observed at one reconcile pass: every container carrying
    `supervisor.managed=true` and this node's id (running or not) and every dir under
    `workspace_root`. The listing began at `observed_at` (a resource recorded as created
    before that and absent here is gone). The reconciler's only reading of Docker and the
    disk; every divergence is computed from the projection of these events."""

    category = "node"
    name = "inventory"
    observed_at: datetime | None = None
    workspace_root: str = ""
    containers: tuple[ObservedContainer, ...] = ()
    workspaces: tuple[ObservedWorkspace, ...] = ()
    pass_id: str = ""


class NodeHeartbeat(Event, frozen=True, tag="node.heartbeat"):
    """The instance is alive. Published every `interval_s`; once an instance has published
    one, it is taken as dead when none came for `timeout_s`."""

    category = "node"
    name = "heartbeat"
    role: str = "serve"
    interval_s: float = 0.0
    timeout_s: float = 0.0


class NodeRetired(Event, frozen=True, tag="node.retired"):
    """An operator recorded that node `node_id` is gone for good (`supervisor node retire`):
    its open attempts are closed as lost, and what it left on its engine is abandoned
    (only that node could reach it). `instance_id` is the process that recorded it;
    `open_attempts` the attempts it closed."""

    category = "node"
    name = "retired"
    reason: str = ""
    open_attempts: int = 0


class ReconcileDecision(Event, frozen=True, tag="reconcile.decision"):
    """A divergence the reconciler found and what it orders about it. `rule` names the rule,
    `resource` the container id, workspace path or `<task>/<attempt>`; `evidence_seqs` are
    the `SUP_EVENTS` sequences that prove it (the inventory that observed or missed the
    resource, the terminal event, the last heartbeat...). Unless `dry_run`, a cleanup
    command with `command_id` goes to `SUP_COMMANDS`; its `reconcile.outcome` follows."""

    category = "reconcile"
    name = "decision"
    rule: str
    resource_kind: str
    resource: str
    action: str
    evidence_seqs: tuple[int, ...] = ()
    reason: str = ""
    dry_run: bool = False
    command_id: str | None = None
    resource_task_id: str = NO_TASK
    resource_attempt: int = 0
    since: datetime | None = None
    pass_id: str = ""


ReconcileOutcomeKind = Literal["succeeded", "already_gone", "refused", "failed"]


class ReconcileOutcome(Event, frozen=True, tag="reconcile.outcome"):
    """What the node's command executor did with one delivery of a cleanup command.
    `refused`: the resource is not this node's managed resource (nothing was touched).
    A `failed` outcome with `final` false is retried; `final` closes the command."""

    category = "reconcile"
    name = "outcome"
    command_id: str
    outcome: ReconcileOutcomeKind
    final: bool = True
    delivery: int = 1
    rule: str = ""
    action: str = ""
    resource_kind: str = ""
    resource: str = ""
    resource_task_id: str = NO_TASK
    resource_attempt: int = 0
    decision_id: str = ""
    detail: str = ""


PoolRetireReason = Literal["idle", "aged", "shutdown", "vanished", "failed"]


class PoolParked(Event, frozen=True, tag="pool.parked"):
    """The warm pool made and started `container_id` for `shape` (`schemas.spec.Shape`),
    its empty `workspace` mounted read-only; it waits for a task to adopt it, the parking
    instance's until `pool.adopted` or `pool.retired` (the reconciler's once it is dead)."""

    category = "pool"
    name = "parked"
    container_id: str
    workspace: str
    shape: str
    image: str
    duration_s: float = 0.0


class PoolAdopted(Event, frozen=True, tag="pool.adopted"):
    """An attempt (the envelope's task and attempt) took the parked `container_id`; its
    `container.created{adopted}` and `workspace.created` follow, and from there on the
    container and its workspace are the attempt's, cleaned up as a cold start's."""

    category = "pool"
    name = "adopted"
    container_id: str
    workspace: str
    shape: str
    parked_s: float = 0.0


class PoolRetired(Event, frozen=True, tag="pool.retired"):
    """The pool removed the parked `container_id` (never adopted) and its workspace: `idle`
    (shape unused for `[pool] idle_s`), `aged` (past `max_age_s`), `shutdown`, `vanished`
    (died or removed out of band), `failed` (would not start). `removed` false: the
    removal failed (`error`), a leak the reconciler removes."""

    category = "pool"
    name = "retired"
    container_id: str
    workspace: str
    shape: str
    reason: PoolRetireReason
    removed: bool = True
    error: str | None = None


class CallbackAttempted(Event, frozen=True, tag="callback.attempted"):
    """One delivery of a task's Result to its `callback_url`: `delivery` counts from 1;
    `outcome` is `delivered` (a 2xx answer), `retrying` (again after `next_delay_s`) or
    `gave_up` (the last one allowed failed). `status` is the HTTP status when there was an
    answer, `error` what failed. `terminal_event_id` is the terminal event delivered."""

    category = "callback"
    name = "attempted"
    url: str
    delivery: int
    outcome: Literal["delivered", "retrying", "gave_up"]
    terminal_event_id: str
    status: int | None = None
    error: str | None = None
    next_delay_s: float | None = None
    duration_s: float = 0.0


AnyEvent = (
    SupervisorStarted
    | SupervisorStopped
    | SupervisorSuperseded
    | EmbeddedNatsRestarted
    | TaskSubmitted
    | TaskRejected
    | TaskRefused
    | TaskSucceeded
    | TaskFailed
    | RetryScheduled
    | TaskCancelRequested
    | AttemptStarted
    | AttemptFinished
    | WorkspaceCreated
    | ContainerCreated
    | ContainerStarted
    | KillIssued
    | ContainerExited
    | ErrorRaised
    | CleanupSucceeded
    | CleanupFailed
    | BreakerTransition
    | ResourceAlert
    | ResourceRecovered
    | ResourceSample
    | NodeInventory
    | NodeHeartbeat
    | NodeRetired
    | ReconcileDecision
    | ReconcileOutcome
    | CallbackAttempted
    | PoolParked
    | PoolAdopted
    | PoolRetired
)

EVENT_TYPES: tuple[type[Event], ...] = AnyEvent.__args__
TERMINAL_TASK_EVENTS = (TaskSucceeded, TaskFailed, TaskRejected)

_encoder = msgspec.json.Encoder()
_decoder: msgspec.json.Decoder[AnyEvent] = msgspec.json.Decoder(AnyEvent)


def event_type(event: Event) -> str:
    """The event's `type` tag (msgspec keeps it in the class config, not on the instance)."""
    tag = type(event).__struct_config__.tag
    assert isinstance(tag, str)
    return tag


def encode_event(event: Event) -> bytes:
    return _encoder.encode(event)


def decode_event(data: bytes) -> Event:
    """Decode one event; raises `msgspec.DecodeError` / `msgspec.ValidationError`."""
    try:
        event: Event = _decoder.decode(data)
    except msgspec.ValidationError as e:
        event = _decoder.decode(spec_fields_known(data, e))  # a newer writer's spec
    return event
