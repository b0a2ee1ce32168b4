"""What the read side derives from the lifecycle state machine (`schemas.lifecycle`).

The machine is defined once, there; this module only reads it through its public API. In
the task machine every event type leads to one state whatever the state it leaves (that is
what lets the projector derive a task's state set-wise, from its latest event); the
derivation below checks that property and fails loudly at import if the machine ever
loses it. Pure: no I/O.
"""

from __future__ import annotations

from typing import Final, get_args

from schemas.lifecycle import (
    CLOSING_ERROR_TYPE,
    CONTAINER_PROGRESSION,
    TASK_EVENT_TYPES,
    WORKSPACE_PROGRESSION,
    InvalidTransition,
    TaskState,
    attempt_finish_applies,
    is_terminal,
    next_task_state,
    sql_attempt_finish_applies,
    sql_terminal_applies,
    terminal_applies,
)

__all__ = [
    "CLOSING_ERROR_TYPE",
    "attempt_finish_applies",
    "sql_attempt_finish_applies",
    "sql_terminal_applies",
    "terminal_applies",
]


def _targets() -> dict[str, str]:
    targets: dict[str, str] = {}
    for event_type in sorted(TASK_EVENT_TYPES):
        found: set[str] = set()
        for state in (None, *get_args(TaskState)):
            try:
                found.add(next_task_state(state, event_type))
            except InvalidTransition:
                continue
        if len(found) != 1:
            raise RuntimeError(f"lifecycle: {event_type} leads to {sorted(found)}, not one state")
        targets[event_type] = found.pop()
    return targets


TASK_TARGET_STATE: Final[dict[str, str]] = _targets()
"""Task event type -> the state the task is in right after it."""

TERMINAL_TASK_TYPES: Final[tuple[str, ...]] = tuple(
    sorted(t for t, s in TASK_TARGET_STATE.items() if is_terminal(s))
)
"""The task event types that end a task (task.succeeded, task.failed, task.rejected)."""


def task_state_after(event_type: str) -> str:
    """The state a task is in right after `event_type`; KeyError for a non-task event."""
    return TASK_TARGET_STATE[event_type]


def sql_in(values: tuple[str, ...] | list[str]) -> str:
    """`('a', 'b')` for a SQL IN list of known, quote-free literals."""
    assert all("'" not in v for v in values)
    return "(" + ", ".join(f"'{v}'" for v in values) + ")"


def sql_task_state_case(column: str) -> str:
    """A SQL CASE mapping the event type in `column` to the task state after it (NULL for
    events that do not move the task machine)."""
    arms = " ".join(f"WHEN '{t}' THEN '{s}'" for t, s in sorted(TASK_TARGET_STATE.items()))
    return f"CASE {column} {arms} END"


# --- who may finish an attempt: `schemas.lifecycle` (the rule, in Python and SQL) --------

# --- how far an attempt, a container or a workspace got ----------------------------------
#
# Their state is the furthest step of their machine (`schemas.lifecycle`) that the history
# shows; each step is known from one column of the row (the seq or time it happened). Each
# table is (state, column) from the first step to the last, in the machine's order.


def _steps(progression: tuple[str, ...], columns: dict[str, str]) -> tuple[tuple[str, str], ...]:
    if set(progression) != set(columns):
        raise RuntimeError(f"lifecycle: states {progression} but columns for {sorted(columns)}")
    return tuple((state, columns[state]) for state in progression)


CONTAINER_STEPS: Final = _steps(
    CONTAINER_PROGRESSION,
    {
        "created": "created_seq",
        "running": "started_at",
        "exited": "exited_at",
        "removed": "removed_seq",
    },
)
WORKSPACE_STEPS: Final = _steps(
    WORKSPACE_PROGRESSION, {"present": "created_seq", "removed": "removed_seq"}
)
ATTEMPT_STEPS: Final[tuple[tuple[str, str], ...]] = (
    ("running", "started_seq"),
    ("finished", "finished_seq"),
)
"""An attempt is `running` once started and `finished` once ended (`unknown` before)."""
