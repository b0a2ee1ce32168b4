"""The current-state tables, each declared once (`projections.store.rules`): which events
touch which key and how each column is made of them. The set-based `MERGE`s of
`projections.store.apply` and the Python folds of `projections.store.batch_fold` are both made
from these declarations. Pure: no I/O.

A table's columns are listed in the order of its DDL (`projections.store.ddl`); a test
holds the two equal.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Final

from projections.store.machine import (
    ATTEMPT_STEPS,
    CONTAINER_STEPS,
    TASK_TARGET_STATE,
    TERMINAL_TASK_TYPES,
    WORKSPACE_STEPS,
    attempt_finish_applies,
    sql_attempt_finish_applies,
    sql_task_state_case,
    sql_terminal_applies,
    terminal_applies,
)
from projections.store.rules import (
    Category,
    Coalesce,
    Col,
    Const,
    Count,
    Derived,
    Ev,
    F,
    FieldIn,
    FirstSet,
    Fn,
    Furthest,
    Group,
    Hidden,
    IsKind,
    Key,
    Last,
    LastSet,
    Looked,
    Lookup,
    Old,
    Owner,
    OwnerOf,
    Positive,
    Rule,
    Table,
    Take,
    all_of,
    is_type,
    not_type,
)
from schemas import NO_TASK

ATTEMPT_CATEGORIES: Final[tuple[str, ...]] = (
    "attempt",
    "workspace",
    "container",
    "cleanup",
    "error",
)
"""Categories whose events (with attempt >= 1) belong to an attempt; task.* events of an
attempt (retry_scheduled, the terminal event) are task-level."""

CONTAINER_CLEANUP_STEPS: Final[tuple[str, ...]] = ("kill", "remove_container")
"""The cleanup steps whose `resource` is a container."""

TASK_SCOPE: Final = "task_scope"
"""An input of `steps_for` besides the staging kinds: some event of the batch names a task."""

ATTEMPT_SCOPE: Final = "attempt_scope"
"""Another: some event of the batch belongs to an attempt (`ATTEMPT_CATEGORIES`, attempt >= 1)."""

_EPOCH: Final = datetime(1970, 1, 1)


def _deadline(seconds: float) -> datetime | None:
    # The SQL cast rounds half to even, as `round` does.
    return _EPOCH + timedelta(microseconds=round(seconds * 1e6)) if seconds > 0 else None


def _sql_deadline(column: str) -> str:
    return f"CASE WHEN {column} > 0 THEN make_timestamp(({column} * 1e6)::BIGINT) END"


_TASK_STATE = Fn("type", TASK_TARGET_STATE.get, sql_task_state_case)
"""The state a task is in right after an event of this type (None: not a task event)."""

SEQ, AT = F("seq"), F("occurred_at")

# --- tasks ---------------------------------------------------------------------------------

_SUBMITTED = Group("submitted", IsKind("submitted"), guard="submitted_seq")
_FINISHED = Group(
    "finished",
    all_of(
        IsKind("terminal"),
        # Whether the terminal event may end the task, given the attempt it claims.
        Rule(
            terminal_applies,
            sql_terminal_applies,
            (
                Ev("attempt"),
                Ev("instance_id"),
                Ev("seq"),
                Looked("instance_id"),
                Looked("finished_seq"),
                Ev("proof"),
            ),
        ),
    ),
    guard="finished_seq",
)

TASKS: Final = Table(
    name="tasks",
    keys=("task_id",),
    sources=((FieldIn("task_id", (NO_TASK,), negate=True), (F("task_id"),)),),
    columns=(
        ("task_id", Key()),
        ("state", Derived(Coalesce((Col("outcome"), Hidden("last_state"), Old("state"))))),
        ("outcome", Take(_FINISHED, _TASK_STATE)),
        ("priority", Take(_SUBMITTED, F("priority"))),
        ("image", Take(_SUBMITTED, F("image"))),
        ("node_id", Owner()),
        ("correlation_id", Owner()),
        ("max_attempts", Take(_SUBMITTED, F("max_attempts"))),
        ("attempts", Count(is_type("attempt.started"))),
        ("submitted_at", Take(_SUBMITTED, AT)),
        ("submitted_seq", Take(_SUBMITTED, SEQ)),
        ("finished_at", Take(_FINISHED, AT)),
        ("finished_seq", Take(_FINISHED, SEQ)),
        ("exit_code", Take(_FINISHED, F("exit_code"))),
        ("error_type", Take(_FINISHED, F("error_type"))),
        ("error_code", Take(_FINISHED, F("error_code"))),
        ("duration_s", Take(_FINISHED, F("duration_s"))),
        ("terminal_events", Count(is_type(*TERMINAL_TASK_TYPES))),
        ("first_seq", FirstSet(None, SEQ)),
        ("last_seq", Last(SEQ)),
        ("last_event_at", Last(AT)),
        ("events", Count()),
    ),
    # The state of the task's latest event that moves it, its end excepted (the end
    # counts only when it applies: `outcome`).
    hidden=(("last_state", LastSet(not_type(*TERMINAL_TASK_TYPES), _TASK_STATE, stored=False)),),
    lookup=Lookup(
        "attempts",
        on=(("task_id", F("task_id")), ("attempt", F("attempt"))),
        when=all_of(IsKind("terminal"), Positive("attempt")),
    ),
    kinds=("submitted", "terminal"),
    reads=(TASK_SCOPE,),
)

# --- attempts ------------------------------------------------------------------------------

_STARTED = Group("started", is_type("attempt.started"), guard="started_seq")
_ENDED = Group(
    "ended",
    all_of(
        is_type("attempt.finished"),
        # Only its owner may finish an attempt, or another instance closing it as lost.
        Rule(
            attempt_finish_applies,
            sql_attempt_finish_applies,
            (Ev("instance_id"), OwnerOf("instance_id"), Ev("error_type"), Ev("proof")),
        ),
    ),
    guard="finished_seq",
)

ATTEMPTS: Final = Table(
    name="attempts",
    keys=("task_id", "attempt"),
    sources=(
        (
            all_of(Positive("attempt"), Category(ATTEMPT_CATEGORIES)),
            (F("task_id"), F("attempt")),
        ),
    ),
    columns=(
        ("task_id", Key()),
        ("attempt", Key()),
        ("state", Derived(Coalesce((Furthest(ATTEMPT_STEPS), Const("unknown"))))),
        ("outcome", Take(_ENDED, F("outcome"))),
        ("node_id", Owner()),
        ("instance_id", Owner()),
        ("max_attempts", Take(_STARTED, F("max_attempts"))),
        ("started_at", Take(_STARTED, AT)),
        ("started_seq", Take(_STARTED, SEQ)),
        ("finished_at", Take(_ENDED, AT)),
        ("finished_seq", Take(_ENDED, SEQ)),
        ("exit_code", Take(_ENDED, F("exit_code"))),
        ("error_type", Take(_ENDED, F("error_type"))),
        ("error_code", Take(_ENDED, F("error_code"))),
        ("duration_s", Take(_ENDED, F("duration_s"))),
        ("container_id", FirstSet(is_type("container.created"), F("container_id"))),
        ("workspace", FirstSet(IsKind("workspace"), F("path"))),
        ("kill_reason", FirstSet(is_type("container.kill_issued"), F("kill_reason"))),
        ("first_seq", FirstSet(None, SEQ)),
        ("last_seq", Last(SEQ)),
        ("events", Count()),
    ),
    kinds=("attempt", "container", "workspace"),
    reads=(ATTEMPT_SCOPE,),
)

# --- containers and workspaces -------------------------------------------------------------

_OWNER: Final = tuple((c, Owner()) for c in ("task_id", "attempt", "node_id", "instance_id"))
_FAILED = is_type("cleanup.failed")
_CLEANUP_TAIL: Final = (
    ("cleanup_failures", Count(_FAILED)),
    ("last_cleanup_error", LastSet(_FAILED, F("reason"))),
    ("first_seq", FirstSet(None, SEQ)),
    ("last_seq", Last(SEQ)),
)

_CREATED = Group("created", is_type("container.created"), guard="created_seq")
_EXITED = Group("exited", is_type("container.exited"), guard="exited_at")
_REMOVED = Group(
    "removed",
    all_of(is_type("cleanup.succeeded"), FieldIn("step", ("remove_container",))),
    guard="removed_seq",
)

CONTAINERS: Final = Table(
    name="containers",
    keys=("container_id",),
    sources=(
        (IsKind("container"), (F("container_id"),)),
        (all_of(IsKind("cleanup"), FieldIn("step", CONTAINER_CLEANUP_STEPS)), (F("resource"),)),
    ),
    columns=(
        ("container_id", Key()),
        ("state", Derived(Furthest(CONTAINER_STEPS))),
        *_OWNER,
        ("image", Take(_CREATED, F("image"))),
        ("deadline", Take(_CREATED, Fn("deadline", _deadline, _sql_deadline))),
        ("created_at", Take(_CREATED, AT)),
        ("created_seq", Take(_CREATED, SEQ)),
        ("started_at", FirstSet(is_type("container.started"), AT)),
        ("exited_at", Take(_EXITED, AT)),
        ("exit_code", Take(_EXITED, F("exit_code"))),
        ("oom_killed", Take(_EXITED, F("oom_killed"))),
        ("kill_reason", FirstSet(is_type("container.kill_issued"), F("kill_reason"))),
        ("removed_at", Take(_REMOVED, AT)),
        ("removed_seq", Take(_REMOVED, SEQ)),
        ("already_gone", Take(_REMOVED, F("already_gone"))),
        *_CLEANUP_TAIL,
    ),
    kinds=("container", "cleanup"),
    reads=("container", "cleanup"),
)

_WS_CREATED = Group("created", is_type("workspace.created"), guard="created_seq")
_WS_REMOVED = Group("removed", is_type("cleanup.succeeded"), guard="removed_seq")

WORKSPACES: Final = Table(
    name="workspaces",
    keys=("path",),
    sources=(
        (IsKind("workspace"), (F("path"),)),
        (all_of(IsKind("cleanup"), FieldIn("step", ("remove_workspace",))), (F("resource"),)),
    ),
    columns=(
        ("path", Key()),
        ("state", Derived(Furthest(WORKSPACE_STEPS))),
        *_OWNER,
        ("files", Take(_WS_CREATED, F("files"))),
        ("bytes", Take(_WS_CREATED, F("bytes"))),
        ("created_at", Take(_WS_CREATED, AT)),
        ("created_seq", Take(_WS_CREATED, SEQ)),
        ("removed_at", Take(_WS_REMOVED, AT)),
        ("removed_seq", Take(_WS_REMOVED, SEQ)),
        ("already_gone", Take(_WS_REMOVED, F("already_gone"))),
        *_CLEANUP_TAIL,
    ),
    kinds=("workspace", "cleanup"),
    reads=("workspace", "cleanup"),
)

# --- instances -----------------------------------------------------------------------------

_BOOT = Group("boot", is_type("supervisor.started"), guard="started_seq")
_STOP = Group("stop", is_type("supervisor.stopped"), guard="stopped_seq")
_BEAT = Group("beat", is_type("node.heartbeat"), latest=True)

INSTANCES: Final = Table(
    name="instances",
    keys=("instance_id",),
    sources=((None, (F("instance_id"),)),),
    columns=(
        ("instance_id", Key()),
        ("node_id", Owner()),
        ("role", FirstSet(is_type("supervisor.started", "node.heartbeat"), F("role"))),
        ("pid", Take(_BOOT, F("pid"))),
        ("started_at", Take(_BOOT, AT)),
        ("started_seq", Take(_BOOT, SEQ)),
        ("stopped_at", Take(_STOP, AT)),
        ("stopped_seq", Take(_STOP, SEQ)),
        ("heartbeats", Count(is_type("node.heartbeat"))),
        ("last_heartbeat_at", Take(_BEAT, AT)),
        ("last_heartbeat_seq", Take(_BEAT, SEQ)),
        ("heartbeat_timeout_s", Take(_BEAT, F("timeout_s"))),
        ("first_seq", FirstSet(None, SEQ)),
        ("last_seq", Last(SEQ)),
        ("last_event_at", Last(AT)),
        ("events", Count()),
    ),
    kinds=("instance",),
    reads=("batch",),
)

TABLES: Final[tuple[Table, ...]] = (ATTEMPTS, TASKS, CONTAINERS, WORKSPACES, INSTANCES)
"""In the order they are applied: attempts before tasks, whose ends look up their attempt."""
