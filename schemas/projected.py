"""The projected state the divergence rules read: one node's latest inventory and the
lifecycle of its containers, workspaces, attempts, tasks and instances, as plain frozen
values. `supervisor.reconcile.reconciler.StateSource` builds it from the projection. Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import PurePosixPath
from typing import Final

from schemas import labels as L

RUNNING_STATES: Final = frozenset({"running", "restarting", "paused"})


# --- observed -----------------------------------------------------------------------------


@dataclass(frozen=True)
class SeenContainer:
    """A container of the latest inventory, its labels parsed (see `seen_container`)."""

    container_id: str
    state: str
    created_at: datetime
    task_id: str | None = None
    attempt: int | None = None
    instance_id: str | None = None
    deadline: datetime | None = None
    managed: bool = True
    node_id: str | None = None

    @property
    def running(self) -> bool:
        return self.state in RUNNING_STATES


@dataclass(frozen=True)
class SeenWorkspace:
    path: str
    created_at: datetime
    task_id: str | None = None
    attempt: int | None = None


@dataclass(frozen=True)
class Inventory:
    """The node's latest `node.inventory`: its stream sequence, when its listing began."""

    seq: int
    observed_at: datetime
    workspace_root: str = ""
    containers: Mapping[str, SeenContainer] = field(default_factory=dict)
    workspaces: Mapping[str, SeenWorkspace] = field(default_factory=dict)


@dataclass(frozen=True)
class ContainerRecord:
    """A container as the lifecycle records it; `failed_*` is its last `cleanup.failed`."""

    container_id: str
    task_id: str
    attempt: int
    node_id: str
    instance_id: str
    created_seq: int | None = None
    created_at: datetime | None = None
    deadline: datetime | None = None
    removed_seq: int | None = None
    failed_seq: int | None = None
    failed_at: datetime | None = None


@dataclass(frozen=True)
class WorkspaceRecord:
    path: str
    task_id: str
    attempt: int
    node_id: str
    instance_id: str
    created_seq: int | None = None
    created_at: datetime | None = None
    removed_seq: int | None = None
    failed_seq: int | None = None
    failed_at: datetime | None = None


@dataclass(frozen=True)
class AttemptRecord:
    task_id: str
    attempt: int
    node_id: str
    instance_id: str
    started_seq: int | None = None
    started_at: datetime | None = None
    finished_seq: int | None = None
    finished_at: datetime | None = None


@dataclass(frozen=True)
class TaskRecord:
    task_id: str
    state: str | None
    last_seq: int
    last_event_at: datetime
    finished_seq: int | None = None
    finished_at: datetime | None = None
    correlation_id: str = ""


@dataclass(frozen=True)
class InstanceRecord:
    """A supervisor process: `role` from its `supervisor.started` (serve, run, ...), its last
    heartbeat and the timeout it declared, and its `supervisor.stopped` if any."""

    instance_id: str
    node_id: str
    role: str | None = None
    started_seq: int | None = None
    stopped_seq: int | None = None
    stopped_at: datetime | None = None
    heartbeat_seq: int | None = None
    heartbeat_at: datetime | None = None
    heartbeat_timeout_s: float | None = None


@dataclass(frozen=True)
class ParkedRecord:
    """A warm pool's container no attempt adopted, not removed: `parked` (its instance's
    until that instance dies) or `retire_failed` (its pool gave it up, the removal failed)."""

    container_id: str
    workspace: str
    node_id: str
    instance_id: str
    parked_seq: int
    parked_at: datetime
    state: str = "parked"
    retired_seq: int | None = None
    retired_at: datetime | None = None


@dataclass(frozen=True)
class ProjectedState:
    """Everything the rules read about one node. `open_commands` are the command ids of
    decisions in the log with no final outcome yet; `finals` counts the final outcomes of
    each (action, resource), which makes the next command for it a new one, and
    `finals_at` holds when the last of them was recorded."""

    node_id: str
    inventory: Inventory
    containers: Mapping[str, ContainerRecord] = field(default_factory=dict)
    workspaces: Mapping[str, WorkspaceRecord] = field(default_factory=dict)
    attempts: Mapping[tuple[str, int], AttemptRecord] = field(default_factory=dict)
    tasks: Mapping[str, TaskRecord] = field(default_factory=dict)
    instances: Mapping[str, InstanceRecord] = field(default_factory=dict)
    open_commands: frozenset[str] = frozenset()
    finals: Mapping[tuple[str, str], int] = field(default_factory=dict)
    finals_at: Mapping[tuple[str, str], datetime] = field(default_factory=dict)
    self_instance: str | None = None
    parked: Mapping[str, ParkedRecord] = field(default_factory=dict)


# --- labels and names ---------------------------------------------------------------------


def seen_container(
    container_id: str, state: str, created: float, labels: Mapping[str, str]
) -> SeenContainer:
    """A listed container with its `supervisor.*` labels parsed; a malformed number reads
    as absent."""
    attempt: int | None
    try:
        attempt = int(labels[L.ATTEMPT])
    except (KeyError, ValueError):
        attempt = None
    deadline: datetime | None
    try:
        deadline = datetime.fromtimestamp(float(labels[L.DEADLINE]), UTC)
    except (KeyError, ValueError, OverflowError, OSError):
        deadline = None
    return SeenContainer(
        container_id=container_id,
        state=state,
        created_at=datetime.fromtimestamp(created, UTC),
        task_id=labels.get(L.TASK),
        attempt=attempt,
        instance_id=labels.get(L.INSTANCE),
        deadline=deadline,
        managed=labels.get(L.MANAGED) == "true",
        node_id=labels.get(L.NODE),
    )


def workspace_owner(path: str) -> tuple[str | None, int | None]:
    """(task, attempt) from a workspace dir named `<task>.<attempt>.<random>`."""
    parts = PurePosixPath(path).name.rsplit(".", 2)
    if len(parts) != 3:
        return None, None
    try:
        return parts[0], int(parts[1])
    except ValueError:
        return parts[0], None
