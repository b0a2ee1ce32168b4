"""The lifecycle state machine of a task and of the resources of its attempts.

Defined once and used by the executor (which asserts its own transitions), by the projector
(current state) and by the audit (which replays history against it). Pure: no I/O.

Task:      (none) -submitted-> submitted -rejected-> rejected   (none) -rejected-> rejected
           submitted|retrying -attempt.started-> running -attempt.finished-> attempt_done
           attempt_done -retry_scheduled-> retrying
           attempt_done -succeeded|failed-> succeeded|failed
           running -failed-> failed              (an attempt that could not finish, e.g. lost)
Container: (none) -created-> created -started-> running -exited-> exited
           created|running|exited -removed-> removed
Workspace: (none) -created-> present -removed-> removed

Within an attempt, every container/workspace/kill/cleanup/error event is emitted before the
attempt's `attempt.finished`, so no event of an attempt follows its terminal event.
"""

from __future__ import annotations

from typing import Final, Literal

TaskState = Literal[
    "submitted", "running", "attempt_done", "retrying", "succeeded", "failed", "rejected"
]
ContainerState = Literal["created", "running", "exited", "removed"]
WorkspaceState = Literal["present", "removed"]

TERMINAL_TASK_STATES: Final[frozenset[str]] = frozenset({"succeeded", "failed", "rejected"})

_TASK: Final[dict[tuple[str | None, str], TaskState]] = {
    (None, "task.submitted"): "submitted",
    ("submitted", "task.rejected"): "rejected",
    (None, "task.rejected"): "rejected",  # refused before it was accepted (spec, policy)
    ("submitted", "attempt.started"): "running",
    ("retrying", "attempt.started"): "running",
    ("running", "attempt.finished"): "attempt_done",
    ("attempt_done", "task.retry_scheduled"): "retrying",
    ("attempt_done", "task.succeeded"): "succeeded",
    ("attempt_done", "task.failed"): "failed",
    ("running", "task.failed"): "failed",
    ("retrying", "task.failed"): "failed",
}

_CONTAINER: Final[dict[tuple[str | None, str], ContainerState]] = {
    (None, "container.created"): "created",
    ("created", "container.started"): "running",
    ("running", "container.exited"): "exited",
    ("created", "container.exited"): "exited",
    ("created", "removed"): "removed",
    ("running", "removed"): "removed",
    ("exited", "removed"): "removed",
}

_WORKSPACE: Final[dict[tuple[str | None, str], WorkspaceState]] = {
    (None, "workspace.created"): "present",
    ("present", "removed"): "removed",
}

TASK_EVENT_TYPES: Final[frozenset[str]] = frozenset(t for _, t in _TASK)


class InvalidTransition(ValueError):
    def __init__(self, machine: str, state: str | None, event_type: str) -> None:
        self.machine = machine
        self.state = state
        self.event_type = event_type
        super().__init__(f"{machine}: no transition from {state or '(none)'} on {event_type}")


def next_task_state(state: str | None, event_type: str) -> TaskState:
    """The task's state after `event_type`; raises InvalidTransition if it cannot happen."""
    try:
        return _TASK[(state, event_type)]
    except KeyError:
        raise InvalidTransition("task", state, event_type) from None


def next_container_state(state: str | None, event_type: str) -> ContainerState:
    """`event_type` is a container event type, or "removed" for a successful removal step."""
    try:
        return _CONTAINER[(state, event_type)]
    except KeyError:
        raise InvalidTransition("container", state, event_type) from None


def next_workspace_state(state: str | None, event_type: str) -> WorkspaceState:
    try:
        return _WORKSPACE[(state, event_type)]
    except KeyError:
        raise InvalidTransition("workspace", state, event_type) from None


def is_terminal(state: str | None) -> bool:
    return state in TERMINAL_TASK_STATES
